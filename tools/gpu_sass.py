"""What the GPU's compiler makes of the scan kernels, read from their sm_90a machine code on
a host without a GPU: registers, spills, and what the time loop loads, stores and waits for.

    pip install --target /opt/jax-cuda jax-cuda12-plugin==JAXLIB_VERSION nvidia-cuda-nvcc-cu12 \
        nvidia-cuda-nvdisasm              # XLA's own Triton and ptxas, a disassembler
    python tools/gpu_sass.py --plugin /opt/jax-cuda  # the default tuning and candidates
    python tools/gpu_sass.py --tunings "32,1,128,prefetch mosaic,32,6" --resets
    python tools/gpu_sass.py --tunings "mosaic,32,6,halves=2" --full_a --dtype bfloat16

Each tuning (lrulm.kernels.gpu.Tuning, Triton or Mosaic GPU) is compiled the way a GPU
host compiles it: the gradient of `linear_scan_planar(method="pallas")` at --shape (real
and imaginary planes; --full_a: a per-step complex decay, as Griffin's RG-LRU; --resets: a
(B, L) reset mask). Two compilers (--compiler):

- xla (the default where jax's CUDA plugin is found, in this environment or --plugin):
  XLA compiles the whole program for an H100 without a GPU (jax's deviceless
  ahead-of-time path, as `lrulm compile --topology h100` takes it: lrulm.devices.gpu_devices),
  in a child process that alone sees the plugin (installed into this environment, the
  plugin would try to open a GPU at every `import jax`). That is the jaxlib's own Triton
  pipeline, as the device runs it, up to the jaxlib version; XLA's dump gives each Triton
  kernel's PTX. The Mosaic GPU kernels are compiled too, by the plugin's custom call when
  XLA instantiates it (Mosaic's passes, LLVM's PTX, ptxas: a kernel that cannot compile
  fails here as on the device), and $MOSAIC_GPU_DUMP_TO gives their PTX. ptxas (from
  nvidia-cuda-nvcc-cu12, or on PATH) turns each PTX into sm_90a machine code as XLA and
  Mosaic do. compile s: XLA's compile of the whole gradient.
- triton (Triton tunings only): the kernels' Triton IR (captured by exporting the
  gradient for CUDA), compiled for sm_90 by the `triton` package (pip install triton:
  brings ptxas and cuobjdump), whose version differs from the jaxlib's: its register
  allocation differs too (3.9 spills the pingpong backward at 128 load registers, XLA's
  0.10.2 Triton does not), and its coalescing pass grows with the square of a kernel's
  memory operations (minutes a kernel). compile s: one kernel's.

The SASS (cuobjdump, or nvdisasm) is read for:

- regs / stack B: registers per thread and the per-thread stack frame plus static local
  memory, in bytes: where registers spill (0 is wanted: a kernel at the 255-register cap
  usually spills);
- the time loop's body (the longest backward branch before the kernel's last EXIT; the
  mbarrier retry loops Mosaic places after it are not the time loop): its global loads
  and stores (LDG / STG: Triton), TMA copies in and out (UTMALDG / UTMASTG: Mosaic GPU,
  through shared memory), shared-memory loads and stores (LDS / STS), mbarrier waits
  (SYNCS.PHASECHK: a chunk's copy awaited) and spill accesses (LDL + STL);
- waiting moves: MOVs in that body from a register loaded (LDG) in the same iteration and
  not written since. A move needs its value, so it waits for the load: a loop that ends
  in such moves waits there for every load it issued (lrulm.kernels.gpu._walk_chunks).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import tool_args

from lrulm.devices import PLUGIN_ENV

TOOLS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TOOLS)

# Registers an instruction writes: its first operand, for the instructions that write
# one (not stores, branches, barriers; a predicate destination is not a register).
_NO_DESTINATION = re.compile(r"^(ST|RED|ATOM|BRA|EXIT|BAR|MEMBAR|DEPBAR|NOP|RET|CALL|WARPSYNC)")
# What loop_report counts in the time loop, by opcode prefix.
_LOOP_COUNTS = {
    "loop_ldg": ("LDG",),
    "loop_stg": ("STG",),
    "loop_tma_in": ("UTMALDG",),
    "loop_tma_out": ("UTMASTG",),
    "loop_lds": ("LDS",),
    "loop_sts": ("STS",),
    "loop_waits": ("SYNCS.PHASECHK",),
    "loop_spills": ("LDL", "STL"),
}
_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def _registers(operand: str, width: int = 1) -> list[str]:
    match = re.fullmatch(r"R(\d+)", operand.strip())
    if not match:
        return []
    return [f"R{int(match.group(1)) + i}" for i in range(width)]


def _width(opcode: str) -> int:
    """Registers an LDG writes: .64 two, .128 four."""
    return {"64": 2, "128": 4}.get(opcode.rsplit(".", 1)[-1], 1)


def _resolve_labels(sass: str) -> str:
    """nvdisasm names branch targets (BRA `(.L_x_0)) where cuobjdump gives addresses
    (BRA 0x620): each label becomes the address of the instruction after it."""
    addresses, pending = {}, []
    for line in sass.splitlines():
        if label := re.match(r"\s*(\.L_\w+):", line):
            pending.append(label.group(1))
        elif pending and (address := re.search(r"/\*([0-9a-f]{4,})\*/", line)):
            addresses.update(dict.fromkeys(pending, address.group(1)))
            pending = []
    return re.sub(r"`\((\.L_\w+)\)", lambda m: f"0x{addresses.get(m.group(1), '0')}", sass)


def read_sass(sass: str) -> list[tuple[int, str, list[str]]]:
    """(address, opcode, operands) per instruction, predicates dropped."""
    out = []
    for address, text in _INSTRUCTION.findall(_resolve_labels(sass)):
        text = re.sub(r"^@!?U?P\w+\s+", "", text)
        opcode, _, rest = text.partition(" ")
        out.append((int(address, 16), opcode, [x.strip() for x in rest.split(",")] if rest else []))
    return out


def loop_report(sass: str) -> dict:
    """The time loop's body (the longest backward branch's span, among the branches
    before the kernel's last EXIT) of one kernel's SASS: its memory operations, mbarrier
    waits and spill accesses, and the moves that wait for an LDG of the same iteration."""
    code = read_sass(sass)
    exits = [address for address, opcode, _ in code if opcode == "EXIT"]
    end_of_kernel = exits[-1] if exits else float("inf")
    loops = []
    for address, opcode, operands in code:
        if opcode.startswith("BRA") and operands and address < end_of_kernel:
            target = int(operands[-1].split()[-1], 16)
            if target < address:
                loops.append((address - target, target, address))
    counts = {name: 0 for name in _LOOP_COUNTS}
    if not loops:
        return dict(loop=False, **counts, waiting_moves=0)
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
    for name, prefixes in _LOOP_COUNTS.items():
        counts[name] = sum(op.startswith(prefixes) for op, _ in body)
    return dict(loop=True, **counts, waiting_moves=waiting)


def resource_usage(text: str) -> dict:
    """Registers and the bytes registers spill to (the stack frame, which ptxas grows
    for spills, plus static local memory) from `cuobjdump -res-usage`'s last function."""
    line = [x for x in text.splitlines() if "REG:" in x][-1]
    fields = dict(re.findall(r"(\w+):(\d+)", line))
    return dict(regs=int(fields["REG"]), stack=int(fields["STACK"]) + int(fields["LOCAL"]))


def gradient(shape: tuple[int, int, int], resets: bool, sharding=None, *, full_a: bool = False,
             dtype: str = "float32"):  # fmt: skip
    """The program both compilers see, and its abstract arguments: the gradient (in a and
    b) of a loss of the Pallas scan of real and imaginary planes of `dtype`, (B, L, N) =
    shape; a is (N,), or (B, L, N) with full_a."""
    import jax
    import jax.numpy as jnp

    from lrulm import scan as scan_lib

    planes = jnp.dtype(dtype)
    spec = lambda *shape, dtype=planes: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    B, L, N = shape
    a = (spec(B, L, N) if full_a else spec(N),) * 2
    args = a, (spec(B, L, N),) * 2, spec(B, L, dtype=jnp.bool_)

    def loss(a, b, keep):
        h = scan_lib.linear_scan_planar(a, b, resets=keep if resets else None, method="pallas")
        return sum(jnp.sum(x.astype(jnp.float32) ** 2) for x in h)

    return jax.jit(jax.grad(loss, argnums=(0, 1))), args


def capture(tuning: str, shape: tuple[int, int, int], resets: bool, **variant) -> list[dict]:
    """The Triton IR of each Triton kernel in the CUDA lowering of the scan's gradient
    under `tuning`, with the launch it asks for: [{name, ttir, num_warps, num_stages}]."""
    import jax
    from jax._src.pallas.triton import pallas_call_registration as registration

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

    registration.lowering.lower_jaxpr_to_triton_module = spy
    old = os.environ.get(gpu.TUNING_ENV)
    os.environ[gpu.TUNING_ENV] = tuning  # read while tracing
    scan_pallas.forget_traces()
    try:
        triton_call = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
        grad, args = gradient(shape, resets, **variant)
        jax.export.export(grad, platforms=["cuda"], disabled_checks=[triton_call])(*args)
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
        return dict(error=_child_error(done.stderr), compile_s=seconds)
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


# ==========================================================================================
# XLA: the jaxlib's own Triton pipeline, compiling for an H100 without one.
# ==========================================================================================

_PLUGINS = ("xla_cuda12", "xla_cuda13")
_INSTALL = (
    "pip install --target DIR jax-cuda12-plugin==JAXLIB_VERSION nvidia-cuda-nvcc-cu12 "
    "nvidia-cuda-nvdisasm, then --plugin DIR"
)


def find_plugin(path: str = "") -> str | None:
    """Where jax's CUDA plugin is: `path` when it holds one, "" when this environment
    does, None when neither."""
    if path:
        found = any(os.path.isdir(os.path.join(path, "jax_plugins", n)) for n in _PLUGINS)
        return path if found else None
    spec = importlib.util.find_spec("jax_plugins")
    places = spec.submodule_search_locations if spec else []
    return "" if any(os.path.isdir(os.path.join(d, n)) for d in places for n in _PLUGINS) else None


def nvidia_tool(name: str, plugin: str = "") -> str | None:
    """A CUDA tool (ptxas, cuobjdump, nvdisasm): on PATH, in NVIDIA's pip wheels
    (nvidia/*/bin) next to the plugin or on sys.path, or the one triton brings."""
    if found := shutil.which(name):
        return found
    for base in filter(None, [plugin, *sys.path]):
        candidates = sorted(glob.glob(os.path.join(base, "nvidia", "*", "bin", name)))
        candidates.append(os.path.join(base, "triton", "backends", "nvidia", "bin", name))
        for found in candidates:
            if os.path.isfile(found) and os.access(found, os.X_OK):
                return found
    return None


def ptxas_usage(text: str) -> dict:
    """Registers and stack bytes (spills and local memory) from `ptxas -v`."""
    regs = re.findall(r"Used (\d+) registers", text)
    if not regs:
        raise ValueError(f"no register count in ptxas's output: {text[-300:]!r}")
    stack = re.findall(r"(\d+) bytes stack frame", text)
    lmem = re.findall(r"(\d+) bytes lmem", text)
    return dict(regs=int(regs[-1]), stack=int((stack or [0])[-1]) + int((lmem or [0])[-1]))


def compile_for_h100(case: str) -> None:
    """The child process's work (the plugin on its path; the tuning and the dump folders
    in its environment): compiles the gradient of `case` (gradient's arguments, as JSON)
    for an H100, prints the seconds taken."""
    import jax

    from lrulm import compile as compile_lib
    from lrulm import target

    h100 = compile_lib.gpu_devices(compile_lib.parse_target("h100"))[0]
    sharding = jax.sharding.SingleDeviceSharding(h100)
    case = json.loads(case)
    with target.compiling_for("gpu"):  # traced as a GPU host traces it
        grad, args = gradient(tuple(case.pop("shape")), case.pop("resets"), sharding, **case)
        start = time.perf_counter()
        grad.lower(*args).compile()
    print(json.dumps(dict(compile_s=time.perf_counter() - start)))


def _disassemble(cubin: str, plugin: str) -> str:
    if cuobjdump := nvidia_tool("cuobjdump", plugin):
        command = [cuobjdump, "-sass", cubin]
    else:
        command = [nvidia_tool("nvdisasm", plugin), cubin]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout


def xla_compile(tuning: str, case: dict, out: str, plugin: str) -> list[dict]:
    """The kernels of `tuning` (Triton, or Mosaic GPU and any Triton it leaves) as XLA
    compiles the gradient of `case` for an H100, in a child process that alone sees the
    plugin: one row per kernel, forward first."""
    from lrulm.kernels import gpu

    dump = os.path.join(out, tuning.replace(",", "_").replace("=", ""))
    shutil.rmtree(dump, ignore_errors=True)
    os.makedirs(mosaic_dump := os.path.join(dump, "mosaic"))
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={dump}".strip()
    path = os.pathsep.join(filter(None, [TOOLS, ROOT, os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path, XLA_FLAGS=flags, MOSAIC_GPU_DUMP_TO=mosaic_dump,
               **{gpu.TUNING_ENV: tuning})  # fmt: skip
    if plugin:  # a folder of its own: lrulm.devices.gpu_devices puts it on the path
        env[PLUGIN_ENV] = plugin
    env["JAX_PLATFORMS"] = "cpu"  # the plugin compiles for the topology; no GPU is opened
    # Compiled afresh: a program from a persistent compilation cache dumps no kernels.
    env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    child = "import sys, gpu_sass; gpu_sass.compile_for_h100(sys.argv[1])"
    done = subprocess.run([sys.executable, "-c", child, json.dumps(case)],
                          capture_output=True, text=True, env=env)  # fmt: skip
    if done.returncode:
        return [dict(kernel="forward+backward", error=_child_error(done.stderr))]
    compile_s = json.loads(done.stdout.strip().splitlines()[-1])["compile_s"]
    for log in glob.glob(os.path.join(mosaic_dump, "*.mlir-passes.log")):
        os.remove(log)  # Mosaic's IR after each pass: megabytes a kernel
    rows = []
    for ptx in sorted(glob.glob(os.path.join(dump, "*.ptx")) + glob.glob(mosaic_dump + "/*.ptx")):
        text = open(ptx).read()
        if not (entry := re.search(r"\.entry (linear_scan\w*)", text)):
            continue
        cubin = os.path.join(os.path.dirname(ptx), entry.group(1) + ".cubin")
        arch = re.search(r"\.target (sm_\w+)", text).group(1)
        command = [nvidia_tool("ptxas", plugin), f"-arch={arch}", "-O3", "-v", ptx, "-o", cubin]
        built = subprocess.run(command, capture_output=True, text=True, check=True)
        sass = _disassemble(cubin, plugin)
        with open(cubin[: -len(".cubin")] + ".sass", "w") as f:
            f.write(sass)
        name = entry.group(1)
        rows.append(dict(kernel="backward" if "_bwd" in name else "forward",
                         code="mosaic" if "mosaic" in name else "triton",
                         **ptxas_usage(built.stdout + built.stderr), **loop_report(sass),
                         compile_s=compile_s))  # fmt: skip
    return sorted(rows, key=lambda r: (r["kernel"] == "backward", r["code"]))


_COLUMNS = (  # (heading, row key) after tuning and kernel
    ("regs", "regs"), ("stack B", "stack"), ("loop LDG", "loop_ldg"), ("loop STG", "loop_stg"),
    ("loop TMA in", "loop_tma_in"), ("loop TMA out", "loop_tma_out"), ("loop LDS", "loop_lds"),
    ("loop STS", "loop_sts"), ("loop waits", "loop_waits"), ("loop spills", "loop_spills"),
    ("waiting moves", "waiting_moves"),
)  # fmt: skip


def table(rows: list[dict]) -> str:
    headings = ["tuning", "kernel", *(h for h, _ in _COLUMNS), "compile s"]
    lines = ["| " + " | ".join(headings) + " |", "|" + "---|" * len(headings)]
    for r in rows:
        kernel = r["kernel"] + (" (Triton)" if r.get("code") == "triton" and
                                r["tuning"].startswith("mosaic") else "")  # fmt: skip
        if "error" in r:
            cells = [f"failed: {r['error']}"] + [""] * len(_COLUMNS)
        else:
            cells = [str(r.get(key, "")) for _, key in _COLUMNS] + [f"{r['compile_s']:.0f}"]
        lines.append("| " + " | ".join([r["tuning"], kernel, *cells]) + " |")
    return "\n".join(lines)


def _triton_jobs(args, shape, variant, out) -> list[tuple[dict, tuple]]:
    """Triton: one compile per kernel, of the Triton IR captured for it."""
    jobs = []
    for tuning in args.tunings.split():
        for m in capture(tuning, shape, args.resets, **variant):
            kernel = "backward" if m["name"].endswith("_bwd") else "forward"
            if kernel not in args.kernels.split(","):
                continue
            stem = tuning.replace(",", "_").replace("=", "")
            path = os.path.join(out, f"{stem}_{m['name']}.ttir")
            with open(path, "w") as f:
                f.write(m["ttir"])
            jobs.append((dict(tuning=tuning, kernel=kernel),
                         (_compile, path, m["num_warps"], m["num_stages"])))  # fmt: skip
    return jobs


def _child_error(stderr: str) -> str:
    """A failed child's error line: the last `SomeError: ...` line (jax ends a traceback
    with a note on its filtered frames), else the last line."""
    lines = stderr.strip().splitlines() or ["(no output)"]
    errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Exit)\b", line)]
    return (errors or lines)[-1]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tunings", default="32,1,128,prefetch 32,1,128,pingpong")
    p.add_argument("--shape", default="8,2048,1024", help="B,L,N")
    p.add_argument("--resets", action="store_true", help="with a (B, L) reset mask")
    p.add_argument("--full_a", action="store_true", help="a per-step decay, (B, L, N)")
    p.add_argument("--dtype", default="float32", help="of a, b and h (float32, bfloat16)")
    p.add_argument("--kernels", default="forward,backward", help="which of them to report")
    p.add_argument("--compiler", choices=("xla", "triton"), default=None,
                   help="default: xla where jax's CUDA plugin is found, else triton")  # fmt: skip
    p.add_argument("--plugin", default=os.environ.get(PLUGIN_ENV, ""),
                   help="a folder holding jax's CUDA plugin (pip install --target); default: "
                   "$LRULM_JAX_CUDA_PLUGIN, else this environment")  # fmt: skip
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", default="", help="keep the IR, PTX, cubins and SASS here")
    p.add_argument("--json", default="")
    args = tool_args.show_defaults(p).parse_args()
    tool_args.writable(p, args.json)
    from lrulm.kernels import gpu

    for tuning in args.tunings.split():
        try:
            gpu.Tuning.parse(tuning)
        except ValueError as e:
            p.error(f"--tunings: {e}")
    try:
        shape = tuple(int(x) for x in args.shape.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        p.error(f"--shape takes B,L,N (three positive integers); got {args.shape!r}")
    plugin = find_plugin(args.plugin)
    if args.plugin and plugin is None:
        p.error(f"--plugin / ${PLUGIN_ENV} {args.plugin}: no jax CUDA plugin there ({_INSTALL})")
    compiler = args.compiler or ("xla" if plugin is not None else "triton")
    if compiler == "xla":
        missing = [x for x in ("ptxas",) if not nvidia_tool(x, plugin or "")]
        if not (nvidia_tool("cuobjdump", plugin or "") or nvidia_tool("nvdisasm", plugin or "")):
            missing.append("cuobjdump or nvdisasm")
        if plugin is None or missing:
            what = "jax's CUDA plugin" if plugin is None else " and ".join(missing)
            raise SystemExit(f"--compiler xla needs {what}: {_INSTALL}")
    else:
        try:
            _triton_tool("cuobjdump")
        except ImportError:
            raise SystemExit(
                "needs the triton package (with ptxas for sm_90): pip install triton, "
                f"or for XLA's own pipeline: {_INSTALL}"
            ) from None
    variant = dict(full_a=args.full_a, dtype=args.dtype)
    out = args.out or tempfile.mkdtemp(prefix="gpu_sass_")
    os.makedirs(out, exist_ok=True)
    if compiler == "xla":
        case = dict(shape=shape, resets=args.resets, **variant)
        jobs = [(dict(tuning=t), (xla_compile, t, case, out, plugin))
                for t in args.tunings.split()]  # fmt: skip
    else:
        jobs = _triton_jobs(args, shape, variant, out)
    target = "an H100 (XLA)" if compiler == "xla" else "sm_90 (triton)"
    print(f"compiling {len(jobs)} jobs for {target}, {args.jobs} at a time, in {out}", flush=True)
    rows = []
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(*job) for _, job in jobs]
        for (row, _), future in zip(jobs, futures):
            result = future.result()
            new = [{**row, **r} for r in (result if isinstance(result, list) else [result])]
            new = [r for r in new if r.get("kernel") in args.kernels.split(",") or "error" in r]
            rows += new
            for line in table(new).splitlines()[2:]:
                print(line, flush=True)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(shape=shape, resets=args.resets, **variant, compiler=compiler,
                           rows=rows), f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
