"""Times the GPU scan kernels' launch shapes (Triton, Mosaic GPU); names the fastest correct one.

    python tools/gpu_kernel_sweep.py                        # docs/design.md §4 size, on a GPU
    python tools/gpu_kernel_sweep.py --best_out best.txt    # + the winner, for bench.py:
    LRULM_PALLAS_GPU_TUNING=$(cat best.txt) python tools/bench.py ...
    python tools/gpu_kernel_sweep.py --full_a               # a (B, L, N) decay, as a gated
                                                            # recurrence (RG-LRU) has

Each configuration is CHANNELS,WARPS,LOAD_REGISTERS[,prefetch|,pingpong][,stages=S]
[,bwd=R][,segments=T] (lrulm.kernels.gpu.Tuning): channels and warps per program, the
values per thread a chunk may hold in flight (the chunk length follows from it), whether
the next chunk's loads are issued before the current one is scanned (pingpong: two
chunks a loop iteration in two register sets taken in turn, so that both are in
flight), Triton's software-pipelining stages (no change to the kernels' SASS in Triton
3.9: tools/gpu_sass.py), the backward's own load registers, and the
time split; or mosaic,CHUNK,STAGES[,halves=2][,segments=T] for the Mosaic GPU kernels
(steps per TMA copy, slots in the ring, two thread groups of 64 channels a program).
All are lowered one after another (the tuning is read while tracing) and compiled
--threads at a time in the background; as each is ready, in order, it is
checked against `associative` (the forward and the vjp of
`linear_scan_planar` for a random cotangent, at (B, L, N) float32 re / im planes) and
timed against tools/bench_scan.py's byte floors (read b + write h; + read dh, read h,
write g), as a fraction of the copy bandwidth measured in the same process. A
configuration off by more than --rtol is reported and never chosen. A Mosaic GPU row also
times its ring without the scan (lrulm.kernels.mosaic_gpu.ring_copy of b: the same TMA
copies, slots and programs): the most that ring shape lets the forward reach, so a gap
between the two columns is the scan's, and a low ring column is the ring's (too few
bytes in flight, or too few programs). On a CPU the kernels
run in the Pallas interpreter (tiny sizes only: a check of this script, not a measurement).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import os
import re
import sys
import threading
import time
import traceback

import bench_scan
import jax
import numpy as np
import tool_args

from lrulm import scan_pallas
from lrulm.kernels import gpu, mosaic_gpu
from lrulm.scan import linear_scan_planar

# In order of promise (rows are timed as their compiles finish, the first ready in this
# order, until the budget is spent). Registers and loop structure from XLA's own Triton
# pipeline for an H100 (tools/gpu_sass.py, jaxlib 0.10.2, ptxas 12.9; none of these
# spills unless said): the default (H100: 69% / 59% of copy forward / forward+backward;
# H200: 57% / 52%), whose loop ends in 62 (backward 58) moves waiting for the chunk just
# loaded: one chunk in flight, not two; pingpong, whose loop ends in none (168 / 168
# registers, 2x the default's loads in flight; compiles in ~5x the default's time);
# pingpong with 1.25x that forward and 1.5x backward (252 / 255 registers); the Mosaic
# GPU kernels (TMA copies into a ring of shared-memory slots, so what is in flight no
# longer depends on registers: lrulm.kernels.mosaic_gpu) with the ring filling SMEM
# (complex forward: 6 x 32 steps = 192 KiB; at B=8, N=1024 64 programs, split in two in
# time by default) and unsplit; pingpong with the backward's 1.5x alone; the Triton
# backward with 1.5x the loads (it moves 3 arrays to the forward's 2; measured 55% of its
# floor where the forward measured 69%; 92 waiting moves); two thread groups of 64
# channels a program (halves=2: 128 programs unsplit, for the same bytes) with 6 slots of
# 32 steps; 12 x 16 steps unsplit; 1.5x the loads both ways; halves=2 with 12 slots; 6 x
# 16 (96 KiB forward: two programs per SM), a shallow ring; then Triton without prefetch
# (128 loads, then the scan) and with two warps a program. (The default split in two in
# time measured slower on the H100: 54% / 51%.)
DEFAULT_CONFIGS = (
    "32,1,128,prefetch 32,1,128,pingpong 32,1,160,pingpong,bwd=192 mosaic,32,6 "
    "mosaic,32,6,segments=1 32,1,128,pingpong,bwd=192 32,1,128,prefetch,bwd=192 "
    "mosaic,32,6,halves=2,segments=1 mosaic,16,12,segments=1 32,1,192,prefetch "
    "mosaic,32,12,halves=2,segments=1 mosaic,16,6 mosaic,16,6,segments=1 mosaic,32,3 "
    "32,1,128 64,2,192,prefetch"
)


def _max_rel_err(x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-30))


def _programs(a, b, dh, method):
    """The forward and the forward+backward (the vjp for the cotangent dh), lowered."""
    scan = lambda a, b: linear_scan_planar(a, b, method=method)
    fwd = jax.jit(lambda b: scan(a, b)).lower(b)
    return fwd, jax.jit(bench_scan._vjp(scan)).lower(a, b, dh)


def _launch_line(lowered) -> str:
    """The launch of the first kernel in a lowering: Triton's grid and warps, or that it
    is Mosaic GPU; "" if neither (the interpreter). Evidence that the configuration under
    test is the one compiled."""
    text = lowered.as_text()
    found = re.search(r"grid_x = (\d+).*?num_warps = (\d+)", text)
    if "custom_call @mosaic_gpu" in text:
        return "Mosaic GPU" + (" + Triton" if found else "")
    return f"grid {found[1]}, {found[2]} warps" if found else ""


def _ring(t: gpu.Tuning) -> tuple[int, int, int]:
    """The ring shape of a Mosaic GPU tuning: (chunk, stages, halves)."""
    return t.chunk, t.stages, t.halves


def _ring_copy(t: gpu.Tuning, b):
    """The Mosaic GPU ring's copy of b for tuning t, lowered (a time split leaves the
    ring as it is: one per ring shape)."""
    copy = functools.partial(
        mosaic_gpu.ring_copy,
        chunk=t.chunk,
        stages=t.stages,
        halves=t.halves,
        interpret=jax.default_backend() != "gpu",
    )
    return jax.jit(copy).lower(b)


class _Lowering(threading.Thread):
    """Lowers the configurations in row order, one at a time (the tuning is read from the
    environment while tracing, with every cached trace dropped), submitting each one's
    compiles to `pool` as soon as it is lowered, so that the first rows are timed while
    later ones are still being lowered. programs[config] resolves to (fwd lowered,
    [compile futures]), rings[ring shape] to the ring's copy lowered (Mosaic GPU), or
    either to the exception; after stop() the rest resolve to a TimeoutError."""

    def __init__(self, configs, a, b, dh, pool):
        super().__init__(daemon=True)
        self.configs, self.args, self.pool = configs, (a, b, dh), pool
        self.programs = {c: concurrent.futures.Future() for c in configs}
        tunings = [gpu.Tuning.parse(c) for c in configs]
        self.rings = {
            _ring(t): concurrent.futures.Future() for t in tunings if t.kernel == "mosaic"
        }
        self._ending = threading.Event()

    def stop(self):
        self._ending.set()

    def run(self):
        b = self.args[1]
        try:
            for config in self.configs:
                if self._ending.is_set():
                    break  # the rest resolve to a TimeoutError below
                os.environ[gpu.TUNING_ENV] = config
                scan_pallas.forget_traces()
                _resolve(self.programs[config], self._lower)
                t = gpu.Tuning.parse(config)
                if t.kernel == "mosaic" and not self.rings[_ring(t)].done():
                    _resolve(self.rings[_ring(t)], functools.partial(_ring_copy, t, b))
        finally:
            os.environ.pop(gpu.TUNING_ENV, None)
            for future in (*self.programs.values(), *self.rings.values()):
                if not future.done():
                    future.set_exception(TimeoutError("the sweep ended"))

    def _lower(self):
        fwd, fwd_bwd = _programs(*self.args, "pallas")
        return fwd, [self.pool.submit(p.compile) for p in (fwd, fwd_bwd)]


def _error(e: Exception) -> str:
    """One line: the exception and where it was raised (the innermost frame, and the
    innermost in lrulm when that is another), e.g. a KeyError's bare key says nothing."""
    text = (str(e).splitlines() or [""])[0][:200]
    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames[:-1] if "lrulm" in f.filename][-1:]
    at = "; ".join(
        f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in frames[-1:] + ours
    )
    return f"{type(e).__name__}: {text}" + (f" (at {at})" if at else "")


