"""The TPU (Mosaic) kernels of the linear recurrence: grid over (row, channel block,
chunk), the state carried in VMEM (design: lrulm.scan_pallas)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from lrulm.kernels.common import (
    Parts,
    conj,
    cost,
    group_refs,
    mul,
    mul_conj,
    out_struct,
    split_refs,
    write_over_b,
)

# TPU: lanes per vreg, and the VMEM the double-buffered blocks of one grid step may use
# (the default scoped VMEM limit is 16 MiB on v5e, 32 MiB on v4/v5p/v6e).
_TPU_LANES = 128
_TPU_VMEM_BUDGET = 8 * 2**20
# TPU: time steps per grid step at least (VMEM permitting), whatever chunk is asked for:
# a grid step costs ~200 (forward) to ~550 (backward) bundles besides its tiles' loop
# (block bookkeeping, the carry, DMA issue: tools/tpu_kernel_schedule.py), as much as
# 25-50 steps of the loop itself, and the pipeline's own fixed cost per step.
_TPU_MIN_CHUNK = 512
# ... worth about this many rows of the loop, when choosing how far to pad
_STEP_ROWS = 48
# TPU: the keep column's dtype in HBM and VMEM. A (rows, L, 1) array sits in (8, 128)
# tiles of 32-bit values, one real value per 128 lanes, so its DMA moves 512 bytes per
# step (8% more than the forward's b and h at 384 channels); bfloat16 tiles are (16, 128),
# half of that. 0 and 1 are exact in bfloat16.
_KEEP_DTYPE = jnp.bfloat16
# TPU: channels per block (4 vregs per part for each 8 steps: the log-step tile scan's
# values stay in the 64 vregs).
_TPU_CHANNELS = 512

# Arrays keep their natural (..., L, N) layout, whose (8, 128) tiles hold 8 time steps
# of 128 channels: XLA's matmuls write b that way and its readout reads h that way, so
# no relayout copy surrounds the kernel (a (L, N/128, 128) view, one step per vreg,
# would cost XLA a copy of every operand and result, as many bytes again as the scan).
# A tile's 8 steps are scanned at once, log-step (Hillis-Steele) with sublane rolls,
# then the carry from the previous tile enters through the tile's cumulative decay.
# A sublane roll by k is reported to lower to (8 - k) % 8 one-sublane rotates on the
# vector ALU slots, so the forward's shifts (1, 2, 4: 17 rotates per vreg) cost more
# than the reverse's (7, 6, 4: 7); time both directions when this first runs on a TPU.


def _block_channels(n: int) -> int:
    """Channels per block: the largest multiple of 128 dividing n, at most
    _TPU_CHANNELS; the whole axis when n is not a multiple of 128."""
    if n % _TPU_LANES:
        return n
    lanes = n // _TPU_LANES
    return _TPU_LANES * max(d for d in range(1, _TPU_CHANNELS // _TPU_LANES + 1) if lanes % d == 0)


def chunking(length: int, chunk: int, slab: int, budget_rows: int) -> tuple[int, int]:
    """(rows per grid step, padded length): a multiple of `slab`, at most min(chunk,
    budget, length) (rounded up to a slab), that walks the fewest rows counting each grid
    step as _STEP_ROWS more and padding as two passes over the length (XLA copies every
    operand into the padded shape and every result out of it), so a divisor of the
    length is taken unless it would make many short steps."""
    target = max(slab, min(chunk, budget_rows, length) // slab * slab)
    steps = lambda c: -(-length // c)
    cost = lambda c: steps(c) * (c + _STEP_ROWS) + (2 * length if length % c else 0)
    best = min(range(slab, target + 1, slab), key=lambda c: (cost(c), -c))
    return best, steps(best) * best


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
        x = tuple(jnp.where(valid, v + u, v) for v, u in zip(x, mul(decay, x_from)))
        decay = tuple(jnp.where(valid, u, v) for v, u in zip(decay, mul(decay, decay_from)))
    return decay, x


def _tile_scan_powers(powers, keep, x: Parts, reverse: bool, roll):
    """`_tile_scan` for a time-invariant decay a: the window products are a^w times the
    product of the window's keep values, so only the (8, 1) keep column is composed and
    the channels see a multiply by a precomputed a^w ((1, n) rows for w = 1, 2, 4) per
    round: fewer vector operations and half the rolls of the general form. The table's
    a^w is zero on the rows that have no pair w rows before them (after, in reverse), so
    what the roll wrapped around adds nothing and no select is needed.

    Returns (the keep product from the tile's first row to each row, or None; x).
    """
    row = jax.lax.broadcasted_iota(jnp.int32, (8, 1), 0)
    for aw, w in zip(powers, (1, 2, 4)):
        shift, valid = (8 - w, row < 8 - w) if reverse else (w, row >= w)
        y = mul(aw, tuple(roll(v, shift, 0) for v in x))
        if keep is not None:
            y = tuple(keep * v for v in y)
            keep = jnp.where(valid, keep * roll(keep, shift, 0), keep)
        x = tuple(v + u for v, u in zip(x, y))
    return keep, x


def _power_table(a: Parts, reverse: bool) -> Parts:
    """Per part, (32, N): rows 0-7 the power of a the carry enters each row of a tile
    with (a^(r+1); a^(8-r) in reverse), then a, a^2 and a^4 for the rounds w = 1, 2, 4 of
    `_tile_scan_powers`, each on 8 rows (whole vregs, not a row broadcast in every step)
    and zero on the rows that take no pair in that round (the first w; the last w in
    reverse)."""
    a = tuple(x.astype(jnp.float32) for x in a)
    powers = [a]
    for _ in range(7):
        powers.append(mul(powers[-1], a))
    rows = powers[::-1] if reverse else powers
    zero = tuple(jnp.zeros_like(x) for x in a)
    for w in (1, 2, 4):
        takes = [(r < 8 - w) if reverse else (r >= w) for r in range(8)]
        rows += [powers[w - 1] if t else zero for t in takes]
    return tuple(jnp.stack([r[p] for r in rows]) for p in range(len(a)))


def _power_rows(a_refs):
    """(carry_in, [a, a^2, a^4]) from the power table's refs, as (8, channels) values:
    loaded once per grid step."""
    carry_in = tuple(r[pl.ds(0, 8), :] for r in a_refs)
    return carry_in, [tuple(r[pl.ds(8 * k, 8), :] for r in a_refs) for k in (1, 2, 3)]


def _slab_decays(a_refs, keep_refs, load, start, slab, full_a):
    """A slab's keep column ((slab, 1), broadcast over the channels; None without
    resets) and, for a full a, its decays times keep (else None)."""
    k = keep_refs[0][pl.ds(start, slab), :].astype(jnp.float32) if keep_refs else None
    if not full_a:
        return k, None
    decays = tuple(map(load, a_refs))
    return k, decays if k is None else tuple(k * x for x in decays)


def _scan_slab(xs: Parts, k, decays, powers, carry_in, carry, reverse: bool, roll):
    """One slab (`_slab_rows`: 16 rows, 32 for bf16, scanned as 8-row tiles) of the
    recurrence.

    xs: the slab's inputs (float32 parts); k: its keep column (slab, 1) or None; decays:
    its full decays (already times keep) or None for a time-invariant decay given as the
    power table's rows (`powers`, `carry_in`). Returns (the slab's states, the carry).
    """
    outs = [None] * (len(xs[0]) // 8)
    for j in reversed(range(len(outs))) if reverse else range(len(outs)):
        sub = slice(8 * j, 8 * j + 8)
        x = tuple(v[sub] for v in xs)
        if decays is not None:
            decay, x = _tile_scan(tuple(v[sub] for v in decays), x, reverse, roll)
            entering = mul(decay, carry)
        else:
            k_sub = None if k is None else k[sub]
            k_sub, x = _tile_scan_powers(powers, k_sub, x, reverse, roll)
            entering = mul(carry_in, carry)
            if k_sub is not None:
                entering = tuple(k_sub * v for v in entering)
        x = tuple(v + u for v, u in zip(x, entering))
        outs[j] = x
        edge = slice(0, 1) if reverse else slice(7, 8)
        carry = tuple(v[edge] for v in x)
    whole = tuple(
        outs[0][p] if len(outs) == 1 else jnp.concatenate([o[p] for o in outs])
        for p in range(len(xs))
    )
    return whole, carry


def _slab_rows(dtype) -> int:
    """Rows per loop iteration: two vregs' worth per 128 channels (16 for 32-bit values,
    32 for bf16), scanned as 8-row tiles. Two independent tile scans per iteration give
    the scheduler work to overlap: per 16 float32 rows the forward takes 93 bundles
    with resets and 73 without, against 114 and 78 for two iterations of one tile."""
    return 16 * max(1, 4 // jnp.dtype(dtype).itemsize)


def _vmem_rows(chunk, length, n, dtype, sequences: int, columns: int) -> tuple[int, int, int]:
    """(block channels, rows per grid step, padded length) for a kernel that moves
    `sequences` (rows, L, N) arrays and `columns` (rows, L, 1) ones, double-buffered;
    a (chunk, 1) block takes (chunk, 128) values of VMEM."""
    bn = _block_channels(n)
    chunk = max(chunk, _TPU_MIN_CHUNK)
    padded_bn = -(-bn // _TPU_LANES) * _TPU_LANES
    keep_row = _TPU_LANES * jnp.dtype(_KEEP_DTYPE).itemsize
    per_row = 2 * sequences * padded_bn * jnp.dtype(dtype).itemsize + 2 * keep_row * columns
    chunk, padded = chunking(length, chunk, _slab_rows(dtype), _TPU_VMEM_BUDGET // per_row)
    return bn, chunk, padded


def forward(
    a: Parts, b: Parts, h0: Parts, keep: Parts, *, chunk, reverse, interpret, over_b=False
) -> Parts:
    rows, length, n = b[0].shape
    num_parts, full_a = len(b), a[0].ndim == 3
    dtype = b[0].dtype
    slab = _slab_rows(dtype)
    # b and h (and a full a) per part; keep
    bn, chunk, padded = _vmem_rows(chunk, length, n, dtype, (2 + full_a) * num_parts, len(keep))
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
        a_refs, b_refs, h0_refs, keep_refs, h_refs, carry_refs = split_refs(
            refs, num_parts, len(keep)
        )

        @pl.when(pl.program_id(2) == 0)
        def _():
            for c, h0_ref in zip(carry_refs, h0_refs):
                c[...] = h0_ref[...].astype(jnp.float32)

        carry_in, powers = (None, None) if full_a else _power_rows(a_refs)

        def tile(i, carry):
            s = (num_slabs - 1 - i) if reverse else i
            start = pl.multiple_of(s * slab, slab)
            load = lambda r: r[pl.ds(start, slab), :].astype(jnp.float32)
            k, decays = _slab_decays(a_refs, keep_refs, load, start, slab, full_a)
            h, carry = _scan_slab(
                tuple(map(load, b_refs)), k, decays, powers, carry_in, carry, reverse, roll
            )
            for ref, x in zip(h_refs, h):
                ref[pl.ds(start, slab), :] = x.astype(ref.dtype)
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
        out_shape=[out_struct((rows, padded, n), dtype, b[0])] * num_parts,
        grid=(rows, n // bn, num_chunks),
        in_specs=in_specs,
        out_specs=[seq_spec] * num_parts,
        scratch_shapes=[pltpu.VMEM((1, bn), jnp.float32)] * num_parts,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        cost_estimate=cost(num_parts, full_a, rows, padded, n, dtype.itemsize),
        input_output_aliases=write_over_b(num_parts) if over_b else {},
        interpret=interpret,
        name="linear_scan_tpu",
    )(
        *(a if full_a else _power_table(a, reverse)),
        *b,
        *(x[:, None] for x in h0),
        *(k.astype(_KEEP_DTYPE)[..., None] for k in keep),
    )
    if padded != length:
        out = [h[:, padded - length :] if reverse else h[:, :length] for h in out]
    return tuple(out)


def _shift_in(x, fill, from_end: bool):
    """x moved one step along axis 1 (time), `fill` entering at the start (x_{t-1} at t)
    or, from_end, at the end (x_{t+1} at t)."""
    fill = fill[:, None]
    return jnp.concatenate([x[:, 1:], fill] if from_end else [fill, x[:, :-1]], axis=1)


def _previous_states(h: Parts, edge: Parts, reverse: bool, roll) -> Parts:
    """Per row of a slab, the state the forward carried into it: h_{t-1} (h_{t+1} in
    reverse), `edge` (a (1, n) row: the neighbouring slab's, or h0) entering at the end."""
    tiles = len(h[0]) // 8  # 2 for a bf16 slab
    row = jax.lax.broadcasted_iota(jnp.int32, (8, h[0].shape[1]), 0)
    out = []
    for x, e in zip(h, edge):
        parts = []
        for j in range(tiles):
            # The row entering tile j: the edge, or the next tile's first row (in
            # reverse) / the previous tile's last row.
            entering = e
            if j != (tiles - 1 if reverse else 0):
                entering = x[8 * j + 8 : 8 * j + 9] if reverse else x[8 * j - 1 : 8 * j]
            shifted = roll(x[8 * j : 8 * j + 8], 7 if reverse else 1, 0)
            parts.append(jnp.where(row == (7 if reverse else 0), entering, shifted))
        out.append(parts[0] if tiles == 1 else jnp.concatenate(parts))
    return tuple(out)


def backward(a, dh, h, h0, keep, *, chunk, reverse, interpret):
    """The gradient of `forward` in one pass (the fused backward).

    Walks opposite to the forward, carrying g_t = conj(a_{t+1}) keep_{t+1} g_{t+1} + dh_t
    (the cotangent of b, written over dh) with the forward's tile scan, and in the same
    step forms da_t = keep_t g_t conj(h_{t-1}) from the h tile the forward wrote: the
    tile's rows moved one step by a sublane roll, the row entering it from the
    neighbouring tile's (h0 at the forward's first position). A time-invariant a sums
    da in an (8, channels) accumulator (registers within a grid step, VMEM between
    steps) and writes one row per sequence; a full a writes da per step. Bytes: read dh
    and h, write g (and read a, write da when a is full) against read dh, write g, then
    read g and h again for da when the backward is the forward kernel plus XLA.

    Returns:
      (g parts (rows, L, N), da parts: (rows, N) float32 partial sums, or (rows, L, N)
      in dh's dtype for a full a).
    """
    rows, length, n = dh[0].shape
    num_parts, full_a = len(dh), a[0].ndim == 3
    dtype = dh[0].dtype
    slab = _slab_rows(dtype)
    walk_reverse = not reverse  # the backward's own direction
    a_next = conj(a)
    if full_a:
        a_next = tuple(_shift_in(x, jnp.zeros_like(x[:, 0]), not reverse) for x in a_next)
    keep_next = tuple(_shift_in(k, jnp.zeros_like(k[:, 0]), not reverse) for k in keep)
    # dh, h, g (and a, da) per part; keep_next and keep
    bn, chunk, padded = _vmem_rows(
        chunk, length, n, dtype, (3 + 2 * full_a) * num_parts, 2 * len(keep)
    )
    if padded != length:
        # Extra rows where the walk starts: it carries zeros through them (dh is zero).
        pad = ((0, 0), (padded - length, 0) if reverse else (0, padded - length), (0, 0))
        dh, h = (tuple(jnp.pad(x, pad) for x in xs) for xs in (dh, h))
        a_next = tuple(jnp.pad(x, pad) for x in a_next) if full_a else a_next
        keep_next, keep = (tuple(jnp.pad(k, pad[:2]) for k in ks) for ks in (keep_next, keep))
    num_chunks, num_slabs = padded // chunk, chunk // slab
    # Grid step k walks chunk block_of(k) (in time); the forward's first chunk gets h0.
    block_of = (lambda k: num_chunks - 1 - k) if walk_reverse else (lambda k: k)
    first_chunk, first_slab = (num_chunks - 1, num_slabs - 1) if reverse else (0, 0)

    def edge_block(k):  # the slab just before the chunk, forward (after it, in reverse)
        if reverse:
            return jnp.minimum((block_of(k) + 1) * num_slabs, padded // slab - 1)
        return jnp.maximum(block_of(k) * num_slabs - 1, 0)

    roll = jnp.roll if interpret else pltpu.roll

    def kernel(*refs):
        sizes = [num_parts] * 5 + [len(keep)] * 2 + [num_parts] * 3
        *groups, acc_refs = group_refs(refs, sizes)
        a_refs, dh_refs, h_refs, edge_refs, h0_refs, keepn_refs, keep_refs = groups[:7]
        g_refs, da_refs, carry_refs = groups[7:]
        step = pl.program_id(2)

        @pl.when(step == 0)
        def _():
            for c in (*carry_refs, *acc_refs):
                c[...] = jnp.zeros_like(c)

        # The state entering the chunk's edge slab: from the neighbouring chunk, or h0.
        at_first_chunk = block_of(step) == first_chunk
        edge_row = slice(0, 1) if reverse else slice(slab - 1, slab)
        chunk_edge = tuple(
            jnp.where(at_first_chunk, x0[...], e[edge_row, :]).astype(jnp.float32)
            for x0, e in zip(h0_refs, edge_refs)
        )
        carry_in, powers = (None, None) if full_a else _power_rows(a_refs)

        def tile(i, state):
            carry, acc = state
            s = (num_slabs - 1 - i) if walk_reverse else i
            start = pl.multiple_of(s * slab, slab)
            load = lambda r, at=start: r[pl.ds(at, slab), :].astype(jnp.float32)
            k_next, decays = _slab_decays(a_refs, keepn_refs, load, start, slab, full_a)
            g, carry = _scan_slab(
                tuple(map(load, dh_refs)), k_next, decays, powers, carry_in, carry,
                walk_reverse, roll,
            )  # fmt: skip
            for ref, x in zip(g_refs, g):
                ref[pl.ds(start, slab), :] = x.astype(ref.dtype)
            # h_{t-1} for each row: the slab's own h moved one step, the row entering it
            # from the neighbouring slab of this chunk, or from the chunk's edge.
            near = jnp.clip(s + (1 if reverse else -1), 0, num_slabs - 1)
            near = pl.multiple_of(near * slab, slab)
            entering = tuple(
                jnp.where(s == first_slab, e, load(r, near)[edge_row])
                for r, e in zip(h_refs, chunk_edge)
            )
            before = _previous_states(tuple(map(load, h_refs)), entering, reverse, roll)
            da = mul_conj(g, before)
            if keep:
                k = keep_refs[0][pl.ds(start, slab), :].astype(jnp.float32)
                da = tuple(k * x for x in da)
            if full_a:
                for ref, x in zip(da_refs, da):
                    ref[pl.ds(start, slab), :] = x.astype(ref.dtype)
            else:  # fold the slab's rows onto the accumulator's 8
                acc = tuple(
                    v + sum(x[8 * j : 8 * j + 8] for j in range(slab // 8)) for v, x in zip(acc, da)
                )
            return carry, acc

        state = (tuple(c[...] for c in carry_refs), tuple(c[...] for c in acc_refs))
        carry, acc = jax.lax.fori_loop(0, num_slabs, tile, state)
        for c, x in zip((*carry_refs, *acc_refs), (*carry, *acc)):
            c[...] = x
        if not full_a:

            @pl.when(step == num_chunks - 1)
            def _():
                for ref, x in zip(da_refs, acc):
                    ref[...] = x.sum(0, keepdims=True)

    seq_spec = pl.BlockSpec((None, chunk, bn), lambda r, j, k: (r, block_of(k), j))
    state_spec = pl.BlockSpec((None, 1, bn), lambda r, j, k: (r, 0, j))
    edge_spec = pl.BlockSpec((None, slab, bn), lambda r, j, k: (r, edge_block(k), j))
    col_spec = pl.BlockSpec((None, chunk, 1), lambda r, j, k: (r, block_of(k), 0))
    a_spec = seq_spec if full_a else pl.BlockSpec((32, bn), lambda r, j, k: (0, j))
    in_specs = [a_spec] * num_parts + [seq_spec] * 2 * num_parts + [edge_spec] * num_parts
    in_specs += [state_spec] * num_parts + [col_spec] * 2 * len(keep)
    da_shape = (rows, padded, n) if full_a else (rows, 1, n)
    out = pl.pallas_call(
        kernel,
        out_shape=[out_struct((rows, padded, n), dtype, dh[0])] * num_parts
        + [out_struct(da_shape, dtype if full_a else jnp.float32, dh[0])] * num_parts,
        grid=(rows, n // bn, num_chunks),
        in_specs=in_specs,
        out_specs=[seq_spec] * num_parts + [seq_spec if full_a else state_spec] * num_parts,
        scratch_shapes=[pltpu.VMEM((1, bn), jnp.float32)] * num_parts
        + ([] if full_a else [pltpu.VMEM((8, bn), jnp.float32)] * num_parts),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        cost_estimate=pl.CostEstimate(
            flops=6 * num_parts**2 * rows * padded * n,
            transcendentals=0,
            bytes_accessed=(3 + 2 * full_a) * num_parts * rows * padded * n * dtype.itemsize,
        ),
        input_output_aliases=write_over_b(num_parts),
        interpret=interpret,
        name="linear_scan_tpu_backward",
    )(
        *(a_next if full_a else _power_table(a_next, walk_reverse)),
        *dh,
        *h,
        *h,
        *(x[:, None] for x in h0),
        *(k.astype(_KEEP_DTYPE)[..., None] for k in (*keep_next, *keep)),
    )
    g, da = tuple(out[:num_parts]), tuple(out[num_parts:])
    if padded != length:
        trim = (lambda x: x[:, padded - length :]) if reverse else (lambda x: x[:, :length])
        g = tuple(map(trim, g))
        da = tuple(map(trim, da)) if full_a else da
    if not full_a:
        da = tuple(x[:, 0] for x in da)
    return g, da
