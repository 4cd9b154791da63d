"""Sequence parallelism for the recurrence: the sequence split across devices.

With the sequence axis split S ways, device i holds positions [i*L/S, (i+1)*L/S). The
linear recurrence composes: a segment maps the state entering it to the state leaving
it by h_exit = E_i + T_i * h_entry, where E_i is the exit state from a zero entry and
T_i the segment's total decay. Only the (b, n) values E_i (and T_i when it varies)
cross devices: one all-gather per layer and direction, after which every device folds
them into the state entering its own segment.

Time-invariant a (shape (n,), the LRU's case, with optional document resets), on
(real, imag) parts: E_i is a weighted sum of the segment's inputs (one read of b), and
the local scan (any `linear_scan` method, the Pallas kernel included) then runs from
the state entering the segment, so h is written once and exact: no correction pass, no
(b, l, n) cumulative decays: a split layer's temporaries are those of an unsplit one
holding the same tokens. The backward is the same pattern mirrored: a weighted sum of
dh, an all-gather, the fold, and the backward kernel from the cotangent arriving at the
segment's exit.

Time-varying a (shape (..., l, n)): each device scans its segment from zero, forms the
cumulative decays P_t and corrects h_t += P_t * c_i; the backward is autodiff's
transpose (a reduce-scatter of the same size as the all-gather).

Per layer and step each device receives

    forward:  (S - 1) * b * n * 8 bytes   (complex64 states; x2 with time-varying a,
                                          + (S - 1) * b * 4 with resets)
    backward: the same again

with b the per-device batch. Everything else in a block is per position and works on
sequence-sharded activations as it is.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from lrulm import scan as scan_lib

AXIS = "sequence"


def sharded_linear_scan(a, b, *, h0, reverse, axis_name, local_scan):
    """The recurrence over a sequence split along `axis_name` (call inside shard_map).

    Args:
      a: (n,) or the local (..., l, n) decays.
      b: local (..., l, n) inputs of this device's segment.
      h0: optional (..., n) state entering the whole sequence (segment 0, or the last
        segment when reverse).
      reverse: scan from the end of the sequence.
      axis_name: the mesh axis the sequence is split over.
      local_scan: linear_scan with the method to use within a segment.

    Returns:
      h, the local (..., l, n) states of this segment.
    """
    num = jax.lax.axis_size(axis_name)
    index = jax.lax.axis_index(axis_name)
    h_local = local_scan(a, b, h0=None, reverse=reverse)
    length, n = b.shape[-2], b.shape[-1]
    if a.ndim == 1:
        decay = jax.lax.cumprod(jnp.broadcast_to(a, (length, n)), axis=0, reverse=reverse)
    else:
        decay = jax.lax.cumprod(a, axis=a.ndim - 2, reverse=reverse)
    exit_pos = 0 if reverse else -1  # where the state leaves this segment
    states = _all_gather(h_local[..., exit_pos, :], axis_name)  # (S, ..., n)
    if a.ndim == 1:  # time-invariant: every segment decays by the same a^l
        decays = [decay[exit_pos]] * num
    else:
        gathered = _all_gather(decay[..., exit_pos, :], axis_name)
        decays = [gathered[j] for j in range(num)]
    carry = jnp.zeros_like(states[0]) if h0 is None else h0.astype(states.dtype)
    carries = [None] * num
    order = range(num - 1, -1, -1) if reverse else range(num)
    for j in order:  # S is small (the mesh axis): a static fold
        carries[j] = carry
        carry = decays[j] * carry + states[j]
    carry_in = jnp.stack(carries)[index]
    return h_local + decay * carry_in[..., None, :]


# ----------------------------------------------------------------------------------
# Time-invariant a on parts (the LRU's case): two passes over each segment, one buffer.
# ----------------------------------------------------------------------------------
#
# With a of shape (n,), a segment's transfer needs no scan: the state it passes on from
# a zero entry is a weighted sum of its inputs, E = sum_t a^(l-1-s_t) R_t b_t (s_t = steps
# from the segment's entry, R_t = 1 unless a reset comes later in the segment), and the
# entering state decays by T = a^l (times 0 if the segment holds a reset). So each device
# first reads its b once for E, the (b, n) E's are all-gathered and folded into the state
# h_in entering every segment, and then the kernel scans the segment from h_in: h exact,
# written once, no correction pass and no cumulative-decay array. The backward is the
# same pattern run the other way: F = sum_t conj(P_t) dh_t (P_t = the decay from the
# entry through t) gives each segment's state cotangent, the fold across devices gives
# the cotangent m arriving at the segment's exit, and the backward kernel (g and da in
# one pass) runs on dh with m added at the exit and h_in as the state before the entry.
# Residuals: h (which the LRU readout shares), h_in, the (..., l) keep and a.


def sharded_scan_parts(
    a, b, *, h0, keep, reverse, axis_name, method, chunk_size, overwrite_b=False
):
    """The planar recurrence (lrulm.scan.linear_scan_planar) over a sequence split along
    `axis_name`, inside shard_map, for a time-invariant a: parts of shape (n,).

    Args:
      a: (n,) parts; b: local (..., l, n) parts of this device's segment.
      h0: optional (..., n) parts, the state entering the whole sequence.
      keep: optional (..., l) 0/1, zero where a document starts (the state carried in
        is dropped there).
      reverse, method, chunk_size, overwrite_b: as for linear_scan_planar.
    """
    segments = _Segments(axis_name=axis_name)
    return _sharded_parts(a, b, h0, keep, segments, method, chunk_size, reverse, overwrite_b)


def split_scan_parts(a, b, *, h0, keep, reverse, segments, method, chunk_size, overwrite_b=False):
    """The same two-pass scan within one device: the (..., L, n) parts are viewed as
    `segments` consecutive (..., L / segments, n) segments, one more leading (row) axis
    for the local scan. For a scan kernel that parallelises over rows and channels only
    (the GPU kernel walks time within a program), this multiplies its parallelism by
    `segments` for one more read of b (the exit sums) and, in the backward, of dh.

    Args as for `sharded_scan_parts`, with the whole sequence local; L must be a multiple
    of `segments`.
    """
    shape = b[0].shape
    if shape[-2] % segments:
        raise ValueError(f"length {shape[-2]} is not a multiple of {segments} segments")
    b = tuple(_as_segments(x, -2, segments) for x in b)
    keep = None if keep is None else _as_segments(keep, -1, segments)
    run = _Segments(count=segments)
    h = _sharded_parts(a, b, h0, keep, run, method, chunk_size, reverse, overwrite_b)
    return tuple(x.reshape(shape) for x in h)


def _as_segments(x, axis, count):
    """x with its (negative) axis split into (count, length / count): free, a view."""
    axis += x.ndim
    return x.reshape(x.shape[:axis] + (count, x.shape[axis] // count) + x.shape[axis + 1 :])


@dataclasses.dataclass(frozen=True)
class _Segments:
    """Where a scan's segments live: one per device along the mesh axis `axis_name`
    (inside shard_map), or `count` of them along axis -3 of b on this device."""

    axis_name: str | None = None
    count: int = 0

    def size(self):
        return jax.lax.axis_size(self.axis_name) if self.axis_name else self.count

    def gather(self, parts, axis):
        """Every segment's values of per-segment parts, segments first. In-device, the
        segment axis of the parts is `axis`; across devices each holds its own."""
        if self.axis_name:
            return _gather(parts, self.axis_name)
        return tuple(jnp.moveaxis(x, axis, 0) for x in parts)

    def mine(self, states, num_parts):
        """The parts of {segment: parts} that this device's segment(s) take."""
        if self.axis_name:
            index = jax.lax.axis_index(self.axis_name)
            return tuple(_pick(states, i, self.size(), index) for i in range(num_parts))
        return tuple(
            jnp.stack([states[j][i] for j in range(self.count)], axis=-2) for i in range(num_parts)
        )

    def only_segment(self, x, j):
        """x on the device holding segment j, zero on the others (in-device: x)."""
        if self.axis_name:
            return jnp.where(jax.lax.axis_index(self.axis_name) == j, x, 0)
        return x


