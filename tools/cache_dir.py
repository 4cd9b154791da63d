"""Lists a shared data.cache_dir and removes what no run will read again.

    python tools/cache_dir.py DIR                      # every entry: kind, size, sources, last use
    python tools/cache_dir.py DIR --prune              # remove entries of edited or deleted files
    python tools/cache_dir.py DIR --prune --unused_days 30   # and entries unused for 30 days

Runs given `--config.data.cache_dir=DIR` keep there one tokenizer per corpus and vocabulary
size and one tokenized copy of each split, named by their content: an edited corpus gets new
entries and the old ones stay. Each entry records the files it was made from (path, size,
modification time); an entry whose files changed or were deleted is not read by a run
started since, and `--prune` removes it. Entries made before the record was kept, or whose
files cannot be read from here (a corpus not mounted on this machine), are "unknown" and kept
(unless unused for `--unused_days`). Each run's start marks the entries it reads used (their
files' modification time). Temporary files of runs killed while writing (a day old) go too.

A run reopens its entries while it runs (each evaluation, each data worker): prune when no run
still running started before its corpus was edited, and give `--unused_days` more than your
longest run.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

import tool_args

from lrulm.data import cache as data_cache


def entries(directory: str) -> list[dict]:
    """Each entry of a cache dir: name, kind ("split" or "tokenizer"), its files, bytes,
    sources state (data_cache.sources_state) and last use (seconds since the epoch)."""
    out = []
    for meta_path in sorted(glob.glob(os.path.join(directory, "*.meta.json"))):
        if "fingerprint" not in _read(meta_path):  # e.g. a prepared shard set's record
            continue
        stem = meta_path.removesuffix(".meta.json")
        files = [meta_path] + [p for p in (stem + ".tokens.npy",) if os.path.exists(p)]
        out.append(_entry(os.path.basename(stem), "split", files, meta_path))
    for model in sorted(glob.glob(os.path.join(directory, "tokenizer-*.model"))):
        record = model.removesuffix(".model") + ".json"
        files = [model] + [record] * os.path.exists(record)
        out.append(_entry(os.path.basename(model), "tokenizer", files, record, used=model))
    for tmp in sorted(glob.glob(os.path.join(directory, "*.tmp*"))):  # a killed run's
        entry = {"name": os.path.basename(tmp), "kind": "temporary", "files": [tmp]}
        entry.update(bytes=os.path.getsize(tmp), sources="-", used=os.path.getmtime(tmp))
        out.append(entry)
    return out


def _read(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _entry(name, kind, files, record_path, used=None) -> dict:
    sources = _read(record_path).get("sources")
    return {
        "name": name,
        "kind": kind,
        "files": files,
        "bytes": sum(os.path.getsize(p) for p in files),
        "sources": data_cache.sources_state(sources),
        "used": os.path.getmtime(used or record_path),
    }


def stale(entry: dict, unused_days: float | None, now: float) -> bool:
    if entry["sources"] in ("changed", "gone"):
        return True
    if entry["kind"] == "temporary" and now - entry["used"] > 86400:
        return True  # a run writing it would have renamed it long since
    return unused_days is not None and now - entry["used"] > unused_days * 86400


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("directory", help="a data.cache_dir")
    p.add_argument("--prune", action="store_true", help="remove the stale entries listed")
    p.add_argument(
        "--unused_days",
        type=float,
        default=None,
        help="with --prune, also entries not read for this many days (default: keep them)",
    )
    args = tool_args.show_defaults(p).parse_args(argv)
    if not os.path.isdir(args.directory):
        p.error(f"{args.directory} is not a directory")
    if args.unused_days is not None and not args.prune:
        p.error("--unused_days goes with --prune")
    now = time.time()
    found = entries(args.directory)
    removed = 0
    for e in found:
        drop = args.prune and stale(e, args.unused_days, now)
        days = (now - e["used"]) / 86400
        print(
            f"{'removed ' if drop else ''}{e['kind']:9s} {e['name']:48s} "
            f"{e['bytes'] / 2**20:9.1f} MiB  sources {e['sources']:7s}  used {days:.1f} days ago"
        )
        if drop:
            for path in e["files"]:
                os.remove(path)
            removed += e["bytes"]
    if not found and os.listdir(args.directory):  # entries or nothing: a cache dir
        workdir = os.path.exists(os.path.join(args.directory, "config.json"))
        print(
            f"cache_dir: {args.directory} is a run's workdir, not a data.cache_dir (its own "
            "cache, WORKDIR/data, goes with the run)" if workdir else
            f"cache_dir: {args.directory} holds no cache entries (the *.meta.json files runs "
            f"given --config.data.cache_dir={args.directory} write): not a data.cache_dir?",
            file=sys.stderr,
        )  # fmt: skip
    total = sum(e["bytes"] for e in found)
    print(
        f"{len(found)} entries, {total / 2**20:.1f} MiB"
        + (f"; removed {removed / 2**20:.1f} MiB" if args.prune else ""),
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
