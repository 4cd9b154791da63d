"""Pallas kernels for the linear recurrence h_t = a_t * h_{t-1} + b_t: Triton, Mosaic GPU, TPU.

The recurrence moves 16 bytes per complex64 element (read b, write h) for 8 flops, so a
kernel is fast when it reads b and writes h once with enough bytes in flight to cover
memory latency. Time is sequential within a program, so all parallelism comes from
(rows x channel blocks); the design follows from that:

- One program owns one row (the leading axes, flattened) and one block of channels, and
  walks the whole sequence with its state in float32 registers. Complex numbers are
  (real, imag) float32 parts (no complex type in Triton or Mosaic): `forward_parts`
  takes and returns parts, and the LRU layer keeps them from its B projection to its C
  readout (lrulm.scan.linear_scan_planar), so a model pays no split or merge pass; the
  complex64 `forward` splits and merges around the kernel (3x the kernel's own bytes in
  an isolated scan). bf16 is upcast on load: the recurrence always accumulates in float32.
- Document resets enter as a per-row (B, L) keep mask, one value per step broadcast over
  the channels, not as a (B, L, N) decay array with zeros: that would add half again to
  the forward's bytes and be kept for the backward.
- Time is walked in chunks of `chunk_size` steps. Every row of a chunk is loaded before
  the chunk's first step, so a whole chunk of loads is in flight and memory latency is
  paid once per chunk, not once per step as in the naive kernel of docs/design.md §4.
- GPU: 32 channels and one warp per program: each thread owns a channel and every row
  load is one coalesced 128-byte line per part. At (B=8, N=1024) that is 256 warps, ~2
  per H100 SM, so memory parallelism must come from the chunk. Loads per thread are
  capped at 128 registers' worth (shorter chunks when `a` is full), split into two
  chunks of 32 complex rows: the next chunk's loads are issued before the current one
  is scanned, so they are always in flight (on an H200 this took forward+backward from
  29% to 52% of the copy bandwidth; lrulm.kernels.gpu.Tuning has the measurements);
  the `pingpong` tuning walks two chunks an iteration so that both are in flight (the
  one-chunk loop's register moves wait for each prefetched chunk: its SASS). The
  program loops over the chunks itself (Triton programs cannot pass each other a carry)
  and finishes with a shorter static tail: no padding or masking in time. A launch of
  fewer programs than SMs (one long sequence) is split in time first
  (lrulm.sequence_parallel.split_scan_parts, the sequence-parallel scan's two passes
  with the segments as rows).
- GPU, Mosaic GPU (lrulm.kernels.mosaic_gpu, opt-in: $LRULM_PALLAS_GPU_TUNING=mosaic,...):
  for N a multiple of 128 (an (N,) a or a full one), one warpgroup of 128 channels per
  program streams the sequence through a ring of shared-memory slots filled by TMA
  copies, so the bytes in flight are set by the ring's depth, not by registers; with
  halves=2, 64 channels per program, two thread groups scanning half a chunk each
  (twice the programs for the same bytes; N a multiple of 64).
- TPU: arrays keep XLA's (..., L, N) layout, whose (8, 128) tiles are 8 time steps of
  128 channels, so the kernel costs no relayout copies around it; a tile's 8 steps are
  scanned together in log steps with sublane rolls, then the carry enters. The grid is
  (rows, channel blocks, chunks) with the chunk axis sequential ("arbitrary"), the state
  carried in VMEM scratch, and Pallas's pipeline copying the next chunk into VMEM behind
  the current one; a chunk is at least 512 steps (VMEM permitting) whatever `chunk_size`
  asks, since every grid step has a fixed cost. tools/tpu_kernel_schedule.py reads the
  compiler's VLIW schedule of each variant against the HBM time of its bytes.
- All kernels write h over b (and the backward g over dh): one (B, L, N) buffer per
  recurrence, so the LRU's B projection, the scan and its C readout hold one
  complex-sized activation per layer, which is also the only residual the gradient keeps.
- `reverse` only changes which chunk comes next and the row order within it, so no
  flipped copies are made.

A `pallas_call` cannot be transposed, so gradients come from lrulm.scan's
grad="recurrence": `backward_parts`, one fused kernel per backend that walks the other
way carrying the cotangent of b (written over dh) and forms the cotangent of a from the
h the forward wrote in the same pass (read dh and h, write g).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lrulm import target
from lrulm.kernels import gpu, mosaic_gpu, tpu
from lrulm.kernels.common import Parts

# The GPU kernel's chunk is unrolled, so interpreted its compile time grows quickly with
# the chunk's length; the values do not depend on the chunk, so interpret short ones.
_INTERPRET_CHUNK = 8


# ----------------------------------------------------------------------------------
# Leading axes, and the choice of kernel.
# ----------------------------------------------------------------------------------


def _gpu_kernel(triton: Callable, name: str, **options) -> Callable:
    """The GPU kernel the tuning names (lrulm.kernels.gpu.Tuning.kernel): Mosaic GPU's
    `name` (lrulm.kernels.mosaic_gpu) for the operands it supports (N a multiple of
    128, or of 64 with halves=2) when asked for, else the Triton kernel; both with
    `options`."""

    def run(a, *groups, chunk, reverse, interpret):
        t = gpu.tuning()
        if t.kernel == "mosaic" and mosaic_gpu.supports(a, groups[0], t.halves):
            mosaic_gpu.check_device([] if interpret else None)
            mosaic = getattr(mosaic_gpu, name)  # looked up per call, so tests can count them
            return mosaic(
                a,
                *groups,
                chunk=t.chunk,
                stages=t.stages,
                halves=t.halves,
                reverse=reverse,
                interpret=interpret,
                **options,
            )
        return triton(a, *groups, chunk=chunk, reverse=reverse, interpret=interpret, **options)

    return run


_KERNELS: dict[tuple[str, str], Callable] = {
    ("forward", "gpu"): _gpu_kernel(gpu.forward, "forward"),
    ("forward", "tpu"): tpu.forward,
    ("forward_over_b", "gpu"): _gpu_kernel(gpu.forward, "forward", over_b=True),
    ("forward_over_b", "tpu"): functools.partial(tpu.forward, over_b=True),
    ("backward", "gpu"): _gpu_kernel(gpu.backward, "backward"),
    ("backward", "tpu"): tpu.backward,
    # The Triton kernels whatever the tuning: what the interpreter runs where Mosaic GPU's
    # interpreter cannot be lowered (see _dispatch).
    ("forward", "triton"): gpu.forward,
    ("forward_over_b", "triton"): functools.partial(gpu.forward, over_b=True),
    ("backward", "triton"): gpu.backward,
}
# The operand and result groups of each operation, each group a tuple of parts, by kind:
# "a" the decays ((N,) or b's shape), "seq" (..., L, N), "state" (..., N), "keep"
# (..., L); "da" is per-row partial sums (..., N) for an (N,) a, else (..., L, N).
_OPERANDS = {
    "forward": ("a", "seq", "state", "keep"),  # a, b, h0, keep -> h
    "forward_over_b": ("a", "seq", "state", "keep"),  # the same, h written over b
    "backward": ("a", "seq", "seq", "state", "keep"),  # a, dh, h, h0, keep -> g, da
}
_RESULTS = {"forward": ("seq",), "forward_over_b": ("seq",), "backward": ("seq", "da")}


def _run(op, groups, *, kernel, interpret, chunk, reverse):
    """Flattens the leading axes of the groups into rows and runs one kernel."""
    *lead, length, n = groups[1][0].shape
    rows, full_a = math.prod(lead), groups[0][0].ndim > 1
    flat = {
        "a": (rows, length, n) if full_a else (n,),
        "seq": (rows, length, n),
        "state": (rows, n),
        "keep": (rows, length),
    }
    groups = [tuple(p.reshape(flat[k]) for p in g) for k, g in zip(_OPERANDS[op], groups)]
    out = _KERNELS[op, kernel](*groups, chunk=chunk, reverse=reverse, interpret=interpret)
    out = (out,) if len(_RESULTS[op]) == 1 else out
    shapes = {"seq": (*lead, length, n), "da": (*lead, length, n) if full_a else (*lead, n)}
    return tuple(tuple(p.reshape(shapes[k]) for p in g) for k, g in zip(_RESULTS[op], out))


def _dispatch(op, groups, chunk, reverse, interpret, kernel, cpu_mosaic=False):
    """Picks the kernel variant, and whether to interpret it. Where that is decided at
    lowering (interpret and kernel None), the CPU's interpreter runs the Triton kernels
    unless `cpu_mosaic`: Pallas's Mosaic GPU interpreter orders its steps with I/O
    callbacks (an ordered effect), and platform_dependent traces every branch, so on a
    GPU too the call would carry that effect, which a custom_partitioning call cannot
    lower (KeyError: OrderedIOEffect). The unpartitioned path (_mosaic_interpreted)
    passes cpu_mosaic=True, so that a CPU run of a Mosaic GPU tuning interprets it."""
    run = functools.partial(_run, op, chunk=chunk, reverse=reverse)

    def interpreted(groups, kernel):
        # The GPU kernel unrolls its chunk (see _INTERPRET_CHUNK); the TPU one loops.
        short = min(chunk, _INTERPRET_CHUNK) if kernel != "tpu" else chunk
        return _run(op, groups, chunk=short, reverse=reverse, kernel=kernel, interpret=True)

    if interpret is None and kernel is None:
        # Decided when the computation is lowered, so ahead-of-time compilation for a
        # TPU (or GPU) from a CPU host picks that device's kernel.
        return jax.lax.platform_dependent(
            groups,
            cpu=functools.partial(interpreted, kernel="gpu" if cpu_mosaic else "triton"),
            tpu=functools.partial(run, kernel="tpu", interpret=False),
            default=functools.partial(run, kernel="gpu", interpret=False),
        )
    backend = target.backend()
    kernel = kernel or ("tpu" if backend == "tpu" else "gpu")
    if backend == "cpu" if interpret is None else interpret:
        return interpreted(groups, kernel=kernel)
    return run(groups, kernel=kernel, interpret=False)


def _dispatcher(op: str) -> Callable:
    """_dispatch for one op, its operand groups positional, then chunk, reverse,
    interpret and kernel (positional as custom_partitioning calls it, or by name)."""
    num_groups = len(_OPERANDS[op])

    def dispatch(*args, **static):
        static.update(zip(("chunk", "reverse", "interpret", "kernel"), args[num_groups:]))
        return _dispatch(op, args[:num_groups], **static)

    return dispatch


_DISPATCH = {op: _dispatcher(op) for op in _OPERANDS}


# ----------------------------------------------------------------------------------
# Sharding. XLA's partitioner cannot split a kernel call (Mosaic refuses; a Triton call
# would run replicated), so under jit with sharded inputs each device runs the kernel on
# its own rows and channels; only the sequence axis must be whole (sequence parallelism
# goes through lrulm.sequence_parallel's shard_map, inside which this is a plain call).
# Under the trainer's mesh context that is a shard_map over the activation layout, which
# also compiles ahead of time for TPU; elsewhere the partitioner is told how to split
# the call (custom_partitioning), from the shardings the operands actually have.
# ----------------------------------------------------------------------------------


def _kind_specs(spec: tuple, full_a: bool) -> dict[str, P]:
    """The PartitionSpec of every kind of group, from the spec of a (..., L, N) operand:
    its rows and channels as they are, the sequence whole."""
    spec = spec[:-2] + (None, spec[-1])
    seq, state = P(*spec), P(*spec[:-2], spec[-1])
    return {
        "a": seq if full_a else P(spec[-1]),
        "seq": seq,
        "state": state,
        "keep": P(*spec[:-2], None),
        "da": seq if full_a else state,
    }


def _group_specs(op, groups, specs):
    """(operand specs, result specs), one spec per part."""
    num_parts = len(groups[1])
    ins = tuple((specs[k],) * len(g) for k, g in zip(_OPERANDS[op], groups))
    return ins, tuple((specs[k],) * num_parts for k in _RESULTS[op])


def _on_activation_mesh(fn, op, groups):
    """fn(*groups) per device under lrulm.sharding's mesh context, else plain fn."""
    from lrulm import sharding  # the trainer's mesh and logical axis rules

    mesh = sharding.current_mesh()
    if mesh is None or mesh.size == 1 or jax.sharding.get_abstract_mesh().manual_axes:
        return fn(*groups)
    seq = groups[1][0]
    names = ("batch",) + (None,) * (seq.ndim - 3) if seq.ndim > 2 else ()
    spec = tuple(sharding.spec_for((*names, "length", "act_state"), mesh, seq.shape))
    ins, outs = _group_specs(op, groups, _kind_specs(spec, groups[0][0].ndim == seq.ndim))
    per_device = jax.shard_map(fn, mesh=mesh, in_specs=ins, out_specs=outs, check_vma=False)
    return per_device(*groups)


