"""Times every linear_scan method against the byte floor of the recurrence.

    python tools/bench_scan.py                       # CPU-sized default, < 1 minute
    python tools/bench_scan.py --B 8 --L 2048 --N 1024 --json out.json   # docs/design.md §4 size

Floors (complex64, bytes that must move at least once):
  forward           read b, write h                       2 * B*L*N*8
  forward+backward  + read dh, read h, write db (= g)      5 * B*L*N*8
                    (gradients w.r.t. a and b for a random cotangent dh; a is (N,), its
                    gradient a reduction)
  a full (B, L, N) a (tools/gpu_kernel_sweep.py --full_a) adds a read of a forward, and a
  read of a and a write of da backward: 3 and 8 arrays
The copy bandwidth is measured here on the same device (read x, write x + 1), so
"% copy" is the fraction of this device's achievable memory bandwidth. Where lrulm.scan
has `linear_scan_planar` (float32 re / im parts), its rows follow, on the same bytes.
tools/bench.py runs these rows as part of the whole table.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import tool_args

from lrulm import scan as scan_lib
from lrulm.scan import ScanMethod, linear_scan


def _time(fn, *args, repeats: int, target_s: float = 0.02) -> float:
    """Seconds per call: the best of `repeats` timings, each of enough back-to-back calls
    (up to 50) to last about `target_s`, dispatched asynchronously and waited for once, so
    that for a kernel of ~0.1 ms the host's per-call overhead overlaps the device's work
    instead of being counted in it. A jitted fn is compiled ahead of time first, so that
    every tool times the same kind of callable (tools/gpu_kernel_sweep.py times compiled
    programs; on an H100 bench.py's jitted forward of the Pallas scan measured 0.297 ms
    where the sweep's compiled one measured 0.140, the forward+backward 0.416 against
    0.412)."""
    if hasattr(fn, "lower"):
        fn = fn.lower(*args).compile()
    jax.block_until_ready(fn(*args))  # warm up
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    calls = max(1, min(50, int(target_s / max(time.perf_counter() - start, 1e-6))))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)  # one stream: the last call ends after the others
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def copy_bandwidth(nbytes: int, repeats: int) -> float:
    """Bytes read + written per second by an elementwise op over an array of nbytes."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    t = _time(jax.jit(lambda x: x + 1.0), x, repeats=repeats)
    return 2 * nbytes / t


def default_methods() -> list[str]:
    """Every method this backend runs natively (Pallas only on GPU / TPU: on CPU it would
    run in the interpreter, which measures nothing useful)."""
    methods = [m.value for m in ScanMethod if m not in (ScanMethod.AUTO, ScanMethod.PALLAS)]
    return methods + (["pallas"] if jax.default_backend() in ("gpu", "tpu") else [])


def grads_for(method: str) -> tuple[str, ...]:
    """The gradient methods worth timing for a scan method."""
    # lax.scan is differentiated as written; a Pallas kernel cannot be (no transpose rule).
    return {"sequential": ("autodiff",), "pallas": ("recurrence",)}.get(
        method, ("recurrence", "autodiff")
    )


def make_inputs(B: int, L: int, N: int, *, full_a: bool = False):
    """a (N,) complex64 decays on |a| = 0.99 (full_a: (B, L, N) ones, with |a| drawn from
    [0.9, 1)), b (B, L, N) complex64 standard normal."""
    rng = np.random.default_rng(0)
    shape = (B, L, N) if full_a else (N,)
    radius = rng.uniform(0.9, 1.0, shape) if full_a else 0.99
    a = jnp.asarray((radius * np.exp(1j * rng.uniform(0, 6, shape))).astype(np.complex64))
    b = jnp.asarray(
        (rng.normal(size=(B, L, N)) + 1j * rng.normal(size=(B, L, N))).astype(np.complex64)
    )
    return a, b


