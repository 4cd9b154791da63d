"""What Triton makes of the GPU scan kernels, read from their sm_90 machine code, on a host
without a GPU: registers, spills, and what the time loop's loads wait for.

    pip install triton                       # not an lrulm dependency: Triton + ptxas
    python tools/triton_sass.py              # the default tuning and the candidates
    python tools/triton_sass.py --tunings "32,1,128,prefetch 32,1,128,pingpong" --resets

Each tuning (lrulm.kernels.gpu.Tuning) is lowered here the way a GPU host lowers it
(jax.export for CUDA: the gradient of `linear_scan_planar(method="pallas")` at --shape,
float32 planes), which yields each Pallas kernel's Triton IR. That IR is compiled for
sm_90 by the installed `triton` package, whose version may differ from the Triton inside
the GPU's jaxlib (so the numbers describe the kernel's structure, not jaxlib's exact
build), and its SASS is read (cuobjdump):

- regs / stack B: registers per thread and the per-thread stack frame plus static local
  memory, in bytes: where registers spill (0 is wanted: a kernel at the 255-register cap
  usually spills);
- loop LDG / STG / spills: global loads, global stores and spill accesses (LDL + STL) in
  the time loop's body (the backward branch);
- waiting moves: MOVs in that body from a register loaded in the same iteration and not
  written since. A move needs its value, so it waits for the load: a loop that ends in
  such moves waits there for every load it issued (lrulm.kernels.gpu._walk_chunks).

Compiling one kernel takes minutes (Triton's coalescing pass grows with the square of a
kernel's memory operations); --jobs compiles several at once.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import subprocess
import sys
import tempfile
import time

# Registers an instruction writes: its first operand, for the instructions that write
# one (not stores, branches, barriers; a predicate destination is not a register).
_NO_DESTINATION = re.compile(r"^(ST|RED|ATOM|BRA|EXIT|BAR|MEMBAR|DEPBAR|NOP|RET|CALL|WARPSYNC)")
_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def _registers(operand: str, width: int = 1) -> list[str]:
    match = re.fullmatch(r"R(\d+)", operand.strip())
    if not match:
        return []
    return [f"R{int(match.group(1)) + i}" for i in range(width)]


def _width(opcode: str) -> int:
    """Registers an LDG writes: .64 two, .128 four."""
    return {"64": 2, "128": 4}.get(opcode.rsplit(".", 1)[-1], 1)


def read_sass(sass: str) -> list[tuple[int, str, list[str]]]:
    """(address, opcode, operands) per instruction, predicates dropped."""
    out = []
    for address, text in _INSTRUCTION.findall(sass):
        text = re.sub(r"^@!?U?P\w+\s+", "", text)
        opcode, _, rest = text.partition(" ")
        out.append((int(address, 16), opcode, [x.strip() for x in rest.split(",")] if rest else []))
    return out


def loop_report(sass: str) -> dict:
    """The time loop's body (the longest backward branch's span) of one kernel's SASS:
    its LDG, STG and spill (LDL + STL) counts and the moves that wait for a load of the
    same iteration."""
    code = read_sass(sass)
    loops = []
    for address, opcode, operands in code:
        if opcode.startswith("BRA") and operands:
            target = int(operands[-1].split()[-1], 16)
            if target < address:
                loops.append((address - target, target, address))
    if not loops:
        return dict(loop=False, loop_ldg=0, loop_stg=0, loop_spills=0, waiting_moves=0)
    _, start, end = max(loops)
    body = [(op, operands) for address, op, operands in code if start <= address <= end]
    loaded: set[str] = set()  # registers holding a load of this iteration
    waiting = 0
    for opcode, operands in body:
        if opcode.startswith("MOV") and len(operands) == 2 and operands[1] in loaded:
            waiting += 1
        if not operands or _NO_DESTINATION.match(opcode):
            continue
        written = _registers(operands[0], _width(opcode) if opcode.startswith("LDG") else 1)
        if opcode.startswith("LDG"):
            loaded.update(written)
        else:
            loaded.difference_update(written)
    return dict(
        loop=True,
        loop_ldg=sum(op.startswith("LDG") for op, _ in body),
        loop_stg=sum(op.startswith("STG") for op, _ in body),
        loop_spills=sum(op.startswith(("LDL", "STL")) for op, _ in body),
        waiting_moves=waiting,
    )


def resource_usage(text: str) -> dict:
    """Registers and the bytes registers spill to (the stack frame, which ptxas grows
    for spills, plus static local memory) from `cuobjdump -res-usage`'s last function."""
    line = [x for x in text.splitlines() if "REG:" in x][-1]
    fields = dict(re.findall(r"(\w+):(\d+)", line))
    return dict(regs=int(fields["REG"]), stack=int(fields["STACK"]) + int(fields["LOCAL"]))


