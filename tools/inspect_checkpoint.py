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

from lrulm import checkpoint as ckpt_lib


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def _locate(path: str, step: int | None) -> tuple[str, int | None]:
    """(the checkpoints directory, step) from a workdir, its checkpoints directory or one
    checkpoint's directory (whose name is the step)."""
    path = os.path.normpath(path)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return os.path.join(path, "checkpoints"), step
    name = os.path.basename(path)
    if name.isdigit() and os.path.isdir(os.path.join(path, "state")):
        if step is not None and step != int(name):
            raise ValueError(f"{path} is the checkpoint of step {name}, not {step}")
        return os.path.dirname(path), int(name)
    if os.path.isdir(path) and any(d.isdigit() for d in os.listdir(path)):
        return path, step
    raise FileNotFoundError(
        f"{path} is no workdir (no checkpoints/ in it), checkpoints directory or checkpoint"
    )


def describe(workdir: str, step: int | None = None, show_all: bool = False) -> str:
    """The text the tool prints: workdir may also be its checkpoints directory or one
    checkpoint's directory."""
    directory, step = _locate(workdir, step)
    steps = sorted(int(d) for d in os.listdir(directory) if d.isdigit())
    if not steps:
        raise FileNotFoundError(f"{directory} holds no checkpoints")
    lines = [f"{directory}: steps {steps}"]
    step = steps[-1] if step is None else step
    if step not in steps:
        raise ValueError(f"no checkpoint at step {step}; there are {steps}")
    path = os.path.join(directory, str(step))
    items = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    lines.append(f"step {step} ({_fmt_bytes(_dir_bytes(path))}): items {items}")
    meta_file = os.path.join(path, "metadata", "metadata")
    if os.path.exists(meta_file):
        with open(meta_file) as f:
            meta = json.load(f)
        lines.append(f"  written by lrulm {meta.get('lrulm_version')} on mesh {meta.get('mesh')}")
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
    args = p.parse_args()
    try:
        print(describe(args.workdir, args.step, args.all))
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"inspect_checkpoint: {e}")


if __name__ == "__main__":
    main()
