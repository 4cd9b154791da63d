"""Two thread groups per program for the Mosaic GPU kernels (lrulm.kernels.mosaic_gpu,
halves=2): a program owns 64 channels, and its warpgroup scans the two halves of every
chunk at once, as (2, 64) arrays. The walk's first half starts from the state entering
the chunk; the second starts from zero and also carries P, the product of its steps'
decays, so that once the first half's end state E is known (one exchange through SMEM),
its rows are stored fixed up, as h + P E. Twice the programs of halves=1 for the same
bytes.

The scans here are `_stream` scans (lrulm.kernels.mosaic_gpu): scan(carry, slot, parts)
for one chunk in SMEM, its halves laid out by `mosaic_gpu._parts`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

try:  # a jaxlib built without Mosaic GPU's bindings still runs everything else
    from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:
    plgpu = None

from lrulm.kernels.common import Parts, conj, mul, mul_conj
from lrulm.kernels.common import step as recurrence_step


def selector(width: int) -> jax.Array:
    """(2, width) float32: 0 in the first half's row, 1 in the second's (loaded like a
    vector, it tells each thread group which half it scans)."""
    return jnp.repeat(jnp.arange(2, dtype=jnp.float32)[:, None], width, axis=1)


def pick(mask, x: Parts, y: Parts) -> Parts:
    return tuple(jnp.where(mask, p, q) for p, q in zip(x, y))


def add(x: Parts, y: Parts) -> Parts:
    return tuple(p + q for p, q in zip(x, y))


def swap(values: Parts, buffers) -> Parts:
    """Each (2, width) value with its halves exchanged: stored twice into a (4, width)
    SMEM buffer and read back one row down, with a warpgroup barrier between. (The next
    exchange is after the chunk's commit_smem, a warpgroup barrier too.)"""
    for buf, v in zip(buffers, values):
        buf[pl.ds(0, 2)] = v
        buf[pl.ds(2, 2)] = v
    plgpu.commit_smem()
    return tuple(buf[pl.ds(1, 2)] for buf in buffers)


def swap_buffers(count: int, width: int):
    return [plgpu.SMEM((4, width), jnp.float32) for _ in range(count)]


class _Chunk:
    """What the split scans share for one chunk: the walk's row per step (the same in
    both halves), each half's keep position, and the masks of the walk's second half."""

    def __init__(self, sel, parts, reverse):
        (n0, _), (n1, _) = parts
        self.m = max(n0, n1)  # the first half's rows
        self.reverse = reverse
        self.n_second = n0 if reverse else n1
        self.second = (sel < 0.5) if reverse else (sel > 0.5)  # the walk's second half
        self.sel, self.parts = sel, parts

    def row(self, s):
        return self.m - 1 - s if self.reverse else s

    def keep(self, keep_slot, s):
        """keep at walk step s, per half (a blend of two scalars: no per-channel loads)."""
        last = keep_slot.shape[0] - 1
        base = (0, self.parts[0][0])
        q = [min(max(base[j] + self.row(s) - self.parts[j][1], 0), last) for j in (0, 1)]
        k0, k1 = (keep_slot[i].astype(jnp.float32) for i in q)
        return k0 + self.sel * (k1 - k0)

    def dummy(self, s):
        """Whether walk step s is past the second half's rows (an odd tail's last step)."""
        return s >= self.n_second

    def last(self, values, empty):
        """Each half's value after its last row (`empty` for a second half of no rows)."""
        first = values[self.m - 1]
        if self.n_second == self.m:
            return first
        second = values[self.n_second - 1] if self.n_second else empty
        return pick(self.second, second, first)


def forward_scan(*, num_parts, num_keep, full_a, a_vec, sel, reverse, buffers):
    """The forward's `_stream` scan for halves=2: b (and a) slots (2, chunk / 2, 64)."""
    streams = num_parts * (1 + full_a)
    zeros = (0.0 * sel,) * num_parts
    ones = (0.0 * sel + 1.0,) + zeros[1:]

    def scan(carry, slot, parts):
        c = _Chunk(sel, parts, reverse)
        x, p = pick(c.second, zeros, carry), ones  # the second half starts from zero
        xs, ps = [], []
        for s in range(c.m):
            r = c.row(s)
            bt = tuple(ref[:, r, :].astype(jnp.float32) for ref in slot[:num_parts])
            at = tuple(ref[:, r, :].astype(jnp.float32) for ref in slot[num_parts:streams])
            at = at or a_vec
            if num_keep:
                k = c.keep(slot[streams], s)
                x, p = tuple(k * v for v in x), tuple(k * v for v in p)
            x, p = recurrence_step(x, at, bt), mul(at, p)
            xs.append(x)
            ps.append(p)
        own_e, own_p = c.last(xs, zeros), c.last(ps, ones)
        other = swap(own_e + own_p, buffers)
        other_e, other_p = other[:num_parts], other[num_parts:]
        e_first = pick(c.second, other_e, own_e)  # the true state after the first half
        if c.n_second:
            e_second = pick(c.second, own_e, other_e)
            p_second = pick(c.second, own_p, other_p)
            carry = add(e_second, mul(p_second, e_first))
        else:
            carry = e_first
        fix = pick(c.second, e_first, zeros)
        for s in range(c.m):
            h = add(xs[s], mul(ps[s], fix))
            for ref, v in zip(slot, h):  # written over b
                ref[:, c.row(s), :] = v.astype(ref.dtype)
        return carry

    return scan


def backward_scan(*, num_parts, num_keep, full_a, a_vec, sel, reverse, buffers):
    """The backward's `_stream` scan for halves=2 (`reverse`: the walk's direction): dh
    and h (or a, for a full a) slots. The walk computes g_t = conj(a_{t+1}) keep_{t+1}
    g_{t+1} + dh_t, the decay of a step being that of the row before it in the walk (the
    other half's last, or the chunk before's, for a half's first row: carried, or
    exchanged). For an (N,) a the fix-up pass also sums da = keep_{t+1} g_{t+1}
    conj(h_t) over its rows. Carry: (g, a and keep of the last row walked, da)."""
    zeros = (0.0 * sel,) * num_parts
    ones = (0.0 * sel + 1.0,) + zeros[1:]
    decay = lambda at, k: tuple(k * v for v in conj(at))

    def scan(carry, slot, parts):
        g_in, a_in, k_in, da = carry
        c = _Chunk(sel, parts, reverse)
        dh_slot, x_slot = slot[:num_parts], slot[num_parts : 2 * num_parts]
        x, p = pick(c.second, zeros, g_in), ones
        a_prev, k_prev = a_in, k_in
        xs, ps, ks, a_rows = [], [], [], []
        for s in range(c.m):
            r = c.row(s)
            dht = tuple(ref[:, r, :].astype(jnp.float32) for ref in dh_slot)
            alpha = decay(a_prev if full_a else a_vec, k_prev)
            if s == 0:  # the second half's first decay comes after the exchange
                alpha = pick(c.second, ones, alpha)
            x, p = add(mul(alpha, x), dht), mul(alpha, p)
            k_prev = c.keep(slot[-1], s) if num_keep else k_prev
            if full_a:
                a_prev = tuple(ref[:, r, :].astype(jnp.float32) for ref in x_slot)
            xs.append(x)
            ps.append(p)
            ks.append(k_prev)
            a_rows.append(a_prev)
        own = c.last(xs, zeros) + c.last(ps, ones) + (c.last([(k,) for k in ks], (ones[0],)))
        if full_a:
            own += c.last(a_rows, ones)
        other = swap(own, buffers)
        mine = lambda i, n=num_parts: own[i : i + n]
        theirs = lambda i, n=num_parts: other[i : i + n]
        first = lambda i, n=num_parts: pick(c.second, theirs(i, n), mine(i, n))
        second = lambda i, n=num_parts: pick(c.second, mine(i, n), theirs(i, n))
        e_first, (k_b,) = first(0), first(2 * num_parts, 1)
        a_b = first(2 * num_parts + 1) if full_a else a_vec
        fix = mul(decay(a_b, k_b), e_first)  # into the second half's first row
        if c.n_second:
            carry_out = add(second(0), mul(second(num_parts), fix))
            (k_out,) = second(2 * num_parts, 1)
            a_out = second(2 * num_parts + 1) if full_a else a_in
        else:
            carry_out, k_out, a_out = e_first, k_b, (a_b if full_a else a_in)
        fix = pick(c.second, fix, zeros)
        g_prev = pick(c.second, e_first, g_in)  # true g of the row walked before
        k_before = jnp.where(c.second, k_b, k_in)
        for s in range(c.m):
            r = c.row(s)
            g = add(xs[s], mul(ps[s], fix))
            if not full_a:
                ht = tuple(ref[:, r, :].astype(jnp.float32) for ref in x_slot)
                term = mul_conj(tuple(k_before * v for v in g_prev), ht)
                if c.dummy(s):
                    term = pick(c.second, zeros, term)
                da = add(da, term)
            for ref, v in zip(dh_slot, g):  # written over dh
                ref[:, r, :] = v.astype(ref.dtype)
            g_prev, k_before = g, ks[s]
        return carry_out, a_out, k_out, da

    return scan
