"""The LM train step's program: the depth is a scan, sizes that do not divide the mesh,
remat's memory, the vocabulary-blocked loss (values, gradients, no scatter, memory), the
initial logits' scale and bfloat16 logits."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from run_helpers import TINY
from run_helpers import tiny_config as _config

from lrulm import config as config_lib
from lrulm import experiment, tasks, train


def _step_program(*overrides):
    config = config_lib.load_with_overrides(
        TINY,
        [("model.vocab_size", "512"), ("mesh.data", "1")]
        + [tuple(o.split("=")) for o in overrides],
    )
    mesh = experiment.make_mesh(config, jax.devices()[:1])
    exp = experiment.build(config, tasks.make_task(config, None, prepare_data=False), mesh)
    train_jit, _ = train.jit_steps(exp)
    batch = {
        k: jax.ShapeDtypeStruct(s, d, sharding=exp.batch_shardings[k])
        for k, (s, d) in exp.batch_spec.items()
    }
    return exp, train_jit.lower(exp.abstract_state, batch)


def test_depth_is_a_scan_so_the_program_does_not_grow():
    sizes = {k: len(_step_program(f"model.num_layers={k}")[1].as_text()) for k in (2, 8)}
    assert abs(sizes[8] - sizes[2]) < 0.02 * sizes[2], sizes
    unrolled = len(_step_program("model.num_layers=8", "model.scan_layers=False")[1].as_text())
    assert unrolled > 2 * sizes[8]


@pytest.mark.parametrize(
    "mesh, widths, warned",
    [
        (["mesh.data=1", "mesh.fsdp=8"], [], False),
        (["mesh.data=1", "mesh.fsdp=8"], ["model.d_model=36"], True),
        (["mesh.data=4", "mesh.tensor=2"], [], False),
        (["mesh.data=1", "mesh.tensor=8"], ["model.d_state=36", "model.d_ff=36"], True),
    ],
)
def test_sizes_that_do_not_divide_the_mesh_are_said(mesh, widths, warned, capsys):
    """spec_for keeps an array whole on an axis its dimension does not divide by; when
    that leaves much of the model unsplit, the run says so (not a silent replica)."""
    config = _config("model.vocab_size=512", *mesh, *widths)
    exp = experiment.build(
        config, tasks.make_task(config, None, prepare_data=False), experiment.make_mesh(config)
    )
    out = capsys.readouterr().out
    assert ("are not split over the mesh axes meant to split them" in out) == warned, out
    if warned:
        axis = "fsdp=8" if "mesh.fsdp=8" in mesh else "tensor=8"
        assert f"(36) over {axis}" in out
    # The warning tells the truth: the share of the parameters' bytes on one device.
    sizes = lambda f: [f(s, x) for s, x in zip(*map(jax.tree.leaves, (shardings, abstract)))]
    shardings, abstract = exp.state_shardings["params"], exp.abstract_state["params"]
    held = sum(sizes(lambda s, x: math.prod(s.shard_shape(x.shape))))
    share = held / sum(sizes(lambda s, x: math.prod(x.shape)))
    split = exp.mesh.shape["fsdp"] * exp.mesh.shape["tensor"]
    assert share > 2 / split if warned else share < 1.5 / split, share


def test_remat_policies_change_memory_not_math():
    rng = np.random.default_rng(0)
    results = {}
    for policy in ("none", "full", "dots", "lru"):
        exp, lowered = _step_program(f"model.remat={policy}", "train.seq_len=256")
        train_step = lowered.compile()  # the program measured is the one run
        temp = train_step.memory_analysis().temp_size_in_bytes
        state = jax.jit(exp.init_fn, out_shardings=exp.state_shardings)(jax.random.key(0))
        batch = {
            k: rng.integers(4, 500, s).astype(np.int32) for k, (s, _) in exp.batch_spec.items()
        }
        rng = np.random.default_rng(0)
        state, metrics = train_step(state, batch)
        results[policy] = (temp, float(metrics["train/loss"]), float(metrics["train/grad_norm"]))
    for policy, (_, loss, norm) in results.items():
        np.testing.assert_allclose(loss, results["none"][1], rtol=1e-6, err_msg=policy)
        np.testing.assert_allclose(norm, results["none"][2], rtol=1e-5, err_msg=policy)
    print({p: f"{t / 2**20:.1f} MiB" for p, (t, _, _) in results.items()})
    assert results["full"][0] < 0.7 * results["none"][0]


def test_remat_wraps_each_layer_when_layers_are_not_scanned():
    """With model.scan_layers=False each block is its own rematerialised call (outside a
    scan, jax marks its recomputation with an optimization barrier so that XLA cannot
    merge it back into the forward pass); the step's math is unchanged."""
    results = {}
    for policy in ("none", "full"):
        exp, lowered = _step_program(
            f"model.remat={policy}", "model.scan_layers=False", "model.num_layers=3"
        )
        results[policy] = lowered.as_text().count("stablehlo.optimization_barrier")
        state = jax.jit(exp.init_fn, out_shardings=exp.state_shardings)(jax.random.key(0))
        rng = np.random.default_rng(0)
        batch = {
            k: rng.integers(4, 500, s).astype(np.int32) for k, (s, _) in exp.batch_spec.items()
        }
        _, metrics = lowered.compile()(state, batch)
        results[policy, "norm"] = float(metrics["train/grad_norm"])
    assert results["none"] == 0 and results["full"] == 3, results
    np.testing.assert_allclose(results["full", "norm"], results["none", "norm"], rtol=1e-5)


