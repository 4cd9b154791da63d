"""Generation cost per token after long prompts: flat in the context length.

    python tools/bench_generate.py                         # tiny preset, random weights
    python tools/bench_generate.py --workdir runs/tiny     # a trained model
    python tools/bench_generate.py --contexts 1024,16384,131072 --json out.json

For each prompt length: prefill time (parallel scan in chunks of --prefill_chunk), then
decode --new_tokens tokens and report decode tokens/s and memory. The decode step's
compiled memory (arguments + temporaries) is the same program whatever the context,
since the state is (layers, batch, d_state); peak device memory (accelerators) or the
process's peak RSS (CPU) is reported as measured.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import jax
import numpy as np
import tool_args
from flax import nnx

from lrulm import generate as gen
from lrulm.model import LanguageModel
from lrulm.model_config import from_preset


def _peak_memory() -> tuple[str, float]:
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return "device peak", stats["peak_bytes_in_use"]
    return "process peak RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="", help="a trained LM workdir (default: random tiny)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--contexts", default="1024,16384,131072")
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prefill_chunk", type=int, default=4096)
    p.add_argument(
        "--repetition_penalty",
        type=float,
        default=1.0,
        help="!= 1: time decoding with the per-row token counts penalties keep",
    )
    p.add_argument("--json", default="")
    args = tool_args.show_defaults(p).parse_args()
    try:
        contexts = [int(c) for c in args.contexts.split(",") if c.strip()]
    except ValueError:
        p.error(f"--contexts takes comma-separated prompt lengths; got {args.contexts!r}")
    tool_args.positive(p, args, "new_tokens", "batch", "prefill_chunk")
    if not contexts or min(contexts) < 1:
        p.error(f"--contexts takes positive prompt lengths; got {args.contexts!r}")
    tool_args.writable(p, args.json)
    try:
        sampling = gen.Sampling(temperature=1.0, repetition_penalty=args.repetition_penalty)
    except ValueError as e:
        p.error(str(e))
    if args.workdir and not os.path.isdir(os.path.join(args.workdir, "checkpoints")):
        p.error(f"--workdir {args.workdir}: no checkpoints/ there (train an LM into it first)")
    if not args.workdir:
        tool_args.preset(p, args.preset)
    if args.workdir:
        model, _, _ = gen.load_model(args.workdir)
    else:
        model = LanguageModel(from_preset(args.preset), rngs=nnx.Rngs(0))
    vocab = model.cfg.vocab_size
    rng = np.random.default_rng(0)
    rows = []
    for ctx in contexts:
        prompts = [rng.integers(4, vocab, ctx).tolist() for _ in range(args.batch)]
        warm = gen.prefill(model, prompts, chunk_size=args.prefill_chunk)  # compiles
        jax.block_until_ready(warm)
        start = time.perf_counter()
        logits, states = gen.prefill(model, prompts, chunk_size=args.prefill_chunk)
        jax.block_until_ready(states)
        prefill_s = time.perf_counter() - start
        graphdef, params = nnx.split(model)
        jnp = jax.numpy
        kw = dict(steps=args.new_tokens, sampling=sampling)
        stop = jnp.asarray([-1], jnp.int32)  # never stop: time every token
        keys = [gen.row_keys(jax.random.key(seed), range(args.batch)) for seed in (0, 1)]
        # From the prompts' end (no row done, none after an EOS); the state is zeroed
        # after EOS, as in `lrulm generate`.
        no_rows = jnp.zeros((args.batch,), bool)
        seen = counts = None
        if sampling.penalised:  # as `generate` keeps them: the prompt's tokens, then counts
            seen = jnp.zeros((args.batch, vocab), bool).at[:, 4:100].set(True)
            counts = jnp.zeros((args.batch, vocab), jnp.int32)
        carry = (jnp.int32(0), logits, states, no_rows, no_rows, counts)
        fixed = (jnp.asarray([gen.tok.EOS_ID]), jnp.int32(args.new_tokens), seen)
        inputs = [(params, carry, key, stop, *fixed) for key in keys]
        decode = gen._decode.lower(graphdef, *inputs[0], **kw).compile()
        mem = decode.memory_analysis()
        jax.block_until_ready(decode(*inputs[0]))
        start = time.perf_counter()
        jax.block_until_ready(decode(*inputs[1]))
        decode_s = time.perf_counter() - start
        kind, peak = _peak_memory()
        rows.append(
            {
                "context": ctx,
                "prefill_s": prefill_s,
                "prefill_tokens_per_s": ctx * args.batch / prefill_s,
                "decode_tokens_per_s": args.new_tokens * args.batch / decode_s,
                "decode_ms_per_step": 1e3 * decode_s / args.new_tokens,  # batch tokens a step
                "decode_program_bytes": mem.argument_size_in_bytes + mem.temp_size_in_bytes,
                "state_bytes": states.size * states.dtype.itemsize,
                "peak_kind": kind,
                "peak_bytes": peak,
            }
        )
    print(
        f"{model.cfg.num_layers} layers x d_model {model.cfg.d_model} x d_state "
        f"{model.cfg.d_state}, batch {args.batch}, {jax.devices()[0].device_kind}"
        + (f", repetition_penalty {args.repetition_penalty}" if sampling.penalised else "")
    )
    print(
        "| context | prefill tok/s | decode tok/s | ms/step | decode program | state | "
        f"{rows[0]['peak_kind']} |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['context']:,} | {r['prefill_tokens_per_s']:,.0f} | "
            f"{r['decode_tokens_per_s']:,.1f} | {r['decode_ms_per_step']:.2f} | "
            f"{r['decode_program_bytes'] / 2**20:.2f} MiB | {r['state_bytes'] / 2**10:.1f} KiB | "
            f"{r['peak_bytes'] / 2**20:.0f} MiB |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