def _walk(x, reverse):
    """x in the order the scan visits its positions (axis -1)."""
    return jnp.flip(x, -1) if reverse else x


def _keep_products(keep, reverse):
    """(through, after, whole): the product of keep along the walk up to and including
    each position, over the positions after it, and over the whole segment."""
    k = _walk(keep, reverse)
    through = jnp.cumprod(k, axis=-1)
    after = jnp.flip(jnp.cumprod(jnp.flip(k, -1), axis=-1), -1)
    after = jnp.concatenate([after[..., 1:], jnp.ones_like(after[..., :1])], axis=-1)
    return _walk(through, reverse), _walk(after, reverse), through[..., -1]


# The weights a^e_t of the sums over a segment are products of two small tables,
# a^e_t = low[t % d] * high[t // d] (d = 128 when it divides l): an (l, n) table per
# part (as big as the activations themselves at one sequence per device) never exists,
# and XLA forms the weights inside the reduction.
_BLOCK = 128


def _cumulative_powers(a, count):
    """x^0 ... x^(count - 1) of the parts x, (count, n) float32 parts."""
    x = scan_lib._merge(a)
    steps = jax.lax.cumprod(jnp.broadcast_to(x, (count - 1, x.shape[-1])), axis=0)
    return scan_lib._split(jnp.concatenate([jnp.ones_like(x)[None], steps]))


