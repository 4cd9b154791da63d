"""lrulm's LRA training step beside a minimal-LRU-style reference step, on this machine.

    python tools/bench_baseline.py                      # the CPU row: 8 x 1024, H 128, N 256
    python tools/bench_baseline.py --size listops       # 32 x 2048, H 128, N 256 (GPU)
    python tools/bench_baseline.py --size scifar --json # 50 x 1024 pixels, H 512, N 384 (GPU)
    python tools/bench_baseline.py --size listops,scifar --scan_methods auto,pallas   # GPU

docs/design.md §4 states lrulm's throughput target as at least twice that of the public
reference implementation of the LRU (minimal-LRU: Flax Linen, `jax.lax.associative_scan`,
the per-example model vmapped over the batch), measured on the same configurations. The
reference cannot be downloaded here, so `reference_*` below rebuilds it from that
description and the paper: the same block (LayerNorm -> LRU -> GELU -> GLU -> skip), the
same parameters (`lrulm.lru.LRU`'s names and shapes, so trees map one-to-one; tests check
that both layers compute the same values), AdamW, mean pooling, float32, no dropout.

Both steps are timed the same way on one device: compile, one warm-up step, then the
median of `--steps` steps on one fixed random batch (tokens for ListOps-shaped rows, unit
variance pixels for sCIFAR). The ratio reference / lrulm is the figure the target is
about.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tool_args

from lrulm import config as config_lib
from lrulm import experiment, tasks, train
from lrulm import lru as lru_lib
from lrulm import scan as scan_lib
from lrulm.data import lra

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
TARGET_RATIO = 2.0  # docs/design.md §4: at least twice the reference's throughput


@dataclasses.dataclass(frozen=True)
class Size:
    """One configuration of docs/design.md §4's baseline table."""

    task: str  # the LRA task whose input and head shapes are used
    batch: int
    seq_len: int
    d_model: int  # H
    d_state: int  # N
    num_layers: int = 6
    design_ms: dict | None = None  # the reference's step time in docs/design.md §4, by device


SIZES = {
    "cpu": Size("listops", 8, 1024, 128, 256, design_ms={"H100": 8.2, "cpu": 1320.0}),
    "listops": Size("listops", 32, 2048, 128, 256, design_ms={"H100": 20.3}),
    "scifar": Size("image", 50, 1024, 512, 384, design_ms={"H100": 42.9}),
    "tiny": Size("listops", 2, 64, 16, 8, num_layers=2),  # checks the tool, not a figure
}


# -- the reference: minimal-LRU's structure, Flax Linen, one example at a time ----------


def _binary_operator(left, right):
    """Composes two steps (a_i, b_i), (a_j, b_j) of h = a h + b."""
    a_i, b_i = left
    a_j, b_j = right
    return a_j * a_i, a_j * b_i + b_j


class ReferenceLRU(nn.Module):
    """The LRU on one sequence (l, h) -> (l, h), complex parameters assembled per call."""

    d_model: int
    d_state: int
    r_min: float = 0.0
    r_max: float = 0.99
    max_phase: float = 2 * np.pi

    @nn.compact
    def __call__(self, u):
        h, n = self.d_model, self.d_state

        ring = lambda i: (
            lambda key: lru_lib.ring_init(key, n, self.r_min, self.r_max, self.max_phase)[i]
        )
        nu_log = self.param("nu_log", ring(0))
        theta_log = self.param("theta_log", ring(1))
        gamma_log = self.param(
            "gamma_log", lambda _: jnp.log(jnp.sqrt(1 - jnp.exp(-jnp.exp(nu_log)) ** 2))
        )
        normal = lambda std: lambda key, shape: std * jax.random.normal(key, shape)
        b_re = self.param("B_re", normal(1 / np.sqrt(2 * h)), (n, h))
        b_im = self.param("B_im", normal(1 / np.sqrt(2 * h)), (n, h))
        c_re = self.param("C_re", normal(1 / np.sqrt(n)), (h, n))
        c_im = self.param("C_im", normal(1 / np.sqrt(n)), (h, n))
        d = self.param("D", normal(1.0), (h,))

        diag_lambda = jnp.exp(-jnp.exp(nu_log) + 1j * jnp.exp(theta_log))
        b_norm = (b_re + 1j * b_im) * jnp.exp(gamma_log)[:, None]
        c = c_re + 1j * c_im
        lambdas = jnp.repeat(diag_lambda[None], u.shape[0], axis=0)
        bu = jax.vmap(lambda x: b_norm @ x)(u)
        _, states = jax.lax.associative_scan(_binary_operator, (lambdas, bu))
        return jax.vmap(lambda s, x: (c @ s).real + d * x)(states, u)


class ReferenceBlock(nn.Module):
    """Norm -> LRU -> GELU -> GLU -> skip, on one sequence."""

    d_model: int
    d_state: int

    @nn.compact
    def __call__(self, x):
        y = nn.LayerNorm()(x)
        y = ReferenceLRU(self.d_model, self.d_state)(y)
        y = nn.gelu(y)
        y = nn.Dense(self.d_model)(y) * jax.nn.sigmoid(nn.Dense(self.d_model)(y))
        return x + y


