"""Lists a run's checkpoints, their items, and the parameter tree with shapes and sizes.

    python tools/inspect_checkpoint.py WORKDIR [STEP] [--all]
    python tools/inspect_checkpoint.py WORKDIR/checkpoints/STEP      # or the checkpoints dir

Reads only what Orbax wrote (metadata, not the arrays), so it is quick on any machine,
whatever devices wrote the checkpoint. --all also lists the optimizer state.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import numpy as np
import tool_args

from lrulm import checkpoint as ckpt_lib
from lrulm.main import exit_quietly_on_broken_pipe


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def _locate(path: str, step: int | None) -> tuple[str, list[str], str]:
    """(the directory listed, its checkpoints' names, the one to describe) from a workdir,
    its checkpoints directory or one checkpoint's directory: named by its step, or moved
    aside as damaged (corrupt_checkpoints/STEP-TIME)."""
    path = os.path.normpath(path)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")
    name = os.path.basename(path)
    if os.path.isdir(os.path.join(path, "state")):  # one checkpoint
        saved = name.split("-")[0]
        if step is not None and saved.isdigit() and step != int(saved):
            raise ValueError(f"{path} is the checkpoint of step {saved}, not {step}")
        parent = os.path.dirname(path)
        siblings = sorted((d for d in os.listdir(parent) if d.isdigit()), key=int)
        return parent, siblings if name.isdigit() else [name], path
    names = (
        sorted((d for d in os.listdir(path) if d.isdigit()), key=int) if os.path.isdir(path) else []
    )
    if names:
        if step is not None and str(step) not in names:
            raise ValueError(f"no checkpoint at step {step}; there are {list(map(int, names))}")
        return path, names, os.path.join(path, str(step) if step is not None else names[-1])
    if os.path.basename(path) == "checkpoints":
        aside = os.path.join(os.path.dirname(path), "corrupt_checkpoints")
        moved = f"; damaged ones were moved to {aside}" if os.path.isdir(aside) else ""
        raise FileNotFoundError(f"{path} holds no checkpoints{moved}")
    raise FileNotFoundError(
        f"{path} is no workdir (no checkpoints/ in it), checkpoints directory or checkpoint"
    )


def describe(workdir: str, step: int | None = None, show_all: bool = False) -> str:
    """The text the tool prints: workdir may also be its checkpoints directory or one
    checkpoint's directory."""
    directory, names, path = _locate(workdir, step)
    steps = [int(n) if n.isdigit() else n for n in names]
    lines = [f"{directory}: steps {steps}"]
    items = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    lines.append(f"step {os.path.basename(path)} ({_fmt_bytes(_dir_bytes(path))}): items {items}")
    meta_file = os.path.join(path, "metadata", "metadata")
    if os.path.exists(meta_file):
        with open(meta_file) as f:
            try:
                meta = json.load(f)
            except json.JSONDecodeError as e:
                meta = None
                lines.append(f"  metadata {meta_file} does not read ({e}): damaged")
        if meta is not None:
            version, mesh = meta.get("lrulm_version"), meta.get("mesh")
            on = f" on mesh {mesh}" if mesh is not None else ""  # a best/ one keeps none
            lines.append(f"  written by lrulm {version}{on}")
            if "metric" in meta:
                lines.append(f"  the best eval {meta['metric']} so far: {meta.get('best_value')}")
    data_dir = os.path.join(path, "data")
    if os.path.isdir(data_dir):
        for name in sorted(os.listdir(data_dir)):
            if name.startswith("process_"):
                with open(os.path.join(data_dir, name)) as f:
                    try:
                        state = json.load(f)
                    except json.JSONDecodeError as e:
                        state = f"does not read ({e}): damaged"
                lines.append(f"  data iterator {name}: {state}")
    tree = ckpt_lib.saved_tree(os.path.join(path, "state"))
    groups = (
        tree.keys() if show_all else [k for k in ("step", "params", "model_state") if k in tree]
    )
    total = count = 0
    for group in groups:
        leaves = jax.tree_util.tree_flatten_with_path(tree[group])[0]
        if not leaves:
            continue
        lines.append(f"  {group}:")
        for key, leaf in leaves:
            shape = tuple(getattr(leaf, "shape", ()) or ())
            dtype = np.dtype(getattr(leaf, "dtype", np.float32))
            size = int(np.prod(shape)) * dtype.itemsize
            sharding = getattr(leaf, "sharding", None)
            spec = getattr(sharding, "partition_spec", None) or getattr(sharding, "spec", None)
            if group == "params":
                total, count = total + size, count + int(np.prod(shape))
            name = jax.tree_util.keystr(key) or group  # a scalar group (step) has no path
            lines.append(
                f"    {name:60s} {str(shape):18s} {dtype.name:9s} "
                f"{_fmt_bytes(size):>10s}  {spec if spec is not None else ''}"
            )
    lines.append(f"  parameters: {count:,} ({_fmt_bytes(total)})")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("workdir", help="a workdir, its checkpoints/ or one checkpoint's directory")
    p.add_argument("step", nargs="?", type=int)
    p.add_argument("--all", action="store_true", help="include the optimizer state")
    args = tool_args.show_defaults(p).parse_args()
    try:
        text = describe(args.workdir, args.step, args.all)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"inspect_checkpoint: {e}")
    sys.exit(exit_quietly_on_broken_pipe(lambda: print(text)))  # `... | head`


if __name__ == "__main__":
    main()