@pytest.mark.parametrize(
    "block,dtype",
    [(0, "float32"), (128, "float32"), (300, "float32"), (0, "bfloat16"), (300, "bfloat16")],
)
def test_vocab_blocked_loss_equals_the_full_softmax(block, dtype):
    """The blocked loss (its hand-written VJP) against optax on the whole logits; the
    per-position weights make the cotangent differ between positions."""
    from lrulm.model import cross_entropy_and_lse

    rng = np.random.default_rng(block)
    x = jnp.asarray(rng.normal(size=(2, 9, 16)), dtype)
    w = jnp.asarray(rng.normal(size=(16, 1024)), dtype)
    targets = rng.integers(0, 1024, (2, 9))
    best = np.asarray(jnp.einsum("blh,hv->blv", x, w, preferred_element_type=jnp.float32))
    targets[:, ::2] = best[:, ::2].argmax(-1)  # right predictions, from several blocks
    targets = jnp.asarray(targets, jnp.int32)

    weights = jnp.linspace(0.5, 1.5, 9)
    z = 0.01  # a z-loss on log Z: its gradient goes through the log-partition output

    def total(x, w, block):
        losses, lse, correct = cross_entropy_and_lse(x, w, targets, vocab_block=block)
        return jnp.sum((losses + z * lse**2) * weights), correct

    def reference(x, w):  # optax on the whole logits, in float32
        logits = jnp.einsum("blh,hv->blv", x, w, preferred_element_type=jnp.float32)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        lse = jax.nn.logsumexp(logits, -1)
        return jnp.sum((losses + z * lse**2) * weights), jnp.argmax(logits, -1) == targets

    (ref, ref_ok), ref_grads = jax.value_and_grad(reference, (0, 1), has_aux=True)(x, w)
    (got, ok), grads = jax.jit(jax.value_and_grad(total, (0, 1), has_aux=True), static_argnums=2)(
        x, w, block
    )
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    np.testing.assert_array_equal(ok, ref_ok)
    assert ok[:, ::2].all() and not ok[:, 1::2].any()
    tol = 1e-5 if dtype == "float32" else 1e-2  # bf16 gradients: relative to their scale
    for a, b in zip(grads, ref_grads):
        assert a.dtype == b.dtype == jnp.dtype(dtype)
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, rtol=10 * tol, atol=tol * np.abs(b).max())


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("preset", ["test", "tiny"])
def test_initial_logits_have_unit_scale(tie, preset):
    """Tied embeddings (N(0, 1)) are scaled by d_model**-0.5 in the head, as the untied
    head's init is: the first loss is near ln(vocab), whatever the width."""
    from flax import nnx

    from lrulm.model import LanguageModel
    from lrulm.model_config import from_preset

    model = LanguageModel(from_preset(preset, vocab_size=512, tie_embeddings=tie), rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 512, (4, 64)))
    assert 0.8 < float(jnp.std(model(tokens))) < 1.25


