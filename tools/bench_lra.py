"""Times one training step of each LRA task's paper-size config and projects the full run.

    python tools/bench_lra.py                        # all six tasks, a markdown table
    python tools/bench_lra.py --tasks listops,image --steps 3 --json

Each task's `configs/lra/<task>.py` (the paper's model, batch and iterations) is built
on one device with random inputs of the task's shapes (no data needed) and its jitted
train step timed after compiling and one warm-up step. On a GPU or TPU the paper's batch
itself is timed. A CPU cannot hold or run it in reasonable time, so there a smaller
batch of about `--max_tokens` tokens (default 16384) is timed and the step time scaled
linearly to the paper's batch: a rough extrapolation (step time is not linear in the
batch: small batches use the hardware worse), starred in the table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np
import tool_args

from lrulm import config as config_lib
from lrulm import experiment, tasks, train
from lrulm.data import lra

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
# LRU paper Table 4: training steps/s on one A100.
PAPER_A100_STEPS_PER_S = dict(
    image=15.9, listops=2.1, text=14.7, retrieval=5.7, pathfinder=15.5, pathx=2.4
)


def _random_batch(exp, num_classes: int, vocab_size: int | None, seed: int = 0) -> dict:
    """A global batch of the task's shapes: valid tokens / unit-variance pixels, all real."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, (shape, dtype) in exp.batch_spec.items():
        if name == "inputs" and vocab_size:
            x = rng.integers(1, vocab_size, shape)
        elif name == "inputs":
            x = rng.standard_normal(shape)
        elif name == "label":
            x = rng.integers(0, num_classes, shape)
        else:  # mask, weight: every position and row is real
            x = np.ones(shape)
        out[name] = jax.device_put(x.astype(dtype), exp.batch_shardings[name])
    return out


def bench_task(task: str, *, steps: int, max_tokens: int) -> dict:
    """Times the paper config's train step for one task.

    Args:
      task: an LRA task name.
      steps: timed steps (after compiling and one warm-up step).
      max_tokens: measure at the largest batch with at most this many tokens (at least
        one example); 0 = the paper's batch.

    Returns:
      A dict of the measurement and the projection to the paper's batch and iterations.
    """
    config = config_lib.load(os.path.join(CONFIGS, "lra", f"{task}.py"))
    paper_batch, iterations = config.train.global_batch_size, config.train.steps
    spec = lra.TASKS[task]
    per_example = config.train.seq_len * (2 if spec.dual else 1)
    batch = paper_batch if max_tokens <= 0 else max(1, min(paper_batch, max_tokens // per_example))
    with config.unlocked():
        config.train.global_batch_size = batch
        config.mesh.data = 1
    device = jax.devices()[:1]
    mesh = experiment.make_mesh(config, device)
    exp = experiment.build(config, tasks.make_task(config, None, prepare_data=False), mesh)
    state = jax.jit(exp.init_fn, out_shardings=exp.state_shardings)(jax.random.key(0))
    train_jit, _ = train.jit_steps(exp)
    inputs = _random_batch(exp, spec.num_classes, spec.vocab_size)
    t0 = time.perf_counter()
    compiled = train_jit.lower(state, inputs).compile()
    compile_s = time.perf_counter() - t0
    state, metrics = compiled(state, inputs)  # warm-up
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, inputs)
    jax.block_until_ready((state, metrics))
    step_s = (time.perf_counter() - t0) / steps
    if not np.isfinite(float(metrics["train/loss"])):
        raise RuntimeError(f"{task}: non-finite loss in the benchmark step")
    scaled = step_s * paper_batch / batch
    paper_rate = PAPER_A100_STEPS_PER_S[task]
    return {
        "task": task,
        "device": jax.devices()[0].device_kind,
        "params": sum(x.size for x in jax.tree.leaves(state["params"])),
        "measured_batch": batch,
        "paper_batch": paper_batch,
        "seq_len": per_example,
        "compile_s": compile_s,
        "step_s_measured": step_s,
        "step_s_paper_batch": scaled,
        "scaled": batch != paper_batch,
        "tokens_per_s": batch * per_example / step_s,
        "iterations": iterations,
        "projected_run_h": scaled * iterations / 3600,
        "paper_a100_steps_per_s": paper_rate,
        "paper_a100_run_h": iterations / paper_rate / 3600,
    }


def _duration(hours: float) -> str:
    if hours < 48:
        return f"{hours:,.1f} h"
    return f"{hours / 24:,.0f} days"


def markdown(rows: list[dict]) -> str:
    """The results as a markdown table, with a note on scaling."""
    device = rows[0]["device"] if rows else "?"
    head = [
        "task",
        "batch timed",
        "s/step timed",
        "steps/s at paper batch",
        "iterations (paper)",
        f"projected full run ({device})",
        "paper A100 (steps/s, run)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        timed = f"{r['measured_batch']} of {r['paper_batch']}"
        star = " *" if r["scaled"] else ""
        lines.append(
            "| "
            + " | ".join(
                [
                    r["task"],
                    timed,
                    f"{r['step_s_measured']:.2f}",
                    f"{1 / r['step_s_paper_batch']:.3g}{star}",
                    f"{r['iterations']:,}",
                    _duration(r["projected_run_h"]),
                    f"{r['paper_a100_steps_per_s']} ({_duration(r['paper_a100_run_h'])})",
                ]
            )
            + " |"
        )
    notes = [f"\nDevice: {device}, one device, float32, compile time excluded."]
    if any(r["scaled"] for r in rows):
        notes.append(
            "* timed at a smaller batch and scaled linearly to the paper's batch: a rough "
            "extrapolation (small batches use the hardware worse, so it is pessimistic)."
        )
    return "\n".join(lines + notes)


def main(argv: list[str] | None = None) -> None:
    """Parses `argv` (default sys.argv[1:]), benchmarks the tasks, prints the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tasks", default=",".join(lra.TASKS), help="comma-separated LRA tasks (default: all six)"
    )
    parser.add_argument("--steps", type=int, default=2, help="timed steps after warm-up")
    parser.add_argument(
        "--max_tokens",
        type=int,
        default=None,
        help="time a batch of at most this many tokens and scale linearly (0 = the paper's "
        "batch; default: the paper's batch on GPU/TPU, 16384 on CPU)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON lines instead")
    args = tool_args.show_defaults(parser).parse_args(argv)
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in names if t not in lra.TASKS]
    if unknown or not names:
        parser.error(f"unknown task(s) {unknown}; use some of {', '.join(lra.TASKS)}")
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.max_tokens is None:
        args.max_tokens = 16384 if jax.default_backend() == "cpu" else 0
    elif args.max_tokens < 0:
        parser.error("--max_tokens must be >= 0 (0: the paper's batch)")
    rows = []
    for name in names:
        row = bench_task(name, steps=args.steps, max_tokens=args.max_tokens)
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print(
                f"{name}: {row['step_s_measured']:.2f} s/step at batch {row['measured_batch']} "
                f"(compile {row['compile_s']:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
    if not args.json:
        print(markdown(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
