"""Does checkpointing stall training? Step time with a save every step vs with none.

    python tools/bench_checkpoint.py                      # 125m preset: 150M parameters
    python tools/bench_checkpoint.py --preset 125m --steps 6 --json out.json

Runs the real train step (lrulm.experiment.build / jit_steps, random tokens) of an LM preset
and saves the whole train state (parameters + Adam moments: ~12 bytes per parameter)
through lrulm's Checkpointer, asynchronously (the default) and synchronously, every
step. Async saves block the loop only while arrays are copied off the devices; the
write to disk overlaps the next steps (a save waits for the previous one to commit).
On a CPU-only machine the "device" is the CPU itself, so the background write competes
with the step for the same cores: expect a real overlap only on accelerator hosts.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time

import jax
import numpy as np
import tool_args

from lrulm import checkpoint as ckpt_lib
from lrulm import config as config_lib
from lrulm import experiment, tasks, train


def _setup(preset: str, batch: int, seq_len: int):
    config = config_lib.base_config()
    config.model.preset = preset
    config.model.dtype = "float32"
    config.train.global_batch_size, config.train.seq_len = batch, seq_len
    config.lock()
    mesh = experiment.make_mesh(config)
    task = tasks.make_task(config, None, prepare_data=False)
    exp = experiment.build(config, task, mesh)
    state = jax.jit(exp.init_fn, out_shardings=exp.state_shardings)(jax.random.key(0))
    train_jit, _ = train.jit_steps(exp)
    rng = np.random.default_rng(0)
    batch_arrays = {
        k: jax.device_put(
            rng.integers(4, task.model_config.vocab_size, shape).astype(np.int32),
            exp.batch_shardings[k],
        )
        for k, (shape, _) in exp.batch_spec.items()
    }
    return task, state, train_jit, batch_arrays


def _loop(state, train_jit, batch, steps, checkpointer=None):
    state, m = train_jit(state, batch)  # compile, warm up
    jax.block_until_ready(m)
    times, blocked = [], []
    for step in range(1, steps + 1):
        start = time.perf_counter()
        state, m = train_jit(state, batch)
        if checkpointer is not None:
            jax.block_until_ready(state)
            t = time.perf_counter()
            checkpointer.save(step, state)
            blocked.append(time.perf_counter() - t)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - start)
    start = time.perf_counter()
    if checkpointer is not None:
        checkpointer.wait()
    drain = time.perf_counter() - start
    return state, float(np.median(times)), drain, float(np.median(blocked or [0.0]))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="125m")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--json", default="")
    args = tool_args.show_defaults(p).parse_args()
    tool_args.preset(p, args.preset)
    tool_args.positive(p, args, "batch", "seq_len", "steps")
    tool_args.writable(p, args.json)
    task, state, train_jit, batch = _setup(args.preset, args.batch, args.seq_len)
    n = sum(x.size for x in jax.tree.leaves(state["params"]))
    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    result = {
        "preset": args.preset,
        "params": n,
        "state_bytes": nbytes,
        "device": jax.devices()[0].device_kind,
    }
    state, result["no_save_s"], _, _ = _loop(state, train_jit, batch, args.steps)
    for mode, async_save in (("async", True), ("sync", False)):
        workdir = tempfile.mkdtemp(prefix="lrulm_bench_ckpt_")
        checkpointer = ckpt_lib.Checkpointer(workdir, max_to_keep=1, async_save=async_save)
        try:
            state, step_s, drain_s, blocked_s = _loop(
                state, train_jit, batch, args.steps, checkpointer
            )
            result[f"{mode}_save_s"], result[f"{mode}_drain_s"] = step_s, drain_s
            result[f"{mode}_blocked_s"] = blocked_s
        finally:
            checkpointer.close()
            shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"{args.preset}: {n / 1e6:.0f}M parameters, train state {nbytes / 2**30:.2f} GiB, "
        f"{result['device']}, batch {args.batch} x {args.seq_len}"
    )
    print(f"  median step, no saves:          {result['no_save_s']:.3f} s")
    for mode in ("async", "sync"):
        ratio = result[f"{mode}_save_s"] / result["no_save_s"]
        print(
            f"  median step, {mode:5s} save every step: {result[f'{mode}_save_s']:.3f} s "
            f"({ratio:.2f}x; save() blocked {result[f'{mode}_blocked_s']:.2f} s; "
            f"last save committed {result[f'{mode}_drain_s']:.2f} s after)"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