def capture(tuning: str, shape: tuple[int, int, int], resets: bool) -> list[dict]:
    """The Triton IR of each Triton kernel in the CUDA lowering of the scan's gradient
    under `tuning`, with the launch it asks for: [{name, ttir, num_warps, num_stages}]."""
    import jax
    import jax.numpy as jnp
    from jax._src.pallas.triton import pallas_call_registration as registration

    from lrulm import scan as scan_lib
    from lrulm import scan_pallas
    from lrulm.kernels import gpu

    t = gpu.Tuning.parse(tuning)
    if t.kernel != "triton":
        raise SystemExit(f"{tuning}: only Triton tunings compile to Triton IR")
    modules = []
    lower = registration.lowering.lower_jaxpr_to_triton_module

    def spy(*args, **kwargs):
        result = lower(*args, **kwargs)
        op = result.module.operation
        name = re.search(r"tt\.func public @(\w+)", op.get_asm()).group(1)
        modules.append(dict(name=name, ttir=op.get_asm(), num_warps=t.warps, num_stages=t.stages))
        return result

    B, L, N = shape
    a = (jnp.zeros((N,), jnp.float32),) * 2
    b = (jax.ShapeDtypeStruct((B, L, N), jnp.float32),) * 2
    keep = jax.ShapeDtypeStruct((B, L), jnp.bool_)

    def loss(a, b, keep):
        h = scan_lib.linear_scan_planar(a, b, resets=keep if resets else None, method="pallas")
        return sum(jnp.sum(x**2) for x in h)

    registration.lowering.lower_jaxpr_to_triton_module = spy
    old = os.environ.get(gpu.TUNING_ENV)
    os.environ[gpu.TUNING_ENV] = tuning  # read while tracing
    scan_pallas.forget_traces()
    try:
        triton_call = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
        grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
        jax.export.export(grad, platforms=["cuda"], disabled_checks=[triton_call])(a, b, keep)
    finally:
        registration.lowering.lower_jaxpr_to_triton_module = lower
        if old is None:
            os.environ.pop(gpu.TUNING_ENV)
        else:
            os.environ[gpu.TUNING_ENV] = old
        scan_pallas.forget_traces()
    return modules


def _compile(path: str, num_warps: int, num_stages: int) -> dict:
    """Compiles one Triton IR file for sm_90 in a fresh process; SASS and resource usage."""
    script = (
        "import sys, triton\n"
        "from triton.backends.compiler import GPUTarget\n"
        "k = triton.compile(sys.argv[1], target=GPUTarget('cuda', 90, 32),\n"
        "    options=dict(num_warps=int(sys.argv[2]), num_stages=int(sys.argv[3])))\n"
        "open(sys.argv[1] + '.cubin', 'wb').write(k.asm['cubin'])\n"
    )
    env = dict(
        os.environ,
        TRITON_DEFAULT_FP_FUSION="1",  # as XLA's Triton: fused multiply-adds
        TRITON_CACHE_DIR=path + ".cache",  # compiled afresh, so the time is the compile's
    )
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", script, path, str(num_warps), str(num_stages)],
        capture_output=True,
        text=True,
        env=env,
    )
    seconds = time.perf_counter() - start
    if done.returncode:
        return dict(error=done.stderr.strip().splitlines()[-1], compile_s=seconds)
    cuobjdump = _triton_tool("cuobjdump")
    cubin = path + ".cubin"
    usage = subprocess.run([cuobjdump, "-res-usage", cubin], capture_output=True, text=True)
    sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True).stdout
    with open(path + ".sass", "w") as f:
        f.write(sass)
    return dict(**resource_usage(usage.stdout), **loop_report(sass), compile_s=seconds)


def _triton_tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def table(rows: list[dict]) -> str:
    lines = [
        "| tuning | kernel | regs | stack B | loop LDG | loop STG | loop spills "
        "| waiting moves | compile s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['tuning']} | {r['kernel']} | failed: {r['error']} | | | | | | |")
            continue
        lines.append(
            f"| {r['tuning']} | {r['kernel']} | {r['regs']} | {r['stack']} | {r['loop_ldg']} "
            f"| {r['loop_stg']} | {r['loop_spills']} | {r['waiting_moves']} "
            f"| {r['compile_s']:.0f} |"
        )
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tunings", default="32,1,128,prefetch 32,1,128,pingpong")
    p.add_argument("--shape", default="8,2048,1024", help="B,L,N")
    p.add_argument("--resets", action="store_true", help="with a (B, L) reset mask")
    p.add_argument("--kernels", default="forward,backward", help="which of them to compile")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", default="", help="keep the IR, cubins and SASS here")
    p.add_argument("--json", default="")
    args = p.parse_args()
    try:
        _triton_tool("cuobjdump")
    except ImportError:
        raise SystemExit(
            "needs the triton package (with ptxas for sm_90): pip install triton"
        ) from None
    shape = tuple(int(x) for x in args.shape.split(","))
    out = args.out or tempfile.mkdtemp(prefix="triton_sass_")
    os.makedirs(out, exist_ok=True)
    jobs = []
    for tuning in args.tunings.split():
        for m in capture(tuning, shape, args.resets):
            kernel = "backward" if m["name"].endswith("_bwd") else "forward"
            if kernel not in args.kernels.split(","):
                continue
            stem = tuning.replace(",", "_").replace("=", "")
            path = os.path.join(out, f"{stem}_{m['name']}.ttir")
            with open(path, "w") as f:
                f.write(m["ttir"])
            jobs.append((dict(tuning=tuning, kernel=kernel), path, m["num_warps"], m["num_stages"]))
    print(f"compiling {len(jobs)} kernels for sm_90, {args.jobs} at a time, in {out}", flush=True)
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(_compile, *job[1:]) for job in jobs]
        rows = []
        for (row, *_), future in zip(jobs, futures):
            rows.append({**row, **future.result()})
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(shape=shape, resets=args.resets, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
