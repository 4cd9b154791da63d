"""The recurrence's methods on whole complex (or real) arrays: `ScanMethod`, how "auto"
picks one per backend, the sequential, associative and chunked scans, and their shared
backward (the reverse recurrence, under `jax.custom_vjp`). lrulm.scan builds on these:
`linear_scan` (the entry point, with its argument checks) and the planar form, where
complex values travel as (real, imag) parts and the Pallas kernels run."""

from __future__ import annotations

import enum
import functools

import jax
import jax.numpy as jnp

from lrulm import target


class ScanMethod(enum.Enum):
    """How the recurrence is computed. All give the same result."""

    SEQUENTIAL = "sequential"  # a loop over L: the reference, L sequential steps.
    ASSOCIATIVE = "associative"  # jax.lax.associative_scan: log2(L) levels.
    CHUNKED = "chunked"  # sequential within chunks of C, vectorised across chunks.
    PALLAS = "pallas"  # hand-written kernel (lrulm.scan_pallas); GPU / TPU / interpret.
    AUTO = "auto"  # the fastest correct method for the backend.


class GradMethod(enum.Enum):
    RECURRENCE = "recurrence"  # custom VJP: the reverse recurrence, O(L*N) residuals.
    AUTODIFF = "autodiff"  # differentiate the forward computation as written.


# Measured with tools/bench_baseline.py (the docs/design.md §4 CPU row: an LRA step, 6 x H128 x
# N256, layer norm, batch 8 x 1024, 2-core CPU, 2026-12-04): a train step takes 0.31 s with
# the sequential loop (on parts, in place: `_sequential_parts`), 0.46 s chunked, 0.49 s
# associative; a minimal-LRU-style reference step (complex associative_scan vmapped over
# the batch) takes 1.04 s there. On CPU the sequential loop is cheap (no launch overhead)
# and touches each element once.
_AUTO_BY_BACKEND = {
    "cpu": ScanMethod.SEQUENTIAL,
    # The Pallas kernels (lrulm/scan_pallas.py) read b and write h once, where
    # associative_scan makes log2(L) passes (docs/design.md §4). On an H200 (tools/
    # gpu_check.sh, 2026-11-27) the GPU kernel made an LRU layer 1.16x and the 350m step
    # 1.02x faster, but one 65,536-token sequence 1.35x slower (too few programs). Such
    # launches are now split in time (4.2x faster than unsplit on an H100), not yet timed
    # in that train step against associative: until it wins every case, opt in with
    # model.scan_method=pallas (docs/kernels.md). On TPU the kernels compile (Mosaic,
    # ahead of time) but have never run.
    "gpu": ScanMethod.ASSOCIATIVE,
    "cuda": ScanMethod.ASSOCIATIVE,
    "rocm": ScanMethod.ASSOCIATIVE,
    "tpu": ScanMethod.CHUNKED,
}
DEFAULT_CHUNK_SIZE = 64


def resolve(method: str | ScanMethod, backend: str | None = None) -> ScanMethod:
    """Turns a method name into a concrete `ScanMethod` (AUTO picks by backend)."""
    if isinstance(method, str):
        try:
            method = ScanMethod(method)
        except ValueError:
            names = ", ".join(repr(m.value) for m in ScanMethod)
            raise ValueError(f"unknown scan method {method!r}; use one of {names}") from None
    match method:
        case ScanMethod.AUTO:
            backend = backend or target.backend()
            return _AUTO_BY_BACKEND.get(backend, ScanMethod.ASSOCIATIVE)
        case _:
            return method


def _resolve_grad(grad: str | GradMethod) -> GradMethod:
    if isinstance(grad, GradMethod):
        return grad
    try:
        return GradMethod(grad)
    except ValueError:
        names = ", ".join(repr(g.value) for g in GradMethod)
        raise ValueError(f"unknown scan grad {grad!r}; use one of {names}") from None


