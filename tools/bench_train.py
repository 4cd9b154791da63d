"""Training-step throughput of an LM preset: tokens/s, step time, MFU, peak memory.

    python tools/bench_train.py --preset tiny --batch 16 --seq_len 256
    python tools/bench_train.py --preset 350m --batch 8 --seq_len 2048 --json out.json  # one H100
    python tools/bench_train.py --preset 125m --profile /tmp/prof  # + a trace of 3 steps

Runs the real jitted train step (the same one `lrulm train` runs, via lrulm.experiment.build
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
import tool_args

from lrulm import config as config_lib
from lrulm import experiment, metrics, tasks, train
from lrulm import scan as scan_lib


def make_config(
    preset: str,
    batch: int,
    seq_len: int,
    *,
    dtype: str = "",
    remat: str = "",
    scan_method: str = "",
    mesh: str = "data=-1",
    model: str = "",
    loss_vocab_block: int = 0,
):
    """The locked experiment config of one benchmark: preset, global batch x seq_len.

    Args:
      preset: a name in lrulm.model_config.PRESETS.
      batch, seq_len: the global batch in sequences, and their length.
      dtype, remat, scan_method: model fields; "" keeps the preset's.
      mesh: axis sizes, e.g. "data=2,fsdp=4".
      model: more model field overrides, e.g. "num_layers=6,d_state=256".
      loss_vocab_block: train.loss_vocab_block (0 = the whole logits at once).
    """
    config = config_lib.base_config()
    config.model.preset = preset
    for key, value in (("dtype", dtype), ("remat", remat), ("scan_method", scan_method)):
        if value:
            config.model[key] = value
    config.train.global_batch_size, config.train.seq_len = batch, seq_len
    config.train.steps = 1000  # the length of the learning-rate schedule only
    config.train.loss_vocab_block = loss_vocab_block
    for pair in filter(None, model.split(",")):
        key, value = pair.split("=")
        config_lib.override(config, f"model.{key}", value)
    for pair in mesh.split(","):
        axis, size = pair.split("=")
        config.mesh[axis] = int(size)
    config.lock()
    return config


PROFILE_STEPS = 3  # traced by --profile, after the timed steps


def run(config, steps: int, devices=None, profile_dir: str = "") -> dict:
    """Compiles the train step of `config`, runs it `steps` times; returns the figures.

    Memory: arguments and temporaries per device from the compiled step's
    memory_analysis(); peak_bytes_in_use from the device's allocator where it has one.
    That peak is the process's: it is reported only where this run raised it (None where
    an earlier run in the process had reached more; run one per process for each figure).
    With `profile_dir`, PROFILE_STEPS more steps are traced there after the timed ones
    (so the trace costs the figures nothing): TensorBoard's profile tab, or Perfetto.
    """
    mesh = experiment.make_mesh(config, devices)
    peak_before = (mesh.devices.flat[0].memory_stats() or {}).get("peak_bytes_in_use", 0)
    task = tasks.make_task(config, None, prepare_data=False)
    exp = experiment.build(config, task, mesh)
    state = jax.jit(exp.init_fn, out_shardings=exp.state_shardings)(jax.random.key(0))
    train_jit, _ = train.jit_steps(exp)
    rng = np.random.default_rng(0)
    vocab = task.model_config.vocab_size
    batch = {
        k: jax.device_put(rng.integers(4, vocab, shape).astype(np.int32), exp.batch_shardings[k])
        for k, (shape, _) in exp.batch_spec.items()
    }
    start = time.perf_counter()
    compiled = train_jit.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    state, m = compiled(state, batch)  # warm-up
    jax.block_until_ready(m)
    start = time.perf_counter()
    for _ in range(steps):
        state, m = compiled(state, batch)
    jax.block_until_ready(m)
    dt = (time.perf_counter() - start) / steps
    if profile_dir:
        jax.profiler.start_trace(profile_dir)
        for _ in range(PROFILE_STEPS):
            state, m = compiled(state, batch)
        jax.block_until_ready((state, m))
        jax.profiler.stop_trace()
    b, seq_len = config.train.global_batch_size, config.train.seq_len
    tokens = b * task.tokens_per_example()
    fpt = task.flops_per_token(seq_len)
    peak = metrics.peak_flops()
    result = {
        "device": jax.devices()[0].device_kind,
        "devices": mesh.devices.size,
        "preset": config.model.preset,
        "params": task.num_params(),
        "batch": b,
        "seq_len": seq_len,
        "dtype": task.model_config.dtype,
        "scan_method": scan_lib.resolve(task.model_config.scan_method).value,
        "remat": task.model_config.remat,
        "loss_vocab_block": config.train.loss_vocab_block,
        "compile_s": compile_s,
        "step_time_ms": 1e3 * dt,
        "tokens_per_s": tokens / dt,
        "flops_per_token": fpt,
        "mfu": (fpt * tokens / dt / (peak * mesh.devices.size)) if peak else None,
        "temp_bytes_per_device": getattr(mem, "temp_size_in_bytes", None),
        "argument_bytes_per_device": getattr(mem, "argument_size_in_bytes", None),
        "loss": float(m["train/loss"]),
    }
    stats = mesh.devices.flat[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        raised = stats["peak_bytes_in_use"] > peak_before
        result["peak_bytes_in_use"] = stats["peak_bytes_in_use"] if raised else None
    return result


def report(result: dict) -> str:
    """Four lines a person reads: the model, the speed, MFU and memory."""
    mib = lambda key: f"{(result[key] or 0) / 2**20:.1f} MiB"
    mfu = (
        f"{100 * result['mfu']:.1f}%"
        if result["mfu"]
        else "not reported (no peak FLOP/s for this device)"
    )
    return "\n".join(
        [
            f"{result['preset']} ({result['params'] / 1e6:.1f}M params) on {result['devices']} x "
            f"{result['device']}: batch {result['batch']} x {result['seq_len']}, "
            f"{result['dtype']}, scan {result['scan_method']}",
            f"  step {result['step_time_ms']:.1f} ms, {result['tokens_per_s']:,.0f} tokens/s, "
            f"FLOPs/token {result['flops_per_token']:.3g} (6 x matmul weights + recurrence)",
            f"  MFU {mfu}",
            f"  per-device memory: arguments {mib('argument_bytes_per_device')}, "
            f"temporaries {mib('temp_bytes_per_device')}",
        ]
    )


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--dtype", default="")
    p.add_argument("--remat", default="")
    p.add_argument("--scan_method", default="")
    p.add_argument("--loss_vocab_block", type=int, default=0, help="train.loss_vocab_block")
    p.add_argument("--mesh", default="data=-1", help="e.g. data=2,fsdp=4")
    p.add_argument(
        "--model",
        default="",
        help="model field overrides, e.g. num_layers=6,d_state=256,d_ff=0,norm=layer",
    )
    p.add_argument("--json", default="")
    p.add_argument(
        "--profile",
        default="",
        metavar="DIR",
        help=f"trace {PROFILE_STEPS} more steps after the timed ones into DIR "
        "(tensorboard --logdir DIR)",
    )
    args = tool_args.show_defaults(p).parse_args()
    tool_args.preset(p, args.preset)
    tool_args.writable(p, args.json)
    config = make_config(
        args.preset,
        args.batch,
        args.seq_len,
        dtype=args.dtype,
        remat=args.remat,
        scan_method=args.scan_method,
        mesh=args.mesh,
        model=args.model,
        loss_vocab_block=args.loss_vocab_block,
    )
    if args.steps < 1:
        p.error(f"--steps must be positive; got {args.steps}")
    result = run(config, args.steps, profile_dir=args.profile)
    print(report(result))
    if args.profile:
        print(f"  profile of {PROFILE_STEPS} steps: {args.profile}/plugins/profile/")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
