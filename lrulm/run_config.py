"""The run's config across processes and starts: every process runs process 0's; a resume
records it in WORKDIR/config.json and says what changed against the checkpoint it resumes
(the schedule's jump, eval metrics that stop being comparable)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os

import jax
import numpy as np

from lrulm import best_checkpoint as best_lib
from lrulm import checkpoint as ckpt_lib
from lrulm import config as config_lib
from lrulm import metrics as metrics_lib
from lrulm import optim, tasks
from lrulm.data import lm as lm_data

# Settings a process may have of its own (reader threads), or that only process 0 acts on.
_PER_PROCESS_KEYS = (
    ("data", "num_threads"),
    ("train", "progress"),
    ("train", "profile_start_step"),
    ("train", "profile_steps"),
)


def check_processes_agree(config) -> None:
    """Every process must run the config process 0 runs (each builds its own from its
    command line): refused on all of them at once, before anything is read or written,
    when any differs (one lr on one host and another on the next trained a mixture)."""
    if jax.process_count() < 2:
        return
    from jax.experimental import multihost_utils

    settings = config_lib.to_dict(config)
    for group, key in _PER_PROCESS_KEYS:  # may differ: each process's own, or process 0's
        settings.get(group, {}).pop(key, None)
    text = json.dumps(settings, sort_keys=True)
    digest = np.frombuffer(hashlib.sha256(text.encode()).digest(), np.uint32)
    every = np.asarray(multihost_utils.process_allgather(digest)).reshape(-1, digest.size)
    differ = [i for i in range(len(every)) if not np.array_equal(every[i], every[0])]
    if differ:
        raise ValueError(
            f"process(es) {', '.join(map(str, differ))} run another config than process 0 "
            "(their resolved configs differ): give every process the same command line"
        )


def _recorded(workdir: str) -> dict:
    """WORKDIR/config.json ({} where there is none or it does not read)."""
    try:
        with open(os.path.join(workdir, "config.json")) as f:
            recorded = json.load(f)
    except (OSError, ValueError):
        return {}
    return recorded if isinstance(recorded, dict) else {}


def check_start(config, workdir: str) -> None:
    """Checks against the workdir, before any data is read or written. A resume must be
    of the run's task; its checkpoint.init_from (which only a new run reads) stays the
    one it started from, said where the command names another. A new run's init_from
    must hold a checkpoint."""
    c = config.checkpoint
    if not ckpt_lib.checkpoint_steps(workdir):
        select = c.get("init_from_params", "")
        optim.check_not_subscript(select, "checkpoint.init_from_params")
        if c.get("init_from", ""):
            directory, step = ckpt_lib.find_checkpoint_dir(c.init_from)  # said at once
            if select:  # patterns that find none of the source's parameters: said now
                saved = ckpt_lib.saved_tree(os.path.join(directory, str(step), ckpt_lib.STATE))
                ckpt_lib.select_params(saved.get("params") or {}, select, f"{c.init_from}'s")
        return
    recorded = _recorded(workdir)
    task = recorded.get("task")
    if task is not None and task != config.task:
        raise ValueError(
            f"{workdir} holds a run of task {task!r} (its config.json), and this config "
            f"trains {config.task!r}; resume it with its own config, or give another "
            "--workdir; nothing was changed"
        )
    started = recorded.get("checkpoint") or {}
    base = started_in(workdir)  # the recorded init_from is relative to where it started
    for key in ("init_from", "init_from_params"):
        given, was = c.get(key, ""), started.get(key, "")
        if key == "init_from" and was and base:
            was = _rebase(was, base)  # as a path from here (config.json then says so)
        same = os.path.realpath(given) == os.path.realpath(was) if key == "init_from" else None
        if given == was or same and given or key not in c:
            continue
        if given and jax.process_index() == 0:
            metrics_lib.say(
                f"lrulm: checkpoint.{key}={given!r} is not read: it starts a new run, and "
                f"{workdir} resumes from its own checkpoints (its run started from "
                f"{was!r}, as config.json keeps)"
            )
        c[key] = was
    _keep_vocab_size(config, workdir, recorded)
    _check_keep_best(config, workdir)


def _keep_vocab_size(config, workdir: str, recorded: dict) -> None:
    """A resume keeps the workdir's tokenizer (the checkpoints' embedding rows are its
    ids), so another data.vocab_size would change nothing but config.json: it keeps the
    run's, and the difference is said."""
    if config.task != "lm" or config.data.get("tokenizer", ""):
        return  # a given tokenizer: data.vocab_size is not read (prepare says so)
    was = (recorded.get("data") or {}).get("vocab_size")
    if was is None or was == config.data.vocab_size:
        return
    # A run that started from a given tokenizer never read data.vocab_size: kept quietly.
    if jax.process_index() == 0 and not (recorded.get("data") or {}).get("tokenizer"):
        metrics_lib.say(
            f"lrulm: data.vocab_size={config.data.vocab_size} is not used: {workdir} resumes "
            f"with its tokenizer (data.vocab_size={was}): its checkpoints' embeddings are "
            "indexed by that tokenizer's ids (for a new vocabulary, train in another "
            "--workdir, e.g. with checkpoint.init_from and init_from_params='^stack/')"
        )
    config.data.vocab_size = was


