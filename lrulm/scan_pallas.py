"""Pallas kernels for the linear recurrence h_t = a_t * h_{t-1} + b_t (GPU Triton, TPU Mosaic).

The recurrence moves 16 bytes per complex64 element (read b, write h) and does 8 flops on
them, so a kernel is fast exactly when it keeps enough bytes in flight to cover memory
latency while reading b and writing h once. Time is sequential within a program, so all
parallelism comes from (rows x channel blocks); the design follows from that:

- One program owns one row (a flattened leading index) and one block of channels, and
  walks the whole sequence with its state in float32 registers. Complex numbers are
  split into real/imaginary float32 arrays before the kernel and recombined after (no
  complex type in Triton or Mosaic); bf16 inputs are upcast on load, so the recurrence
  always accumulates in float32.
- Time is walked in chunks of `chunk_size` steps. Every row of a chunk is loaded before
  the first step of the chunk runs, so a program has a whole chunk of loads in flight
  and pays memory latency once per chunk instead of once per step (the naive
  one-load-per-step kernel of DESIGN.md §4 pays it 2048 times: 1.12 ms).
- GPU: 32 channels per program and one warp: each thread owns one channel, each row load
  is one coalesced 128-byte line per part. At (B=8, N=1024) that is 256 warps, ~2 per H100
  SM, so memory parallelism must come from the chunk: 64 complex rows = 16 KiB in
  flight per warp, ~32 KiB per SM, which is what Little's law asks for at ~3 TB/s and
  ~1 us latency. Loads per thread are capped at 128 registers' worth (fewer rows per
  chunk when `a` is full) so the chunk does not spill. The program loops over chunks
  itself (Triton programs cannot pass a carry to each other), and the length
  remainder is a shorter static tail: no padding, no masking in time.
- TPU: channels are viewed as (N/128, 128) so one time step of a block is whole (8, 128)
  vregs; the grid is (rows, channel blocks, chunks) with the chunk axis sequential
  ("arbitrary"), the state carried in VMEM scratch, and Pallas's block pipeline
  double-buffers the HBM->VMEM copies of the next chunk behind the current one.
- Both walk a chunk with the same body (`_scan_rows`); `reverse` only changes which
  chunk comes next and the row order inside it, so no flipped copies are made.

Autodiff through `pallas_call` is not possible (it has no transpose rule), so gradients
come from lrulm.scan's `grad="recurrence"`, which runs this same kernel backwards.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plt

# GPU: one warp per program, one channel per thread (see the module docstring).
_GPU_CHANNELS = 32
_GPU_WARPS = 1
# Values one GPU thread may hold for a chunk's loads before registers spill (of 255).
_GPU_LOAD_REGISTERS = 128
# The interpreter unrolls a chunk into one XLA computation whose compile time grows
# quickly with its length; the values do not depend on the chunk, so interpret short ones.
_INTERPRET_CHUNK = 8
# TPU: lanes per vreg, and the VMEM the double-buffered blocks of one grid step may use
# (the default scoped VMEM limit is 16 MiB on v5e, 32 MiB on v4/v5p/v6e).
_TPU_LANES = 128
_TPU_VMEM_BUDGET = 8 * 2**20

Parts = tuple[jax.Array, ...]  # (x,) for real values, (real, imag) for complex ones


# ----------------------------------------------------------------------------------
# The body shared by every kernel: one step, and a chunk of steps.
# ----------------------------------------------------------------------------------


def _step(h: Parts, a: Parts, b: Parts) -> Parts:
    """h <- a * h + b on real parts, or on (real, imag) pairs for complex numbers."""
    if len(h) == 1:
        return (a[0] * h[0] + b[0],)
    (hr, hi), (ar, ai), (br, bi) = h, a, b
    # Grouped so that each new part is two dependent fused multiply-adds away from the
    # previous state (the recurrence's critical path), not three operations.
    return (ar * hr + (br - ai * hi), ar * hi + (bi + ai * hr))


def _scan_rows(h, a, a_refs, b_refs, h_refs, rows, load, store):
    """Runs the recurrence over `rows` (in processing order) of one block.

    All loads of the chunk are issued before the first step, so they are in flight
    together; the stores follow the dependent chain.

    Args:
      h: the carried state, a tuple of float32 parts.
      a: the decay parts (already float32) when `a` is time-invariant, else None.
      a_refs, b_refs, h_refs: refs indexed by a row (time) index first.
      rows: row indices, static or traced, in the order the recurrence visits them.
      load: load(ref, row) -> float32 value of the row.
      store: store(ref, row, value).

    Returns:
      The state after the last row.
    """
    bs = [tuple(load(r, t) for r in b_refs) for t in rows]
    as_ = [tuple(load(r, t) for r in a_refs) for t in rows] if a is None else [a] * len(rows)
    for t, at, bt in zip(rows, as_, bs):
        h = _step(h, at, bt)
        for ref, x in zip(h_refs, h):
            store(ref, t, x)
    return h


def _split_refs(refs, num_parts, full_a, has_h0):
    it = iter(refs)
    take = lambda n: tuple(next(it) for _ in range(n))
    a_refs, b_refs = take(num_parts), take(num_parts)
    h0_refs = take(num_parts) if has_h0 else ()
    return a_refs, b_refs, h0_refs, take(num_parts), tuple(it)


def _cost(num_parts, full_a, rows, length, n, itemsize):
    arrays = 2 + full_a  # read b (and a), write h
    return pl.CostEstimate(
        flops=4 * num_parts * num_parts * rows * length * n,
        transcendentals=0,
        bytes_accessed=arrays * num_parts * rows * length * n * itemsize,
    )


# ----------------------------------------------------------------------------------
# GPU (Triton): grid over (row, channel block); each program loops over the chunks.
# ----------------------------------------------------------------------------------


def _gpu(a: Parts, b: Parts, h0: Parts | None, *, chunk, reverse, interpret) -> Parts:
    rows, length, n = b[0].shape
    num_parts, full_a = len(b), a[0].ndim == 3
    bn = min(_GPU_CHANNELS, pl.next_power_of_2(n))  # Triton blocks are powers of two
    num_blocks = pl.cdiv(n, bn)
    ragged = n % bn != 0
    per_row = num_parts * (1 + full_a)  # values loaded per channel per time step
    chunk = max(1, min(chunk, length, _GPU_LOAD_REGISTERS // per_row))
    num_chunks, tail = divmod(length, chunk)

    def kernel(*refs):
        a_refs, b_refs, h0_refs, h_refs, _ = _split_refs(refs, num_parts, full_a, h0 is not None)
        mask = None
        if ragged:  # the last channel block hangs over the end of the array
            j = pl.program_id(0) % num_blocks
            mask = j * bn + jax.lax.broadcasted_iota(jnp.int32, (bn,), 0) < n

        # (The interpreter's masked load/store wants a traced row index, not a Python int.)
        def load(ref, t):
            if mask is None:
                return ref[t].astype(jnp.float32)
            return plt.load(ref.at[jnp.int32(t)], mask=mask, other=0).astype(jnp.float32)

        def store(ref, t, x):
            x = x.astype(ref.dtype)
            if mask is None:
                ref[t] = x
            else:
                plt.store(ref.at[jnp.int32(t)], x, mask=mask)

        def load_all(refs):
            if mask is None:
                return tuple(r[...].astype(jnp.float32) for r in refs)
            return tuple(plt.load(r, mask=mask, other=0).astype(jnp.float32) for r in refs)

        if h0_refs:
            h = load_all(h0_refs)
        else:
            h = (jnp.zeros((bn,), jnp.float32),) * num_parts
        a_const = None if full_a else load_all(a_refs)
        scan = functools.partial(_scan_rows, a=a_const, a_refs=a_refs, b_refs=b_refs,
                                 h_refs=h_refs, load=load, store=store)  # fmt: skip

        def chunk_rows(start, count):
            """Row indices of `count` steps beginning `start` steps into the walk."""
            if reverse:
                return [length - 1 - start - i for i in range(count)]
            return [start + i for i in range(count)]

        def body(k, h):
            return scan(h, rows=chunk_rows(k * chunk, chunk))

        if num_chunks:
            h = jax.lax.fori_loop(0, num_chunks, body, h)
        if tail:
            scan(h, rows=chunk_rows(num_chunks * chunk, tail))

    seq_spec = pl.BlockSpec((None, length, bn), lambda p: (p // num_blocks, 0, p % num_blocks))
    state_spec = pl.BlockSpec((None, bn), lambda p: (p // num_blocks, p % num_blocks))
    a_spec = seq_spec if full_a else pl.BlockSpec((bn,), lambda p: (p % num_blocks,))
    in_specs = [a_spec] * num_parts + [seq_spec] * num_parts
    in_specs += [state_spec] * num_parts if h0 is not None else []
    dtype = b[0].dtype
    return tuple(
        pl.pallas_call(
            kernel,
            out_shape=[jax.ShapeDtypeStruct(b[0].shape, dtype)] * num_parts,
            grid=(rows * num_blocks,),
            in_specs=in_specs,
            out_specs=[seq_spec] * num_parts,
            compiler_params=plt.CompilerParams(num_warps=_GPU_WARPS, num_stages=1),
            cost_estimate=_cost(num_parts, full_a, rows, length, n, dtype.itemsize),
            interpret=interpret,
            name="linear_scan_gpu",
        )(*a, *b, *(h0 or ()))
    )


# ----------------------------------------------------------------------------------
# TPU (Mosaic): grid over (row, channel block, chunk), the state carried in VMEM.
# ----------------------------------------------------------------------------------


def _tpu_layout(n: int, dtype) -> tuple[int, int, int]:
    """(groups, lanes, groups per block): channels viewed as (groups, lanes)."""
    if n % _TPU_LANES:
        return 1, n, 1  # one (1, N) row per step: the block spans the whole array
    groups = n // _TPU_LANES
    sublanes = 8 * 4 // jnp.dtype(dtype).itemsize  # a vreg holds (8, 128) 32-bit values
    return groups, _TPU_LANES, sublanes if groups % sublanes == 0 else groups


def _tpu(a: Parts, b: Parts, h0: Parts | None, *, chunk, reverse, interpret) -> Parts:
    rows, length, n = b[0].shape
    num_parts, full_a = len(b), a[0].ndim == 3
    dtype = b[0].dtype
    groups, lanes, gb = _tpu_layout(n, dtype)
    # VMEM per time step of a block: its tile padded to (8, 128), for every array that
    # moves with time (b, h and a full a), double-buffered.
    tile = -(-gb // 8) * 8 * (-(-lanes // 128) * 128) * 4
    chunk = max(1, min(chunk, length, _TPU_VMEM_BUDGET // (2 * (2 + full_a) * num_parts * tile)))
    num_chunks, tail = pl.cdiv(length, chunk), length % chunk
    block_of = (lambda k: num_chunks - 1 - k) if reverse else (lambda k: k)

    def kernel(*refs):
        a_refs, b_refs, h0_refs, h_refs, carry_refs = _split_refs(
            refs, num_parts, full_a, h0 is not None
        )
        k = pl.program_id(2)

        @pl.when(k == 0)
        def _():
            for i, c in enumerate(carry_refs):
                c[...] = h0_refs[i][...].astype(jnp.float32) if h0_refs else jnp.zeros_like(c)

        def load(ref, t):
            return ref[t].astype(jnp.float32)

        def store(ref, t, x):
            ref[t] = x.astype(ref.dtype)

        a_const = None if full_a else tuple(r[...].astype(jnp.float32) for r in a_refs)

        def walk(count):
            def run(h):
                order = range(count - 1, -1, -1) if reverse else range(count)
                return _scan_rows(h, a_const, a_refs, b_refs, h_refs, list(order), load, store)

            return run

        h = tuple(c[...] for c in carry_refs)
        if reverse and tail:
            # The walk starts in the last, partial block, whose rows past the end hold
            # garbage; forward, they come after every real row and are never stored.
            h = jax.lax.cond(k == 0, walk(tail), walk(chunk), h)
        else:
            h = walk(chunk)(h)
        for c, x in zip(carry_refs, h):
            c[...] = x

    seq_spec = pl.BlockSpec((None, chunk, gb, lanes), lambda r, j, k: (r, block_of(k), j, 0))
    state_spec = pl.BlockSpec((None, gb, lanes), lambda r, j, k: (r, j, 0))
    a_spec = seq_spec if full_a else pl.BlockSpec((gb, lanes), lambda r, j, k: (j, 0))
    in_specs = [a_spec] * num_parts + [seq_spec] * num_parts
    in_specs += [state_spec] * num_parts if h0 is not None else []
    view = lambda x: x.reshape(*x.shape[:-1], groups, lanes)
    seq_shape = (rows, length, groups, lanes)
    out = pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct(seq_shape, dtype)] * num_parts,
        grid=(rows, groups // gb, num_chunks),
        in_specs=in_specs,
        out_specs=[seq_spec] * num_parts,
        scratch_shapes=[pltpu.VMEM((gb, lanes), jnp.float32)] * num_parts,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        cost_estimate=_cost(num_parts, full_a, rows, length, n, dtype.itemsize),
        interpret=interpret,
        name="linear_scan_tpu",
    )(*map(view, a), *map(view, b), *map(view, h0 or ()))
    return tuple(h.reshape(rows, length, n) for h in out)


# ----------------------------------------------------------------------------------
# Public entry point.
# ----------------------------------------------------------------------------------

_KERNELS: dict[str, Callable[..., Parts]] = {"gpu": _gpu, "tpu": _tpu}


def _parts(x: jax.Array) -> Parts:
    return (jnp.real(x), jnp.imag(x)) if jnp.iscomplexobj(x) else (x,)


def _combine(parts: Sequence[jax.Array], dtype) -> jax.Array:
    return jax.lax.complex(*parts).astype(dtype) if len(parts) == 2 else parts[0]


def _kernel_for(a, b, h0, *, kernel, interpret, chunk, reverse):
    rows = math.prod(b.shape[:-2])
    length, n = b.shape[-2:]
    a_parts = tuple(p.reshape(rows, length, n) if a.ndim > 1 else p for p in _parts(a))
    b_parts = tuple(p.reshape(rows, length, n) for p in _parts(b))
    h0_parts = None if h0 is None else tuple(p.reshape(rows, n) for p in _parts(h0))
    h = _KERNELS[kernel](a_parts, b_parts, h0_parts, chunk=chunk, reverse=reverse,
                         interpret=interpret)  # fmt: skip
    return _combine(h, b.dtype).reshape(b.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _forward(a, b, h0, chunk, reverse, interpret, kernel):
    run = functools.partial(_kernel_for, chunk=chunk, reverse=reverse)
    interpreted = functools.partial(run, chunk=min(chunk, _INTERPRET_CHUNK), interpret=True)
    if interpret is None and kernel is None:
        # Decided when the computation is lowered, so ahead-of-time compilation for a
        # TPU (or GPU) from a CPU host picks that device's kernel.
        return jax.lax.platform_dependent(
            a,
            b,
            h0,
            cpu=functools.partial(interpreted, kernel="gpu"),
            tpu=functools.partial(run, kernel="tpu", interpret=False),
            default=functools.partial(run, kernel="gpu", interpret=False),
        )
    backend = jax.default_backend()
    kernel = kernel or ("tpu" if backend == "tpu" else "gpu")
    if backend == "cpu" if interpret is None else interpret:
        return interpreted(a, b, h0, kernel=kernel)
    return run(a, b, h0, kernel=kernel, interpret=False)


def _forward_fwd(a, b, h0, chunk, reverse, interpret, kernel):
    return _forward(a, b, h0, chunk, reverse, interpret, kernel), None


def _forward_bwd(*_):
    raise NotImplementedError(
        "linear_scan(method='pallas') cannot be differentiated with grad='autodiff': a "
        "Pallas kernel has no transpose rule. Use grad='recurrence' (the default), which "
        "runs the same kernel backwards."
    )


_forward.defvjp(_forward_fwd, _forward_bwd)


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

    Args:
      a: decays, shape (..., L, N) like b, or (N,).
      b: inputs, shape (..., L, N); float32, bfloat16 or complex64 (float32 math).
      h0: optional initial state, shape (..., N); for reverse=True the state after the
        last position.
      chunk_size: time steps loaded at once per program (an upper bound: the GPU kernel
        uses fewer when its registers would overflow, the TPU kernel when VMEM would).
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
        raise ValueError(f"need b of shape (..., L, N) and a of b's shape or (N,); got "
                         f"a {a.shape}, b {b.shape}")  # fmt: skip
    if kernel not in (None, *_KERNELS):
        raise ValueError(f"unknown Pallas kernel {kernel!r}; use 'gpu', 'tpu' or None")
    dtype = jnp.result_type(a, b) if h0 is None else jnp.result_type(a, b, h0)
    a, b = a.astype(dtype), b.astype(dtype)
    h0 = None if h0 is None else jnp.asarray(h0, dtype).reshape(b.shape[:-2] + b.shape[-1:])
    if b.size == 0:
        return b
    return _forward(a, b, h0, int(chunk_size), bool(reverse), interpret, kernel)
