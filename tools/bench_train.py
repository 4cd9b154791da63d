"""Training-step throughput of an LM preset: tokens/s, step time, MFU, peak memory.

    python tools/bench_train.py --preset tiny --batch 16 --seq_len 256
    python tools/bench_train.py --preset 350m --batch 8 --seq_len 2048 --json out.json  # one H100

Runs the real jitted train step (the same one `lrulm train` runs, via lrulm.train.build
and jit_steps) on random tokens over all local devices (data parallel unless --mesh says
otherwise). MFU = flops_per_token x tokens/s / (devices x peak bf16 FLOP/s); the FLOP count
is ModelConfig.flops_per_token (6 x matmul weights + the recurrence), stated in the output.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from lrulm import config as config_lib
from lrulm import metrics, tasks, train


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--dtype", default="")
    p.add_argument("--remat", default="")
    p.add_argument("--scan_method", default="")
    p.add_argument("--mesh", default="data=-1", help="e.g. data=2,fsdp=4")
    p.add_argument(
        "--model",
        default="",
        help="model field overrides, e.g. num_layers=6,d_state=256,d_ff=0,norm=layer",
    )
    p.add_argument("--json", default="")
    args = p.parse_args()

    config = config_lib.base_config()
    config.model.preset = args.preset
    for key in ("dtype", "remat", "scan_method"):
        if getattr(args, key):
            config.model[key] = getattr(args, key)
    config.train.global_batch_size, config.train.seq_len = args.batch, args.seq_len
    config.train.steps = 1000
    for pair in filter(None, args.model.split(",")):
        key, value = pair.split("=")
        config_lib.override(config, f"model.{key}", value)
    for pair in args.mesh.split(","):
        axis, size = pair.split("=")
        config.mesh[axis] = int(size)
    config.lock()

    mesh = train.make_mesh(config)
    task = tasks.make_task(config, None, prepare_data=False)
    exp = train.build(config, task, mesh)
    state = jax.jit(exp.init_fn, out_shardings=exp.state_shardings)(jax.random.key(0))
    train_jit, _ = train.jit_steps(exp)
    rng = np.random.default_rng(0)
    vocab = task.model_config.vocab_size
    batch = {
        k: jax.device_put(rng.integers(4, vocab, shape).astype(np.int32), exp.batch_shardings[k])
        for k, (shape, _) in exp.batch_spec.items()
    }
    compiled = train_jit.lower(state, batch).compile()
    mem = compiled.memory_analysis()
    state, m = train_jit(state, batch)  # warm-up
    jax.block_until_ready(m)
    start = time.perf_counter()
    for _ in range(args.steps):
        state, m = train_jit(state, batch)
    jax.block_until_ready(m)
    dt = (time.perf_counter() - start) / args.steps
    tokens = args.batch * args.seq_len
    fpt = task.model_config.flops_per_token(args.seq_len)
    peak = metrics.peak_flops()
    result = {
        "device": jax.devices()[0].device_kind,
        "devices": mesh.devices.size,
        "preset": args.preset,
        "params": task.model_config.num_params(),
        "batch": args.batch,
        "seq_len": args.seq_len,
        "dtype": task.model_config.dtype,
        "scan_method": task.model_config.scan_method,
        "remat": task.model_config.remat,
        "step_time_ms": 1e3 * dt,
        "tokens_per_s": tokens / dt,
        "flops_per_token": fpt,
        "mfu": (fpt * tokens / dt / (peak * mesh.devices.size)) if peak else None,
        "temp_bytes_per_device": getattr(mem, "temp_size_in_bytes", None),
        "argument_bytes_per_device": getattr(mem, "argument_size_in_bytes", None),
        "loss": float(m["train/loss"]),
    }
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        result["peak_bytes_in_use"] = stats["peak_bytes_in_use"]
    print(
        f"{result['preset']} ({result['params'] / 1e6:.1f}M params) on {result['devices']} x "
        f"{result['device']}: batch {args.batch} x {args.seq_len}, {result['dtype']}"
    )
    print(
        f"  step {result['step_time_ms']:.1f} ms, {result['tokens_per_s']:,.0f} tokens/s, "
        f"FLOPs/token {fpt:.3g} (6 x matmul weights + recurrence)"
    )
    print(
        "  MFU "
        + (
            f"{100 * result['mfu']:.1f}%"
            if result["mfu"]
            else "not reported (no peak FLOP/s for this device)"
        )
    )
    print(
        f"  per-device memory: arguments {result['argument_bytes_per_device'] / 2**20:.1f} MiB, "
        f"temporaries {result['temp_bytes_per_device'] / 2**20:.1f} MiB"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