def _shardings(op, arg_shapes):
    """(operand shardings, result shardings) from the first (..., L, N) operand's."""
    seq = arg_shapes[1][0]
    sharding, ndim = seq.sharding, len(seq.shape)
    if not isinstance(sharding, NamedSharding):
        raise NotImplementedError(
            f"linear_scan(method='pallas') needs its inputs sharded over a named mesh "
            f"(jax.sharding.NamedSharding); got {sharding}"
        )
    spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
    specs = _kind_specs(spec, len(arg_shapes[0][0].shape) == ndim)
    named = lambda specs: tuple(tuple(NamedSharding(sharding.mesh, s) for s in g) for g in specs)
    ins, outs = _group_specs(op, arg_shapes, specs)
    return named(ins), named(outs)


def _partition(op, chunk, reverse, interpret, kernel, mesh, arg_shapes, result_shape):
    del result_shape
    ins, outs = _shardings(op, arg_shapes)
    local = functools.partial(
        _DISPATCH[op], chunk=chunk, reverse=reverse, interpret=interpret, kernel=kernel
    )
    return ins[1][0].mesh, local, outs, ins


def _infer_sharding(op, chunk, reverse, interpret, kernel, mesh, arg_shapes, result_shape):
    del chunk, reverse, interpret, kernel, mesh, result_shape
    return _shardings(op, arg_shapes)[1]