def _check_keep_best(config, workdir: str) -> None:
    """A resume keeps its best checkpoint by the metric it was kept by: another one would
    replace WORKDIR/best by a checkpoint not better by the old measure (refused); none
    leaves it as it is (said)."""
    kept = best_lib.kept_best(workdir)
    if kept is None:
        return
    metric, value, step = kept
    want = tasks.best_metric(config)
    where = os.path.join(workdir, "best")
    if want is None:
        if jax.process_index() == 0:
            metrics_lib.say(
                f"lrulm: {where} (the best eval {metric}, step {step}) is no longer updated: "
                f"checkpoint.keep_best is unset (set it to {metric!r} to keep it going)"
            )
    elif want[0] != metric:
        raise ValueError(
            f"{where} holds the checkpoint with the best eval {metric} ({value:.4g}, step "
            f"{step}), and this config keeps the best eval {want[0]}: set "
            f"checkpoint.keep_best={metric!r}, or move {where} aside to keep the best "
            f"{want[0]} from here on; nothing was changed"
        )


# model.* settings that leave the train state's tree as it is (how the parameters are
# initialised, or the model computed, not what the state holds): a resume takes them, so a
# refused one does not name them. tests/test_config_and_files_edges.py checks the set
# against the model's tree, field by field.
MODEL_KEYS_OUTSIDE_STATE = frozenset(
    {"dropout", "dropout_over_length", "r_min", "r_max", "max_phase", "dtype", "scan_method",
     "chunk_size", "remat"}
)  # fmt: skip


def state_keys_changed(trained: dict | None, config) -> list[str]:
    """The settings that shape the train state's tree (the model's, optim.no_decay's
    groups of the optimizer state) that differ between a checkpoint's config (`trained`)
    and `config`, as "key: old -> new"."""
    if not trained:
        return []
    now, base = config_lib.to_dict(config), config_lib.to_dict(config_lib.base_config())
    changed = []
    for group, keys in (("model", None), ("optim", ("no_decay", "optimizer"))):
        old, new, default = trained.get(group) or {}, now.get(group) or {}, base.get(group) or {}
        for key in keys or sorted((set(old) | set(new)) - MODEL_KEYS_OUTSIDE_STATE):
            a, b = old.get(key, default.get(key)), new.get(key, default.get(key))
            if a != b:  # a key added to lrulm since: its default, the run's behaviour
                changed.append(f"{group}.{key}: {a!r} -> {b!r}")
    return changed


def trained_config(checkpointer, step: int) -> dict | None:
    """The config checkpoint `step` was saved with (its metadata; config.json can be newer:
    a resume that stopped before its first save rewrote it). None if not recorded."""
    try:
        config = checkpointer.metadata(step).get("config")
    except Exception:  # noqa: BLE001 - unreadable metadata: nothing to compare with
        return None
    return config if isinstance(config, dict) else None


