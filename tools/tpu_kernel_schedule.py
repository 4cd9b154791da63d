"""How fast the TPU scan kernels can run, from the compiler's own instruction schedule.

    python tools/tpu_kernel_schedule.py [--topology v5e:1x1] [--shape 8,2048,768]

No TPU needed. libtpu compiles each kernel for the topology (as `lrulm compile` does)
and, asked to, dumps the final VLIW bundles: one bundle issues per cycle, so the bundles
of the kernel's inner loop (one slab: 16 rows of every part, 32 for bfloat16) are the
cycles that slab costs when nothing stalls. Against them: the cycles HBM needs for the
slab's bytes at the chip's bandwidth. The kernel is memory-bound when the loop is
shorter, and its best case is then the HBM roofline; otherwise it runs at about
HBM cycles / loop bundles of it. A grid step adds the bundles outside the loop (block
bookkeeping, the carry, DMA issue; an upper bound, some are predicated off).

Also printed: the loop's use of each issue slot (VALU, XLU for rotates and permutes,
vector loads and stores) against the slots per bundle, so a change to a kernel shows
where its cycles went. Static figures, not timings: DMA stalls and the real clock are
not in them.
"""

from __future__ import annotations

import argparse
import atexit
import glob
import json
import os
import re
import shutil
import tempfile

# The dump flags must be in place before libtpu loads (at the first topology query).
# The dump (~130 MB a run) is read here and removed at exit.
_DUMP = tempfile.mkdtemp(prefix="lrulm_llo_")
atexit.register(shutil.rmtree, _DUMP, True)
os.environ["LIBTPU_INIT_ARGS"] = (
    os.environ.get("LIBTPU_INIT_ARGS", "")
    + f" --xla_jf_dump_to={_DUMP} --xla_jf_dump_llo_text=true"
)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import tool_args  # noqa: E402
from jax.sharding import SingleDeviceSharding  # noqa: E402

from lrulm import compile as compile_lib  # noqa: E402
from lrulm.kernels import tpu as tpu_kernels  # noqa: E402

# TensorCore clock (GHz) and TensorCores sharing a chip's HBM, for the generations whose
# clock follows from the published peak: bf16 FLOP/s = cores x 4 MXUs x 128^2 x 2 x clock.
_CHIPS = {"v4": (1.05, 2), "v5e": (1.5, 1), "v5p": (1.75, 2)}

_ADDR = re.compile(r"^\s*0x([0-9a-f]+)\s")


def _bundles(path: str) -> dict[int, str]:
    """Bundle address -> its line, from a final_bundles dump."""
    out = {}
    with open(path) as f:
        for line in f:
            if m := _ADDR.match(line):
                out[int(m.group(1), 16)] = line
    return out


def _loops(bundles: dict[int, str]) -> list[tuple[int, int]]:
    """(first, last) bundle of every loop: from a loop-body label (LB) to the bundle that
    ends the region its back edge branches to (branch delay slots included)."""
    loops = []
    for start, line in bundles.items():
        if " LB:" not in line:
            continue
        regions = set(re.findall(r"Start region (\d+)", line))
        for addr in sorted(a for a in bundles if a >= start):
            target = re.search(r"sbr\.rel .*target = \$region(\d+)", bundles[addr])
            if target and target.group(1) in regions:
                ends = [
                    a for a in sorted(bundles) if a >= addr
                    and re.search(rf"End region {target.group(1)}\b", bundles[a])
                ]  # fmt: skip
                end = ends[0] if ends else addr
                loops.append((start, end))
                break
    return loops


def _utilization(path: str) -> tuple[list[str], list[int], list[list[int]]]:
    """(slot names, slots per bundle, per-bundle use), from a per-bundle utilization dump."""
    with open(path) as f:
        lines = [line.split("#")[0].strip() for line in f]
    head = lines.index("== CAPACTIY:") if "== CAPACTIY:" in lines else lines.index("== CAPACITY:")
    names = [n.strip() for n in lines[head + 1].split(",")]
    capacity = [int(x) for x in lines[head + 2].split()]
    body = lines[lines.index("== UTILIZATION:") + 1 :]
    return names, capacity, [[int(x) for x in row.split()] for row in body if row]


