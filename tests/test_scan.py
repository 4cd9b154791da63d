"""Every scan method and gradient mode against the sequential reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lrulm import scan as scan_lib
from lrulm.scan import linear_scan

METHODS = ["sequential", "associative", "chunked"]
_STATIC = ("method", "grad", "reverse", "chunk_size")
_scan_jit = jax.jit(linear_scan, static_argnames=_STATIC)


def _inputs(seed, lead, length, n, *, complex_, full_a):
    rng = np.random.default_rng(seed)
    shape = lead + (length, n)
    mag = rng.uniform(0.5, 0.999, shape if full_a else (n,))
    if complex_:
        phase = rng.uniform(0, 2 * np.pi, mag.shape)
        a = (mag * np.exp(1j * phase)).astype(np.complex64)
        b = (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)
        h0 = (rng.normal(size=lead + (n,)) + 1j * rng.normal(size=lead + (n,))).astype(np.complex64)
    else:
        a = mag.astype(np.float32)
        b = rng.normal(size=shape).astype(np.float32)
        h0 = rng.normal(size=lead + (n,)).astype(np.float32)
    return jnp.asarray(a), jnp.asarray(b), jnp.asarray(h0)


def _numpy_scan(a, b, h0, reverse):
    a, b = np.asarray(a), np.asarray(b)
    a = np.broadcast_to(a, b.shape)
    h = np.zeros_like(b)
    state = np.zeros(b.shape[:-2] + b.shape[-1:], b.dtype) if h0 is None else np.asarray(h0)
    order = range(b.shape[-2] - 1, -1, -1) if reverse else range(b.shape[-2])
    for t in order:
        state = a[..., t, :] * state + b[..., t, :]
        h[..., t, :] = state
    return h


def _rel(x, y):
    return float(jnp.max(jnp.abs(x - y)) / (jnp.max(jnp.abs(y)) + 1e-30))


def _loss(a, b, h0, **kw):
    h = linear_scan(a, b, h0=h0, **kw)
    # A real loss that touches real and imaginary parts differently.
    w = jnp.linspace(-1.0, 2.0, h.shape[-1])
    return jnp.sum(jnp.real(h) * w) + jnp.sum(jnp.imag(h) ** 2) + jnp.sum(jnp.abs(h) ** 2)


@pytest.mark.parametrize("length", [1, 7, 1000])
@pytest.mark.parametrize("complex_", [True, False])
@pytest.mark.parametrize("full_a", [True, False])
@pytest.mark.parametrize("reverse", [False, True])
def test_sequential_matches_numpy(length, complex_, full_a, reverse):
    a, b, h0 = _inputs(length, (2,), length, 3, complex_=complex_, full_a=full_a)
    h = linear_scan(a, b, h0=h0, reverse=reverse, method="sequential")
    np.testing.assert_allclose(h, _numpy_scan(a, b, h0, reverse), rtol=1e-5, atol=1e-5)


# Every combination at lengths 1 and 7; at 1000 (chunk tails, the slow cases) a half
# in which each of complex, full a and reverse still takes both values.
_PRODUCT = [(c, f, r) for c in (True, False) for f in (True, False) for r in (False, True)]
_LONG = [(True, True, False), (True, False, True), (False, True, True), (False, False, False)]


@pytest.mark.parametrize(
    "length, complex_, full_a, reverse",
    [(n, *x) for n in (1, 7) for x in _PRODUCT] + [(1000, *x) for x in _LONG],
)
def test_methods_match_sequential(length, complex_, full_a, reverse):
    """Values and gradients (w.r.t. a, b, h0) of every method and gradient mode."""
    a, b, h0 = _inputs(length + 10 * reverse, (2, 3), length, 4, complex_=complex_, full_a=full_a)
    kw = dict(reverse=reverse, chunk_size=16)
    grad_fn = jax.jit(jax.grad(_loss, argnums=(0, 1, 2)), static_argnames=_STATIC)
    ref = _scan_jit(a, b, h0=h0, method="sequential", grad="autodiff", **kw)
    g_ref = grad_fn(a, b, h0, method="sequential", grad="autodiff", **kw)
    for method in METHODS:
        for grad in ["recurrence", "autodiff"]:
            out = _scan_jit(a, b, h0=h0, method=method, grad=grad, **kw)
            assert out.dtype == ref.dtype
            assert _rel(out, ref) <= 1e-5, (method, grad)
            g = grad_fn(a, b, h0, method=method, grad=grad, **kw)
            for name, x, y in zip(("a", "b", "h0"), g, g_ref):
                assert x.shape == y.shape and x.dtype == y.dtype, (method, grad, name)
                assert _rel(x, y) <= 1e-5, (method, grad, name, _rel(x, y))


@pytest.mark.parametrize("chunk_size", [1, 3, 64, 5000])
def test_chunk_sizes(chunk_size):
    a, b, _ = _inputs(0, (2,), 333, 8, complex_=True, full_a=False)
    ref = linear_scan(a, b, method="sequential")
    assert _rel(linear_scan(a, b, method="chunked", chunk_size=chunk_size), ref) <= 1e-5


def test_no_h0_and_mixed_dtypes():
    """Real a with complex b (the LRU never does this, users might)."""
    a, _, _ = _inputs(1, (2,), 50, 4, complex_=False, full_a=True)
    _, b, _ = _inputs(2, (2,), 50, 4, complex_=True, full_a=True)
    ref = _numpy_scan(a, b, None, False)
    for method in METHODS:
        h = _scan_jit(a, b, method=method)
        assert h.dtype == jnp.complex64
        np.testing.assert_allclose(h, ref, rtol=1e-5, atol=1e-5)
        ga = jax.jit(
            jax.grad(lambda a, m=method: jnp.sum(jnp.abs(linear_scan(a, b, method=m)) ** 2))
        )(a)
        assert ga.dtype == jnp.float32


def test_recurrence_grad_saves_memory_at_4096():
    """The custom VJP stores O(L*N) values; autodiff of associative_scan stores its levels."""
    a, b, h0 = _inputs(3, (4,), 4096, 128, complex_=True, full_a=False)

    def loss(b, method, grad):
        h = linear_scan(a, b, h0=h0, method=method, grad=grad)
        return jnp.sum(h.real) + jnp.sum(h.imag)

    def temp_bytes(method, grad):
        f = jax.jit(jax.grad(lambda b: loss(b, method, grad)))
        return f.lower(b).compile().memory_analysis().temp_size_in_bytes

    custom = temp_bytes("associative", "recurrence")
    autodiff = temp_bytes("associative", "autodiff")
    print(
        f"\ntemporary memory at (B=4, L=4096, N=128) complex64: custom VJP {custom / 2**20:.1f} "
        f"MiB, autodiff of associative_scan {autodiff / 2**20:.1f} MiB"
    )
    assert custom < 0.6 * autodiff  # measured: 20 MiB vs 44 MiB


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(a=np.ones((4, 3)), b=np.ones((4, 5))), "a must have the shape"),
        (dict(a=np.ones((3,)), b=np.ones((3,))), r"b must have shape \(\.\.\., L, N\)"),
        (dict(a=np.ones((3,)), b=np.ones((2, 4, 3)), h0=np.ones((3,))), "h0 must have shape"),
        (dict(a=np.ones((3,)), b=np.ones((4, 3)), method="fast"), "unknown scan method 'fast'"),
        (dict(a=np.ones((3,)), b=np.ones((4, 3)), grad="magic"), "unknown scan grad"),
        (dict(a=np.ones((3,)), b=np.ones((4, 3)), chunk_size=0), "chunk_size"),
        (dict(a=np.ones((3,)), b=np.ones((4, 3)), chunk_size=2.5), r"positive integer; got 2\.5"),
        (dict(a=np.ones((3,)), b=np.ones((4, 3)), chunk_size=None), "positive integer; got None"),
    ],
)
def test_bad_input(kwargs, message):
    a, b = kwargs.pop("a"), kwargs.pop("b")
    with pytest.raises(ValueError, match=message):
        linear_scan(a, b, **kwargs)


def test_auto_resolves_per_backend():
    assert scan_lib.resolve("auto", "cpu") is scan_lib.ScanMethod.SEQUENTIAL
    assert scan_lib.resolve("auto", "gpu") is not scan_lib.ScanMethod.AUTO
    assert scan_lib.resolve(scan_lib.ScanMethod.ASSOCIATIVE) is scan_lib.ScanMethod.ASSOCIATIVE


# ----------------------------------------------------------------------------------
# The planar form: (real, imag) parts in and out.
# ----------------------------------------------------------------------------------


def _planar_losses(a_re, a_im, b_re, b_im, h0_re, h0_im, *, planar, resets, **kw):
    """One real loss, computed by the complex reference or by linear_scan_planar."""
    w = jnp.linspace(-1.0, 2.0, b_re.shape[-1])
    if planar:
        hr, hi = scan_lib.linear_scan_planar(
            (a_re, a_im), (b_re, b_im), h0=(h0_re, h0_im), resets=resets, **kw
        )
    else:
        a = jax.lax.complex(a_re, a_im)
        if resets is not None:  # the reference: a reset is a zero decay
            a = jnp.where(resets[..., None], 0, jnp.broadcast_to(a, b_re.shape))
        h = linear_scan(a, jax.lax.complex(b_re, b_im), h0=jax.lax.complex(h0_re, h0_im), **kw)
        hr, hi = h.real, h.imag
    return jnp.sum(hr * w) + jnp.sum(hi**2) + jnp.sum(hr * hi)


@pytest.mark.parametrize("method", METHODS + ["pallas"])
@pytest.mark.parametrize(  # each flag both ways, each pair of flags in two combinations
    "full_a, reverse, with_resets",
    [(False, False, False), (True, True, False), (False, True, True), (True, False, True)],
)
def test_planar_matches_complex(method, full_a, reverse, with_resets):
    """Values and gradients w.r.t. every part, against the complex sequential scan."""
    a, b, h0 = _inputs(7 + reverse, (2, 3), 37, 5, complex_=True, full_a=full_a)
    parts = (a.real, a.imag, b.real, b.imag, h0.real, h0.imag)
    resets = None
    if with_resets:  # the first and last positions included, where h0 enters
        resets = jnp.asarray(np.random.default_rng(3).uniform(size=(2, 3, 37)) < 0.2)
        resets = resets.at[0, 0, 0].set(True).at[1, 2, -1].set(True)
    kw = dict(reverse=reverse, chunk_size=8)
    losses = {
        planar: jax.jit(
            jax.value_and_grad(
                functools.partial(_planar_losses, planar=planar, resets=resets, **kw, **mkw),
                argnums=tuple(range(6)),
            )
        )
        for planar, mkw in (
            (False, dict(method="sequential", grad="autodiff")),
            (True, dict(method=method)),
        )
    }
    ref, g_ref = losses[False](*parts)
    out, g = losses[True](*parts)
    assert abs(out - ref) <= 1e-5 * abs(ref)
    for name, x, y in zip(("a_re", "a_im", "b_re", "b_im", "h0_re", "h0_im"), g, g_ref):
        assert x.shape == y.shape and x.dtype == y.dtype, name
        assert _rel(x, y) <= 1e-5, (method, name, _rel(x, y))
    # The values themselves, part by part.
    hr, hi = scan_lib.linear_scan_planar(
        (a.real, a.imag),
        (b.real, b.imag),
        h0=(h0.real, h0.imag),
        resets=resets,
        method=method,
        **kw,
    )
    assert hr.dtype == hi.dtype == jnp.float32
    ref_a = a if resets is None else jnp.where(resets[..., None], 0, jnp.broadcast_to(a, b.shape))
    ref_h = linear_scan(ref_a, b, h0=h0, method="sequential", **kw)
    assert _rel(jax.lax.complex(hr, hi), ref_h) <= 1e-5


def _real_planar_loss(a, b, **kw):
    return jnp.sum(scan_lib.linear_scan_planar((a,), (b,), **kw)[0] ** 2)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("grad", ["recurrence", "autodiff"])
def test_planar_real_parts(method, grad):
    """Real values as one part, each direction: values against numpy, gradients against
    the complex-free reference's autodiff."""
    for reverse in (False, True):
        a, b, h0 = _inputs(11 + reverse, (2,), 20, 3, complex_=False, full_a=reverse)
        kw = dict(h0=(h0,), reverse=reverse, chunk_size=4)
        (h,) = scan_lib.linear_scan_planar((a,), (b,), method=method, grad=grad, **kw)
        np.testing.assert_allclose(h, _numpy_scan(a, b, h0, reverse), rtol=1e-5, atol=1e-5)
        got = jax.grad(_real_planar_loss, argnums=(0, 1))(a, b, method=method, grad=grad, **kw)
        ref = jax.grad(_real_planar_loss, argnums=(0, 1))(
            a, b, method="associative", grad="autodiff", **kw
        )
        for x, y in zip(got, ref):
            assert _rel(x, y) <= 1e-5, (method, grad, reverse, _rel(x, y))


def test_planar_errors():
    a, b, h0 = _inputs(11, (2,), 20, 3, complex_=False, full_a=False)
    with pytest.raises(ValueError, match="parts"):
        scan_lib.linear_scan_planar((a, a), (b,))
    with pytest.raises(ValueError, match="takes b as a tuple of parts.*use linear_scan"):
        scan_lib.linear_scan_planar((a,), b)
    with pytest.raises(ValueError, match="real arrays"):
        scan_lib.linear_scan_planar((a + 0j,), (b + 0j,))
    with pytest.raises(ValueError, match="share a shape"):
        scan_lib.linear_scan_planar((a, a), (b, b[:, :3]))
    with pytest.raises(ValueError, match="resets must have shape"):
        scan_lib.linear_scan_planar((a,), (b,), resets=jnp.zeros((2, 19), bool))