def _schedule_lr(config: dict | None, step: int) -> float | None:
    """The learning-rate schedule's value at step under a config dict (None if unknown)."""
    try:
        o = config["optim"]
        kind, decay = o.get("schedule", "cosine"), o.get("decay_fraction", 0.2)
        steps, final = config["train"]["steps"], o.get("final_lr_fraction", 0.0)
        sched = optim.schedule(o["lr"], steps, o["warmup_fraction"], kind, decay, final)
        return float(sched(step))
    except (KeyError, TypeError, ValueError):
        return None


_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "sentencepiece")


def _git_commit() -> str | None:
    """The commit of the lrulm checkout this runs from (None: an installed copy, no git)."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        top = subprocess.run(
            ["git", "-C", root, "rev-parse", "--show-toplevel"],
            capture_output=True, text=True, timeout=5,
        )  # fmt: skip
        if top.returncode or os.path.realpath(top.stdout.strip()) != os.path.realpath(root):
            return None  # not a checkout of lrulm (e.g. a venv inside another repository)
        out = subprocess.run(
            ["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode or not out.stdout.strip():
        return None
    return out.stdout.strip() + ("+local changes" if dirty.stdout.strip() else "")


def environment(step: int, *, resumed: bool) -> dict:
    """What this start of a run ran with (a line of WORKDIR/starts.jsonl): when, from which
    step, the command, lrulm's version and commit, the packages' versions, the devices."""
    import platform
    import sys
    import time
    from importlib import metadata

    import lrulm

    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    device = jax.devices()[0]
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "step": int(step),
        "resumed": resumed,
        "argv": sys.argv,
        "cwd": os.getcwd(),  # what the config's relative paths are relative to
        "lrulm": lrulm.__version__,
        "commit": _git_commit(),
        "python": platform.python_version(),
        "packages": versions,
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "host": platform.node(),
    }


def started_in(workdir: str) -> str | None:
    """The working directory of the run's last start (WORKDIR/starts.jsonl; None where
    it is not recorded)."""
    try:
        with open(os.path.join(workdir, "starts.jsonl")) as f:
            lines = [line for line in f if line.strip()]
        return json.loads(lines[-1]).get("cwd") if lines else None
    except (OSError, ValueError, AttributeError):
        return None


# A run's settings that are paths (or comma-separated globs) in the file system.
_PATH_KEYS = ("data.train_files", "data.eval_files", "data.tokenizer", "data.data_dir",
              "data.cache_dir", "checkpoint.init_from")  # fmt: skip


def _rebase(globs: str, base: str) -> str:
    """Comma-separated paths or globs, the relative ones joined to base."""

    def one(p):
        p = p.strip()
        return p if not p or os.path.isabs(os.path.expanduser(p)) else os.path.join(base, p)

    return ",".join(one(p) for p in globs.split(","))


def rebase_paths(config, base: str) -> list[str]:
    """Joins the relative paths of a run's config (its files, data_dir, tokenizer,
    cache_dir, init_from) to `base`, the directory the run started in, so that a run's
    config.json read from elsewhere reads the run's files. Returns the keys changed."""
    changed = []
    d = config.data
    for name in _PATH_KEYS:
        group, key = name.split(".")
        node = config[group]
        if node.get(key) and _rebase(node[key], base) != node[key]:
            node[key] = _rebase(node[key], base)
            changed.append(name)
    if d.get("eval_sets"):
        sets = lm_data.parse_eval_sets(d.eval_sets)
        text = ";".join(f"{name}={_rebase(globs, base)}" for name, globs in sets.items())
        if text != ";".join(f"{n}={g}" for n, g in sets.items()):
            d.eval_sets = text
            changed.append("data.eval_sets")
    if d.get("mixture"):
        parts = lm_data.parse_mixture(d.mixture)
        rebased = [(n, _rebase(g, base), w) for n, g, w in parts]
        if rebased != parts:
            d.mixture = ";".join(f"{n}={g}@{w!r}" for n, g, w in rebased)
            changed.append("data.mixture")
    return changed