@pytest.mark.parametrize("tie", [False, True])
def test_bfloat16_model_logits_are_the_ones_the_loss_trains(tie):
    """Generation and `lrulm eval` read the model's logits; training reads cross_entropy
    (blocked or not). In a bfloat16 model all three are the float32 product of the
    bfloat16 features and head: none is rounded to bfloat16 first."""
    from flax import nnx

    from lrulm.model import LanguageModel, cross_entropy
    from lrulm.model_config import from_preset

    cfg = from_preset("test", vocab_size=512, dtype="bfloat16", tie_embeddings=tie)
    model = LanguageModel(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 512, (2, 16)), jnp.int32)
    targets = jnp.roll(tokens, -1, axis=1)
    scale = 8.0  # logits of a trained model's size: bf16 rounding would cost ~0.03 nats
    logits = scale * model(tokens)
    from_logits = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    x = model.features(tokens)
    w = model.head_weight(x.dtype) * jnp.asarray(scale, x.dtype)
    for block in (0, 128):
        losses, _ = cross_entropy(x, w, targets, vocab_block=block)
        np.testing.assert_allclose(losses, from_logits, rtol=1e-5, atol=1e-5)
        # ... and the gradient's matmuls stay bfloat16 (float32 accumulation): autodiff of
        # a float32 product would make both backward matmuls float32.
        grad = jax.grad(lambda x, w, b=block: cross_entropy(x, w, targets, vocab_block=b)[0].sum())
        dots = _equations(jax.make_jaxpr(grad)(x, w).jaxpr, "dot_general")
        assert dots and {str(v.aval.dtype) for e in dots for v in e.invars} == {"bfloat16"}


def _equations(jaxpr, name: str) -> list:
    """The equations of a primitive in jaxpr and every jaxpr inside it."""
    found = [e for e in jaxpr.eqns if e.primitive.name == name]
    for e in jaxpr.eqns:
        for param in e.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += _equations(inner, name)
    return found


def test_vocab_blocked_loss_gradient_has_no_scatter():
    """The target's logit is picked by a compare inside each block, in the forward and in
    the hand-written backward: no gather, so no scatter in the gradient (XLA's TPU
    compiler builds that scatter as several (length, block) buffers at batch 1)."""
    from lrulm.model import cross_entropy

    def total(x, w, targets):
        return jnp.sum(cross_entropy(x, w, targets, vocab_block=128)[0])

    args = (jnp.zeros((1, 64, 16), jnp.bfloat16), jnp.zeros((16, 500), jnp.bfloat16),
            jnp.zeros((1, 64), jnp.int32))  # fmt: skip
    hlo = jax.jit(jax.grad(total, (0, 1))).lower(*args).as_text()
    assert "while" in hlo  # the blocks are a loop
    for op in ("scatter", "gather"):
        assert f"stablehlo.{op}" not in hlo, op


def test_vocab_blocked_loss_saves_memory():
    sizes = {}
    for block in (0, 512):
        _, lowered = _step_program(
            f"train.loss_vocab_block={block}", "train.seq_len=512", "model.remat=full",
            "model.vocab_size=4096",
        )  # fmt: skip
        sizes[block] = lowered.compile().memory_analysis().temp_size_in_bytes
    print({b: f"{t / 2**20:.0f} MiB" for b, t in sizes.items()})
    assert sizes[512] < 0.5 * sizes[0], sizes