def _power_tables(a, length):
    """(low, high, a^l): a^0..a^(d-1) and (a^d)^0..(a^d)^(l/d - 1), float32 parts."""
    a = tuple(x.astype(jnp.float32) for x in a)
    d = _BLOCK if length % _BLOCK == 0 else 1
    low = _cumulative_powers(a, d + 1)
    a_d = tuple(x[d] for x in low)
    high = _cumulative_powers(a_d, length // d)
    total = scan_lib._cmul(tuple(x[-1] for x in high), a_d)
    return tuple(x[:d] for x in low), high, total


def _weights(tables, a, rising, shift):
    """(low, high) for the exponents e_t = t + shift (rising) or l - 1 + shift - t."""
    low, high, _ = tables
    if not rising:  # l-1-t = d (l/d - 1 - t//d) + (d - 1 - t%d)
        low, high = (tuple(jnp.flip(x, 0) for x in y) for y in (low, high))
    if shift:
        high = scan_lib._cmul(high, tuple(x.astype(jnp.float32) for x in a))
    return low, high


def _weighted_sum(x, weights, mask, conj):
    """sum over positions of x_t * w_t (conj(w_t) if conj), w_t = low[t % d] *
    high[t // d] * mask_t: one read of the (..., l, n) parts x, in float32. Summed in two
    stages, within blocks of d by `low`, then over blocks by `high`, so no (l, n) weight
    is formed (XLA would keep one when the batch is a single sequence)."""
    low, high = weights
    d = low[0].shape[0]
    blocks = lambda v: v.reshape(v.shape[:-2] + (v.shape[-2] // d, d) + v.shape[-1:])
    x = tuple(blocks(p.astype(jnp.float32)) for p in x)
    if mask is not None:
        x = tuple(p * blocks(mask[..., None]) for p in x)
    partial = tuple(p.sum(axis=-2) for p in scan_lib._cmul(x, low, conj_y=conj))
    return tuple(p.sum(axis=-2) for p in scan_lib._cmul(partial, high, conj_y=conj))


def _gather(parts, axis_name):
    """all_gather of a tuple of same-shaped float arrays, in one collective."""
    return tuple(jnp.moveaxis(jax.lax.all_gather(jnp.stack(parts), axis_name), 1, 0))


def _pick(states, part, num, index):
    """Part `part` of this device's entry in {segment: parts}."""
    return jnp.stack([states[j][part] for j in range(num)])[index]


def _add_row(x, row, pos):
    """x with `row` added at position `pos` of axis -2, in place when x is dead."""
    row = jax.lax.dynamic_index_in_dim(x, pos, axis=x.ndim - 2) + row[..., None, :].astype(x.dtype)
    return jax.lax.dynamic_update_index_in_dim(x, row, pos, axis=x.ndim - 2)


def _fold(ends, decay, start, order):
    """The states entering each segment: s_j = start for the first in `order`, then
    s_next = decay_j * s_j + ends_j (parts; ends and decay indexed by segment)."""
    state, entering = start, {}
    for j in order:
        entering[j] = state
        carried = scan_lib._cmul(decay(j), state)
        state = tuple(c + e[j] for c, e in zip(carried, ends))
    return entering, state


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _sharded_parts(a, b, h0, keep, segments, method, chunk_size, reverse, overwrite_b):
    args = (segments, method, chunk_size, reverse, overwrite_b)
    return _sharded_parts_fwd(a, b, h0, keep, *args)[0]


def _decays(tables, wholes):
    """j -> segment j's decay T_j = a^l, times 0 if segment j holds a reset."""
    total = tables[2]
    if wholes is None:
        return lambda j: total
    return lambda j: tuple(p * wholes[j][..., None] for p in total)


def _sharded_parts_fwd(a, b, h0, keep, segments, method, chunk_size, reverse, overwrite_b):
    num = segments.size()
    length, dtype = b[0].shape[-2], b[0].dtype
    tables, after, wholes = _power_tables(a, length), None, None
    if keep is not None:
        _, after, whole = _keep_products(keep.astype(jnp.float32), reverse)
        (wholes,) = segments.gather((whole,), axis=-1)
    # E = sum_t a^(l-1-s_t) after_t b_t: a^(l-1) at the entry down to a^0 at the exit
    weights = _weights(tables, a, rising=reverse, shift=0)
    ends = segments.gather(_weighted_sum(b, weights, after, conj=False), axis=-2)
    zero = tuple(jnp.zeros(ends[0].shape[1:], jnp.float32) for _ in b)
    start = zero if h0 is None else tuple(x.astype(jnp.float32) for x in h0)
    order = range(num - 1, -1, -1) if reverse else range(num)
    entering, _ = _fold(ends, _decays(tables, wholes), start, order)
    h_in = tuple(x.astype(dtype) for x in segments.mine(entering, len(b)))
    h = scan_lib._forward_parts(a, b, h_in, keep, method, chunk_size, reverse, overwrite_b)
    return h, (a, h, h_in, h0, keep, wholes)


def _sharded_parts_bwd(segments, method, chunk_size, reverse, overwrite_b, residuals, dh):
    del overwrite_b
    a, h, h_in, h0, keep, wholes = residuals
    num = segments.size()
    length, dtype = h[0].shape[-2], h[0].dtype
    dh = tuple(d.astype(dtype) for d in dh)
    tables = _power_tables(a, length)
    through = None if keep is None else _keep_products(keep.astype(jnp.float32), reverse)[0]
    # F = sum_t conj(P_t) dh_t, P_t = a^(s_t + 1) through_t: the decay from the entry to t
    weights = _weights(tables, a, rising=not reverse, shift=1)
    starts = segments.gather(_weighted_sum(dh, weights, through, conj=True), axis=-2)
    decay = _decays(tables, wholes)
    zero = tuple(jnp.zeros_like(x[0]) for x in starts)
    order = range(num) if reverse else range(num - 1, -1, -1)  # the backward walk
    # m_j, the cotangent arriving at segment j's exit, and the one leaving the first
    arriving, entry_cotangent = _fold(starts, lambda j: scan_lib._conj(decay(j)), zero, order)
    exit_pos = 0 if reverse else length - 1
    arriving = segments.mine(arriving, len(dh))
    dh = tuple(_add_row(d, m, exit_pos) for d, m in zip(dh, arriving))
    g, da = scan_lib._backward_parts(a, dh, h, h_in, keep, method, chunk_size, reverse)
    dh0 = None
    if h0 is not None:  # the whole sequence's entry lies in the walk's first segment
        first = num - 1 if reverse else 0
        dh0 = tuple(
            segments.only_segment(x, first).astype(y.dtype) for x, y in zip(entry_cotangent, h0)
        )
    return tuple(d.astype(x.dtype) for d, x in zip(da, a)), g, dh0, None


_sharded_parts.defvjp(_sharded_parts_fwd, _sharded_parts_bwd)


def _all_gather(x, axis_name):
    """all_gather along a new leading axis; complex values travel as (re, im) float
    pairs, since the gradient's transpose of a complex all-gather is a complex
    reduce-scatter, which XLA's TPU compiler cannot lower ("Supported lowering only of
    Sum reduce-scatter")."""
    if not jnp.iscomplexobj(x):
        return jax.lax.all_gather(x, axis_name)
    pairs = jax.lax.all_gather(jnp.stack([x.real, x.imag], axis=-1), axis_name)
    return jax.lax.complex(pairs[..., 0], pairs[..., 1])


def _spec(mesh, shape, names):
    from lrulm import sharding

    return sharding.spec_for(names, mesh, shape)


def _check_divisible(length, mesh):
    if length % mesh.shape[AXIS]:
        raise ValueError(
            f"sequence length {length} is not divisible by mesh.sequence="
            f"{mesh.shape[AXIS]}; use a multiple of it"
        )


def scan_over_mesh(a, b, *, h0=None, reverse=False, mesh, method, chunk_size):
    """linear_scan of (b, l, n) arrays whose length axis is sharded over mesh's
    "sequence" axis, from outside shard_map (e.g. inside a jitted model)."""
    _check_divisible(b.shape[-2], mesh)
    b_spec = _spec(mesh, b.shape, ("batch", "length", "act_state"))
    a_spec = _spec(mesh, a.shape, ("act_state",)) if a.ndim == 1 else b_spec
    args, specs = [a, b], [a_spec, b_spec]
    if h0 is not None:
        args.append(h0)
        specs.append(_spec(mesh, h0.shape, ("batch", "act_state")))

    def body(a, b, h0=None):
        return scan_lib.linear_scan(
            a, b, h0=h0, reverse=reverse, method=method, chunk_size=chunk_size, axis_name=AXIS
        )

    fn = jax.shard_map(body, mesh=mesh, in_specs=tuple(specs), out_specs=b_spec, check_vma=False)
    return fn(*args)


def scan_over_mesh_parts(
    a, b, *, h0=None, resets=None, reverse=False, mesh, method, chunk_size, overwrite_b=False
):
    """linear_scan_planar (parts, optional (b, l) resets) of arrays whose length axis is
    sharded over mesh's "sequence" axis, from outside shard_map: the LRU's path."""
    shape = b[0].shape
    _check_divisible(shape[-2], mesh)
    b_spec = _spec(mesh, shape, ("batch", "length", "act_state"))
    a_spec = _spec(mesh, a[0].shape, ("act_state",)) if a[0].ndim == 1 else b_spec
    args = {"a": a, "b": b}
    specs = {"a": (a_spec,) * len(a), "b": (b_spec,) * len(b)}
    if h0 is not None:
        args["h0"] = h0
        specs["h0"] = (_spec(mesh, h0[0].shape, ("batch", "act_state")),) * len(h0)
    if resets is not None:
        args["resets"] = resets
        specs["resets"] = _spec(mesh, resets.shape, ("batch", "length"))

    def body(args):
        return scan_lib.linear_scan_planar(
            **args, reverse=reverse, method=method, chunk_size=chunk_size, axis_name=AXIS,
            overwrite_b=overwrite_b,
        )  # fmt: skip

    out_specs = (b_spec,) * len(b)
    fn = jax.shard_map(body, mesh=mesh, in_specs=(specs,), out_specs=out_specs, check_vma=False)
    return fn(args)


def comm_bytes_per_layer(
    batch: int,
    d_state: int,
    shards: int,
    *,
    time_varying_a=False,
    resets=False,
    directions: int = 1,
) -> dict:
    """Bytes each device receives per layer and step (forward, backward), complex64."""
    per = (shards - 1) * batch * d_state * 8 * (2 if time_varying_a else 1)
    if resets and not time_varying_a:  # each segment's "holds a reset" flags, float32
        per += (shards - 1) * batch * 4
    return {"forward": per * directions, "backward": per * directions}
