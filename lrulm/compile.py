"""`lrulm compile`: compile the train and eval steps for a TPU topology or a GPU host, on any
machine.

Uses JAX's ahead-of-time path: libtpu describes the chips of a slice
(`jax.experimental.topologies`), the trainer builds its mesh, model and shardings
abstractly over them (`experiment.build`), and XLA compiles the exact jitted steps the
trainer runs for ShapeDtypeStruct inputs. No parameter is materialised anywhere, so a
laptop can tell whether a 1.3B model fits a v5e-16 before a TPU is rented. For GPUs
(`h100:8`, a host of 8; `h100:8x4`, 4 such hosts) jax's CUDA plugin describes them
(lrulm.devices) and XLA's GPU compiler, with its Triton, compiles the steps (and the
plugin the Mosaic GPU kernels, to sm_90a code, as it would on the GPU host); it reports
a peak but no FLOPs or bytes, and the fit is against the card's whole memory (a running
jax preallocates 75% of it unless XLA_PYTHON_CLIENT_PREALLOCATE=false).

What the report holds, per chip (SPMD programs are per device; on v4 and v5p one JAX
device is one chip, its two TensorCores fused as a "megacore"):

- memory from XLA's buffer assignment: arguments (train state + batch), outputs,
  aliased (donated arguments reused for outputs), temporaries and generated code. The
  resident total is XLA's peak of the buffers live at once (arguments, outputs and the
  temporaries live at that moment): the figure its TPU compiler holds against the HBM,
  and quotes when it refuses. The temporaries row is the whole temporary allocation,
  whose buffers are not all live at once, so the rows summed overstate the need: for
  125m at 5 x 65,536 tokens per v5e chip they sum to 21 GiB of a 16 GiB chip, and XLA
  accepts the program, whose peak is 14.9 GiB. Backends without a peak get the sum.
  XLA's TPU compiler refuses a program that exceeds the HBM it may use (a little under
  the chip's HBM); the report then gives the need XLA's refusal states (marked `~`, its
  estimate before its own rematerialisation). `measure_overflow` recompiles with
  `xla_tpu_no_crash_on_oom` to measure it instead, which libtpu 0.0.42 refuses for every
  over-HBM step tried ("Invalid TPU program", even 0.7% over), so it is off by default.
- FLOPs and bytes from XLA's cost analysis. Caveat: XLA counts each while-loop body
  once, and the layer stack, the chunked recurrence and gradient accumulation are
  loops, so these undercount; the report flags it.
- an MFU bound: model FLOPs per step (the task's flops_per_token x tokens, the usual
  6N-style count, recomputation not counted) over chips x peak x t_min, with
  t_min = max(per-chip FLOPs / peak, per-chip bytes / HBM bandwidth), per-chip FLOPs =
  max(executed FLOPs / chips, XLA FLOPs) (executed = model FLOPs x 4/3 under
  remat=full, which runs each forward twice) and per-chip bytes = max(XLA bytes,
  arguments + outputs, which every step must read and write). It ignores collective time
  and kernel efficiency, so real MFU is lower: it is a ceiling, not a forecast.
- collectives in the compiled HLO (static counts: one in a loop body counts once) and
  the bytes of their results per chip.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time

from lrulm.devices import (
    PLUGIN_ENV,  # noqa: F401 (tools and tests read compile.PLUGIN_ENV)
    gpu_devices,
    topology_devices,
)
from lrulm.topologies import (
    GpuTopology,
    Topology,
    parse_target,
    parse_topology,  # noqa: F401 (tools and tests call compile.parse_topology)
)

GIB = 1024**3


# ==========================================================================================
# The report.
# ==========================================================================================


@dataclasses.dataclass
class StepReport:
    """One compiled step (train or eval), per chip."""

    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    xla_flops: float | None  # None: not compiled
    xla_bytes_accessed: float | None
    has_loops: bool  # XLA's FLOPs and bytes count each loop body once
    collectives: dict[str, dict[str, float]]
    lower_s: float
    compile_s: float
    compiler_fits: bool  # False: XLA refused it for lack of HBM
    measured: bool = True  # False: refused and not recompiled; temporaries are XLA's estimate
    oom_message: str = ""
    # XLA's peak of simultaneously live buffers, arguments included (None: not reported)
    xla_peak_bytes: int | None = None
    # custom calls in the compiled HLO by target (static counts): the Pallas kernels are
    # tpu_custom_call on a TPU, __gpu$xla.gpu.triton (Triton) or mosaic_gpu_v2 on a GPU
    custom_calls: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def summed_bytes(self) -> int:
        """Every allocation of the step added up (donated arguments counted once)."""
        return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
                + self.code_bytes)  # fmt: skip

    @property
    def total_bytes(self) -> int:
        """What must be resident at the step's peak: XLA's own figure (what its TPU
        compiler holds against the HBM), or the summed allocations where the backend
        reports no peak."""
        return self.xla_peak_bytes or self.summed_bytes

    @property
    def working_bytes(self) -> int:
        """The part of the peak that is not the step's arguments (temporaries live at the
        peak, outputs not donated into arguments, code, the runtime's reserve)."""
        return self.total_bytes - self.argument_bytes