class ReferenceClassifier(nn.Module):
    """Encoder -> blocks -> mean over the valid positions -> logits, one sequence."""

    size: Size
    num_classes: int
    vocab_size: int | None

    @nn.compact
    def __call__(self, inputs, mask):
        s = self.size
        if self.vocab_size:
            x = nn.Embed(self.vocab_size, s.d_model)(inputs)
        else:
            x = nn.Dense(s.d_model)(inputs)
        for _ in range(s.num_layers):
            x = ReferenceBlock(s.d_model, s.d_state)(x)
        m = mask.astype(x.dtype)[:, None]
        pooled = (x * m).sum(0) / jnp.maximum(m.sum(), 1.0)
        return nn.Dense(self.num_classes)(pooled)


BatchedReferenceClassifier = nn.vmap(
    ReferenceClassifier,
    in_axes=(0, 0),
    out_axes=0,
    variable_axes={"params": None},
    split_rngs={"params": False},
)


def reference_step(size: Size, spec, batch: dict, lr: float = 1e-3):
    """(jitted step, state) of the reference: cross-entropy, AdamW, donated state."""
    model = BatchedReferenceClassifier(size, spec.num_classes, spec.vocab_size)
    params = model.init(jax.random.key(0), batch["inputs"], batch["mask"])["params"]
    tx = optax.adamw(lr, weight_decay=0.05)
    state = (params, tx.init(params))

    def loss_fn(params, batch):
        logits = model.apply({"params": params}, batch["inputs"], batch["mask"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

    def step(state, batch):
        params, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return jax.jit(step, donate_argnums=0), state


# -- lrulm: the trainer's own step on the task's config -------------------------------


def lrulm_config(size: Size, scan_method: str = ""):
    """The task's paper config resized to `size`, layer norm, one device."""
    config = config_lib.load(os.path.join(CONFIGS, "lra", f"{size.task}.py"))
    with config.unlocked():
        config.model.num_layers = size.num_layers
        config.model.d_model = size.d_model
        config.model.d_state = size.d_state
        config.model.norm = "layer"  # DESIGN §4 measured the reference with layer norm
        config.model.dropout = 0.0
        config.model.bidirectional = False
        config.model.dtype = "float32"
        if scan_method:
            config.model.scan_method = scan_method
        config.train.global_batch_size = size.batch
        config.train.seq_len = size.seq_len
        config.mesh.data = 1
    return config


def random_batch(size: Size, spec, seed: int = 0) -> dict:
    """One batch of the task's shapes on the host: every row and position real."""
    rng = np.random.default_rng(seed)
    if spec.vocab_size:
        inputs = rng.integers(1, spec.vocab_size, (size.batch, size.seq_len)).astype(np.int32)
    else:
        inputs = rng.standard_normal((size.batch, size.seq_len, 1)).astype(np.float32)
    return {
        "inputs": inputs,
        "mask": np.ones((size.batch, size.seq_len), bool),
        "label": rng.integers(0, spec.num_classes, (size.batch,)).astype(np.int32),
        "weight": np.ones((size.batch,), np.float32),
    }


def lrulm_step(size: Size, host_batch: dict, scan_method: str = ""):
    """(jitted step, state, batch on device) of lrulm's trainer for `size`."""
    config = lrulm_config(size, scan_method)
    mesh = experiment.make_mesh(config, jax.devices()[:1])
    exp = experiment.build(config, tasks.make_task(config, None, prepare_data=False), mesh)
    state = jax.jit(exp.init_fn, out_shardings=exp.state_shardings)(jax.random.key(0))
    step, _ = train.jit_steps(exp)
    batch = {
        k: jax.device_put(v, exp.batch_shardings[k])
        for k, v in host_batch.items()
        if k in exp.batch_spec
    }
    return step, state, batch


def _time(step, state, batch, steps: int) -> tuple[float, float, float]:
    """(compile s, median step s, last loss) of `step` on a fixed batch."""
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    state, out = compiled(state, batch)  # warm-up
    jax.block_until_ready(out)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, out = compiled(state, batch)
        jax.block_until_ready((state, out))
        times.append(time.perf_counter() - t0)
    loss = float(out["train/loss"] if isinstance(out, dict) else out)
    return compile_s, statistics.median(times), loss


def bench(name: str, *, steps: int, scan_methods: tuple[str, ...] = ("auto",)):
    """Times the reference and lrulm (with each scan method) at SIZES[name]; yields one
    row per method as it is measured, sharing the reference's timing."""
    size = SIZES[name]
    spec = lra.TASKS[size.task]
    host = random_batch(size, spec)
    base = {
        "size": name,
        "device": jax.devices()[0].device_kind,
        "batch": size.batch,
        "seq_len": size.seq_len,
        "d_model": size.d_model,
        "d_state": size.d_state,
        "num_layers": size.num_layers,
        "target_ratio": TARGET_RATIO,
        "design_reference_ms": size.design_ms,
    }
    dev = {k: jnp.asarray(host[k]) for k in ("inputs", "mask", "label")}
    tokens = size.batch * size.seq_len
    try:  # a failure (out of memory, a kernel that does not lower) is a row, not the end
        ref, ref_state = reference_step(size, spec, dev)
        c, s, loss = _time(ref, ref_state, dev, steps)
        del ref_state
        if not np.isfinite(loss):
            raise RuntimeError("non-finite reference loss in the benchmark step")
        base.update(reference_compile_s=c, reference_step_s=s, reference_loss=loss)
        base["reference_tokens_per_s"] = tokens / s
    except Exception as e:  # noqa: BLE001
        base.update(reference_step_s=None, reference_error=_brief(e))
    for method in scan_methods:
        shown = f"auto ({scan_lib.resolve('auto').value})" if method == "auto" else method
        try:
            step, state, batch = lrulm_step(size, host, "" if method == "auto" else method)
            c, s, loss = _time(step, state, batch, steps)
            del state
            if not np.isfinite(loss):
                raise RuntimeError(f"non-finite lrulm loss ({method} scan)")
        except Exception as e:  # noqa: BLE001
            yield dict(base, scan_method=shown, lrulm_step_s=None, error=_brief(e))
            continue
        row = dict(base, scan_method=shown, lrulm_compile_s=c, lrulm_step_s=s, lrulm_loss=loss)
        row["lrulm_tokens_per_s"] = tokens / s
        ref_s = base["reference_step_s"]
        row["ratio"] = None if ref_s is None else ref_s / s
        yield row


def _brief(e: BaseException) -> str:
    """An error as one line of at most 300 characters."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


def markdown(rows: list[dict]) -> str:
    """The rows as a markdown table and a line on how they were measured."""
    head = ["size", "b x l, H, N", "reference ms/step", "lrulm scan", "lrulm ms/step",
            "tokens/s lrulm", "ratio"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    errors = []
    for r in rows:
        ref = r.get("reference_step_s")
        ref_ms = "failed" if ref is None else f"{ref * 1e3:,.1f}"
        if r.get("lrulm_step_s") is None:
            ours = ["failed", "–"]
        else:
            ours = [f"{r['lrulm_step_s'] * 1e3:,.1f}", f"{r['lrulm_tokens_per_s']:,.0f}"]
        ratio = r.get("ratio")
        ratio = "–" if ratio is None else (
            f"{ratio:.2f}x ({'met' if ratio >= TARGET_RATIO else 'below'})"
        )  # fmt: skip
        lines.append(
            f"| {r['size']} | {r['batch']} x {r['seq_len']}, {r['d_model']}, {r['d_state']} "
            f"| {ref_ms} | {r['scan_method']} | {ours[0]} | {ours[1]} | {ratio} |"
        )
        for key, what in (("reference_error", "reference"), ("error", r["scan_method"])):
            if r.get(key) and f"{r['size']} {what}: {r[key]}" not in errors:
                errors.append(f"{r['size']} {what}: {r[key]}")
    device = rows[0]["device"] if rows else "?"
    layers = rows[0]["num_layers"] if rows else 6
    return "\n".join(
        lines
        + [
            f"\nDevice: {device}, one device, float32, {layers} layers, median step after "
            f"compile and warm-up. Target (docs/design.md §4): ratio >= {TARGET_RATIO:g}x."
        ]
        + [f"- failed: {e}" for e in errors]
    )


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line, checked before anything compiles."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="cpu", help=f"comma-separated: {', '.join(SIZES)}")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after warm-up")
    parser.add_argument(
        "--scan_methods",
        default="auto",
        help="comma-separated model.scan_method values for lrulm's step (auto: the backend's)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON lines instead")
    parser.add_argument(
        "--render", metavar="FILE", help="print the table of the JSON lines in FILE; time nothing"
    )
    args = tool_args.show_defaults(parser).parse_args(argv)
    args.sizes = [s.strip() for s in args.size.split(",") if s.strip()]
    unknown = [s for s in args.sizes if s not in SIZES]
    if unknown or not args.sizes:
        parser.error(f"unknown size(s) {unknown}; use some of {', '.join(SIZES)}")
    args.methods = tuple(m.strip() for m in args.scan_methods.split(",") if m.strip())
    known = [m.value for m in scan_lib.ScanMethod]
    if not args.methods or any(m not in known for m in args.methods):
        parser.error(f"--scan_methods {args.scan_methods!r}: use some of {', '.join(known)}")
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    return args


def read_rows(path: str) -> list[dict]:
    """The rows among a file's lines (a log may hold other lines too)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.startswith('{"size"')]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.render:
        rows = read_rows(args.render)
        print(markdown(rows) if rows else f"no rows in {args.render}")
        return
    rows = []
    for name in args.sizes:
        for row in bench(name, steps=args.steps, scan_methods=args.methods):
            rows.append(row)
            if args.json:
                print(json.dumps(row), flush=True)
    if not args.json:
        print(markdown(rows), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