def kernel_schedules(since: set[str]) -> list[dict]:
    """Every Pallas TPU kernel compiled since the dump held `since`: its loop and slots."""
    found = []
    for path in sorted(glob.glob(os.path.join(_DUMP, "*final_bundles.txt"))):
        name = os.path.basename(path)
        if path in since or "linear_scan" not in name or "schedule-analysis" in name:
            continue
        bundles = _bundles(path)
        loops = _loops(bundles)
        if not loops:
            continue
        first, last = min(loops, key=lambda fl: fl[1] - fl[0])  # the innermost
        prefix = re.sub(r"-\d+-final_bundles\.txt$", "", path)
        util = glob.glob(prefix + "-*final_hlo-static-per-bundle-utilization.txt")
        row = dict(
            kernel=re.sub(r"^\d+-|-\d+-final_bundles\.txt$", "", name),
            loop_bundles=last - first + 1,
            total_bundles=len(bundles),
            # stores of results in one loop iteration: to the pipeline's block buffers,
            # addressed by scalar registers (not to spill slots or scratch allocations)
            vector_stores=sum(
                len(re.findall(r"= vst \[vmem:\[%s", bundles[a]))
                for a in range(first, last + 1)
                if a in bundles
            ),  # fmt: skip
        )
        if util:
            names, capacity, use = _utilization(util[0])
            loop = use[first : last + 1]
            row["slots"] = {
                n: (sum(r[i] for r in loop), c * len(loop))
                for i, (n, c) in enumerate(zip(names, capacity))
                if n in ("VALU", "XLU", "VLOAD", "VLOAD:FILL", "VSTORE", "VSTORE:SPILL")
            }
        found.append(row)
    return found


# name, kernel, decay full (else (N,)), dtype, resets, reverse
CASES = [
    ("forward, a (N,), resets", "forward", False, jnp.float32, True, False),
    ("forward, a (N,)", "forward", False, jnp.float32, False, False),
    ("reverse, a (N,), resets", "forward", False, jnp.float32, True, True),
    ("forward, a (B,L,N)", "forward", True, jnp.float32, False, False),
    ("forward, a (N,), bf16", "forward", False, jnp.bfloat16, False, False),
    ("backward, a (N,), resets", "backward", False, jnp.float32, True, False),
    ("backward, a (B,L,N)", "backward", True, jnp.float32, False, False),
]


def arrays_moved(kernel: str, full_a: bool) -> int:
    """(rows, L, N) arrays per part a kernel reads or writes: forward b, h (and a);
    backward dh, h, g (and a, da)."""
    return 2 + full_a if kernel == "forward" else 3 + 2 * full_a


def compile_case(device, shape, kernel, full_a, dtype, keep, reverse, chunk):
    b, l, n = shape
    spec = lambda s, t: jax.ShapeDtypeStruct(s, t, sharding=SingleDeviceSharding(device))
    parts = lambda s: (spec(s, dtype), spec(s, dtype))
    a = parts((b, l, n) if full_a else (n,))
    seq, state, resets = parts((b, l, n)), parts((b, n)), spec((b, l), jnp.float32)
    static = dict(chunk=chunk, reverse=reverse, interpret=False)
    if kernel == "forward":
        run = lambda a, x, h0, r: tpu_kernels.forward(a, x, h0, (r,) if keep else (), **static)
        jax.jit(run).lower(a, seq, state, resets).compile()
    else:
        run = lambda a, dh, h, h0, r: tpu_kernels.backward(
            a, dh, h, h0, (r,) if keep else (), **static
        )
        jax.jit(run).lower(a, seq, seq, state, resets).compile()