@dataclasses.dataclass
class Report:
    """What `lrulm compile` found; every byte count is per chip."""

    topology: str
    accelerator_type: str
    device_kind: str
    chips: int
    hbm_bytes: int
    hbm_usable_bytes: int | None  # what XLA said it may use, when it said (on OOM)
    mesh: dict[str, int]  # each axis's whole size (across slices too)
    preset: str
    num_params: int
    global_batch: int
    seq_len: int
    grad_accum_steps: int
    remat: str
    dtype: str
    state_bytes: int  # params (+ their average) + optimizer state + counters, by shardings
    batch_bytes: int
    train: StepReport
    eval: StepReport | None
    model_flops_per_step: float
    peak_flops: float
    hbm_bytes_per_s: float
    step_time_lower_bound_s: float
    bound_by: str  # "compute" or "memory"
    mfu_bound: float | None  # None when the train step did not compile
    shape: str = ""  # layers, widths: what the model is (LRA configs name no preset)
    # Each axis's size across slices (mesh.dcn_*); an axis's size within a slice (the
    # config's mesh.<axis>) is mesh[axis] // dcn[axis].
    dcn: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def steps(self) -> list[StepReport]:
        return [s for s in (self.train, self.eval) if s is not None]

    @property
    def peak_bytes(self) -> int:
        return max(s.total_bytes for s in self.steps)

    @property
    def limit_bytes(self) -> int:
        return self.hbm_usable_bytes or self.hbm_bytes

    @property
    def fits(self) -> bool:
        return all(s.compiler_fits for s in self.steps) and self.peak_bytes <= self.limit_bytes

    @property
    def shortfall_bytes(self) -> int:
        return max(0, self.peak_bytes - self.limit_bytes)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        for name in ("train", "eval"):
            if getattr(self, name) is not None:
                step = getattr(self, name)
                out[name].update(total_bytes=step.total_bytes, summed_bytes=step.summed_bytes)
        out.update(fits=self.fits, peak_bytes=self.peak_bytes,
                   shortfall_bytes=self.shortfall_bytes)  # fmt: skip
        return out


# ==========================================================================================
# Compiling.
# ==========================================================================================

_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
                "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8,
                "c128": 16, "s4": 0.5, "u4": 0.5}  # fmt: skip
_INSTRUCTION = re.compile(r"=\s+(.+?)\s+(" + "|".join(_COLLECTIVES) + r")(-start)?\(")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z0-9]*)?)\[([0-9,]*)\]")


