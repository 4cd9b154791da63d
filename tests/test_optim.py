"""The optimizer: the paper's parameter groups on a real model's tree, the schedule's shape,
and gradient clipping before Adam."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lrulm import optim
from lrulm.model import LanguageModel
from lrulm.model_config import from_preset

LRU_PARAMS = ("nu_log", "theta_log", "gamma_log", "B_re", "B_im", "C_re", "C_im", "D")


def test_recurrent_parameters_get_reduced_lr_and_no_weight_decay():
    params = {
        "lru": {name: jnp.full((3,), 2.0) for name in LRU_PARAMS},
        "glu_gate": {"kernel": jnp.full((3,), 2.0)},
    }
    lr, factor, wd = 0.1, 0.25, 0.5
    tx, _ = optim.make_optimizer(
        lr=lr, total_steps=10, lr_factor=factor, weight_decay=wd, warmup_fraction=0.0
    )
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    # Adam's first step moves each weight by lr (m / sqrt(v) = 1), plus lr * wd * weight.
    for name in ("nu_log", "theta_log", "gamma_log", "B_re", "B_im"):
        np.testing.assert_allclose(updates["lru"][name], -lr * factor, rtol=1e-4)
    for u in (*(updates["lru"][n] for n in ("C_re", "C_im", "D")), updates["glu_gate"]["kernel"]):
        np.testing.assert_allclose(u, -lr * (1 + wd * 2.0), rtol=1e-4)


def test_no_decay_patterns_leave_out_what_they_name():
    """optim.no_decay: the norms' scales and biases (named by path regexes) move by Adam's
    step alone; other non-recurrent weights still decay; recurrent ones are unchanged."""
    params = {
        "stack": {"norm": {"scale": jnp.full((3,), 2.0)}, "mlp_in": {"kernel": jnp.full((3,), 2.0),
                  "bias": jnp.full((3,), 2.0)}, "lru": {"nu_log": jnp.full((3,), 2.0)}},
    }  # fmt: skip
    lr, wd = 0.1, 0.5
    tx, _ = optim.make_optimizer(
        lr=lr, total_steps=10, weight_decay=wd, warmup_fraction=0.0, no_decay="scale$, bias$"
    )
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    s = updates["stack"]
    for u in (s["norm"]["scale"], s["mlp_in"]["bias"], s["lru"]["nu_log"]):
        np.testing.assert_allclose(u, -lr, rtol=1e-4)
    np.testing.assert_allclose(s["mlp_in"]["kernel"], -lr * (1 + wd * 2.0), rtol=1e-4)
    with pytest.raises(ValueError, match=r"optim.no_decay: 'norm\[' is no regular expression"):
        optim.make_optimizer(lr=lr, total_steps=10, no_decay="bias,norm[")
    # A pattern that finds no decayed parameter (a typo; or only recurrent ones, already
    # undecayed) is refused, as is a Python subscript (a character class as a regex).
    optim.check_no_decay(params, "scale$, bias$")
    for typo in ("bais$", "nu_log"):
        with pytest.raises(ValueError, match=re.escape(f"'{typo}' finds none of this model")):
            optim.check_no_decay(params, f"scale$,{typo}")
    with pytest.raises(ValueError, match="reads as a character class"):
        optim.check_no_decay(params, "['stack']")


@pytest.mark.parametrize("scan_layers", [True, False])
def test_a_real_models_groups_are_the_papers(scan_layers):
    """On the tree a LanguageModel really has (stacked or per-layer): ν, θ, γ and B of every
    layer are recurrent; C, D, the embedding, the norms and the MLP are not."""
    config = from_preset("test", vocab_size=64, scan_layers=scan_layers)
    params = nnx.to_pure_dict(nnx.state(LanguageModel(config, rngs=nnx.Rngs(0)), nnx.Param))
    labels = optim._labels(params)
    by_name = {}
    for path, label in jax.tree_util.tree_flatten_with_path(labels)[0]:
        by_name.setdefault(str(path[-1].key), set()).add(label)
    for name in LRU_PARAMS:
        want = "recurrent" if name in optim.RECURRENT_PARAMS else "default"
        assert by_name.pop(name) == {want}, name
    assert by_name and all(v == {"default"} for v in by_name.values()), by_name


def test_schedule_warms_up_and_decays():
    lr, total, warmup = 1e-3, 100, 10
    _, sched = optim.make_optimizer(lr=lr, total_steps=total, warmup_fraction=0.1)
    assert sched(0) < 1e-6 and abs(sched(warmup) - lr) < 1e-9
    np.testing.assert_allclose(sched(5), lr / 2, rtol=1e-3)  # linear warm-up
    # A cosine over the steps after the warm-up, to ~1e-7 at the last step.
    for step in (30, 55, 80, 95):
        cosine = 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
        np.testing.assert_allclose(sched(step), cosine, rtol=1e-2, atol=2e-7)
    assert sched(total) < 2e-7


@pytest.mark.parametrize(
    "kind, points",
    [
        # Down from step 10 to ~0 at 99, the last step trained.
        ("linear", {10: 1.0, 10 + 89 / 2: 0.5, 99: 0.0, 100: 0.0}),
        ("constant", {10: 1.0, 60: 1.0, 100: 1.0}),
        # Warm-up 10, stable to step 80, then linearly to ~0 at step 99.
        ("wsd", {10: 1.0, 50: 1.0, 80: 1.0, 80 + 19 / 2: 0.5, 99: 0.0}),
    ],
)
def test_schedules_after_the_warm_up(kind, points):
    lr = 1e-3
    _, sched = optim.make_optimizer(
        lr=lr, total_steps=100, warmup_fraction=0.1, schedule_kind=kind, decay_fraction=0.2
    )
    np.testing.assert_allclose(sched(5), lr / 2, rtol=1e-3)  # the same warm-up for all
    for step, fraction in points.items():
        np.testing.assert_allclose(sched(step), fraction * lr, rtol=1e-3, atol=2e-7)


@pytest.mark.parametrize("kind", ["cosine", "linear", "wsd"])
def test_the_decay_ends_at_the_final_fraction(kind):
    """optim.final_lr_fraction=0.1: the decay ends at lr / 10 (cosine: at train.steps;
    linear and wsd: at the last step trained), halfway there at its middle."""
    lr = 1e-3
    _, sched = optim.make_optimizer(
        lr=lr, total_steps=100, warmup_fraction=0.1, schedule_kind=kind, final_lr_fraction=0.1
    )
    last, middle = {"cosine": (100, 55), "linear": (99, 54.5), "wsd": (99, 89.5)}[kind]
    np.testing.assert_allclose(sched(last), 0.1 * lr, rtol=1e-3)
    np.testing.assert_allclose(sched(middle), 0.55 * lr, rtol=1e-2)
    with pytest.raises(ValueError, match=r"optim.final_lr_fraction must be in \[0, 1\]"):
        optim.make_optimizer(lr=lr, total_steps=100, final_lr_fraction=1.5)
    # 0, or a fraction below it: the paper's floor of ~1e-7, never 0.
    for fraction in (0.0, 1e-6):
        _, floor = optim.make_optimizer(
            lr=lr, total_steps=100, warmup_fraction=0.1, schedule_kind=kind,
            final_lr_fraction=fraction,
        )  # fmt: skip
        assert float(floor(last)) == pytest.approx(1e-7, rel=1e-3)
    with pytest.raises(ValueError, match="the constant schedule has none"):
        optim.make_optimizer(
            lr=lr, total_steps=100, schedule_kind="constant", final_lr_fraction=0.1
        )


def test_the_default_optimizer_state_keeps_its_tree():
    """The parameter groups of the default optimizer are the paper's two: a third group
    (optim.no_decay) exists only when asked for, so checkpoints of earlier runs restore."""
    params = {"lru": {"nu_log": jnp.ones(2)}, "mlp": {"kernel": jnp.ones(2)}}
    for no_decay, groups in (("", {"recurrent", "default"}), ("kernel", {"recurrent",
                             "default", "no_decay"})):  # fmt: skip
        tx, _ = optim.make_optimizer(lr=0.1, total_steps=10, grad_clip=1.0, no_decay=no_decay)
        (state,) = [s for s in tx.init(params) if hasattr(s, "inner_states")]
        assert set(state.inner_states) == groups


def test_a_resume_compares_the_schedule_it_was_trained_with():
    """The learning rate a resumed checkpoint's config had (run_config._schedule_lr) under
    each schedule; a config from before optim.schedule existed is the cosine."""
    from lrulm import run_config

    trained = {"optim": {"lr": 1e-3, "warmup_fraction": 0.1}, "train": {"steps": 100}}
    _, cosine = optim.make_optimizer(lr=1e-3, total_steps=100, warmup_fraction=0.1)
    assert run_config._schedule_lr(trained, 55) == pytest.approx(float(cosine(55)))
    trained["optim"].update(schedule="wsd", decay_fraction=0.2)
    assert run_config._schedule_lr(trained, 55) == pytest.approx(1e-3)


def test_gradients_are_clipped_before_adam():
    """A spike is clipped before it reaches Adam's moments: two steps with grad_clip=1
    move the weights as an unclipped optimizer does on the gradients scaled to norm <= 1."""
    kwargs = dict(lr=0.1, total_steps=10, weight_decay=0.0, warmup_fraction=0.0)
    clipped, _ = optim.make_optimizer(grad_clip=1.0, **kwargs)
    plain, _ = optim.make_optimizer(**kwargs)
    params = {"w": jnp.zeros((2,))}
    grads = [{"w": jnp.asarray([60.0, 80.0])}, {"w": jnp.asarray([0.3, -0.4])}]
    scaled = [{"w": g["w"] / max(1.0, float(jnp.linalg.norm(g["w"])))} for g in grads]

    def moves(tx, gs):
        state, out = tx.init(params), []
        for g in gs:
            u, state = tx.update(g, state, params)
            out.append(u["w"])
        return out

    for a, b in zip(moves(clipped, grads), moves(plain, scaled)):
        np.testing.assert_allclose(a, b, rtol=1e-5)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_muon_steps_the_hidden_matrices_and_adamw_the_rest(scan_layers):
    """optim.optimizer="muon": each hidden layer's kernel (one per layer of a scanned
    stack) steps by an orthogonalised momentum (its singular values close to one another,
    RMS 0.2 x lr); every other parameter gets AdamW's update, as without Muon."""
    config = from_preset("test", vocab_size=64, scan_layers=scan_layers)
    params = nnx.to_pure_dict(nnx.state(LanguageModel(config, rngs=nnx.Rngs(0)), nnx.Param))
    lr = 0.01
    kw = dict(lr=lr, total_steps=10, warmup_fraction=0.0, grad_clip=0.0)
    muon, _ = optim.make_optimizer(optimizer="muon", **kw)
    adamw, _ = optim.make_optimizer(**kw)
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    keys = jax.random.split(jax.random.key(1), len(leaves))
    grads = jax.tree.unflatten(
        jax.tree.structure(params),
        [jax.random.normal(k, p.shape, p.dtype) for k, (_, p) in zip(keys, leaves)],
    )
    got = jax.tree_util.tree_flatten_with_path(muon.update(grads, muon.init(params), params)[0])[0]
    want = jax.tree.leaves(adamw.update(grads, adamw.init(params), params)[0])
    matrices = 0
    for (path, u), a in zip(got, want):
        if not optim.is_hidden_matrix(path):
            np.testing.assert_allclose(u, a, rtol=1e-5, atol=1e-8, err_msg=str(path))
            continue
        matrices += 1
        name = optim._name(path)
        assert name.endswith("/kernel") and "lru" not in name
        spread = lambda m: (lambda sv: sv.max() / sv.min())(np.linalg.svd(m, compute_uv=False))
        for layer, adam in zip(np.asarray(u).reshape(-1, *u.shape[-2:]),
                               np.asarray(a).reshape(-1, *a.shape[-2:])):  # fmt: skip
            # Newton-Schulz's quintic leaves the singular values within ~[0.6, 1.3].
            assert spread(layer) < 2.5 < spread(adam), name
            assert abs(np.sqrt(np.mean(layer**2)) / lr - 0.2) < 0.06, name
    assert matrices == (4 if scan_layers else 4 * config.num_layers)  # mlp in/out, glu x2
    with pytest.raises(ValueError, match="optim.optimizer must be one of adamw, muon"):
        optim.make_optimizer(optimizer="lion", **kw)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_mu_dtype_keeps_the_first_moment_in_bfloat16(optimizer):
    """optim.mu_dtype=bfloat16: every first moment (Adam's mu, Muon's momentum) is
    bfloat16, the second moment float32; the updates are float32's to bfloat16's precision."""
    config = from_preset("test", vocab_size=64)
    params = nnx.to_pure_dict(nnx.state(LanguageModel(config, rngs=nnx.Rngs(0)), nnx.Param))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    grads = tree.unflatten([jax.random.normal(k, p.shape) for k, p in zip(keys, leaves)])
    kw = dict(lr=0.01, total_steps=10, warmup_fraction=0.0, optimizer=optimizer)
    half, _ = optim.make_optimizer(mu_dtype="bfloat16", **kw)
    full, _ = optim.make_optimizer(**kw)
    state = half.init(params)
    moments = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        names = [str(getattr(k, "name", getattr(k, "key", k))) for k in path]
        kind = "mu" if "mu" in names else "nu" if "nu" in names else None
        if kind and leaf.ndim:
            moments.setdefault(kind, set()).add(leaf.dtype)
    assert moments == {"mu": {np.dtype(jnp.bfloat16)}, "nu": {np.dtype(np.float32)}}
    for _ in range(2):
        u_half, state = half.update(grads, state, params)
    full_state = full.init(params)
    for _ in range(2):
        u_full, full_state = full.update(grads, full_state, params)
    for a, b in zip(jax.tree.leaves(u_half), jax.tree.leaves(u_full)):
        assert a.dtype == b.dtype == jnp.float32
        assert np.linalg.norm(a - b) <= 2e-2 * np.linalg.norm(b) + 1e-6
    with pytest.raises(ValueError, match="optim.mu_dtype must be one of"):
        optim.make_optimizer(mu_dtype="fp8", **kw)
