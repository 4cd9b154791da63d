"""The LRU layer against an independent NumPy implementation of the paper's equations."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lrulm.lru import LRU

PARAM_NAMES = {"nu_log", "theta_log", "gamma_log", "B_re", "B_im", "C_re", "C_im", "D"}


def _numpy_lru(p, u, reverse=False, use_d=True):
    """x_k = Λ x_{k-1} + exp(γ_log) ⊙ (B u_k); y_k = Re(C x_k) + D ⊙ u_k, one step at a time."""
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    lam = np.exp(-np.exp(p["nu_log"]) + 1j * np.exp(p["theta_log"]))
    B = (p["B_re"] + 1j * p["B_im"]) * np.exp(p["gamma_log"])[:, None]
    C = p["C_re"] + 1j * p["C_im"]
    u = np.asarray(u, np.float64)
    y = np.zeros_like(u)
    for i in range(u.shape[0]):
        x = np.zeros(lam.shape, np.complex128)
        steps = range(u.shape[1] - 1, -1, -1) if reverse else range(u.shape[1])
        for k in steps:
            x = lam * x + B @ u[i, k]
            y[i, k] = (C @ x).real + (p["D"] * u[i, k] if use_d else 0)
    return y


def _params(module):
    return {k: v[...] for k, v in vars(module).items() if k in PARAM_NAMES and v is not None}


@pytest.mark.parametrize("method", ["sequential", "associative", "chunked", "pallas"])
def test_matches_numpy(method):
    layer = LRU(6, 10, r_min=0.4, r_max=0.95, scan_method=method, rngs=nnx.Rngs(0))
    assert set(_params(layer)) == PARAM_NAMES
    u = np.random.default_rng(1).normal(size=(2, 23, 6)).astype(np.float32)
    y = layer(jnp.asarray(u))
    np.testing.assert_allclose(y, _numpy_lru(_params(layer), u), rtol=2e-4, atol=2e-4)


def test_bidirectional_matches_numpy():
    layer = LRU(4, 8, bidirectional=True, rngs=nnx.Rngs(2))
    u = np.random.default_rng(3).normal(size=(2, 15, 4)).astype(np.float32)
    ref = _numpy_lru(_params(layer), u) + _numpy_lru(
        _params(layer.reverse), u, reverse=True, use_d=False
    )
    np.testing.assert_allclose(layer(jnp.asarray(u)), ref, rtol=2e-4, atol=2e-4)


def test_bidirectional_resets_separate_documents_both_ways():
    """With resets a bidirectional layer sees each document alone: the forward scan
    starts at each reset, the reverse one ends its document just before the next reset."""
    layer = LRU(4, 8, bidirectional=True, rngs=nnx.Rngs(2))
    u = jnp.asarray(np.random.default_rng(4).normal(size=(2, 15, 4)).astype(np.float32))
    starts = (0, 6, 11)
    resets = jnp.zeros((2, 15), bool).at[:, starts].set(True)
    alone = [layer(u[:, a:b]) for a, b in zip(starts, (*starts[1:], 15))]
    np.testing.assert_allclose(
        layer(u, resets=resets), jnp.concatenate(alone, 1), rtol=1e-5, atol=1e-5
    )


def test_parameter_shapes_and_dtypes():
    layer = LRU(16, 32, rngs=nnx.Rngs(0))
    shapes = {k: (v.shape, v.dtype) for k, v in _params(layer).items()}
    f32 = jnp.float32
    assert shapes == {
        "nu_log": ((32,), f32),
        "theta_log": ((32,), f32),
        "gamma_log": ((32,), f32),
        "B_re": ((32, 16), f32),
        "B_im": ((32, 16), f32),
        "C_re": ((16, 32), f32),
        "C_im": ((16, 32), f32),
        "D": ((16,), f32),
    }


def test_bfloat16_inputs_keep_float32_recurrence():
    """bfloat16 in and out, float32 in between: over 1024 slow-decaying steps the output
    is the float64 reference on the same (rounded) inputs up to the output's own bf16
    rounding. A bfloat16 recurrence would be off by ~0.3 at an output scale of ~1.4."""
    layer = LRU(8, 16, r_min=0.9, r_max=0.999, rngs=nnx.Rngs(0))
    u16 = jax.random.normal(jax.random.PRNGKey(0), (2, 1024, 8)).astype(jnp.bfloat16)
    y16 = jax.jit(lambda u: layer(u))(u16)
    assert y16.dtype == jnp.bfloat16
    ref = _numpy_lru(_params(layer), np.asarray(u16, np.float32))
    np.testing.assert_allclose(np.asarray(y16, np.float32), ref, rtol=1e-2, atol=2e-2)
    _, state = layer(u16, return_state=True)
    assert state.dtype == jnp.complex64


def test_initial_scales_are_the_papers():
    """B_re, B_im ~ N(0, 1/(2h)), C_re, C_im ~ N(0, 1/n), D ~ N(0, 1), each drawn apart."""
    h, n = 256, 512
    p = _params(LRU(h, n, rngs=nnx.Rngs(3)))
    for name, std in [("B_re", (2 * h) ** -0.5), ("B_im", (2 * h) ** -0.5), ("C_re", n**-0.5),
                      ("C_im", n**-0.5), ("D", 1.0)]:  # fmt: skip
        x = np.asarray(p[name], np.float64).ravel()
        assert abs(x.mean()) < 4 * std / math.sqrt(x.size), name
        assert abs(x.std() / std - 1) < (0.1 if name == "D" else 0.02), (name, x.std(), std)
    assert not np.allclose(p["B_re"], p["B_im"]) and not np.allclose(p["C_re"], p["C_im"])


def test_decay_stays_below_one_whatever_nu_log():
    """exp(-exp(ν_log)) is 1.0 in float32 for ν_log below ~-17.3: the decay rate has a
    floor, so no mode stops forgetting (and nothing becomes NaN far out either way)."""
    layer = LRU(2, 5, rngs=nnx.Rngs(0))
    layer.nu_log[...] = jnp.asarray([-40.0, -17.0, -16.0, 0.0, 80.0])
    re, im = layer._lambda_parts()
    magnitude = np.hypot(np.asarray(re, np.float64), np.asarray(im, np.float64))
    assert np.all(magnitude < 1.0) and magnitude[:2].max() < 1 - 2**-24  # not 1 by rounding
    graph, state = nnx.split(layer)
    u = jnp.ones((1, 8, 2))
    grads = jax.grad(lambda s: jnp.sum(nnx.merge(graph, s)(u) ** 2))(state)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    with pytest.raises(ValueError, match="r_max=0.99999999"):
        LRU(2, 4, r_max=0.99999999, rngs=nnx.Rngs(0))  # 1.0 in float32


@pytest.mark.parametrize("r_min, r_max, max_phase", [(0.0, 0.99, 2 * math.pi), (0.9, 0.999, 0.3)])
def test_ring_initialisation(r_min, r_max, max_phase):
    layer = LRU(4, 20000, r_min=r_min, r_max=r_max, max_phase=max_phase, rngs=nnx.Rngs(7))
    lam = np.asarray(layer.diag_lambda()).astype(np.complex128)
    mag, phase = np.abs(lam), np.angle(lam) % (2 * np.pi)
    assert mag.min() >= r_min - 1e-6 and mag.max() <= r_max + 1e-6
    assert phase.min() >= 0 and phase.max() <= max_phase + 1e-5
    gamma = np.exp(np.asarray(layer.gamma_log[...], np.float64))
    np.testing.assert_allclose(gamma, np.sqrt(1 - mag**2), rtol=1e-4, atol=1e-6)
    # |λ|^2 is uniform on [r_min^2, r_max^2]: Kolmogorov-Smirnov against the uniform CDF.
    x = np.sort((mag**2 - r_min**2) / (r_max**2 - r_min**2))
    cdf = np.arange(1, len(x) + 1) / len(x)
    ks = max(np.max(cdf - x), np.max(x - (cdf - 1 / len(x))))
    assert ks < 1.36 / math.sqrt(len(x))  # 5% critical value
    # The phase is uniform on [0, max_phase] (the same test).
    t = np.sort(np.exp(np.asarray(layer.theta_log[...], np.float64)) / max_phase)
    assert max(np.max(cdf - t), np.max(t - (cdf - 1 / len(t)))) < 1.36 / math.sqrt(len(t))
    # ... and a clearly non-uniform law (|λ| itself uniform) fails the same test.
    mag_u = np.sort(np.random.default_rng(0).uniform(r_min, r_max, len(x)))
    x_bad = (mag_u**2 - r_min**2) / (r_max**2 - r_min**2)
    assert max(np.max(cdf - x_bad), np.max(x_bad - (cdf - 1 / len(x)))) > 1.36 / math.sqrt(len(x))


def test_long_sequence_scale_does_not_grow():
    """γ normalisation: with |λ| up to 0.9999, outputs at 16k steps stay at unit scale."""
    layer = LRU(16, 64, r_min=0.999, r_max=0.9999, rngs=nnx.Rngs(0))
    u = jax.random.normal(jax.random.PRNGKey(1), (1, 16384, 16))
    y = np.asarray(jax.jit(lambda u: layer(u))(u))
    assert np.all(np.isfinite(y))
    early, late = np.std(y[0, 2000:4000]), np.std(y[0, 14000:16384])
    assert late < 2.0 * early and late < 10.0


def test_step_matches_parallel_with_resets():
    layer = LRU(5, 7, rngs=nnx.Rngs(4))
    u = jax.random.normal(jax.random.PRNGKey(2), (3, 12, 5))
    resets = jnp.zeros((3, 12), bool).at[:, 5].set(True).at[1, 9].set(True)
    y = layer(u, resets=resets)
    state = layer.init_state(3)
    outs = []
    for k in range(12):
        state = jnp.where(resets[:, k, None], 0, state)
        out, state = layer.step(u[:, k], state)
        outs.append(out)
    np.testing.assert_allclose(jnp.stack(outs, 1), y, rtol=1e-4, atol=1e-4)
    # the reset really cuts the history: positions after it ignore what came before.
    u2 = u.at[:, :5].set(0.0)
    np.testing.assert_allclose(layer(u2, resets=resets)[:, 5:], y[:, 5:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(r_min=0.9, r_max=0.5), "r_min < r_max"),
        (dict(r_min=0.5, r_max=0.5), "r_min < r_max"),
        (dict(r_max=1.0), "r_max=1.0"),
        (dict(max_phase=0.0), "max_phase must be positive"),
        (dict(max_phase=-1.0), "got -1.0"),
        (dict(scan_method="quick"), "unknown scan method 'quick'"),
    ],
)
def test_bad_configuration(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LRU(4, 8, rngs=nnx.Rngs(0), **kwargs)


def test_wrong_input_width():
    with pytest.raises(ValueError, match="width 4"):
        LRU(4, 8, rngs=nnx.Rngs(0))(jnp.ones((1, 3, 5)))


def _layer_loss_and_grads(method, u, resets):
    layer = LRU(6, 10, r_min=0.4, r_max=0.95, scan_method=method, rngs=nnx.Rngs(4))
    graph, state = nnx.split(layer)

    def loss(state, u):
        y = nnx.merge(graph, state)(u, resets=resets)
        return jnp.sum(y * jnp.linspace(-1, 1, y.shape[-1])) + jnp.sum(y**2)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(state, u)


def test_methods_agree_with_resets_values_and_gradients():
    """Every scan method in the layer, with document resets: loss, parameter and input grads."""
    rng = np.random.default_rng(5)
    u = jnp.asarray(rng.normal(size=(2, 29, 6)).astype(np.float32))
    resets = jnp.asarray(rng.uniform(size=(2, 29)) < 0.15).at[:, 0].set(True)
    ref, (g_ref, gu_ref) = _layer_loss_and_grads("sequential", u, resets)
    for method in ("associative", "chunked", "pallas"):
        out, (g, gu) = _layer_loss_and_grads(method, u, resets)
        np.testing.assert_allclose(out, ref, rtol=1e-5)
        np.testing.assert_allclose(gu, gu_ref, rtol=1e-4, atol=1e-5)
        for (path, x), (_, y) in zip(
            jax.tree_util.tree_leaves_with_path(g), jax.tree_util.tree_leaves_with_path(g_ref)
        ):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5, err_msg=f"{method} {path}")


@pytest.mark.parametrize("method", ["sequential", "associative", "pallas"])
def test_one_state_sized_residual_per_layer(method):
    """Between forward and backward a layer keeps the real and imaginary parts of x, and
    nothing else of shape (b, l, n), resets or not: no complex copy, no reset-gated decay
    array, no separate real/imag copies for the readout (before the planar form: 16 bytes
    per state element without resets, 33 with)."""
    from jax._src.ad_checkpoint import saved_residuals  # the mechanism behind print_saved_residuals

    b, length, n = 2, 40, 24
    u = jnp.ones((b, length, 6))
    graph, state = nnx.split(LRU(6, n, scan_method=method, rngs=nnx.Rngs(0)))
    for resets in (None, jnp.zeros((b, length), bool).at[:, 7].set(True)):
        f = lambda state, u, r=resets: jnp.sum(nnx.merge(graph, state)(u, resets=r))
        big = [x for x, _ in saved_residuals(f, state, u) if x.shape[-2:] == (length, n)]
        assert [(x.shape, x.dtype) for x in big] == [((b, length, n), jnp.float32)] * 2, big


def test_dropout_over_length_keeps_one_mask_per_channel():
    """model.dropout_over_length (the LRA configs, as S5 / minimal-LRU): a dropped channel
    is dropped at every position of its sequence; otherwise elements drop independently."""
    from lrulm import layers

    x = jnp.ones((3, 50, 16))
    key = jax.random.key(0)
    shared = layers.dropout(x, 0.5, key, shared_axes=(1,))
    dropped = shared == 0
    assert jnp.all(dropped == dropped[:, :1])  # the same along the length
    assert 0.2 < dropped[:, 0].mean() < 0.8  # and a real draw per (example, channel)
    assert set(np.unique(np.asarray(shared)).tolist()) == {0.0, 2.0}  # inverted scaling
    free = layers.dropout(x, 0.5, key) == 0
    assert not jnp.all(free == free[:, :1])
    assert layers.dropout(x, 0.5, None, shared_axes=(1,)) is x  # evaluation: identity


def test_lra_configs_use_the_papers_dropout_and_no_clipping():
    """The LRA runs of the paper (S5 / minimal-LRU code): channel dropout shared along the
    sequence, AdamW without gradient clipping."""
    from lrulm import config as config_lib
    from lrulm.data import lra

    for task in lra.TASKS:
        config = config_lib.load(f"configs/lra/{task}.py")
        assert config.model.dropout_over_length is True, task
        assert config.optim.grad_clip == 0.0, task
    assert config_lib.load("configs/lm/tiny.py").model.dropout_over_length is None  # preset