def collectives(hlo_text: str) -> dict[str, dict[str, float]]:
    """{op: {"count", "bytes", "largest"}} of the collectives in compiled HLO text.

    Async pairs count once (the -start); bytes are those of the op's largest result
    array per chip (for all-gather the gathered array, for reduce-scatter the shard),
    summed, and the largest of them: a gathered activation stands out against weights.
    """
    out = {op: {"count": 0, "bytes": 0.0, "largest": 0.0} for op in _COLLECTIVES}
    for m in _INSTRUCTION.finditer(hlo_text):
        size = max(
            (
                math.prod(int(d) for d in dims.split(",") if d) * _DTYPE_BYTES.get(dtype, 1)
                for dtype, dims in _ARRAY.findall(m.group(1))
            ),
            default=0,
        )
        op = out[m.group(2)]
        op["count"] += 1
        op["bytes"] += size
        op["largest"] = max(op["largest"], size)
    return out


def custom_calls(hlo_text: str) -> dict[str, int]:
    """{target: count} of the custom calls in compiled HLO text."""
    counts: dict[str, int] = {}
    for target in re.findall(r'custom_call_target="([^"]+)"', hlo_text):
        counts[target] = counts.get(target, 0) + 1
    return counts


def _sharded_bytes(tree) -> int:
    """Bytes per device of a tree of ShapeDtypeStructs with shardings (the largest shard)."""
    import jax
    import numpy as np

    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


_SIZE = r"([0-9.]+)\s*([KMGTP]?)i?B?"  # XLA's "24.36G" (binary units)


def _parse_oom(message: str) -> tuple[int | None, int | None]:
    """(bytes XLA says it needs, bytes it may use) from its out-of-memory message.

    Two wordings are known: an early "total memory required for HLO temporaries (X)
    exceeds available HBM (Y)" and, after scheduling, "Used X of Y hbm". Despite its
    wording the first X is the program's whole peak, arguments included: for 125m at
    6 and 7 x 65,536 tokens per v5e chip it said 17.58 and 20.11 GiB, where the peaks
    measured at 3 to 5 sequences (9.72, 12.31, 14.92 GiB, 1.67 of them arguments) extend
    to 17.53 and 20.14.
    """
    for pattern in (r"temporaries \(" + _SIZE + r"\) exceeds available HBM \(" + _SIZE,
                    r"Used " + _SIZE + " of " + _SIZE + " hbm"):  # fmt: skip
        if m := re.search(pattern, message):
            size = lambda number, unit: int(float(number) * 1024 ** " KMGTP".index(unit or " "))
            return size(m[1], m[2]), size(m[3], m[4])
    return None, None


def _compile_step(jitted, args, measure_overflow: bool) -> tuple[StepReport, int | None]:
    """Lowers and compiles one step; returns its report and the HBM XLA may use (when it
    said). On XLA's out-of-memory refusal, optionally recompiles with
    `xla_tpu_no_crash_on_oom` to measure what the step would need."""
    import jax

    t0 = time.perf_counter()
    lowered = jitted.lower(*args)
    t1 = time.perf_counter()
    oom, needed, usable = "", None, None
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        oom = str(e).strip()
        needed, usable = _parse_oom(oom)
        compiled = None
        if measure_overflow:
            try:
                compiled = lowered.compile(compiler_options={"xla_tpu_no_crash_on_oom": True})
            except jax.errors.JaxRuntimeError:  # seen: "Invalid TPU program" far over HBM
                compiled = None
    t2 = time.perf_counter()
    times = dict(lower_s=t1 - t0, compile_s=t2 - t1, compiler_fits=not oom, oom_message=oom)
    if compiled is None:  # refused, not measured: the state is exact, the rest XLA's estimate
        arguments = _sharded_bytes(args)
        return StepReport(
            argument_bytes=arguments, output_bytes=0, alias_bytes=0,
            temp_bytes=max((needed or 0) - arguments, 0), code_bytes=0, xla_flops=None,
            xla_bytes_accessed=None, has_loops=True, collectives={}, measured=False,
            xla_peak_bytes=needed, **times,
        ), usable  # fmt: skip
    mem, text = compiled.memory_analysis(), compiled.as_text()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older jax: one per module
    cost = cost or {}  # a GPU compiled for without one reports none
    return StepReport(
        argument_bytes=mem.argument_size_in_bytes, output_bytes=mem.output_size_in_bytes,
        alias_bytes=mem.alias_size_in_bytes, temp_bytes=mem.temp_size_in_bytes,
        code_bytes=mem.generated_code_size_in_bytes,
        xla_peak_bytes=getattr(mem, "peak_memory_in_bytes", 0) or None,
        xla_flops=cost.get("flops"), xla_bytes_accessed=cost.get("bytes accessed"),
        has_loops=" while(" in text, collectives=collectives(text), **times,
        custom_calls=custom_calls(text),
    ), usable  # fmt: skip


