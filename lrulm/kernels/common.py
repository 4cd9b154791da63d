"""What the Pallas recurrence kernels share: values as parts, the output-over-input
aliases, the cost estimate, complex arithmetic on (real, imag) pairs, and a full a's
cotangent from a kernel's g."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

Parts = tuple[jax.Array, ...]  # (x,) for real values, (real, imag) for complex ones

_TYPE_FIELDS = inspect.signature(jax.ShapeDtypeStruct).parameters


def out_struct(shape, dtype, like: jax.Array) -> jax.ShapeDtypeStruct:
    """A kernel result's type: `shape` and `dtype`, varying over the manual mesh axes
    `like` varies over (jax.shard_map's type checks, `check_vma`, ask every pallas_call
    result to say so; lrulm.scan makes a scan's operands vary alike first). The field is
    `manual_axis_type` in jax 0.10-0.11 and was `vma` before."""
    like_type = jax.typeof(like)
    if "manual_axis_type" in _TYPE_FIELDS:
        return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=like_type.manual_axis_type)
    if "vma" in _TYPE_FIELDS:
        return jax.ShapeDtypeStruct(shape, dtype, vma=like_type.vma)
    return jax.ShapeDtypeStruct(shape, dtype)


def write_over_b(num_parts: int) -> dict[int, int]:
    """Aliases for writing each row of h over the row of b it was made from (operands
    num_parts.. are b's parts, results 0.. are h's): a step reads b_t before it stores
    h_t, and no program reads a row another one writes, so the recurrence needs one
    (B, L, N) buffer, not two. XLA copies b first if it is still needed afterwards (saved
    by a remat policy, say) or is a non-donated argument, so the forward aliases only on
    request (`overwrite_b`: the LRU's B u is dead once the scan has read it); the
    backward always writes g over dh, a cotangent made for it."""
    return {num_parts + i: i for i in range(num_parts)}


def group_refs(refs, sizes):
    """refs cut into consecutive groups of the given sizes, then the rest."""
    out, start = [], 0
    for size in sizes:
        out.append(refs[start : start + size])
        start += size
    return (*out, refs[start:])


def split_refs(refs, num_parts, num_keep):
    """(a, b, h0, keep, h, scratch) refs: parts, parts, parts, 0 or 1, parts, the rest."""
    return group_refs(refs, (num_parts,) * 3 + (num_keep, num_parts))


def cost(num_parts, full_a, rows, length, n, itemsize):
    arrays = 2 + full_a  # read b (and a), write h
    return pl.CostEstimate(
        flops=2 * num_parts**2 * rows * length * n,
        transcendentals=0,
        bytes_accessed=arrays * num_parts * rows * length * n * itemsize,
    )


def conj(x: Parts) -> Parts:
    return x if len(x) == 1 else (x[0], -x[1])


def mul_conj(x: Parts, y: Parts) -> Parts:
    """x * conj(y) on parts."""
    if len(x) == 1:
        return (x[0] * y[0],)
    (xr, xi), (yr, yi) = x, y
    return xr * yr + xi * yi, xi * yr - xr * yi


def mul(x: Parts, y: Parts) -> Parts:
    """x * y on parts."""
    if len(x) == 1:
        return (x[0] * y[0],)
    (xr, xi), (yr, yi) = x, y
    return xr * yr - xi * yi, xr * yi + xi * yr


def step(h: Parts, a: Parts, b: Parts) -> Parts:
    """h <- a * h + b on real parts, or on (real, imag) pairs for complex numbers."""
    if len(h) == 1:
        return (a[0] * h[0] + b[0],)
    (hr, hi), (ar, ai), (br, bi) = h, a, b
    # Grouped so that each new part is two dependent fused multiply-adds away from the
    # previous state (the recurrence's critical path), not three operations.
    return (ar * hr + (br - ai * hi), ar * hi + (bi + ai * hr))


def full_da(g: Parts, h: Parts, h0: Parts, keep: Parts, reverse: bool) -> Parts:
    """da_t = keep_t g_t conj(h_{t-1}) for a full a, h_{t-1} being h0 at the forward's
    first position (the last for `reverse`), computed in float32 and returned in g's
    dtype (as every kernel writes a full a's da): one elementwise XLA pass over a
    kernel's g (lrulm.kernels.mosaic_gpu.backward)."""
    f32 = lambda x: x.astype(jnp.float32)
    shift = lambda x, x0: jnp.concatenate(
        [x[:, 1:], x0[:, None]] if reverse else [x0[:, None], x[:, :-1]], axis=1
    )
    da = mul_conj(tuple(map(f32, g)), tuple(shift(f32(x), f32(x0)) for x, x0 in zip(h, h0)))
    da = tuple(f32(keep[0])[..., None] * x for x in da) if keep else da
    return tuple(x.astype(g[0].dtype) for x in da)