def _vary_like(x: jax.Array, ref: jax.Array) -> jax.Array:
    """x, made to vary over the mesh axes `ref` varies over (inside `shard_map` with
    check_vma, e.g. a replicated a beside a batch-sharded b), so that the custom VJPs'
    cotangents have x's type (jax sums them over those axes); elsewhere x itself."""
    missing = tuple(sorted(_varying_axes(ref) - _varying_axes(x)))
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def _varying_axes(x) -> frozenset:
    """The manual mesh axes x varies over (empty outside shard_map); the attribute moved
    between jax versions (`manual_axis_type.varying`, before that `vma`)."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)
    return frozenset(manual.varying if manual is not None else getattr(aval, "vma", ()))


def _check_chunk_size(chunk_size) -> None:
    if isinstance(chunk_size, bool) or not hasattr(chunk_size, "__index__"):
        raise ValueError(
            f"chunk_size must be a positive integer; got {chunk_size!r} "
            f"({type(chunk_size).__name__})"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer; got {chunk_size}")


def _check_shapes(a, b, h0):
    if b.ndim < 2:
        raise ValueError(f"b must have shape (..., L, N); got shape {b.shape}")
    n = b.shape[-1]
    if a.shape != b.shape and a.shape != (n,):
        raise ValueError(
            f"a must have the shape of b {b.shape} or ({n},) (one decay per channel); "
            f"got shape {a.shape}"
        )
    if h0 is not None and h0.shape != b.shape[:-2] + (n,):
        raise ValueError(
            f"h0 must have shape {b.shape[:-2] + (n,)} (b's shape without the sequence "
            f"axis); got shape {h0.shape}"
        )


# ----------------------------------------------------------------------------------
# Kernels. Forward: h_t = a_t h_{t-1} + b_t from h_{-1} = h0; reverse: h_t = a_t h_{t+1}
# + b_t from h_L = h0 (zeros if None). `a` is (N,) or the shape of b. Every kernel runs
# in either direction natively, so no flipped copies of (..., L, N) arrays are made.
# ----------------------------------------------------------------------------------


def _sequential(a, b, h0, reverse=False):
    h0 = jnp.zeros_like(b[..., 0, :]) if h0 is None else h0  # b's sharding (and vma)
    bt = jnp.moveaxis(b, -2, 0)
    if a.ndim == 1:

        def step(h, bk):
            h = a * h + bk
            return h, h

        _, h = jax.lax.scan(step, h0, bt, reverse=reverse)
    else:

        def step(h, abk):
            ak, bk = abk
            h = ak * h + bk
            return h, h

        _, h = jax.lax.scan(step, h0, (jnp.moveaxis(a, -2, 0), bt), reverse=reverse)
    return jnp.moveaxis(h, 0, -2)


def _combine(x, y):
    ax, bx = x
    ay, by = y
    return ay * ax, ay * bx + by


def _fold_h0(a, b, h0, reverse):
    """Folds the initial state into the first input: b_0 <- a_0 h0 + b_0."""
    if h0 is None:
        return b
    first = -1 if reverse else 0
    a0 = a if a.ndim == 1 else a[..., first, :]
    return b.at[..., first, :].add(a0 * h0)


def _associative(a, b, h0, reverse=False):
    b = _fold_h0(a, b, h0, reverse)
    if reverse:  # associative_scan(reverse=True) materialises twice the temporaries
        flip = lambda x: jnp.flip(x, axis=-2)
        return flip(_associative(a if a.ndim == 1 else flip(a), flip(b), None))
    a = jnp.broadcast_to(a, b.shape)
    _, h = jax.lax.associative_scan(_combine, (a, b), axis=b.ndim - 2)
    return h


def _chunked(a, b, h0, chunk_size, reverse=False):
    """Two levels: a sequential scan within chunks of C steps, run for all chunks at
    once, then a sequential scan over the L/C chunk carries, then a fix-up."""
    *lead, length, n = b.shape
    c = max(1, min(chunk_size, length))
    num_chunks = -(-length // c)
    pad = num_chunks * c - length
    b = _fold_h0(a, b, h0, reverse)
    full_a = a.ndim > 1
    if pad:  # zeros after the end: harmless in both directions (h0 is already folded in)
        b = jnp.pad(b, [(0, 0)] * len(lead) + [(0, pad), (0, 0)])
        if full_a:
            a = jnp.pad(a, [(0, 0)] * len(lead) + [(0, pad), (0, 0)], constant_values=1)
    # (..., K, C, N): chunk k, position within the chunk.
    bc = b.reshape(*lead, num_chunks, c, n)
    ac = a.reshape(*lead, num_chunks, c, n) if full_a else a
    local = _sequential(ac, bc, None, reverse)  # every chunk from a zero state at once
    # decay[i]: product of a over the chunk positions from its entry up to i.
    if full_a:
        decay = jax.lax.cumprod(ac, axis=ac.ndim - 2, reverse=reverse)
    else:
        decay = jax.lax.cumprod(jnp.broadcast_to(a, (c, n)), axis=0, reverse=reverse)
    last = 0 if reverse else -1  # the chunk position whose state leaves the chunk
    ends = _sequential(decay[..., last, :], local[..., last, :], None, reverse)  # (..., K, N)
    zero = jnp.zeros_like(ends[..., :1, :])
    if reverse:  # carry into chunk k = state leaving chunk k+1
        carry_in = jnp.concatenate([ends[..., 1:, :], zero], axis=-2)
    else:
        carry_in = jnp.concatenate([zero, ends[..., :-1, :]], axis=-2)
    h = local + decay * carry_in[..., None, :]
    h = h.reshape(*lead, num_chunks * c, n)
    return h[..., :length, :]


def _forward(a, b, h0, method: ScanMethod, chunk_size: int, reverse: bool):
    match method:
        case ScanMethod.SEQUENTIAL:
            return _sequential(a, b, h0, reverse)
        case ScanMethod.ASSOCIATIVE:
            return _associative(a, b, h0, reverse)
        case ScanMethod.CHUNKED:
            return _chunked(a, b, h0, chunk_size, reverse)
        case ScanMethod.PALLAS:
            from lrulm import scan_pallas

            return scan_pallas.forward(a, b, h0, chunk_size=chunk_size, reverse=reverse)
        case _:
            raise ValueError(f"unresolved scan method {method}")


# ----------------------------------------------------------------------------------
# Memory-efficient gradient.
# ----------------------------------------------------------------------------------


def _cast_cotangent(g, like):
    if not jnp.iscomplexobj(like) and jnp.iscomplexobj(g):
        g = g.real
    return g.astype(like.dtype)


def _shift(x, reverse, fill):
    """x_{t-1} along axis -2 (x_{t+1} if reverse), `fill` entering at the open end."""
    fill = fill[..., None, :].astype(x.dtype)
    if reverse:
        return jnp.concatenate([x[..., 1:, :], fill], axis=-2)
    return jnp.concatenate([fill, x[..., :-1, :]], axis=-2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _scan_recurrence_grad(a, b, h0, method, chunk_size, reverse):
    return _forward(a, b, h0, method, chunk_size, reverse)


def _scan_fwd(a, b, h0, method, chunk_size, reverse):
    h = _forward(a, b, h0, method, chunk_size, reverse)
    return h, (a, h, h0)


def _scan_bwd(method, chunk_size, reverse, residuals, dh):
    a, h, h0 = residuals  # linear_scan gives a, b, h0 and h one dtype
    dh = dh.astype(h.dtype)
    # g_t = a_{t+1} g_{t+1} + dh_t: the recurrence run the other way, its coefficients
    # shifted by one step (with a of shape (N,) the shift changes nothing).
    a_next = a if a.ndim == 1 else _shift(a, not reverse, jnp.zeros_like(a[..., 0, :]))
    g = _forward(a_next, dh, None, method, chunk_size, not reverse)
    h_start = jnp.zeros_like(h[..., 0, :]) if h0 is None else h0
    da = g * _shift(h, reverse, h_start)
    if a.ndim == 1:
        da = da.reshape(-1, da.shape[-1]).sum(0)
    dh0 = None
    if h0 is not None:
        first = -1 if reverse else 0
        a0 = a if a.ndim == 1 else a[..., first, :]
        dh0 = _cast_cotangent(a0 * g[..., first, :], h0)
    return _cast_cotangent(da, a), g, dh0


_scan_recurrence_grad.defvjp(_scan_fwd, _scan_bwd)