def _best(rows, kernel: str = "any") -> str | None:
    """The correct row with the highest forward+backward bandwidth; of one kernel kind
    ("triton" or "mosaic") if asked."""
    good = [r for r in rows if r["ok"] and kernel in ("any", _kernel(r["config"]))]
    return max(good, key=lambda r: r["fwd_bwd_GBps"])["config"] if good else None


def _kernel(config: str) -> str:
    return "mosaic" if config.startswith("mosaic") else "triton"


def _resolve(future, fn):
    try:
        future.set_result(fn())
    except Exception as e:  # noqa: BLE001 - one launch shape failing is a result too
        future.set_exception(e)


def sweep(
    B, L, N, configs, *, repeats, rtol, threads=8, full_a=False, budget_s=None, log=print,
    on_row=None,
):  # fmt: skip
    """Lowers the configurations in order in the background, compiles them `threads` at a
    time as they are lowered (XLA compiles with the GIL released; Triton takes ~10 s for
    each of these unrolled kernels), and checks and times each as soon as its programs
    are compiled: the first compiled in the configurations' order, so that a run cut
    short still has its first rows, and a slow compile holds back none after it. After
    `budget_s` seconds (from the start) no new row is started: the rest are reported as
    skipped, and the winner is named from the rows measured. on_row(result) is called
    after every row (the result so far, its "best" among the rows measured), so that a
    run killed at its time limit has still saved them. The first traceback of each kind
    of failure is logged."""
    configs = [str(gpu.Tuning.parse(c)) for c in configs]
    logged = set()  # failures whose traceback was logged
    a, b = bench_scan.make_inputs(B, L, N, full_a=full_a)
    dh = bench_scan.cotangent(b)
    a, b, dh = (a.real, a.imag), (b.real, b.imag), (dh.real, dh.imag)
    start = time.perf_counter()
    array_bytes = B * L * N * 8
    bandwidth = bench_scan.copy_bandwidth(array_bytes, repeats)
    ref_fwd, ref_fwd_bwd = (x.compile() for x in _programs(a, b, dh, "associative"))
    want = jax.tree.leaves((ref_fwd(b), ref_fwd_bwd(a, b, dh)))
    result = {
        **bench_scan.header(B, L, N, bandwidth, full_a=full_a),
        "backend": jax.default_backend(),
        "rows": [],
        "best": None,  # the best row so far, updated after every row
    }
    pool = concurrent.futures.ThreadPoolExecutor(threads)
    lowering = _Lowering(configs, a, b, dh, pool)
    lowering.start()
    ring_times = {}  # ring shape: seconds per copy, or the error

    def ring_time(t):
        """The Mosaic GPU ring's copy of b for tuning t: checked, then timed (once)."""
        if _ring(t) not in ring_times:
            try:
                copy = lowering.rings[_ring(t)].result().compile()
                # numpy: jnp would trace, while the lowering thread drops jax's caches
                if not all(np.array_equal(x, y) for x, y in zip(copy(b), b)):
                    raise AssertionError("the ring's copy differs from its input")
                ring_times[_ring(t)] = bench_scan._time(copy, b, repeats=repeats)
            except Exception as e:  # noqa: BLE001 - recorded in the row
                ring_times[_ring(t)] = e
        return ring_times[_ring(t)]

    pending = list(configs)
    try:
        while pending:
            config = _next_ready(pending, lowering.programs, start, budget_s)
            pending.remove(config)
            row = {"config": config}
            try:
                if budget_s is not None and time.perf_counter() - start > budget_s:
                    raise TimeoutError(f"skipped: past the {budget_s:.0f} s budget")
                lowered, compiles = lowering.programs[config].result()
                row["launch"] = _launch_line(lowered)
                fwd, fwd_bwd = (f.result() for f in compiles)
                row["compiled_after_s"] = time.perf_counter() - start
                got = jax.tree.leaves((fwd(b), fwd_bwd(a, b, dh)))
                row["max_rel_err"] = max(_max_rel_err(x, y) for x, y in zip(got, want))
                row["ok"] = row["max_rel_err"] <= rtol
                t_f = bench_scan._time(fwd, b, repeats=repeats)
                t_fb = bench_scan._time(fwd_bwd, a, b, dh, repeats=repeats)
                row.update(
                    bench_scan._row(
                        "pallas", "recurrence", t_f, t_fb, array_bytes, bandwidth, full_a=full_a
                    )
                )
                tuning = gpu.Tuning.parse(config)
                if tuning.kernel == "mosaic":  # what the forward's ring moves without a scan
                    t_ring = ring_time(tuning)
                    if isinstance(t_ring, Exception):
                        row["ring_error"] = _error(t_ring)
                    else:
                        row["ring_pct_copy"] = 100 * 2 * array_bytes / t_ring / bandwidth
            except Exception as e:  # noqa: BLE001 - one launch shape failing is a result too
                row.update(ok=False, error=_error(e))
                kind = (type(e).__name__, row["error"].split(" (at ")[-1])
                if not isinstance(e, TimeoutError) and kind not in logged:
                    logged.add(kind)
                    trace = "".join(traceback.format_exception(e)).splitlines()
                    log(f"{config} failed:\n" + "\n".join(trace[-25:]))
            result["rows"].append(row)
            result["best"] = _best(result["rows"])
            log(_line(row))
            if on_row is not None:
                on_row(result)
    finally:
        lowering.stop()
        pool.shutdown(wait=False, cancel_futures=True)
        lowering.join()  # it restores the environment's tuning
    result["compile_s"] = time.perf_counter() - start
    result["rows"].sort(key=lambda r: configs.index(r["config"]))
    return result