def _for_target(config, backend: str = "tpu"):
    """A copy of the config whose "auto" scan method is resolved for the target's
    backend, not for this host's (lrulm.scan picks by jax.default_backend() at trace time)."""
    from lrulm import scan

    config = config.copy_and_resolve_references()
    if config.model.scan_method in (None, "auto"):
        config.model.scan_method = scan.resolve("auto", backend=backend).value
    return config


def compile_for_topology(
    config,
    topology: str | Topology | GpuTopology,
    *,
    include_eval: bool = True,
    measure_overflow: bool = False,
) -> Report:
    """Compiles the trainer's train (and eval) step for a TPU topology or a GPU host; see
    the module doc.

    Args:
      config: an experiment config (as `lrulm train` takes).
      topology: "v5p-128", "v5p:4x4x4", ... (`parse_topology`), or "h100:8" (`parse_target`).
      include_eval: also compile the eval step (when the train step fits).
      measure_overflow: when XLA refuses a step for lack of HBM, recompile it with
        `xla_tpu_no_crash_on_oom` to measure what it needs (a second compile; see the
        module doc); without it, the state's size and XLA's estimate are reported.

    Returns:
      A Report.

    Raises:
      ValueError: an unknown topology, a mesh that does not match its chips, or a batch
        the mesh cannot split — before anything compiles.
    """
    import jax

    from lrulm import experiment, metrics, target, tasks, train

    topo = parse_target(topology) if isinstance(topology, str) else topology
    gpus = isinstance(topo, GpuTopology)
    config = _for_target(config, "gpu" if gpus else "tpu")
    num_slices = config.mesh.dcn_data * config.mesh.dcn_fsdp
    if gpus and num_slices > 1:
        raise ValueError(
            f"{topo.name}: the mesh spans every GPU of every host; "
            "set --config.mesh.dcn_data=1 --config.mesh.dcn_fsdp=1"
        )
    devices = gpu_devices(topo) if gpus else topology_devices(topo, num_slices)
    where = f"{topo.accelerator_type} ({len(devices)} chips)"
    try:
        mesh = experiment.make_mesh(config, devices)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if note := tasks.vocab_note(config):
        metrics.say(note)
    task = tasks.make_task(config, None, prepare_data=False)
    live_before = sum(a.nbytes for a in jax.live_arrays())
    # traced for the target: its "auto" method, kernels, time split (lrulm.target)
    with target.compiling_for("gpu" if gpus else "tpu"):
        try:  # the batch and sequence checks against this mesh (experiment.validate)
            exp = experiment.build(config, task, mesh)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        train_jit, eval_jit = train.jit_steps(exp)
        batch = {
            k: jax.ShapeDtypeStruct(shape, dtype, sharding=exp.batch_shardings[k])
            for k, (shape, dtype) in exp.batch_spec.items()
        }
        leaves = jax.tree.leaves((exp.abstract_state, batch))
        if not all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves):
            raise AssertionError("compile inputs must be abstract (ShapeDtypeStruct) only")

        usable = []
        train_step, u = _compile_step(train_jit, (exp.abstract_state, batch), measure_overflow)
        usable.append(u)
        eval_step = None
        if include_eval and train_step.compiler_fits:  # else the config must change anyway
            eval_step, u = _compile_step(eval_jit, (exp.abstract_state, batch), measure_overflow)
            usable.append(u)
    # Building and compiling must not have put a parameter on any device (a few key
    # bytes from jax.random.key in the abstract init are fine).
    grown = sum(a.nbytes for a in jax.live_arrays()) - live_before
    if grown > 64 * 1024:
        raise AssertionError(f"compiling allocated {grown} bytes of arrays; it must allocate none")

    mc = task.model_config
    chips = len(devices)
    tokens = config.train.global_batch_size * task.tokens_per_example()
    model_flops = task.flops_per_token(config.train.seq_len) * tokens
    peak = metrics.peak_flops(devices[0])  # every TPU kind is in metrics.PEAK_FLOPS
    bandwidth = topo.generation.hbm_bytes_per_s
    s = train_step
    # Full remat runs each block's forward twice: 4 forward-equivalents, not 3.
    executed = model_flops * (4 / 3 if mc.remat == "full" else 1)
    flops_chip = max(executed / chips, s.xla_flops or 0)
    bytes_chip = max(s.xla_bytes_accessed or 0, s.argument_bytes + s.output_bytes)
    t_compute, t_memory = flops_chip / peak, bytes_chip / bandwidth
    t_min = max(t_compute, t_memory)
    return Report(
        topology=topo.name if num_slices == 1 else f"{num_slices} x {topo.name}",
        accelerator_type=topo.accelerator_type, device_kind=devices[0].device_kind,
        chips=chips, hbm_bytes=int(topo.generation.hbm_gib * GIB),
        hbm_usable_bytes=next((u for u in usable if u), None), mesh=dict(mesh.shape),
        dcn={"data": config.mesh.dcn_data, "fsdp": config.mesh.dcn_fsdp},
        preset=config.model.preset if config.task == "lm" else config.task,
        shape=f"{mc.num_layers} layers, H {mc.d_model}, N {mc.d_state}",
        num_params=task.num_params(),
        global_batch=config.train.global_batch_size, seq_len=config.train.seq_len,
        grad_accum_steps=config.optim.grad_accum_steps, remat=mc.remat, dtype=mc.dtype,
        state_bytes=_sharded_bytes(exp.abstract_state), batch_bytes=_sharded_bytes(batch),
        train=train_step, eval=eval_step, model_flops_per_step=model_flops, peak_flops=peak,
        hbm_bytes_per_s=bandwidth, step_time_lower_bound_s=t_min,
        bound_by="compute" if t_compute >= t_memory else "memory",
        mfu_bound=model_flops / (chips * peak * t_min) if train_step.measured else None,
    )  # fmt: skip