def estimate(found, kernel, full_a, dtype, keep, shape, chunk, bytes_per_cycle) -> dict:
    """A kernel's schedule against the HBM time of its bytes, per slab and grid step."""
    itemsize = jnp.dtype(dtype).itemsize
    rows_per_slab = tpu_kernels._slab_rows(dtype)  # one loop iteration
    # The loop covers one slab of a block's channels: count them from the stores it
    # makes (one per vreg, i.e. 128 channels x 8 rows of 32-bit values or 16 of bf16,
    # per part and stored array; a time-invariant a's da stays in registers).
    stored = 1 + (kernel == "backward" and full_a)
    vregs_per_column = rows_per_slab // (8 * max(1, 4 // itemsize))
    lanes = 128 * found["vector_stores"] / (2 * stored * vregs_per_column)
    columns = (1 + (kernel == "backward")) * keep
    # the keep columns' tiles: 128 lanes per step, of which one value is used
    keep_bytes = columns * rows_per_slab * 128 * jnp.dtype(tpu_kernels._KEEP_DTYPE).itemsize
    hbm = lanes * rows_per_slab * itemsize * 2 * arrays_moved(kernel, full_a) + keep_bytes
    hbm /= bytes_per_cycle
    # A grid step: the loop once per slab of its chunk, plus everything else once.
    sequences = 2 * arrays_moved(kernel, full_a)
    _, chunk, _ = tpu_kernels._vmem_rows(chunk, shape[1], shape[2], dtype, sequences, columns)
    slabs = chunk // rows_per_slab
    step = found["loop_bundles"] * slabs + found["total_bundles"] - found["loop_bundles"]
    return dict(
        found,
        hbm_cycles=hbm,
        chunk=chunk,
        step_bundles=step,
        step_hbm_cycles=hbm * slabs,
        est_pct_of_hbm=100 * min(1.0, hbm * slabs / step),
    )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--topology", default="v5e:1x1")
    p.add_argument("--shape", default="8,2048,768", help="B,L,N of the scanned parts")
    p.add_argument("--chunk", type=int, default=512, help="time steps per grid step (at most)")
    p.add_argument("--clock_ghz", type=float, help="TensorCore clock, for other generations")
    p.add_argument("--json", help="also write the rows here")
    args = tool_args.show_defaults(p).parse_args()
    tool_args.writable(p, args.json)
    shape = tuple(map(int, args.shape.split(",")))
    topo = compile_lib.parse_topology(args.topology)
    device = compile_lib.topology_devices(topo)[0]
    clock, cores = _CHIPS.get(topo.generation.name, (args.clock_ghz, 1))
    if args.clock_ghz:
        clock = args.clock_ghz
    if clock is None:
        raise SystemExit(f"give --clock_ghz for {topo.generation.name}")
    bytes_per_cycle = topo.generation.hbm_bytes_per_s / cores / (clock * 1e9)
    print(
        f"TPU scan kernels on {device.device_kind} ({clock:g} GHz, "
        f"{bytes_per_cycle:.0f} HBM bytes/cycle per core), B,L,N = {shape}"
    )
    header = "| kernel | loop bundles / slab | HBM cycles / slab | chunk | bundles / grid step |"
    header += " HBM cycles / grid step | est. % of HBM BW |"
    header += " VALU | XLU | vld | vst |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    rows = []
    for name, kernel, full_a, dtype, keep, reverse in CASES:
        since = set(glob.glob(os.path.join(_DUMP, "*final_bundles.txt")))
        compile_case(device, shape, kernel, full_a, dtype, keep, reverse, args.chunk)
        for found in kernel_schedules(since):
            r = estimate(found, kernel, full_a, dtype, keep, shape, args.chunk, bytes_per_cycle)
            rows.append(dict(case=name, **r))
            use = {s: f"{100 * n / cap:.0f}%" for s, (n, cap) in r.get("slots", {}).items()}
            print(
                f"| {name} | {r['loop_bundles']} | {r['hbm_cycles']:.0f} | {r['chunk']} | "
                f"{r['step_bundles']} | {r['step_hbm_cycles']:.0f} | {r['est_pct_of_hbm']:.0f}% | "
                + " | ".join(use.get(s, "-") for s in ("VALU", "XLU", "VLOAD", "VSTORE"))
                + " |"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