def _next_ready(pending, programs, start, budget_s):
    """The first of the pending configurations (in their order) whose programs are
    lowered and compiled, or failed, waiting for one: a slow compile (a pingpong kernel
    takes several times the default's) holds back no row compiled after it. Once the
    budget is spent, the first pending one (which is then skipped) without waiting."""
    while True:
        waiting = []
        for config in pending:
            future = programs[config]
            if not future.done():
                waiting.append(future)
                continue
            if future.exception() is not None:
                return config
            undone = [f for f in future.result()[1] if not f.done()]
            if not undone:
                return config
            waiting += undone
        left = None if budget_s is None else start + budget_s - time.perf_counter()
        if left is not None and left <= 0:
            return pending[0]
        concurrent.futures.wait(waiting, timeout=left, return_when="FIRST_COMPLETED")


def _line(r: dict) -> str:
    if "error" in r:
        return f"| {r['config']} | failed: {r['error']} | | | | | | |"
    check = f"{r['max_rel_err']:.1e}" + ("" if r["ok"] else " WRONG")
    ring = f"{r['ring_pct_copy']:.1f}%" if "ring_pct_copy" in r else r.get("ring_error", "")
    return (
        f"| {r['config']} | {r.get('launch', '')} | {check} | {r['fwd_ms']:.3f} | "
        f"{r['fwd_pct_copy']:.1f}% | {r['fwd_bwd_ms']:.3f} | {r['fwd_bwd_pct_copy']:.1f}% "
        f"| {ring} |"
    )