def cotangent(b):
    """A random cotangent for h (b's shape and dtype): read from memory like a real
    upstream gradient, where the gradient of jnp.sum(h) would be a constant XLA can fold
    into the backward for free."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=b.shape) + (1j * rng.normal(size=b.shape) if jnp.iscomplexobj(b) else 0)
    return jnp.asarray(x.astype(b.dtype))


def _vjp(scan):
    """(a, b, dh) -> (da, db): the forward (the backward needs h) and the backward."""

    def run(a, b, dh):
        _, pullback = jax.vjp(scan, a, b)
        return pullback(dh)

    return run


# Arrays of B*L*N complex64 values that must move: (forward, forward+backward), for an
# (N,) a and for a full (B, L, N) one (which the forward also reads, and the backward
# reads again and writes da of).
FLOOR_ARRAYS = {False: (2, 5), True: (3, 8)}


def _row(method, grad, t_f, t_fb, array_bytes, bandwidth, *, full_a=False) -> dict:
    fwd_arrays, fwd_bwd_arrays = FLOOR_ARRAYS[full_a]
    row = {
        "method": method,
        "grad": grad,
        "fwd_ms": None if t_f is None else 1e3 * t_f,
        "fwd_bwd_ms": 1e3 * t_fb,
    }
    if t_f is not None:
        row["fwd_GBps"] = fwd_arrays * array_bytes / t_f / 1e9
        row["fwd_pct_copy"] = 100 * fwd_arrays * array_bytes / t_f / bandwidth
    row["fwd_bwd_GBps"] = fwd_bwd_arrays * array_bytes / t_fb / 1e9
    row["fwd_bwd_pct_copy"] = 100 * fwd_bwd_arrays * array_bytes / t_fb / bandwidth
    return row


def time_method(a, b, method: str, grad: str, *, chunk_size: int, repeats: int, bandwidth: float):
    """One row: forward and forward+backward of linear_scan(a, b) with this method."""
    kw = dict(method=method, chunk_size=chunk_size, grad=grad)
    fwd = jax.jit(lambda b: linear_scan(a, b, **kw))
    fwd_bwd = jax.jit(_vjp(lambda a, b: linear_scan(a, b, **kw)))
    # With grad="autodiff" the forward is the same program as with "recurrence".
    timed_fwd = grad == "recurrence" or method == "sequential"
    t_f = _time(fwd, b, repeats=repeats) if timed_fwd else None
    t_fb = _time(fwd_bwd, a, b, cotangent(b), repeats=repeats)
    return {**_row(method, grad, t_f, t_fb, b.size * 8, bandwidth), "form": "complex"}


def time_planar(
    a, b, method: str, *, chunk_size: int, repeats: int, bandwidth: float, resets: bool = False
):
    """One row for `linear_scan_planar`: the same recurrence on float32 (re, im) planes.

    The bytes moved are the same as for complex64, so the floors and "% copy" compare
    directly with `time_method`'s rows. resets: with a (B, L) document-reset mask (one
    reset every 512 positions), as the LM trains (its bytes are 1/(2N) of b's).
    """
    kw = dict(method=method, chunk_size=chunk_size)
    if resets:
        B, L = b.shape[:2]
        kw["resets"] = jnp.zeros((B, L), bool).at[:, ::512].set(True)
    linear_scan_planar = scan_lib.linear_scan_planar
    a_p, b_p = (a.real, a.imag), (b.real, b.imag)
    fwd = jax.jit(lambda b: linear_scan_planar(a=a_p, b=b, **kw))
    fwd_bwd = jax.jit(_vjp(lambda a, b: linear_scan_planar(a=a, b=b, **kw)))
    dh = cotangent(b)
    t_f = _time(fwd, b_p, repeats=repeats)
    t_fb = _time(fwd_bwd, a_p, b_p, (dh.real, dh.imag), repeats=repeats)
    form = "planar+resets" if resets else "planar"
    return {**_row(method, "default", t_f, t_fb, b.size * 8, bandwidth), "form": form}


def planar_available() -> bool:
    """Whether lrulm.scan has the planar (float32 re / im) form of linear_scan."""
    return hasattr(scan_lib, "linear_scan_planar")


def header(B: int, L: int, N: int, bandwidth: float, *, full_a: bool = False) -> dict:
    """The size, the copy bandwidth and the byte floors (seconds at copy bandwidth)."""
    array_bytes = B * L * N * 8
    fwd_arrays, fwd_bwd_arrays = FLOOR_ARRAYS[full_a]
    return {
        "device": jax.devices()[0].device_kind,
        "B": B,
        "L": L,
        "N": N,
        "full_a": full_a,
        "copy_GBps": bandwidth / 1e9,
        "floor_fwd_ms": 1e3 * fwd_arrays * array_bytes / bandwidth,
        "floor_fwd_bwd_ms": 1e3 * fwd_bwd_arrays * array_bytes / bandwidth,
    }


def run(B: int, L: int, N: int, methods, repeats: int, chunk_size: int) -> dict:
    a, b = make_inputs(B, L, N)
    bandwidth = copy_bandwidth(b.size * 8, repeats)
    kw = dict(chunk_size=chunk_size, repeats=repeats, bandwidth=bandwidth)
    rows = [time_method(a, b, m, g, **kw) for m in methods for g in grads_for(m)]
    if planar_available():
        rows += [time_planar(a, b, m, **kw) for m in methods]
    return {**header(B, L, N, bandwidth), "rows": rows}


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
        name = r["method"] + (" planar" if r.get("form") == "planar" else "")
        lines.append(
            f"| {name} | {r['grad']} | {fwd} | {fpct} | {r['fwd_bwd_ms']:.3f} | "
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
    args = tool_args.show_defaults(p).parse_args()
    methods = [m for m in args.methods.split(",") if m] or default_methods()
    known = [m.value for m in ScanMethod if m != ScanMethod.AUTO]
    if any(m not in known for m in methods):
        p.error(f"--methods {args.methods!r}: use some of {', '.join(known)}")
    tool_args.positive(p, args, "B", "L", "N", "chunk_size", "repeats")
    tool_args.writable(p, args.json)
    result = run(args.B, args.L, args.N, methods, args.repeats, args.chunk_size)
    print(table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