# ==========================================================================================
# Advice and the printed report.
# ==========================================================================================


def suggestions(report: Report) -> list[str]:
    """What to change, the largest part of the overflow first (state vs temporaries)."""
    step = max(report.steps, key=lambda s: s.total_bytes)
    limit, m = report.limit_bytes, report.mesh
    sharded = m["fsdp"] * m["tensor"]
    state_first = step.argument_bytes >= step.working_bytes
    room = limit - step.working_bytes
    out_state, out_temp = [], []
    shardable = report.chips // (m["tensor"] * m["sequence"])  # data x fsdp
    dcn_data, dcn_fsdp = report.dcn.get("data", 1), report.dcn.get("fsdp", 1)
    # Whole FSDP sizes the slices allow: a multiple of dcn_fsdp dividing data x fsdp, the
    # rest of which splits into dcn_data slices.
    larger = [
        f
        for f in range(m["fsdp"] + 1, shardable + 1)
        if not shardable % f and not f % dcn_fsdp and not (shardable // f) % dcn_data
    ]
    if larger:
        # The state shrinks ~1/fsdp; aim for it to fit beside today's temporaries.
        need = math.ceil(step.argument_bytes * m["fsdp"] / room) if room > 0 else shardable
        fsdp = next((f for f in larger if f >= need), larger[-1])
        # Both sizes written out (per slice, as the config takes them): a "-1" here could
        # clash with another axis the config sizes as -1.
        out_state.append(
            f"shard the parameters and optimizer state over more chips (FSDP): "
            f"--config.mesh.fsdp={fsdp // dcn_fsdp} "
            f"--config.mesh.data={shardable // fsdp // dcn_data}"
        )
    elif step.argument_bytes > limit / 2:
        out_state.append(
            f"the state is {step.argument_bytes / GIB:.2f} GiB per chip even sharded "
            f"{sharded} ways: use a larger slice, or more slices with --config.mesh.dcn_fsdp"
        )
    if report.remat == "none":
        out_temp.append("recompute activations in the backward pass: --config.model.remat=full")
    dp = m["data"] * m["fsdp"]  # mesh sizes already include the slices (DCN)
    accum = report.grad_accum_steps
    per_replica = report.global_batch // (dp * accum)
    if per_replica > 1:  # split each replica's rows into k micro-batches (k divides them)
        k = next(f for f in range(2, per_replica + 1) if not per_replica % f)
        out_temp.append(
            f"smaller micro-batches ({per_replica // k} sequences per replica instead of "
            f"{per_replica}): --config.optim.grad_accum_steps={accum * k}"
        )
    if report.dtype != "bfloat16":
        out_temp.append(
            "bfloat16 activations (parameters and the recurrence stay float32): "
            "--config.model.dtype=bfloat16"
        )
    out_temp.append("or shorter --config.train.seq_len / smaller --config.train.global_batch_size")
    return out_state + out_temp if state_first else out_temp + out_state


def _size(x: float, unit: int = GIB) -> str:
    return f"{x / unit:.3f}" if unit == GIB else f"{x / unit:.1f}"


def format_report(report: Report) -> str:
    """The report as aligned text (MiB for small models, GiB otherwise)."""
    r = report
    unit, uname = (GIB, "GiB") if r.peak_bytes >= GIB else (1024**2, "MiB")
    size = lambda x: _size(x, unit)
    steps = [("train", r.train)] + ([("eval", r.eval)] if r.eval else [])
    mesh = " ".join(f"{k}={v}" for k, v in r.mesh.items())
    lines = [
        f"{r.accelerator_type} ({r.topology}): {r.chips} x {r.device_kind}, "
        f"{r.hbm_bytes / GIB:g} GiB HBM per chip",
        f"model    {r.preset} ({r.shape}): {r.num_params / 1e6:.2f}M parameters, "
        f"remat={r.remat}, "
        f"dtype={r.dtype}",
        f"batch    {r.global_batch} x {r.seq_len} tokens, grad_accum_steps={r.grad_accum_steps}",
        f"mesh     {mesh}",
        "",
        f"memory per chip, {uname}" + "".join(f"{name:>12}" for name, _ in steps),
    ]
    rows = [("arguments", "argument_bytes"), ("outputs", "output_bytes"),
            ("aliased (donated)", "alias_bytes"), ("temporaries", "temp_bytes"),
            ("generated code", "code_bytes"), ("resident at peak", "total_bytes")]  # fmt: skip
    for label, attr in rows:
        lines.append(f"  {label:<19}" + "".join(f"{size(getattr(s, attr)):>12}" for _, s in steps))
    if any(s.xla_peak_bytes for _, s in steps):
        lines.append(
            "  (XLA's peak of the buffers live at once; the rows above sum to "
            + ", ".join(f"{size(s.summed_bytes)}" for _, s in steps)
            + ")"
        )
    usable = f" (XLA may use {size(r.hbm_usable_bytes)})" if r.hbm_usable_bytes else ""
    lines += [
        f"  {'HBM':<19}{size(r.hbm_bytes):>12}{usable}",
        f"  state by the shardings (params, optimizer, any weight average): {size(r.state_bytes)}, "
        f"batch {size(r.batch_bytes)}",
        "",
        "compute per train step",
        f"  model FLOPs        {r.model_flops_per_step:.3e} "
        f"({r.model_flops_per_step / r.chips:.3e} per chip)",
        (
            f"  XLA FLOPs per chip {r.train.xla_flops:.3e}, bytes accessed "
            f"{r.train.xla_bytes_accessed:.3e}"
            + ("  [loops counted once: an undercount]" if r.train.has_loops else "")
        )
        if r.train.xla_flops is not None
        else "  XLA FLOPs: " + ("not reported" if r.train.measured else "not compiled"),
        _bound_line(r),
        "",
        f"collectives in the train step (static count, {uname} per chip: all, largest)",
    ]
    for op, c in r.train.collectives.items():
        if c["count"]:
            largest = size(c.get("largest", 0))
            lines.append(f"  {op:<19}{c['count']:>5}{size(c['bytes']):>12}{largest:>12}")
    if not any(c["count"] for c in r.train.collectives.values()):
        lines.append("  none" if r.train.collectives else "  (not compiled)")
    if r.train.custom_calls:
        calls = ", ".join(f"{k} x {n}" for k, n in sorted(r.train.custom_calls.items()))
        lines += ["", f"custom calls in the train step (the kernels): {calls}"]
    times = ", ".join(f"{n} {s.lower_s + s.compile_s:.1f} s" for n, s in steps)
    lines += ["", f"compile time: {times}", ""]
    if r.fits:
        lines.append(
            f"FITS: {_size(r.peak_bytes)} of {_size(r.limit_bytes)} GiB per chip "
            f"({100 * r.peak_bytes / r.limit_bytes:.0f}%)"
        )
    else:
        step = max(r.steps, key=lambda s: s.total_bytes)
        est = "" if step.measured else "~"
        lines.append(
            f"DOES NOT FIT: needs {est}{_size(r.peak_bytes)} GiB per chip, "
            f"{_size(r.limit_bytes)} GiB available: {est}{_size(r.shortfall_bytes)} GiB over "
            f"(arguments {_size(step.argument_bytes)} GiB, temporaries and outputs "
            f"{_size(step.working_bytes)} GiB"
            + ("" if step.measured else ": XLA's estimate before its own rematerialisation")
            + ")"
        )
        if step.oom_message:
            lines.append(f"  XLA: {step.oom_message.splitlines()[0][:300]}")
        lines.append("try:")
        lines += [f"  - {s}" for s in suggestions(r)]
    return "\n".join(lines)


def _bound_line(r: Report) -> str:
    if r.mfu_bound is None:
        return "  MFU bound: none (the train step did not compile)"
    line = (
        f"  step time >= {r.step_time_lower_bound_s * 1e3:.2f} ms ({r.bound_by}-bound at "
        f"{r.peak_flops / 1e12:g} TFLOP/s, {r.hbm_bytes_per_s / 1e9:g} GB/s): "
        f"MFU <= {100 * r.mfu_bound:.1f}%"
    )
    if r.train.xla_bytes_accessed is None:  # e.g. XLA's GPU compiler: no cost analysis
        line += " (bytes: the arguments and outputs alone; XLA gave no cost analysis)"
    return line


def main(
    config, topology: str, json_path: str | None = None, *, measure_overflow: bool = False
) -> int:
    """`lrulm compile`: prints the report; 0 if the steps fit the chips' HBM, 1 if not.

    Args:
      config: the loaded experiment config.
      topology: the topology name (see `parse_topology`).
      json_path: also write the report as JSON here.
      measure_overflow: see `compile_for_topology`.
    """
    report = compile_for_topology(config, topology, measure_overflow=measure_overflow)
    print(format_report(report))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report.to_dict(), f, indent=2, default=float)
        print(f"wrote {json_path}")
    return 0 if report.fits else 1