def evals_incomparable(trained: dict | None, config, split: str | None = None) -> str:
    """Why a resumed run's evaluations score other tokens than those of the checkpoint's
    config (`trained`) did, or "" (or none recorded): other held-out text (its files, or
    the JSON field read), another number of eval batches, or of their size or length where
    only the first batches are scored. split: only what changes that split ("eval", or a
    data.eval_sets name) counts; None: any split."""
    old = (trained or {}).get("train") or {}
    t = config.train
    if not old:
        return ""
    data_changed = _eval_data_changed((trained or {}).get("data") or {}, config, split)
    if data_changed:
        return data_changed
    if old.get("eval_steps", t.eval_steps) != t.eval_steps:
        return f"train.eval_steps {old['eval_steps']} -> {t.eval_steps}"
    for key in ("global_batch_size", "seq_len"):
        if t.eval_steps and old.get(key, t[key]) != t[key]:
            return (
                f"train.eval_steps={t.eval_steps} batches of another train.{key} ({old[key]} "
                f"-> {t[key]}) score other tokens than before"
            )
    return ""


def _eval_data_changed(old: dict, config, split: str | None) -> str:
    """evals_incomparable's part for the held-out data: which setting now names other text."""
    data = config.data
    moved = lambda key: key in old and old[key] != data.get(key)  # noqa: E731
    if moved("text_field"):
        return f"data.text_field {old['text_field']!r} -> {data.text_field!r} reads other text"
    if config.task != "lm":
        return f"data.data_dir {old['data_dir']} -> {data.data_dir}" if moved("data_dir") else ""
    if split in (None, "eval"):
        if moved("eval_files"):
            return f"data.eval_files {old['eval_files']!r} -> {data.eval_files!r}"
        if not data.eval_files and (moved("train_files") or moved("mixture")):
            return (
                "data.eval_files is empty, so the held-out files are every 50th train file, "
                "and data.train_files / data.mixture changed"
            )
    if split != "eval" and moved("eval_sets"):
        before = lm_data.parse_eval_sets(old["eval_sets"] or "")
        now = lm_data.parse_eval_sets(data.eval_sets)
        names = [split] if split else list(dict.fromkeys([*before, *now]))
        differ = [n for n in names if n in before and n in now and before[n] != now[n]]
        if differ:
            return f"data.eval_sets {', '.join(differ)} now names other files"
    return ""


def record(config, workdir: str, trained: dict | None, step: int, *, resumed: bool, task) -> None:
    """Writes config.json and model.json and appends the start to starts.jsonl (process 0;
    `environment`), and says how a resumed run's config
    differs: from config.json, and against `trained` (the resumed checkpoint's own
    config) what that does to the learning rate at `step` and to the eval metrics."""
    # config.json holds the config as given (model.* left unset: the preset's); model.json
    # the model those resolve to, with its parameter count.
    model = {**dataclasses.asdict(task.model_config), "num_params": int(task.num_params())}
    tasks.write_atomic(os.path.join(workdir, "model.json"), json.dumps(model, indent=2))
    with open(os.path.join(workdir, "starts.jsonl"), "a") as f:
        f.write(json.dumps(environment(step, resumed=resumed)) + "\n")
    changed = config_lib.write_run_config(config, workdir, resumed=resumed)
    if changed:
        metrics_lib.say(
            "lrulm: resuming with a config that differs from the run's config.json "
            "(now rewritten): " + "; ".join(changed)
        )
    incomparable = evals_incomparable(trained, config)
    if incomparable:
        metrics_lib.say(
            f"lrulm: {incomparable}: eval metrics before and after this step are not "
            "comparable"
            + " (train.eval_steps=0 scores the whole eval split)"
            * ("eval_steps" in incomparable)
        )
    before, now = _schedule_lr(trained, step), _schedule_lr(config_lib.to_dict(config), step)
    if before is not None and not math.isclose(before, now, rel_tol=1e-3):
        # An extended run's cosine is stretched over the new length: lr goes back up.
        metrics_lib.say(
            f"lrulm: the learning-rate schedule changed with it: at step {step} the "
            f"rate was {before:.3g} and is now {now:.3g}"
        )