def table(result: dict) -> str:
    lines = [
        f"device {result['device']} ({result['backend']})  B={result['B']} L={result['L']} "
        f"N={result['N']}{' full a' if result['full_a'] else ''} planar f32  "
        f"copy {result['copy_GBps']:.1f} GB/s  floors: fwd "
        f"{result['floor_fwd_ms']:.3f} ms, fwd+bwd {result['floor_fwd_bwd_ms']:.3f} ms; "
        f"compiled and timed in {result['compile_s']:.0f} s",
        "| channels,warps,loads | launch | max rel err | fwd ms | fwd % copy | fwd+bwd ms "
        "| fwd+bwd % copy | ring copy % copy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [_line(r) for r in result["rows"]]
    lines.append(f"best (fwd+bwd, correct): {result['best']}")
    return "\n".join(lines)


def parse_args(argv=None):
    """The command line, checked (the shape, every tuning) before anything is compiled."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="8,2048,1024", help="B,L,N")
    p.add_argument(
        "--configs",
        default=DEFAULT_CONFIGS,
        help="space-separated tunings (lrulm.kernels.gpu.Tuning)",
    )
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rtol", type=float, default=1e-3, help="max error relative to the max")
    p.add_argument("--threads", type=int, default=8, help="compiles at a time")
    p.add_argument(
        "--budget_s",
        type=float,
        default=None,
        help="start no new row after this many seconds (the table and winner still print)",
    )
    p.add_argument("--json", default="")
    p.add_argument("--best_out", default="", help="write the winning tuning here")
    p.add_argument(
        "--best_kernel",
        choices=("any", "triton", "mosaic"),
        default="any",
        help="--best_out's winner among these kernels only (e.g. triton: the ones whose "
        "tests have passed on the hardware); the table names the best overall too",
    )
    p.add_argument(
        "--full_a",
        action="store_true",
        help="a full (B, L, N) decay (an input-dependent gate) instead of the LRU's (N,) one",
    )
    args = tool_args.show_defaults(p).parse_args(argv)
    tool_args.writable(p, args.json)
    try:
        args.B, args.L, args.N = (int(x) for x in args.shape.split(","))
    except ValueError:
        p.error(f"--shape takes B,L,N (three integers); got {args.shape!r}")
    try:
        args.configs = [str(gpu.Tuning.parse(c)) for c in args.configs.split()]
    except ValueError as e:
        p.error(f"--configs: {e}")
    return args


def main(argv=None):
    args = parse_args(argv)
    B, L, N = args.B, args.L, args.N
    start = time.perf_counter()

    def save(result):  # after every row, and at the end
        result["seconds"] = time.perf_counter() - start
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
        chosen = _best(result["rows"], args.best_kernel)
        if args.best_out and chosen:
            with open(args.best_out, "w") as f:
                f.write(chosen + "\n")

    result = sweep(
        B,
        L,
        N,
        args.configs,
        repeats=args.repeats,
        rtol=args.rtol,
        threads=args.threads,
        full_a=args.full_a,
        budget_s=args.budget_s,
        log=lambda s: print(s, file=sys.stderr, flush=True),
        on_row=save,
    )
    save(result)
    print(table(result))
    if args.best_kernel != "any":
        print(
            f"best {args.best_kernel} (fwd+bwd, correct): {_best(result['rows'], args.best_kernel)}"
        )


if __name__ == "__main__":
    main()
    # Compiles started before the budget ran out may still be running in the pool's
    # threads, and the interpreter would wait for them at exit: everything is saved.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
