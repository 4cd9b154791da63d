"""The TPU (Mosaic) kernels of the linear recurrence: grid over (row, channel block,
chunk), the state carried in VMEM (design: lrulm.scan_pallas)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from lrulm.kernels.common import Parts, conj, cost, mul, mul_conj, split_refs, write_over_b

# TPU: lanes per vreg, and the VMEM the double-buffered blocks of one grid step may use
# (the default scoped VMEM limit is 16 MiB on v5e, 32 MiB on v4/v5p/v6e).
_TPU_LANES = 128
_TPU_VMEM_BUDGET = 8 * 2**20
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
    """(rows per grid step, padded length): a multiple of `slab` that divides the padded
    length, near min(chunk, budget, length); the length is padded only when no divisor
    of it is at least half that size."""
    target = max(slab, min(chunk, budget_rows, length) // slab * slab)
    padded = -(-length // slab) * slab
    best = max(c for c in range(slab, target + 1, slab) if padded % c == 0)
    if 2 * best >= target:
        return best, padded
    return target, -(-length // target) * target


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
    round: fewer vector operations and half the rolls of the general form.

    Returns (the keep product from the tile's first row to each row, or None; x).
    """
    row = jax.lax.broadcasted_iota(jnp.int32, (8, 1), 0)
    for aw, w in zip(powers, (1, 2, 4)):
        shift, valid = (8 - w, row < 8 - w) if reverse else (w, row >= w)
        y = mul(aw, tuple(roll(v, shift, 0) for v in x))
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
        powers.append(mul(powers[-1], a))
    carry_in = powers[::-1] if reverse else powers
    rows = carry_in + [powers[0]] * 8 + [powers[1]] * 8 + [powers[3]] * 8
    return tuple(jnp.stack([r[p] for r in rows]) for p in range(len(a)))


def forward(
    a: Parts, b: Parts, h0: Parts, keep: Parts, *, chunk, reverse, interpret, over_b=False
) -> Parts:
    rows, length, n = b[0].shape
    num_parts, full_a = len(b), a[0].ndim == 3
    dtype = b[0].dtype
    bn = _block_channels(n)
    # A tile's rows: 8 for 32-bit values, 16 for bf16 (loaded whole, scanned as 2 x 8).
    slab = 8 * max(1, 4 // jnp.dtype(dtype).itemsize)
    # VMEM per row of a grid step, double-buffered: b and h (and a full a), and keep as
    # a (chunk, 1) block that takes (chunk, 128) words.
    padded_bn = -(-bn // _TPU_LANES) * _TPU_LANES
    per_row = 2 * ((2 + full_a) * num_parts * padded_bn * jnp.dtype(dtype).itemsize)
    per_row += 2 * _TPU_LANES * 4 * len(keep)
    chunk, padded = chunking(length, chunk, slab, _TPU_VMEM_BUDGET // per_row)
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
        cost_estimate=cost(num_parts, full_a, rows, padded, n, dtype.itemsize),
        input_output_aliases=write_over_b(num_parts) if over_b else {},
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


def backward(a, dh, h, h0, keep, *, chunk, reverse, interpret):
    """The gradient on TPU: the forward kernel run backwards over conj(a) shifted one step
    (and keep shifted), then da from g and h in XLA. Same results as `backward`."""
    full_a = a[0].ndim == 3
    a_next = conj(a)
    if full_a:
        a_next = tuple(_shift_in(x, jnp.zeros_like(x[:, 0]), not reverse) for x in a_next)
    keep_next = tuple(_shift_in(k, jnp.zeros_like(k[:, 0]), not reverse) for k in keep)
    zeros = tuple(jnp.zeros_like(x) for x in h0)
    g = forward(
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
    da = mul_conj(tuple(x.astype(jnp.float32) for x in g), h_before)
    if keep:
        da = tuple(x * keep[0][..., None] for x in da)
    if not full_a:
        da = tuple(x.sum(1) for x in da)
    return g, da