@functools.cache
def _sharded(op: str, full_a: bool, num_parts: int, num_keep: int):
    """The op's dispatch, which the partitioner runs per device, for one operand structure."""
    num_groups = len(_OPERANDS[op])
    fn = custom_partitioning(_DISPATCH[op], static_argnums=tuple(range(num_groups, num_groups + 4)))
    dims = {
        "a": "... l n" if full_a else "n",
        "seq": "... l n",
        "state": "... n",
        "keep": "... l",
        "da": "... l n" if full_a else "... n",
    }
    operands = [
        dims[k] for k in _OPERANDS[op] for _ in range(num_keep if k == "keep" else num_parts)
    ]
    results = [dims[k] for k in _RESULTS[op] for _ in range(num_parts)]
    fn.def_partition(
        partition=functools.partial(_partition, op),
        infer_sharding_from_operands=functools.partial(_infer_sharding, op),
        sharding_rule=", ".join(operands) + " -> " + ", ".join(results),
        need_replication_factors=("l",),
    )
    return fn


def _parts(x: jax.Array) -> Parts:
    return (jnp.real(x), jnp.imag(x)) if jnp.iscomplexobj(x) else (x,)


def forget_traces() -> None:
    """Drops every cached trace of the kernels (JAX's and this module's), so that the next
    call traces them again: for a change of $LRULM_PALLAS_GPU_TUNING within a process."""
    jax.clear_caches()
    _call.cache_clear()
    _sharded.cache_clear()


