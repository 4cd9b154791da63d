"""Longest trainable context: one device versus the sequence split across S devices.

    python tools/seq_parallel_memory.py --preset 125m --shards 8 --hbm_gib 79.1

Compiles the real train step (lrulm.experiment.build / jit_steps) with abstract inputs on
simulated CPU devices, batch 1, once on one device and once with mesh.sequence = S,
at two context lengths; per-device memory (arguments + temporaries + outputs - donated)
from XLA's memory analysis is linear in the context, so the two points give the longest
context that fits a device of --hbm_gib. Parameters and optimizer state are replicated
in both (no FSDP), which is what limits the split run. Nothing is materialised.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import tool_args  # noqa: E402

from lrulm import config as config_lib  # noqa: E402
from lrulm import experiment, tasks, train  # noqa: E402


def per_device_bytes(preset: str, seq_len: int, shards: int, remat: str, vocab_block: int) -> int:
    config = config_lib.base_config()
    config.model.preset = preset
    config.model.remat = remat
    config.train.loss_vocab_block = vocab_block
    config.train.global_batch_size, config.train.seq_len = 1, seq_len
    config.mesh.data, config.mesh.sequence = 1, shards
    config.lock()
    mesh = experiment.make_mesh(config, jax.devices()[:shards])
    exp = experiment.build(config, tasks.make_task(config, None, prepare_data=False), mesh)
    train_jit, _ = train.jit_steps(exp)
    batch = {
        k: jax.ShapeDtypeStruct(shape, dtype, sharding=exp.batch_shardings[k])
        for k, (shape, dtype) in exp.batch_spec.items()
    }
    m = train_jit.lower(exp.abstract_state, batch).compile().memory_analysis()
    return (
        m.argument_size_in_bytes
        + m.temp_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
    )


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="125m")
    p.add_argument("--shards", type=int, default=8)
    p.add_argument(
        "--hbm_gib",
        type=float,
        default=79.1,
        help="device memory, GiB (an H100 80GB: 79.1, as CUDA reports it)",
    )
    p.add_argument("--lengths", default="32768,65536", help="two context lengths to fit")
    p.add_argument("--remat", default="full")
    p.add_argument("--loss_vocab_block", type=int, default=4096, help="0 = whole logits")
    p.add_argument("--json", default="")
    args = tool_args.show_defaults(p).parse_args()
    try:
        l1, l2 = sorted(int(x) for x in args.lengths.split(","))
    except ValueError:
        p.error(f"--lengths takes two context lengths, e.g. 32768,65536; got {args.lengths!r}")
    if not 0 < l1 < l2:
        p.error(f"--lengths: two different positive lengths; got {args.lengths}")
    tool_args.preset(p, args.preset)
    tool_args.positive(p, args, "shards")
    if not args.hbm_gib > 0:
        p.error(f"--hbm_gib must be positive; got {args.hbm_gib}")
    tool_args.writable(p, args.json)
    budget = args.hbm_gib * 2**30
    rows = []
    for shards in (1, args.shards):
        b1 = per_device_bytes(args.preset, l1, shards, args.remat, args.loss_vocab_block)
        b2 = per_device_bytes(args.preset, l2, shards, args.remat, args.loss_vocab_block)
        per_token = (b2 - b1) / (l2 - l1)
        fixed = b1 - per_token * l1
        # None: the two lengths took the same memory (nothing grows with the context).
        longest = max(0, int((budget - fixed) / per_token)) if per_token > 0 else None
        rows.append(
            {
                "shards": shards,
                "fixed_GiB": fixed / 2**30,
                "KiB_per_token": per_token / 2**10,
                "longest_context": longest,
                f"GiB_at_{l1}": b1 / 2**30,
                f"GiB_at_{l2}": b2 / 2**30,
            }
        )
    print(
        f"{args.preset}, batch 1, remat={args.remat}, per-device memory from XLA (CPU "
        f"compile), {args.hbm_gib:g} GiB per device"
    )
    print("| devices on the sequence | fixed (params, opt) | per context token | longest context |")
    print("|---|---|---|---|")
    for r in rows:
        longest = r["longest_context"]
        if longest is None:
            longest = "n/a (no growth with the context between these lengths)"
        else:
            longest = f"{longest:,} tokens" if longest else "does not fit"
        print(
            f"| {r['shards']} | {r['fixed_GiB']:.2f} GiB | {r['KiB_per_token']:.1f} KiB | "
            f"{longest} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
