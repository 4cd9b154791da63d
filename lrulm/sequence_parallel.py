"""Sequence parallelism for the recurrence: the sequence split across devices.

With the sequence axis split S ways, device i holds positions [i*L/S, (i+1)*L/S). It
scans its segment from a zero state (any `linear_scan` method) and also forms the
segment's cumulative decay P_t = a_{start} ... a_t. The linear recurrence composes, so

    h_t = h_t^local + P_t * c_i,      c_i = the state entering segment i,

and c_i is a fold of the other segments' end states: c_{i+1} = P_end(i) c_i + h_end(i).
Only the (b, n) segment-end states cross devices: one all-gather per layer and
direction (plus the end decays when `a` varies with time, e.g. document resets). The
backward pass is its transpose (a reduce-scatter of the same size), so per layer and
step each device exchanges

    forward:  (S - 1) * b * n * 8 bytes   (complex64 states; x2 with time-varying a)
    backward: the same again

with b the per-device batch. Everything else in a block is per position and works on
sequence-sharded activations as it is.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

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


def scan_over_mesh(a, b, *, h0=None, reverse=False, mesh, method, chunk_size):
    """linear_scan of (b, l, n) arrays whose length axis is sharded over mesh's
    "sequence" axis, from outside shard_map (e.g. inside a jitted model)."""
    from lrulm import scan as scan_lib

    if b.shape[-2] % mesh.shape[AXIS]:
        raise ValueError(
            f"sequence length {b.shape[-2]} is not divisible by mesh.sequence="
            f"{mesh.shape[AXIS]}; use a multiple of it"
        )
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


def comm_bytes_per_layer(
    batch: int, d_state: int, shards: int, *, time_varying_a=False, directions: int = 1
) -> dict:
    """Bytes each device receives per layer and step (forward, backward), complex64."""
    per = (shards - 1) * batch * d_state * 8 * (2 if time_varying_a else 1) * directions
    return {"forward": per, "backward": per}