def _mosaic_interpreted(interpret, kernel) -> bool:
    """Whether a GPU kernel call may run the Mosaic GPU kernels in their interpreter."""
    interpreted = target.backend() == "cpu" if interpret is None else interpret
    return interpreted and kernel in (None, "gpu") and gpu.tuning().kernel == "mosaic"


@functools.cache
def _call(op, chunk, reverse, interpret, kernel):
    """The op on groups of parts, sharded; under vmap, the mapped axis is one more row."""

    def call(*groups):
        if _mosaic_interpreted(interpret, kernel):
            # Pallas's Mosaic GPU interpreter orders its steps with I/O callbacks, which a
            # custom_partitioning call cannot lower: it runs unpartitioned (a test path).
            run = lambda *gs: _DISPATCH[op](*gs, chunk, reverse, interpret, kernel, cpu_mosaic=True)
        else:
            sharded = _sharded(op, groups[0][0].ndim > 1, len(groups[1]), len(groups[-1]))
            run = lambda *gs: sharded(*gs, chunk, reverse, interpret, kernel)
        return tuple(tuple(g) for g in _on_activation_mesh(run, op, groups))

    fn = jax.custom_batching.custom_vmap(call)

    @fn.def_vmap
    def _(axis_size, in_batched, *groups):
        lead = lambda x, batched: x if batched else jnp.broadcast_to(x, (axis_size, *x.shape))
        a, a_batched = groups[0], in_batched[0]
        rest = [tuple(map(lead, g, bat)) for g, bat in zip(groups[1:], in_batched[1:])]
        shape, per_row_a = rest[0][0].shape, False
        if a[0].ndim - a_batched[0] > 1:  # a full-shaped a: one more row, like b
            a = tuple(map(lead, a, a_batched))
        elif any(a_batched):  # one decay vector per mapped index: a full-shaped a
            as_rows = lambda x: x.reshape(axis_size, *(1,) * (len(shape) - 2), -1)
            a = tuple(jnp.broadcast_to(as_rows(lead(x, b)), shape) for x, b in zip(a, a_batched))
            per_row_a = True
        out = fn(a, *rest)
        if per_row_a and op == "backward":  # da of a full a, summed back over time
            out = (out[0], tuple(x.sum(-2) for x in out[1]))
        return out, jax.tree.map(lambda _: True, out)

    return fn


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _forward(a: Parts, b: Parts, h0: Parts, keep: Parts, chunk, reverse, interpret, kernel, op):
    return _call(op, chunk, reverse, interpret, kernel)(a, b, h0, keep)[0]


