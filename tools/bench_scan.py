"""Times every linear_scan method against the byte floor of the recurrence.

    python tools/bench_scan.py                       # CPU-sized default, < 1 minute
    python tools/bench_scan.py --B 8 --L 2048 --N 1024 --json out.json   # DESIGN.md §4 size

Floors (complex64, bytes that must move at least once):
  forward           read b, write h                       2 * B*L*N*8
  forward+backward  + read dh, read h, write db (= g)      5 * B*L*N*8
                    (gradients w.r.t. a and b; a is (N,), its gradient a reduction)
The copy bandwidth is measured here on the same device (read x, write x + 1), so
"% copy" is the fraction of this device's achievable memory bandwidth.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from lrulm.scan import ScanMethod, linear_scan


def _time(fn, *args, repeats: int) -> float:
    out = fn(*args)
    jax.block_until_ready(out)  # compile + warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def copy_bandwidth(nbytes: int, repeats: int) -> float:
    """Bytes read + written per second by an elementwise op over an array of nbytes."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    t = _time(jax.jit(lambda x: x + 1.0), x, repeats=repeats)
    return 2 * nbytes / t


def run(B: int, L: int, N: int, methods, repeats: int, chunk_size: int) -> dict:
    rng = np.random.default_rng(0)
    a = jnp.asarray((0.99 * np.exp(1j * rng.uniform(0, 6, (N,)))).astype(np.complex64))
    b = jnp.asarray(
        (rng.normal(size=(B, L, N)) + 1j * rng.normal(size=(B, L, N))).astype(np.complex64)
    )
    array_bytes = B * L * N * 8
    bandwidth = copy_bandwidth(array_bytes, repeats)
    rows = []
    # lax.scan is differentiated as written; a Pallas kernel cannot be (no transpose rule).
    grads = {"sequential": ("autodiff",), "pallas": ("recurrence",)}
    for method in methods:
        for grad in grads.get(method, ("recurrence", "autodiff")):
            kw = dict(method=method, chunk_size=chunk_size, grad=grad)
            fwd = jax.jit(lambda b, kw=kw: linear_scan(a, b, **kw))
            # Gradients w.r.t. a and b: da needs h, so the forward cannot be skipped.
            fwd_bwd = jax.jit(
                jax.grad(lambda a, b, kw=kw: jnp.sum(linear_scan(a, b, **kw).real), argnums=(0, 1))
            )
            t_f = (
                _time(fwd, b, repeats=repeats)
                if grad == "recurrence" or method == "sequential"
                else None
            )
            t_fb = _time(fwd_bwd, a, b, repeats=repeats)
            row = {
                "method": method,
                "grad": grad,
                "fwd_ms": None if t_f is None else 1e3 * t_f,
                "fwd_bwd_ms": 1e3 * t_fb,
            }
            if t_f is not None:
                row["fwd_GBps"] = 2 * array_bytes / t_f / 1e9
                row["fwd_pct_copy"] = 100 * 2 * array_bytes / t_f / bandwidth
            row["fwd_bwd_GBps"] = 5 * array_bytes / t_fb / 1e9
            row["fwd_bwd_pct_copy"] = 100 * 5 * array_bytes / t_fb / bandwidth
            rows.append(row)
    return {
        "device": jax.devices()[0].device_kind,
        "B": B,
        "L": L,
        "N": N,
        "copy_GBps": bandwidth / 1e9,
        "floor_fwd_ms": 1e3 * 2 * array_bytes / bandwidth,
        "floor_fwd_bwd_ms": 1e3 * 5 * array_bytes / bandwidth,
        "rows": rows,
    }


def table(result: dict) -> str:
    lines = [
        f"device {result['device']}  B={result['B']} L={result['L']} N={result['N']} complex64  "
        f"copy bandwidth {result['copy_GBps']:.1f} GB/s  "
        f"floors: fwd {result['floor_fwd_ms']:.3f} ms, "
        f"fwd+bwd {result['floor_fwd_bwd_ms']:.3f} ms",
        "| method | grad | fwd ms | fwd % copy | fwd+bwd ms | fwd+bwd % copy |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        fwd = "–" if r["fwd_ms"] is None else f"{r['fwd_ms']:.3f}"
        fpct = "–" if r["fwd_ms"] is None else f"{r['fwd_pct_copy']:.1f}%"
        lines.append(
            f"| {r['method']} | {r['grad']} | {fwd} | {fpct} | {r['fwd_bwd_ms']:.3f} | "
            f"{r['fwd_bwd_pct_copy']:.1f}% |"
        )
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--B", type=int, default=4)
    p.add_argument("--L", type=int, default=1024)
    p.add_argument("--N", type=int, default=128)
    p.add_argument("--chunk_size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--methods", default="", help="comma-separated; default: every method this backend supports"
    )
    p.add_argument("--json", default="")
    args = p.parse_args()
    methods = [m for m in args.methods.split(",") if m] or [
        m.value for m in ScanMethod if m not in (ScanMethod.AUTO, ScanMethod.PALLAS)
    ] + (["pallas"] if jax.default_backend() in ("gpu", "tpu") else [])
    result = run(args.B, args.L, args.N, methods, args.repeats, args.chunk_size)
    print(table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
