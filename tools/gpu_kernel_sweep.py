"""Times the GPU (Triton) scan kernel's launch shapes and names the fastest correct one.

    python tools/gpu_kernel_sweep.py                        # DESIGN.md §4 size, on a GPU
    python tools/gpu_kernel_sweep.py --best_out best.txt    # + the winner, for bench.py:
    LRULM_PALLAS_GPU_TUNING=$(cat best.txt) python tools/bench.py ...

Each configuration is CHANNELS,WARPS,LOAD_REGISTERS (lrulm.kernels.gpu.Tuning): channels
per program, warps per program, and the values per thread a chunk may hold in flight
(the chunk length follows from it). For each, `linear_scan_planar(method="pallas")` at
(B, L, N) float32 (re, im) planes is checked against `associative` (values and the
gradients w.r.t. a and b), then timed forward and forward+backward against the byte
floors of tools/bench_scan.py (read b + write h; + read dh, read h, write g), as a
fraction of the copy bandwidth measured in the same process. A configuration whose
result is off by more than --rtol is reported and never chosen. Runs in the Pallas
interpreter on a CPU (tiny sizes only: the check of this script, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import bench_scan
import jax
import jax.numpy as jnp
import numpy as np

from lrulm import scan_pallas
from lrulm.kernels import gpu
from lrulm.scan import linear_scan_planar

# The default first, then prefetching, more loads in flight, two warps per program, and
# (last, the least likely) fewer loads, half-filled warps and several channels a thread.
DEFAULT_CONFIGS = (
    "32,1,128 32,1,128,prefetch 64,2,128 32,1,256,prefetch 64,2,128,prefetch 32,1,256 "
    "32,1,64 16,1,128,prefetch 128,4,128,prefetch 64,1,128,prefetch"
)


def _max_rel_err(x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-30))


def _programs(a, b, method):
    def loss(a, b):
        h = linear_scan_planar(a, b, method=method)
        w = jnp.linspace(-1.0, 1.0, b[0].shape[-1])
        return jnp.sum(h[0] * w) + jnp.sum(h[1] * h[1]) * 1e-3

    return jax.jit(lambda b: linear_scan_planar(a, b, method=method)), jax.jit(
        jax.grad(loss, argnums=(0, 1))
    )


def _launch_line(fn, *args) -> str:
    """The Triton launch attributes of the first kernel in fn's lowering, "" if none
    (the interpreter): evidence that the configuration under test is the one compiled."""
    text = fn.lower(*args).as_text()
    found = re.search(r"grid_x = (\d+).*?num_warps = (\d+)", text)
    return f"grid {found[1]}, {found[2]} warps" if found else ""


def sweep(B, L, N, configs, *, repeats, rtol, budget_s=float("inf"), log=print):
    start = time.perf_counter()
    a, b = bench_scan.make_inputs(B, L, N)
    a, b = (a.real, a.imag), (b.real, b.imag)
    array_bytes = B * L * N * 8
    bandwidth = bench_scan.copy_bandwidth(array_bytes, repeats)
    ref_fwd, ref_grad = _programs(a, b, "associative")
    want_h, want_g = ref_fwd(b), ref_grad(a, b)
    result = {
        **bench_scan.header(B, L, N, bandwidth),
        "backend": jax.default_backend(),
        "rows": [],
    }
    for config in configs:
        row = {"config": str(gpu.Tuning.parse(config))}
        if time.perf_counter() - start > budget_s:
            row.update(ok=False, error=f"skipped: the budget of {budget_s:.0f} s is spent")
            result["rows"].append(row)
            continue
        os.environ[gpu.TUNING_ENV] = row["config"]
        # The tuning is read while tracing: drop every cached trace of the kernels.
        jax.clear_caches()
        scan_pallas._call.cache_clear()
        scan_pallas._sharded.cache_clear()
        try:
            fwd, fwd_bwd = _programs(a, b, "pallas")
            row["launch"] = _launch_line(fwd, b)
            err_h = max(_max_rel_err(x, y) for x, y in zip(fwd(b), want_h))
            got_g = jax.tree.leaves(fwd_bwd(a, b))
            err_g = max(_max_rel_err(x, y) for x, y in zip(got_g, jax.tree.leaves(want_g)))
            row["max_rel_err"] = max(err_h, err_g)
            row["ok"] = row["max_rel_err"] <= rtol
            t_f = bench_scan._time(fwd, b, repeats=repeats)
            t_fb = bench_scan._time(fwd_bwd, a, b, repeats=repeats)
            row.update(bench_scan._row("pallas", "recurrence", t_f, t_fb, array_bytes, bandwidth))
        except Exception as e:  # noqa: BLE001 - one launch shape failing is a result too
            row.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        result["rows"].append(row)
        log(_line(row))
    good = [r for r in result["rows"] if r["ok"]]
    result["best"] = max(good, key=lambda r: r["fwd_bwd_GBps"])["config"] if good else None
    os.environ.pop(gpu.TUNING_ENV, None)
    return result


def _line(r: dict) -> str:
    if "error" in r:
        return f"| {r['config']} | failed: {r['error']} | | | | | |"
    check = f"{r['max_rel_err']:.1e}" + ("" if r["ok"] else " WRONG")
    return (
        f"| {r['config']} | {r.get('launch', '')} | {check} | {r['fwd_ms']:.3f} | "
        f"{r['fwd_pct_copy']:.1f}% | {r['fwd_bwd_ms']:.3f} | {r['fwd_bwd_pct_copy']:.1f}% |"
    )


def table(result: dict) -> str:
    lines = [
        f"device {result['device']} ({result['backend']})  B={result['B']} L={result['L']} "
        f"N={result['N']} planar f32  copy {result['copy_GBps']:.1f} GB/s  floors: fwd "
        f"{result['floor_fwd_ms']:.3f} ms, fwd+bwd {result['floor_fwd_bwd_ms']:.3f} ms",
        "| channels,warps,loads | launch | max rel err | fwd ms | fwd % copy | fwd+bwd ms "
        "| fwd+bwd % copy |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [_line(r) for r in result["rows"]]
    lines.append(f"best (fwd+bwd, correct): {result['best']}")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="8,2048,1024", help="B,L,N")
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help="space-separated C,W,R triples")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rtol", type=float, default=1e-3, help="max error relative to the max")
    p.add_argument("--budget_s", type=float, default=float("inf"), help="start no row after")
    p.add_argument("--json", default="")
    p.add_argument("--best_out", default="", help="write the winning C,W,R here")
    args = p.parse_args()
    B, L, N = (int(x) for x in args.shape.split(","))
    start = time.perf_counter()
    result = sweep(
        B,
        L,
        N,
        args.configs.split(),
        repeats=args.repeats,
        rtol=args.rtol,
        budget_s=args.budget_s,
        log=lambda s: print(s, file=sys.stderr, flush=True),
    )
    result["seconds"] = time.perf_counter() - start
    print(table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.best_out and result["best"]:
        with open(args.best_out, "w") as f:
            f.write(result["best"] + "\n")


if __name__ == "__main__":
    main()