def _forward_fwd(a, b, h0, keep, chunk, reverse, interpret, kernel, op):
    return _forward(a, b, h0, keep, chunk, reverse, interpret, kernel, op), None


def _forward_bwd(*_):
    raise NotImplementedError(
        "linear_scan(method='pallas') cannot be differentiated with grad='autodiff': a "
        "Pallas kernel has no transpose rule. Use grad='recurrence' (the default), which "
        "runs the same kernel backwards."
    )


_forward.defvjp(_forward_fwd, _forward_bwd)


# ----------------------------------------------------------------------------------
# Public entry point.
# ----------------------------------------------------------------------------------


def forward_parts(
    a: Parts,
    b: Parts,
    h0: Parts | None = None,
    *,
    keep: jax.Array | None = None,
    chunk_size: int = 64,
    reverse: bool = False,
    interpret: bool | None = None,
    kernel: str | None = None,
    overwrite_b: bool = False,
) -> Parts:
    """`forward` on values given as parts: (x,) for real ones, (real, imag) for complex.

    The kernels work on parts, so a model that keeps its complex activations as two
    float32 arrays (lrulm.lru does, for this method) pays for no split or merge pass.
    Every part of b (and of a, h0) must have the same shape and dtype; h is returned in
    b's dtype. `keep`, of shape (..., L) (b's shape without the channel axis), bool or
    0/1, zeroes the state carried into the positions where it is false:
    h_t = a_t * (keep_t * h_{t-1}) + b_t, so a per-row reset needs no (..., L, N) decay.
    `overwrite_b`: write h over b's buffers (lrulm.kernels.common.write_over_b); XLA
    copies b first if it is still needed afterwards or is a non-donated argument.
    """
    a, b = tuple(map(jnp.asarray, a)), tuple(map(jnp.asarray, b))
    if len(b) not in (1, 2) or len(a) != len(b) or (h0 is not None and len(h0) != len(b)):
        raise ValueError(
            "a, b and h0 must each be (x,) for real values or (real, imag) for complex "
            f"ones, all alike; got {len(a)}, {len(b)} and {None if h0 is None else len(h0)} parts"
        )
    shape, dtype = b[0].shape, b[0].dtype
    if len(shape) < 2 or any(x.shape != shape for x in b):
        raise ValueError(f"b's parts must share a shape (..., L, N); got {[x.shape for x in b]}")
    if any(x.shape != a[0].shape for x in a) or a[0].shape not in (shape, shape[-1:]):
        raise ValueError(
            f"a's parts must have b's shape {shape} or ({shape[-1]},); got {[x.shape for x in a]}"
        )
    if kernel not in (None, "gpu", "tpu"):
        raise ValueError(f"unknown Pallas kernel {kernel!r}; use 'gpu', 'tpu' or None")
    state_shape = shape[:-2] + shape[-1:]
    b = tuple(x.astype(dtype) for x in b)
    a = tuple(x.astype(dtype) for x in a)
    # Always arrays: the partitioner needs a fixed set of operands (zeros cost 1/L of b).
    if h0 is None:
        h0 = tuple(jnp.zeros(state_shape, dtype) for _ in b)
    h0 = tuple(jnp.asarray(x, dtype) for x in h0)
    if any(x.shape != state_shape for x in h0):
        raise ValueError(f"h0 must have shape {state_shape}; got {[x.shape for x in h0]}")
    if keep is not None:
        keep = jnp.asarray(keep)
        if keep.shape != shape[:-1]:
            raise ValueError(f"keep must have shape {shape[:-1]} (b's without N); got {keep.shape}")
        keep = (keep.astype(dtype),)
    if math.prod(shape) == 0:
        return b
    op = "forward_over_b" if overwrite_b else "forward"
    return _forward(a, b, h0, keep or (), int(chunk_size), bool(reverse), interpret, kernel, op)


