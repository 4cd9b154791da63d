"""Pallas kernels for the linear recurrence h_t = a_t * h_{t-1} + b_t (GPU Triton, TPU Mosaic).

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
  paid once per chunk, not once per step as in the naive kernel of DESIGN.md §4.
- GPU: 32 channels and one warp per program: each thread owns a channel and every row
  load is one coalesced 128-byte line per part. At (B=8, N=1024) that is 256 warps, ~2
  per H100 SM, so memory parallelism must come from the chunk: 64 complex rows = 16 KiB
  in flight per warp, ~32 KiB per SM, about what Little's law asks at ~3 TB/s and ~1 us.
  Loads per thread are capped at 128 registers' worth (shorter chunks when `a` is full);
  ptxas for sm_90a gives 168 registers and no spills for that kernel. The program loops
  over the chunks itself (Triton programs cannot pass each other a carry) and finishes
  with a shorter static tail: no padding or masking in time.
- TPU: arrays keep XLA's (..., L, N) layout, whose (8, 128) tiles are 8 time steps of
  128 channels, so the kernel costs no relayout copies around it; a tile's 8 steps are
  scanned together in log steps with sublane rolls, then the carry enters. The grid is
  (rows, channel blocks, chunks) with the chunk axis sequential ("arbitrary"), the state
  carried in VMEM scratch, and Pallas's pipeline copying the next chunk into VMEM behind
  the current one.
- Both kernels write h over b (and the backward g over dh): one (B, L, N) buffer per
  recurrence, so the LRU's B projection, the scan and its C readout hold one
  complex-sized activation per layer, which is also the only residual the gradient keeps.
- `reverse` only changes which chunk comes next and the row order within it, so no
  flipped copies are made.

A `pallas_call` cannot be transposed, so gradients come from lrulm.scan's
grad="recurrence", which runs this same kernel backwards.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.custom_partitioning import custom_partitioning
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plt
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

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
# TPU: channels per block (4 vregs per part for each 8 steps: the log-step tile scan's
# values stay in the 64 vregs).
_TPU_CHANNELS = 512

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


def _scan_rows(h, a, a_refs, b_refs, h_refs, rows, load, store, *, preload, keep=None):
    """Runs the recurrence over `rows` (in processing order) of one block.

    Args:
      h: the carried state, a tuple of float32 parts.
      a: the decay parts (already float32) when `a` is time-invariant, else None.
      a_refs, b_refs, h_refs: refs indexed by a row (time) index first.
      rows: row indices, static or traced, in the order the recurrence visits them.
      load: load(ref, row) -> float32 value of the row.
      store: store(ref, row, value).
      preload: issue every load before the first step, so that they are in flight
        together (GPU: they come from HBM); else load each row at its step (TPU: rows
        come from VMEM, and 64 vregs could not hold a chunk anyway).
      keep: keep(row) -> a float32 scalar, 1 to carry the state into the row, 0 to
        start it afresh there (a document boundary); None: always carry.

    Returns:
      The state after the last row.
    """

    def inputs(t):
        at = tuple(load(r, t) for r in a_refs) if a is None else a
        return at, tuple(load(r, t) for r in b_refs), None if keep is None else keep(t)

    loaded = [inputs(t) for t in rows] if preload else None
    for i, t in enumerate(rows):
        at, bt, kt = loaded[i] if preload else inputs(t)
        if kt is not None:
            h = tuple(kt * x for x in h)
        h = _step(h, at, bt)
        for ref, x in zip(h_refs, h):
            store(ref, t, x)
    return h


def _write_over_b(num_parts: int) -> dict[int, int]:
    """Aliases for writing each row of h over the row of b it was made from (operands
    num_parts.. are b's parts, results 0.. are h's): a step reads b_t before it stores
    h_t, and no program reads a row another one writes, so the recurrence needs one
    (B, L, N) buffer, not two. XLA copies b first if it is still needed afterwards (saved
    by a remat policy, say) or is a non-donated argument, so the forward aliases only on
    request (`overwrite_b`: the LRU's B u is dead once the scan has read it); the
    backward always writes g over dh, a cotangent made for it."""
    return {num_parts + i: i for i in range(num_parts)}


def _split_refs(refs, num_parts, num_keep):
    """(a, b, h0, keep, h, scratch) refs: parts, parts, parts, 0 or 1, parts, the rest."""
    sizes = (num_parts,) * 3 + (num_keep, num_parts)
    out, start = [], 0
    for size in sizes:
        out.append(refs[start : start + size])
        start += size
    return (*out, refs[start:])


def _cost(num_parts, full_a, rows, length, n, itemsize):
    arrays = 2 + full_a  # read b (and a), write h
    return pl.CostEstimate(
        flops=2 * num_parts**2 * rows * length * n,
        transcendentals=0,
        bytes_accessed=arrays * num_parts * rows * length * n * itemsize,
    )


# ----------------------------------------------------------------------------------
# GPU (Triton): grid over (row, channel block); each program loops over the chunks.
# ----------------------------------------------------------------------------------


def _gpu_memory_ops(n, bn, num_blocks):
    """load(ref, t), store(ref, t, x), load_all(refs), store_all(refs, xs) for the current
    program's block of channels, masked where the last block hangs over the end of N."""
    mask = None
    if n % bn:
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

    def store_all(refs, xs):
        for r, x in zip(refs, xs):
            if mask is None:
                r[...] = x.astype(r.dtype)
            else:
                plt.store(r, x.astype(r.dtype), mask=mask)

    return load, store, load_all, store_all


def _walk_chunks(scan, carry, length, chunk, reverse):
    """carry <- scan(carry, rows) over the sequence, `chunk` rows at a time in walk order
    (a fori_loop over whole chunks, then a shorter static tail: no padding in time)."""
    num_chunks, tail = divmod(length, chunk)

    def chunk_rows(start, count):
        """Row indices of `count` steps beginning `start` steps into the walk."""
        if reverse:
            return [length - 1 - start - i for i in range(count)]
        return [start + i for i in range(count)]

    if num_chunks:
        carry = jax.lax.fori_loop(
            0, num_chunks, lambda k, c: scan(c, chunk_rows(k * chunk, chunk)), carry
        )
    if tail:
        carry = scan(carry, chunk_rows(num_chunks * chunk, tail))
    return carry


def _gpu(
    a: Parts, b: Parts, h0: Parts, keep: Parts, *, chunk, reverse, interpret, over_b=False
) -> Parts:
    rows, length, n = b[0].shape
    num_parts, full_a = len(b), a[0].ndim == 3
    bn = min(_GPU_CHANNELS, pl.next_power_of_2(n))  # Triton blocks are powers of two
    num_blocks = pl.cdiv(n, bn)
    per_row = num_parts * (1 + full_a) + len(keep)  # values loaded per thread per step
    chunk = max(1, min(chunk, length, _GPU_LOAD_REGISTERS // per_row))

    def kernel(*refs):
        a_refs, b_refs, h0_refs, keep_refs, h_refs, _ = _split_refs(refs, num_parts, len(keep))
        load, store, load_all, _ = _gpu_memory_ops(n, bn, num_blocks)
        h = load_all(h0_refs)
        a_const = None if full_a else load_all(a_refs)
        scan = functools.partial(
            _scan_rows,
            a=a_const,
            a_refs=a_refs,
            b_refs=b_refs,
            h_refs=h_refs,
            load=load,
            store=store,
            preload=True,
            # One scalar per step, the same for every channel of the row.
            keep=(lambda t: keep_refs[0][t].astype(jnp.float32)) if keep else None,
        )

        _walk_chunks(lambda h, rows: scan(h, rows=rows), h, length, chunk, reverse)

    seq_spec = pl.BlockSpec((None, length, bn), lambda p: (p // num_blocks, 0, p % num_blocks))
    state_spec = pl.BlockSpec((None, bn), lambda p: (p // num_blocks, p % num_blocks))
    a_spec = seq_spec if full_a else pl.BlockSpec((bn,), lambda p: (p % num_blocks,))
    in_specs = [a_spec] * num_parts + [seq_spec] * num_parts + [state_spec] * num_parts
    in_specs += [pl.BlockSpec((None, length), lambda p: (p // num_blocks, 0))] * len(keep)
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
            input_output_aliases=_write_over_b(num_parts) if over_b else {},
            interpret=interpret,
            name="linear_scan_gpu",
        )(*a, *b, *h0, *keep)
    )


def _conj(x: Parts) -> Parts:
    return x if len(x) == 1 else (x[0], -x[1])


def _mul_conj(x: Parts, y: Parts) -> Parts:
    """x * conj(y) on parts."""
    if len(x) == 1:
        return (x[0] * y[0],)
    (xr, xi), (yr, yi) = x, y
    return xr * yr + xi * yi, xi * yr - xr * yi


def _gpu_bwd(a, dh, h, h0, keep, *, chunk, reverse, interpret):
    """The gradient of the forward kernel, in one pass (the fused backward).

    Walks the sequence opposite to the forward, carrying g_t = conj(a_{t+1}) keep_{t+1}
    g_{t+1} + dh_t (the cotangent of b, written out) and, in the same step, forms
    da_t = keep_t g_t conj(h_{t-1}) from the h row the forward wrote (h0 at the first
    position): summed in registers for a time-invariant a (one (N,) row per program),
    written per step for a full a. The shifted a_{t+1} and keep_{t+1} are the values the
    walk loaded one step earlier, so no shifted copies exist. Bytes: read dh and h, write
    g (plus a and da when a is full), against read dh, write g, then read g and h again
    for da when the backward is the forward kernel run backwards.

    Returns:
      (g parts (rows, L, N), da parts: (rows, N) partial sums or (rows, L, N)).
    """
    rows, length, n = dh[0].shape
    num_parts, full_a = len(dh), a[0].ndim == 3
    bn = min(_GPU_CHANNELS, pl.next_power_of_2(n))
    num_blocks = pl.cdiv(n, bn)
    per_row = num_parts * (2 + full_a) + len(keep)  # dh, h_{t-1} (and a) per step
    chunk = max(1, min(chunk, length, _GPU_LOAD_REGISTERS // per_row))
    first = length - 1 if reverse else 0  # the forward's first row: h0 precedes it
    before = (lambda t: t + 1) if reverse else (lambda t: t - 1)

    def kernel(*refs):
        groups = [num_parts] * 4 + [len(keep), num_parts, num_parts]
        a_refs, dh_refs, h_refs, h0_refs, keep_refs, g_refs, da_refs = (
            refs[sum(groups[:i]) : sum(groups[: i + 1])] for i in range(len(groups))
        )
        load, store, load_all, store_all = _gpu_memory_ops(n, bn, num_blocks)
        h0 = load_all(h0_refs)
        a_const = None if full_a else load_all(a_refs)

        def previous_state(t):  # h_{t-1} in the forward's order; h0 before its first row
            if isinstance(t, int):
                return h0 if t == first else tuple(load(r, before(t)) for r in h_refs)
            row = jnp.clip(before(t), 0, length - 1)
            return tuple(jnp.where(t == first, x0, load(r, row)) for x0, r in zip(h0, h_refs))

        def inputs(t):
            at = a_const if a_const is not None else tuple(load(r, t) for r in a_refs)
            kt = keep_refs[0][t].astype(jnp.float32) if keep else None
            return at, tuple(load(r, t) for r in dh_refs), previous_state(t), kt

        def scan(carry, rows):
            g, a_next, k_next, da = carry
            loaded = [inputs(t) for t in rows]  # the whole chunk's loads in flight
            for t, (at, dht, hp, kt) in zip(rows, loaded):
                if keep:
                    g = tuple(k_next * x for x in g)
                g = _step(g, _conj(a_next), dht)
                for ref, x in zip(g_refs, g):
                    store(ref, t, x)
                contribution = _mul_conj(g, hp)
                if keep:
                    contribution = tuple(kt * x for x in contribution)
                if full_a:
                    for ref, x in zip(da_refs, contribution):
                        store(ref, t, x)
                else:
                    da = tuple(x + y for x, y in zip(da, contribution))
                a_next, k_next = at, (kt if keep else k_next)
            return g, a_next, k_next, da

        zeros = tuple(jnp.zeros((bn,), jnp.float32) for _ in range(num_parts))
        # g starts at zero, so the "next" a and keep of the first walk step do not matter.
        carry = (zeros, a_const or zeros, jnp.float32(1), zeros)
        _, _, _, da = _walk_chunks(scan, carry, length, chunk, not reverse)
        if not full_a:
            store_all(da_refs, da)

    seq_spec = pl.BlockSpec((None, length, bn), lambda p: (p // num_blocks, 0, p % num_blocks))
    state_spec = pl.BlockSpec((None, bn), lambda p: (p // num_blocks, p % num_blocks))
    a_spec = seq_spec if full_a else pl.BlockSpec((bn,), lambda p: (p % num_blocks,))
    in_specs = [a_spec] * num_parts + [seq_spec] * (2 * num_parts) + [state_spec] * num_parts
    in_specs += [pl.BlockSpec((None, length), lambda p: (p // num_blocks, 0))] * len(keep)
    dtype = dh[0].dtype
    da_shape = (rows, length, n) if full_a else (rows, n)
    out = pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct(dh[0].shape, dtype)] * num_parts
        + [jax.ShapeDtypeStruct(da_shape, jnp.float32)] * num_parts,
        grid=(rows * num_blocks,),
        in_specs=in_specs,
        out_specs=[seq_spec] * num_parts + [seq_spec if full_a else state_spec] * num_parts,
        compiler_params=plt.CompilerParams(num_warps=_GPU_WARPS, num_stages=1),
        cost_estimate=pl.CostEstimate(
            flops=4 * num_parts**2 * rows * length * n,
            transcendentals=0,
            bytes_accessed=(3 + 2 * full_a) * num_parts * rows * length * n * dtype.itemsize,
        ),
        input_output_aliases=_write_over_b(num_parts),  # g written over dh
        interpret=interpret,
        name="linear_scan_gpu_bwd",
    )(*a, *dh, *h, *h0, *keep)
    return tuple(out[:num_parts]), tuple(out[num_parts:])


# ----------------------------------------------------------------------------------
# TPU (Mosaic): grid over (row, channel block, chunk), the state carried in VMEM.
# ----------------------------------------------------------------------------------
#
# Arrays keep their natural (..., L, N) layout, whose (8, 128) tiles hold 8 time steps
# of 128 channels: XLA's matmuls write b that way and its readout reads h that way, so
# no relayout copy surrounds the kernel (a (L, N/128, 128) view, one step per vreg,
# would cost XLA a copy of every operand and result, as many bytes again as the scan).
# A tile's 8 steps are scanned at once, log-step (Hillis-Steele) with sublane rolls,
# then the carry from the previous tile enters through the tile's cumulative decay.


def _tpu_block_channels(n: int) -> int:
    """Channels per block: the largest multiple of 128 dividing n, at most
    _TPU_CHANNELS; the whole axis when n is not a multiple of 128."""
    if n % _TPU_LANES:
        return n
    lanes = n // _TPU_LANES
    return _TPU_LANES * max(d for d in range(1, _TPU_CHANNELS // _TPU_LANES + 1) if lanes % d == 0)


def _tpu_chunk(length: int, chunk: int, slab: int, budget_rows: int) -> tuple[int, int]:
    """(rows per grid step, padded length): a multiple of `slab` that divides the padded
    length, near min(chunk, budget, length); the length is padded only when no divisor
    of it is at least half that size."""
    target = max(slab, min(chunk, budget_rows, length) // slab * slab)
    padded = -(-length // slab) * slab
    best = max(c for c in range(slab, target + 1, slab) if padded % c == 0)
    if 2 * best >= target:
        return best, padded
    return target, -(-length // target) * target


def _mul(x: Parts, y: Parts) -> Parts:
    """x * y on parts."""
    if len(x) == 1:
        return (x[0] * y[0],)
    (xr, xi), (yr, yi) = x, y
    return xr * yr - xi * yi, xr * yi + xi * yr


def _tile_scan(decay: Parts, x: Parts, reverse: bool, roll) -> tuple[Parts, Parts]:
    """The recurrence within a tile of 8 time steps (rows), all channels at once.

    Composes (decay, x) pairs over windows of 1, 2, 4 rows: afterwards x_r is the state
    at row r had the tile started from zero, and decay_r the product of the decays from
    the tile's first row (last, in reverse) to r: the factor the carried state enters with.
    """
    row = jax.lax.broadcasted_iota(jnp.int32, x[0].shape, 0)
    for w in (1, 2, 4):
        # Row r takes the pair w rows before it (after it, in reverse).
        shift, valid = (8 - w, row < 8 - w) if reverse else (w, row >= w)
        x_from = tuple(roll(v, shift, 0) for v in x)
        decay_from = tuple(roll(v, shift, 0) for v in decay)
        x = tuple(jnp.where(valid, v + u, v) for v, u in zip(x, _mul(decay, x_from)))
        decay = tuple(jnp.where(valid, u, v) for v, u in zip(decay, _mul(decay, decay_from)))
    return decay, x


def _tile_scan_powers(powers, keep, x: Parts, reverse: bool, roll):
    """`_tile_scan` for a time-invariant decay a: the window products are a^w times the
    product of the window's keep values, so only the (8, 1) keep column is composed and
    the channels see a multiply by a precomputed a^w ((1, n) rows for w = 1, 2, 4) per
    round: fewer vector operations and half the rolls of the general form.

    Returns (the keep product from the tile's first row to each row, or None; x).
    """
    row = jax.lax.broadcasted_iota(jnp.int32, (8, 1), 0)
    for aw, w in zip(powers, (1, 2, 4)):
        shift, valid = (8 - w, row < 8 - w) if reverse else (w, row >= w)
        y = _mul(aw, tuple(roll(v, shift, 0) for v in x))
        if keep is not None:
            y = tuple(keep * v for v in y)
            keep = jnp.where(valid, keep * roll(keep, shift, 0), keep)
        x = tuple(jnp.where(valid, v + u, v) for v, u in zip(x, y))
    return keep, x


def _power_table(a: Parts, reverse: bool) -> Parts:
    """Per part, (32, N): rows 0-7 the power of a the carry enters each row of a tile
    with (a^(r+1); a^(8-r) in reverse), then a, a^2 and a^4, each repeated on 8 rows so
    that the kernel loads whole vregs rather than broadcasting a row in every step."""
    a = tuple(x.astype(jnp.float32) for x in a)
    powers = [a]
    for _ in range(7):
        powers.append(_mul(powers[-1], a))
    carry_in = powers[::-1] if reverse else powers
    rows = carry_in + [powers[0]] * 8 + [powers[1]] * 8 + [powers[3]] * 8
    return tuple(jnp.stack([r[p] for r in rows]) for p in range(len(a)))


def _tpu(
    a: Parts, b: Parts, h0: Parts, keep: Parts, *, chunk, reverse, interpret, over_b=False
) -> Parts:
    rows, length, n = b[0].shape
    num_parts, full_a = len(b), a[0].ndim == 3
    dtype = b[0].dtype
    bn = _tpu_block_channels(n)
    # A tile's rows: 8 for 32-bit values, 16 for bf16 (loaded whole, scanned as 2 x 8).
    slab = 8 * max(1, 4 // jnp.dtype(dtype).itemsize)
    # VMEM per row of a grid step, double-buffered: b and h (and a full a), and keep as
    # a (chunk, 1) block that takes (chunk, 128) words.
    padded_bn = -(-bn // _TPU_LANES) * _TPU_LANES
    per_row = 2 * ((2 + full_a) * num_parts * padded_bn * jnp.dtype(dtype).itemsize)
    per_row += 2 * _TPU_LANES * 4 * len(keep)
    chunk, padded = _tpu_chunk(length, chunk, slab, _TPU_VMEM_BUDGET // per_row)
    if padded != length:
        # Extra rows after the end (before the start, in reverse): the recurrence never
        # carries them into a real row.
        pad = ((0, 0), (padded - length, 0) if reverse else (0, padded - length), (0, 0))
        b = tuple(jnp.pad(x, pad) for x in b)
        a = tuple(jnp.pad(x, pad) for x in a) if full_a else a
        keep = tuple(jnp.pad(k, pad[:2], constant_values=1) for k in keep)
    num_chunks, num_slabs = padded // chunk, chunk // slab
    block_of = (lambda k: num_chunks - 1 - k) if reverse else (lambda k: k)
    roll = jnp.roll if interpret else pltpu.roll

    def kernel(*refs):
        a_refs, b_refs, h0_refs, keep_refs, h_refs, carry_refs = _split_refs(
            refs, num_parts, len(keep)
        )

        @pl.when(pl.program_id(2) == 0)
        def _():
            for c, h0_ref in zip(carry_refs, h0_refs):
                c[...] = h0_ref[...].astype(jnp.float32)

        if not full_a:  # the power table: loaded once per grid step
            carry_in = tuple(r[pl.ds(0, 8), :] for r in a_refs)
            powers = [tuple(r[pl.ds(8 * k, 8), :] for r in a_refs) for k in (1, 2, 3)]

        def tile(i, carry):
            s = (num_slabs - 1 - i) if reverse else i
            start = pl.multiple_of(s * slab, slab)
            load = lambda r: r[pl.ds(start, slab), :].astype(jnp.float32)
            bs = tuple(map(load, b_refs))
            # (slab, 1), broadcast over the channels
            k = keep_refs[0][pl.ds(start, slab), :] if keep else None
            if full_a:
                decays = tuple(map(load, a_refs))
                decays = decays if k is None else tuple(k * x for x in decays)
            outs = [None] * (slab // 8)
            for j in reversed(range(slab // 8)) if reverse else range(slab // 8):
                sub = slice(8 * j, 8 * j + 8)
                x = tuple(v[sub] for v in bs)
                if full_a:
                    decay, x = _tile_scan(tuple(v[sub] for v in decays), x, reverse, roll)
                    entering = _mul(decay, carry)
                else:
                    k_sub = None if k is None else k[sub]
                    k_sub, x = _tile_scan_powers(powers, k_sub, x, reverse, roll)
                    entering = _mul(carry_in, carry)
                    if k_sub is not None:
                        entering = tuple(k_sub * v for v in entering)
                x = tuple(v + u for v, u in zip(x, entering))
                outs[j] = x
                edge = slice(0, 1) if reverse else slice(7, 8)
                carry = tuple(v[edge] for v in x)
            for p, ref in enumerate(h_refs):
                whole = outs[0][p] if len(outs) == 1 else jnp.concatenate([o[p] for o in outs])
                ref[pl.ds(start, slab), :] = whole.astype(ref.dtype)
            return carry

        carry = tuple(c[...] for c in carry_refs)
        carry = jax.lax.fori_loop(0, num_slabs, tile, carry)
        for c, x in zip(carry_refs, carry):
            c[...] = x

    seq_spec = pl.BlockSpec((None, chunk, bn), lambda r, j, k: (r, block_of(k), j))
    state_spec = pl.BlockSpec((None, 1, bn), lambda r, j, k: (r, 0, j))
    a_spec = seq_spec if full_a else pl.BlockSpec((32, bn), lambda r, j, k: (0, j))
    in_specs = [a_spec] * num_parts + [seq_spec] * num_parts + [state_spec] * num_parts
    # keep as (rows, L, 1): a (chunk, 1) block, one value per step
    in_specs += [pl.BlockSpec((None, chunk, 1), lambda r, j, k: (r, block_of(k), 0))] * len(keep)
    out = pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct((rows, padded, n), dtype)] * num_parts,
        grid=(rows, n // bn, num_chunks),
        in_specs=in_specs,
        out_specs=[seq_spec] * num_parts,
        scratch_shapes=[pltpu.VMEM((1, bn), jnp.float32)] * num_parts,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        cost_estimate=_cost(num_parts, full_a, rows, padded, n, dtype.itemsize),
        input_output_aliases=_write_over_b(num_parts) if over_b else {},
        interpret=interpret,
        name="linear_scan_tpu",
    )(
        *(a if full_a else _power_table(a, reverse)),
        *b,
        *(x[:, None] for x in h0),
        *(k.astype(jnp.float32)[..., None] for k in keep),
    )
    if padded != length:
        out = [h[:, padded - length :] if reverse else h[:, :length] for h in out]
    return tuple(out)


def _shift_in(x, fill, from_end: bool):
    """x moved one step along axis 1 (time), `fill` entering at the start (x_{t-1} at t)
    or, from_end, at the end (x_{t+1} at t)."""
    fill = fill[:, None]
    return jnp.concatenate([x[:, 1:], fill] if from_end else [fill, x[:, :-1]], axis=1)


def _tpu_bwd(a, dh, h, h0, keep, *, chunk, reverse, interpret):
    """The gradient on TPU: the forward kernel run backwards over conj(a) shifted one step
    (and keep shifted), then da from g and h in XLA. Same results as `_gpu_bwd`."""
    full_a = a[0].ndim == 3
    a_next = _conj(a)
    if full_a:
        a_next = tuple(_shift_in(x, jnp.zeros_like(x[:, 0]), not reverse) for x in a_next)
    keep_next = tuple(_shift_in(k, jnp.zeros_like(k[:, 0]), not reverse) for k in keep)
    zeros = tuple(jnp.zeros_like(x) for x in h0)
    g = _tpu(
        a_next,
        dh,
        zeros,
        keep_next,
        chunk=chunk,
        reverse=not reverse,
        interpret=interpret,
        over_b=True,
    )
    h_before = tuple(_shift_in(x, x0, reverse) for x, x0 in zip(h, h0))
    da = _mul_conj(tuple(x.astype(jnp.float32) for x in g), h_before)
    if keep:
        da = tuple(x * keep[0][..., None] for x in da)
    if not full_a:
        da = tuple(x.sum(1) for x in da)
    return g, da


# ----------------------------------------------------------------------------------
# Leading axes, and the choice of kernel.
# ----------------------------------------------------------------------------------

_KERNELS: dict[tuple[str, str], Callable] = {
    ("forward", "gpu"): _gpu,
    ("forward", "tpu"): _tpu,
    ("forward_over_b", "gpu"): functools.partial(_gpu, over_b=True),
    ("forward_over_b", "tpu"): functools.partial(_tpu, over_b=True),
    ("backward", "gpu"): _gpu_bwd,
    ("backward", "tpu"): _tpu_bwd,
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


def _dispatch(op, groups, chunk, reverse, interpret, kernel):
    """Picks the kernel variant, and whether to interpret it."""
    run = functools.partial(_run, op, chunk=chunk, reverse=reverse)
    interpreted = functools.partial(run, chunk=min(chunk, _INTERPRET_CHUNK), interpret=True)
    if interpret is None and kernel is None:
        # Decided when the computation is lowered, so ahead-of-time compilation for a
        # TPU (or GPU) from a CPU host picks that device's kernel.
        return jax.lax.platform_dependent(
            groups,
            cpu=functools.partial(interpreted, kernel="gpu"),
            tpu=functools.partial(run, kernel="tpu", interpret=False),
            default=functools.partial(run, kernel="gpu", interpret=False),
        )
    backend = jax.default_backend()
    kernel = kernel or ("tpu" if backend == "tpu" else "gpu")
    if backend == "cpu" if interpret is None else interpret:
        return interpreted(groups, kernel=kernel)
    return run(groups, kernel=kernel, interpret=False)


def _dispatch_forward(a, b, h0, keep, chunk, reverse, interpret, kernel):
    return _dispatch("forward", (a, b, h0, keep), chunk, reverse, interpret, kernel)


def _dispatch_backward(a, dh, h, h0, keep, chunk, reverse, interpret, kernel):
    return _dispatch("backward", (a, dh, h, h0, keep), chunk, reverse, interpret, kernel)


def _dispatch_forward_over_b(a, b, h0, keep, chunk, reverse, interpret, kernel):
    return _dispatch("forward_over_b", (a, b, h0, keep), chunk, reverse, interpret, kernel)


_DISPATCH = {
    "forward": _dispatch_forward,
    "forward_over_b": _dispatch_forward_over_b,
    "backward": _dispatch_backward,
}


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


@functools.cache
def _call(op, chunk, reverse, interpret, kernel):
    """The op on groups of parts, sharded; under vmap, the mapped axis is one more row."""

    def call(*groups):
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
    `overwrite_b`: write h over b's buffers (see `_write_over_b`); XLA copies b first if it
    is still needed afterwards or is a non-donated argument of the jitted function.
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
    kernel pass on GPU (see `_gpu_bwd`).

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
