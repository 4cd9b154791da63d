"""The linear recurrence h_t = a_t * h_{t-1} + b_t, computed every way lrulm knows.

Shapes: b is (..., L, N): any leading batch axes, the sequence axis L and the channel
axis N. a is either the same shape as b or (N,) (a time-invariant diagonal, as in the
LRU). Real or complex. Every method returns the same values and gradients as
`ScanMethod.SEQUENTIAL`; they differ in speed and memory only.

Gradients: by default (`grad="recurrence"`) the backward pass is itself a linear
recurrence run in the opposite direction, under `jax.custom_vjp`:

    g_t = a_{t+1} * g_{t+1} + dh_t,   db_t = g_t,   da_t = g_t * h_{t-1},   dh0 = a_0 * g_0

(JAX's cotangent convention for complex numbers has no conjugate here; in the
conjugate-gradient convention of the paper's reference code this is
g_t = conj(a_{t+1}) g_{t+1} + dh_t.) Training then stores only a, h and h0: O(L*N)
values, instead of the log2(L) intermediate levels autodiff keeps for
`jax.lax.associative_scan`. `grad="autodiff"` differentiates the forward method itself.

Sequence parallelism (the sequence axis split across devices under `shard_map`) is
`linear_scan(..., axis_name="sequence")` (or `linear_scan_planar`): the segments' exit
states from a zero entry are combined across devices, and each device scans its segment
from the state arriving from its left (or right, for reverse); see
lrulm.sequence_parallel.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from lrulm import target
from lrulm.scan_methods import (
    DEFAULT_CHUNK_SIZE,
    GradMethod,
    ScanMethod,
    _check_chunk_size,
    _check_shapes,
    _forward,
    _resolve_grad,
    _scan_recurrence_grad,
    _shift,
    _vary_like,
    resolve,
)

# ----------------------------------------------------------------------------------
# The planar form: complex values as (real, imag) float32 arrays end to end.
# ----------------------------------------------------------------------------------

Parts = tuple[jax.Array, ...]  # (x,) for real values, (real, imag) for complex ones


def _merge(x: Parts) -> jax.Array:
    return jax.lax.complex(*x) if len(x) == 2 else x[0]


def _split(x: jax.Array) -> Parts:
    return (jnp.real(x), jnp.imag(x)) if jnp.iscomplexobj(x) else (x,)


def _gate(a: Parts, keep, shape) -> Parts:
    """The decays with the resets applied: a_t * keep_t, of the full shape."""
    if keep is None:
        return a
    return tuple(keep[..., None] * jnp.broadcast_to(x, shape) for x in a)


def _forward_parts(
    a: Parts, b: Parts, h0, keep, method, chunk_size, reverse, overwrite_b=False
) -> Parts:
    if method is ScanMethod.PALLAS:  # the kernels work on parts: no merge or split pass
        from lrulm import scan_pallas

        return scan_pallas.forward_parts(
            a, b, h0, keep=keep, chunk_size=chunk_size, reverse=reverse, overwrite_b=overwrite_b
        )
    if method is ScanMethod.SEQUENTIAL:
        return _sequential_parts(a, b, h0, keep, reverse)
    a = _gate(a, keep, b[0].shape)  # XLA fuses this into the scan's first reads
    h0 = None if h0 is None else _merge(h0)
    return _split(_forward(_merge(a), _merge(b), h0, method, chunk_size, reverse))


def _sequential_parts(a: Parts, b: Parts, h0, keep, reverse) -> Parts:
    """The sequential loop on parts, in place along axis -2: step t reads b_t from the
    output buffers (which start as b) and writes h_t over it. Nothing is merged into
    complex numbers or moved to a time-major layout, and the resets gate the decay a
    step at a time, so no (..., L, N) array is made besides h."""
    length = b[0].shape[-2]
    full_a = a[0].ndim > 1
    at_step = lambda x, t: jax.lax.dynamic_index_in_dim(x, t, -2, keepdims=False)

    def body(i, carry):
        h, out = carry
        t = length - 1 - i if reverse else i
        a_t = tuple(at_step(x, t) for x in a) if full_a else a
        if keep is not None:
            k = jax.lax.dynamic_index_in_dim(keep, t, -1, keepdims=False)[..., None]
            a_t = tuple(x * k for x in a_t)
        h = tuple(p + at_step(o, t) for p, o in zip(_cmul(a_t, h), out))
        out = tuple(jax.lax.dynamic_update_index_in_dim(o, x, t, -2) for o, x in zip(out, h))
        return h, out

    if h0 is None:
        h0 = tuple(jnp.zeros_like(x[..., 0, :]) for x in b)
    return jax.lax.fori_loop(0, length, body, (h0, b))[1]


def _conj(x: Parts) -> Parts:
    return x if len(x) == 1 else (x[0], -x[1])


def _cmul(x: Parts, y: Parts, conj_y: bool = False) -> Parts:
    """x * y (x * conj(y) if conj_y) on parts."""
    if len(x) == 1:
        return (x[0] * y[0],)
    (xr, xi), (yr, yi) = x, y
    if conj_y:
        return xr * yr + xi * yi, xi * yr - xr * yi
    return xr * yr - xi * yi, xr * yi + xi * yr


def _planar_grads(a, dh, h, h0, keep, method, chunk_size, reverse):
    """(g, da): the reverse recurrence through `method`, then da from g and h."""
    a_conj = _conj(a)
    later = lambda x: _shift(x, not reverse, jnp.zeros_like(x[..., 0, :]))
    if a[0].ndim > 1:
        a_conj = tuple(map(later, a_conj))
    keep_next = None if keep is None else later(keep[..., None])[..., 0]
    g = _forward_parts(a_conj, dh, None, keep_next, method, chunk_size, not reverse)
    h_start = tuple(jnp.zeros_like(x[..., 0, :]) for x in h) if h0 is None else h0
    da = _cmul(g, tuple(_shift(x, reverse, s) for x, s in zip(h, h_start)), conj_y=True)
    if keep is not None:
        da = tuple(x * keep[..., None] for x in da)
    if a[0].ndim == 1:
        da = tuple(x.reshape(-1, x.shape[-1]).sum(0) for x in da)
    return g, da


def _backward_parts(a, dh, h, h0, keep, method, chunk_size, reverse):
    """(g, da) of the planar recurrence given h, its cotangent dh and the state h0
    before the first position."""
    if method is ScanMethod.PALLAS:  # g and da in one kernel pass, no shifted copies
        from lrulm import scan_pallas

        return scan_pallas.backward_parts(
            a, dh, h, h0, keep=keep, chunk_size=chunk_size, reverse=reverse
        )
    return _planar_grads(a, dh, h, h0, keep, method, chunk_size, reverse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _planar_recurrence_grad(a, b, h0, keep, method, chunk_size, reverse, overwrite_b):
    return _forward_parts(a, b, h0, keep, method, chunk_size, reverse, overwrite_b)


def _planar_fwd(a, b, h0, keep, method, chunk_size, reverse, overwrite_b):
    h = _forward_parts(a, b, h0, keep, method, chunk_size, reverse, overwrite_b)
    return h, (a, h, h0, keep)


def _planar_bwd(method, chunk_size, reverse, overwrite_b, residuals, dh):
    del overwrite_b  # the backward kernel writes g over dh, a cotangent made for it
    # Real arithmetic on the parts, so the transpose of "multiply by a" is "multiply by
    # conj(a)": g_t = conj(a_{t+1}) keep_{t+1} g_{t+1} + dh_t and
    # da_t = keep_t g_t conj(h_{t-1}). The residuals are a, h, h0 and the (..., L) keep:
    # a reset costs no (..., L, N) array here either.
    a, h, h0, keep = residuals
    dh = tuple(d.astype(x.dtype) for d, x in zip(dh, h))
    g, da = _backward_parts(a, dh, h, h0, keep, method, chunk_size, reverse)
    dh0 = None
    if h0 is not None:
        first = -1 if reverse else 0
        a0 = a if a[0].ndim == 1 else tuple(x[..., first, :] for x in a)
        dh0 = _cmul(tuple(x[..., first, :] for x in g), a0, conj_y=True)
        if keep is not None:
            dh0 = tuple(x * keep[..., first, None] for x in dh0)
        dh0 = tuple(d.astype(x.dtype) for d, x in zip(dh0, h0))
    return tuple(d.astype(x.dtype) for d, x in zip(da, a)), g, dh0, None


_planar_recurrence_grad.defvjp(_planar_fwd, _planar_bwd)


def linear_scan_planar(
    a: Parts,
    b: Parts,
    *,
    h0: Parts | None = None,
    resets: jax.Array | None = None,
    reverse: bool = False,
    method: str | ScanMethod = "auto",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    grad: str | GradMethod = "recurrence",
    axis_name: str | None = None,
    overwrite_b: bool = False,
) -> Parts:
    """`linear_scan` on complex values held as (real, imag) pairs of real arrays.

    The same recurrence, arguments and methods as `linear_scan`, but a, b and h0 are each
    a tuple of parts, (real, imag) (or (x,) for real values), and so is the result. With
    method="pallas" nothing complex is ever formed: the kernels read and write the parts,
    so a layer whose projections produce and consume real and imaginary parts (the LRU's
    B u and Re(C h)) pays for no merge or split passes; the other methods merge, scan and
    split, which XLA fuses with its neighbours. The gradient (grad="recurrence") keeps
    the parts of h as its only (..., L, N) residuals, which the layer's readout shares.

    `resets`, bool of shape (..., L) (b's shape without N), True where the state must
    start afresh: h_t = b_t there (h_t = a_t * h_{t+1} + b_t reversed, so in reverse a
    reset at t cuts the state arriving from t+1). Equal to zeroing a_t, but the kernels
    and the gradient take the (..., L) mask instead of a (..., L, N) decay array.

    `overwrite_b` (method="pallas"): the kernel writes h into b's buffers, so the scan
    needs one (..., L, N) buffer, not two. Right when b is an intermediate nothing reads
    afterwards (the LRU's B projection); if b is still needed, or is an argument of the
    jitted function that was not donated, XLA copies it first: correct, one more pass.
    """
    for name, x in (("a", a), ("b", b), ("h0", h0)):
        if x is not None and not isinstance(x, tuple | list):
            raise ValueError(
                f"linear_scan_planar takes {name} as a tuple of parts, (real, imag) or (x,); "
                f"got {type(x).__name__} (for one complex or real array use linear_scan)"
            )
    a, b = tuple(map(jnp.asarray, a)), tuple(map(jnp.asarray, b))
    h0 = None if h0 is None else tuple(map(jnp.asarray, h0))
    counts = {len(a), len(b)} | (set() if h0 is None else {len(h0)})
    if len(counts) != 1 or counts.pop() not in (1, 2):
        raise ValueError(
            "a, b and h0 must each be (real, imag) for complex values or (x,) for real ones, "
            f"all alike; got {len(a)}, {len(b)} and {None if h0 is None else len(h0)} parts"
        )
    parts = (*a, *b, *(h0 or ()))
    if any(jnp.iscomplexobj(x) for x in parts):
        raise ValueError("the parts of a planar scan must be real arrays (use linear_scan)")
    for name, x in (("a", a), ("b", b), ("h0", h0)):
        if x is not None and len({p.shape for p in x}) != 1:
            raise ValueError(f"the parts of {name} must share a shape; got {[p.shape for p in x]}")
    _check_shapes(a[0], b[0], None if h0 is None else h0[0])
    _check_chunk_size(chunk_size)
    method, grad = resolve(method), _resolve_grad(grad)
    dtype = jnp.result_type(*parts)
    a = tuple(_vary_like(x.astype(dtype), b[0]) for x in a)
    b = tuple(x.astype(dtype) for x in b)
    h0 = None if h0 is None else tuple(_vary_like(x.astype(dtype), b[0]) for x in h0)
    keep = None
    if resets is not None:
        resets = jnp.asarray(resets)
        if resets.shape != b[0].shape[:-1]:
            raise ValueError(
                f"resets must have shape {b[0].shape[:-1]} (b's without the channel axis); "
                f"got {resets.shape}"
            )
        keep = jnp.logical_not(resets).astype(dtype)
    if axis_name is not None and a[0].ndim == 1 and grad is GradMethod.RECURRENCE:
        from lrulm import sequence_parallel

        return sequence_parallel.sharded_scan_parts(
            a, b, h0=h0, keep=keep, reverse=reverse, axis_name=axis_name, method=method,
            chunk_size=chunk_size, overwrite_b=overwrite_b,
        )  # fmt: skip
    if axis_name is not None or b[0].shape[-2] == 0:
        a = _gate(a, keep, b[0].shape)
        kw = dict(method=method, chunk_size=chunk_size, grad=grad, axis_name=axis_name)
        h0 = None if h0 is None else _merge(h0)
        return _split(linear_scan(_merge(a), _merge(b), h0=h0, reverse=reverse, **kw))
    if grad is GradMethod.RECURRENCE:
        return _planar_recurrence(a, b, h0, keep, method, chunk_size, reverse, overwrite_b)
    return _forward_parts(a, b, h0, keep, method, chunk_size, reverse, overwrite_b)


def _planar_recurrence(a, b, h0, keep, method, chunk_size, reverse, overwrite_b):
    """The planar scan with the recurrence gradient; the GPU kernel's scans that would
    launch too few programs split the sequence in time (lrulm.kernels.gpu.time_segments)."""
    backend = target.backend()
    if method is ScanMethod.PALLAS and a[0].ndim == 1 and backend != "tpu":
        from lrulm import sequence_parallel
        from lrulm.kernels import gpu

        *lead, length, n = b[0].shape
        segments = gpu.time_segments(math.prod(lead), length, n, backend=backend)
        if segments > 1:
            return sequence_parallel.split_scan_parts(
                a, b, h0=h0, keep=keep, reverse=reverse, segments=segments, method=method,
                chunk_size=chunk_size, overwrite_b=overwrite_b,
            )  # fmt: skip
    return _planar_recurrence_grad(a, b, h0, keep, method, chunk_size, reverse, overwrite_b)


# ----------------------------------------------------------------------------------
# Public entry point.
# ----------------------------------------------------------------------------------


def linear_scan(
    a: jax.Array,
    b: jax.Array,
    *,
    h0: jax.Array | None = None,
    reverse: bool = False,
    method: str | ScanMethod = "auto",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    grad: str | GradMethod = "recurrence",
    axis_name: str | None = None,
) -> jax.Array:
    """Computes h_t = a_t * h_{t-1} + b_t along axis -2 of b.

    Args:
      a: decays, shape (..., L, N) like b, or (N,) for a time-invariant diagonal.
      b: inputs, shape (..., L, N).
      h0: optional initial state, shape (..., N); zeros if None. For reverse=True it is
        the state after the last position (h_L).
      reverse: run from the end of the sequence: h_t = a_t * h_{t+1} + b_t.
      method: a `ScanMethod` or its name; "auto" picks per backend.
      chunk_size: chunk length C for "chunked" and "pallas".
      grad: "recurrence" (custom VJP, O(L*N) memory) or "autodiff".
      axis_name: the mesh axis the sequence is split over (inside `shard_map`); None
        when each device holds the whole sequence.

    Returns:
      h, shape (..., L, N), dtype the result type of a, b and h0.
    """
    a, b = jnp.asarray(a), jnp.asarray(b)
    h0 = None if h0 is None else jnp.asarray(h0)
    _check_shapes(a, b, h0)
    _check_chunk_size(chunk_size)
    method = resolve(method)
    grad = _resolve_grad(grad)
    dtype = jnp.result_type(a, b) if h0 is None else jnp.result_type(a, b, h0)
    a, b = _vary_like(a.astype(dtype), b), b.astype(dtype)
    h0 = None if h0 is None else _vary_like(h0.astype(dtype), b)
    if axis_name is not None and a.ndim == 1 and grad is GradMethod.RECURRENCE:
        kw = dict(method=method, chunk_size=chunk_size, axis_name=axis_name)
        h0 = None if h0 is None else _split(h0)
        return _merge(linear_scan_planar(_split(a), _split(b), h0=h0, reverse=reverse, **kw))
    if axis_name is not None:
        from lrulm import sequence_parallel

        return sequence_parallel.sharded_linear_scan(
            a,
            b,
            h0=h0,
            reverse=reverse,
            axis_name=axis_name,
            local_scan=functools.partial(
                linear_scan, method=method, chunk_size=chunk_size, grad=grad
            ),
        )
    if b.shape[-2] == 0:
        return b
    if method is ScanMethod.PALLAS and grad is GradMethod.RECURRENCE:
        # The kernels work on parts, and their fused backward comes with the planar form.
        h = _planar_recurrence(
            _split(a),
            _split(b),
            None if h0 is None else _split(h0),
            None,
            method,
            chunk_size,
            reverse,
            jnp.iscomplexobj(b),  # the split made new parts: the kernel may write over them
        )
        return _merge(h)
    if grad is GradMethod.RECURRENCE:
        return _scan_recurrence_grad(a, b, h0, method, chunk_size, reverse)
    return _forward(a, b, h0, method, chunk_size, reverse)