def backward_parts(
    a: Parts,
    dh: Parts,
    h: Parts,
    h0: Parts | None = None,
    *,
    keep: jax.Array | None = None,
    chunk_size: int = 64,
    reverse: bool = False,
    interpret: bool | None = None,
    kernel: str | None = None,
) -> tuple[Parts, Parts]:
    """The gradient of `forward_parts` given its output h and the cotangent dh, in one
    kernel pass (`lrulm.kernels.gpu.backward`, `lrulm.kernels.tpu.backward`).

    Returns:
      (g, da): g = the cotangent of b, shape (..., L, N); da = the cotangent of a, of a's
      shape ((N,) summed over rows and time, or (..., L, N)). The cotangent of h0 is
      keep_first * conj(a_first) * g_first, left to the caller.
    """
    shape, dtype = h[0].shape, h[0].dtype
    state_shape = shape[:-2] + shape[-1:]
    a = tuple(jnp.asarray(x, dtype) for x in a)
    dh = tuple(jnp.asarray(x, dtype) for x in dh)
    h0 = (
        tuple(jnp.zeros(state_shape, dtype) for _ in h)
        if h0 is None
        else tuple(jnp.asarray(x, dtype) for x in h0)
    )
    keep = () if keep is None else (jnp.asarray(keep, dtype),)
    call = _call("backward", int(chunk_size), bool(reverse), interpret, kernel)
    g, da = call(a, dh, h, h0, keep)
    if a[0].ndim == 1:  # per-row partial sums -> (N,)
        da = tuple(x.reshape(-1, x.shape[-1]).sum(0) for x in da)
    return g, tuple(x.astype(y.dtype) for x, y in zip(da, a))


def forward(
    a: jax.Array,
    b: jax.Array,
    h0: jax.Array | None = None,
    *,
    chunk_size: int = 64,
    reverse: bool = False,
    interpret: bool | None = None,
    kernel: str | None = None,
) -> jax.Array:
    """Computes h_t = a_t * h_{t-1} + b_t along axis -2 of b with a Pallas kernel.

    Under jit with sharded inputs, each device scans its own rows and channels (the
    sequence axis is gathered if it was split); under vmap, the mapped axis becomes one
    more leading axis. Not differentiable by itself: see grad="recurrence" in lrulm.scan.

    Args:
      a: decays, shape (..., L, N) like b, or (N,).
      b: inputs, shape (..., L, N); float32, bfloat16 or complex64 (float32 math).
      h0: optional initial state, shape (..., N); for reverse=True the state after the
        last position.
      chunk_size: time steps loaded at once per program: on GPU an upper bound (fewer
        when its registers would overflow); the TPU kernel takes at least 512 (fewer only
        when VMEM or the sequence is shorter).
      reverse: run from the end of the sequence: h_t = a_t * h_{t+1} + b_t.
      interpret: run the kernel in the Pallas interpreter. None: the interpreter on CPU
        and the compiled kernel on GPU / TPU.
      kernel: "gpu" or "tpu", the kernel variant to run; None picks the one for the
        platform the computation is lowered for (CPU interprets the GPU kernel).

    Returns:
      h, shape (..., L, N), the result dtype of a, b and h0.
    """
    a, b = jnp.asarray(a), jnp.asarray(b)
    if b.ndim < 2 or a.shape not in (b.shape, b.shape[-1:]):
        raise ValueError(
            f"need b of shape (..., L, N) and a of b's shape or (N,); got a {a.shape}, b {b.shape}"
        )
    dtype = jnp.result_type(a, b) if h0 is None else jnp.result_type(a, b, h0)
    a, b = a.astype(dtype), b.astype(dtype)
    if h0 is not None:
        h0 = _parts(jnp.asarray(h0, dtype))
    h = forward_parts(
        _parts(a),
        _parts(b),
        h0,
        chunk_size=chunk_size,
        reverse=reverse,
        interpret=interpret,
        kernel=kernel,
    )
    return jax.lax.complex(*h) if len(h) == 2 else h[0]
