"""optim.ema: a moving average of the weights, kept in the train state and checkpoints,
evaluated in place of the weights and read by generate, score and export_params."""

import functools
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from run_helpers import tiny_config

from lrulm import checkpoint as ckpt_lib
from lrulm import evaluation, experiment, generate, optim, score, train


def test_the_decay_warms_up_to_its_value():
    """min(decay, (1 + t) / (10 + t)): 0.1 at the first step, the set decay from
    (1 + t) / (10 + t) >= decay on."""
    decays = [float(optim.ema_decay(t, 0.99)) for t in (0, 1, 10, 880, 900, 10**6)]
    np.testing.assert_allclose(decays[:3], [0.1, 2 / 11, 11 / 20], rtol=1e-6)
    assert decays[3] < 0.99 and decays[4] == decays[5] == pytest.approx(0.99)
    avg = optim.update_ema({"w": jnp.ones(2, jnp.bfloat16)}, {"w": jnp.zeros(2)}, 10**6, 0.9)
    assert avg["w"].dtype == jnp.bfloat16 and float(avg["w"][0]) == pytest.approx(0.9, 1e-2)


class _Weights(nnx.Module):
    def __init__(self):
        self.w = nnx.Param(jnp.array([1.0, -2.0, 3.0]))


class _SumTask:
    """loss = sum(w) * batch["scale"] (NaN: a non-finite step)."""

    def loss(self, model, batch, *, train, key):
        return jnp.sum(model.w[...]) * batch["scale"], 1.0, {}


def test_the_step_averages_the_weights_and_evaluation_reads_the_average():
    graphdef, params = nnx.split(_Weights(), nnx.Param)
    params = nnx.to_pure_dict(params)
    tx = optax.sgd(0.5)
    state = dict(
        step=jnp.int32(0), rng=jax.random.key_data(jax.random.key(0)), params=params,
        model_state={}, opt_state=tx.init(params), nonfinite_step=jnp.int32(-1),
        ema_params=jax.tree.map(jnp.copy, params),
    )  # fmt: skip
    step = lambda s, scale: train.train_step(
        s, {"scale": jnp.float32(scale)}, graphdef=graphdef, task=_SumTask(), tx=tx,
        schedule=lambda _: 0.5, accum=1, ema=0.9,
    )[0]  # fmt: skip
    w = np.array([1.0, -2.0, 3.0])
    avg = w.copy()
    for t in range(4):  # sgd on sum(w): every weight drops by lr a step
        state = step(state, 1.0)
        w = w - 0.5
        d = min(0.9, (1 + t) / (10 + t))
        avg = d * avg + (1 - d) * w
        np.testing.assert_allclose(state["params"]["w"], w, rtol=1e-6)
        np.testing.assert_allclose(state["ema_params"]["w"], avg, rtol=1e-6)
    kept = jax.tree.map(np.asarray, state)
    state = step(state, np.nan)  # a non-finite step changes neither the weights nor the average
    np.testing.assert_array_equal(state["ema_params"]["w"], kept["ema_params"]["w"])
    np.testing.assert_array_equal(state["params"]["w"], kept["params"]["w"])
    out = train.eval_step(kept, {"scale": jnp.float32(1.0)}, graphdef=graphdef, task=_SumTask())
    assert float(out["loss"]) == pytest.approx(avg.sum(), rel=1e-6) != w.sum()


def _run(workdir, corpus, *overrides):
    config = tiny_config(
        "train.steps=6", "train.eval_every=3", "checkpoint.every_steps=3",
        "checkpoint.async_save=false", *overrides, corpus=corpus,
    )  # fmt: skip
    return train.train_and_evaluate(config, str(workdir)), config


def _saved(workdir, step, key):
    item = os.path.join(workdir, "checkpoints", str(step), "state")
    return jax.tree.map(np.asarray, ckpt_lib.read_numpy(item, key))


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory, corpus):
    workdir = tmp_path_factory.mktemp("ema") / "run"
    result, config = _run(workdir, corpus, "optim.ema=0.9")
    return str(workdir), config, result


def test_a_run_evaluates_and_keeps_the_average_and_resumes_it_exactly(ema_run, tmp_path, corpus):
    """The checkpoint keeps ema_params beside params (as the parameters' shapes); the
    run's evaluation, `lrulm eval` and the average's own loss agree; a run resumed from
    step 3 ends with the same average, bit for bit."""
    workdir, config, result = ema_run
    avg, raw = _saved(workdir, 6, "ema_params"), _saved(workdir, 6, "params")
    assert jax.tree.map(np.shape, avg) == jax.tree.map(np.shape, raw)
    assert any(not np.array_equal(a, r) for a, r in zip(jax.tree.leaves(avg), jax.tree.leaves(raw)))
    evaluated = evaluation.evaluate_workdir(config, workdir)
    assert evaluated["eval/loss"] == pytest.approx(result["loss"], abs=1e-5)

    resumed = str(tmp_path / "resumed")
    shutil.copytree(workdir, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "6"))
    _run(resumed, corpus, "optim.ema=0.9")
    for a, b in zip(jax.tree.leaves(avg), jax.tree.leaves(_saved(resumed, 6, "ema_params"))):
        np.testing.assert_array_equal(a, b)


def test_generate_score_and_export_read_the_average_unless_told(ema_run, tmp_path):
    workdir, _, _ = ema_run
    text = ["def f(x):\n    return x + 1\n"]
    by = {w: score.score_texts(workdir, text, weights=w)[0]["loss"] for w in ("auto", "ema", "raw")}
    assert by["auto"] == by["ema"] != by["raw"]
    model, _, _ = generate.load_model(workdir, weights="raw")
    raw = _saved(workdir, 6, "params")
    np.testing.assert_array_equal(model.embed.embedding[...], raw["embed"]["embedding"])

    out = tmp_path / "p.npz"
    tool = [sys.executable, "tools/export_params.py", workdir, "--output", str(out)]
    for weights, key in (("auto", "ema_params"), ("raw", "params")):
        proc = subprocess.run([*tool, "--weights", weights], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        with np.load(out) as z:
            assert str(z["__weights__"]) == key
            want = _saved(workdir, 6, key)["embed"]["embedding"]
            np.testing.assert_array_equal(z["embed/embedding"], want)
    assert "(the trained weights)" in proc.stdout


def test_the_average_switched_on_or_off_on_resume(
    tmp_path, corpus, lm_workdir, capsys, damage_checkpoint
):
    """Turned on for a resumed run, the average starts from the restored weights; turned
    off, it is dropped from then on (said both times); an evaluation reads a checkpoint's
    average wherever it keeps one. Asking for an average a run never kept is an error."""
    run = str(tmp_path / "run")
    shutil.copytree(lm_workdir, run)  # steps 4 and 8, no average
    with pytest.raises(ckpt_lib.NoWeightAverage, match="keeps no weight average"):
        generate.load_model(run, weights="ema")
    config = tiny_config(
        "train.steps=10", "train.eval_every=10", "checkpoint.every_steps=2",
        "checkpoint.async_save=false", "optim.ema=0.5", corpus=corpus,
    )  # fmt: skip
    train.train_and_evaluate(config, run)
    assert "the weight average starts from step 8's weights" in capsys.readouterr().out
    assert "ema_params" in ckpt_lib.saved_tree(os.path.join(run, "checkpoints", "10", "state"))
    on = evaluation.evaluate_workdir(config, run)
    config.train.steps, config.optim.ema = 12, 0.0
    train.train_and_evaluate(config, run)
    assert "the weight average of step 10's checkpoint is not carried on" in (
        capsys.readouterr().out
    )
    assert "ema_params" not in ckpt_lib.saved_tree(os.path.join(run, "checkpoints", "12", "state"))
    # Step 10's checkpoint under a config without the average: its average is evaluated.
    assert evaluation.evaluate_workdir(config, run, step=10) == on
    with open(os.path.join(run, "config.json")) as f:
        assert json.load(f)["optim"]["ema"] == 0.0
    # Checkpoints of one run differ: with step 12 damaged, a resume under optim.ema falls
    # back to step 10 (with an average) and an evaluation under ema=0 to it as well; with
    # 10 and 12 damaged, to step 8 (without).
    damage_checkpoint(os.path.join(run, "checkpoints", "12"))
    assert evaluation.evaluate_workdir(config, run) == on
    damage_checkpoint(os.path.join(run, "checkpoints", "10"))
    config.optim.ema, config.train.steps = 0.5, 14
    train.train_and_evaluate(config, run)
    out = capsys.readouterr().out
    assert "resumed from" in out and "checkpoints/8" in out and "starts from step 8's" in out


def test_an_average_dropped_on_resume_frees_its_arrays():
    """match_ema without optim.ema deletes the restored average (the restored state stays
    referenced, and only donated arrays are freed by the step)."""
    import types

    exp = types.SimpleNamespace(abstract_state={"params": None})
    avg = {"w": jnp.ones(3)}
    state = experiment.match_ema({"params": {"w": jnp.zeros(3)}, "ema_params": avg}, exp, 5)
    assert set(state) == {"params"} and avg["w"].is_deleted()
    assert not state["params"]["w"].is_deleted()
    # Switched on: the average starts as a copy of the restored weights (its own buffer).
    exp = types.SimpleNamespace(abstract_state={"params": None, "ema_params": None})
    weights = {"w": jnp.arange(3.0)}
    state = experiment.match_ema({"params": weights}, exp, 5)
    np.testing.assert_array_equal(state["ema_params"]["w"], weights["w"])
    assert state["ema_params"]["w"] is not weights["w"]


def test_a_bad_decay_is_refused_before_anything_runs(tmp_path, corpus):
    for bad in ("1.0", "-0.1", "nan"):
        with pytest.raises(ValueError, match=r"optim.ema must be in \[0, 1\)"):
            _run(tmp_path / "bad", corpus, f"optim.ema={bad}")
        assert not (tmp_path / "bad").exists()


# Plain Orbax, as a user without lrulm restores: it warns that it reads the shardings from
# the checkpoint (which it does, onto this host's devices).
@pytest.mark.filterwarnings("ignore:Sharding info not provided when restoring")
def test_plain_orbax_reads_the_average(ema_run):
    workdir, _, _ = ema_run
    restored = ocp.PyTreeCheckpointer().restore(os.path.join(workdir, "checkpoints", "6", "state"))
    assert set(restored) >= {"params", "ema_params", "opt_state"}


def test_init_from_a_run_with_an_average_starts_from_the_average(ema_run, tmp_path, corpus):
    workdir, _, _ = ema_run
    config = tiny_config(
        "train.steps=1", "train.eval_every=0", "checkpoint.async_save=false",
        "optim.lr=1e-12", "optim.weight_decay=0", f"checkpoint.init_from={workdir}",
        corpus=corpus,
    )  # fmt: skip
    train.train_and_evaluate(config, str(tmp_path / "tuned"))
    started = _saved(str(tmp_path / "tuned"), 1, "params")
    for a, b in zip(jax.tree.leaves(started), jax.tree.leaves(_saved(workdir, 6, "ema_params"))):
        np.testing.assert_allclose(a, b, atol=1e-6)
    raw = jax.tree.leaves(_saved(workdir, 6, "params"))
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(started), raw)) > 1e-4


def test_batchnorm_statistics_are_averaged_with_the_weights():
    """An LRA classifier with BatchNorm (the paper's): the state keeps "ema_model_state",
    the running statistics averaged as the weights are, and evaluation uses both; a
    language model (no statistics) keeps no such entry."""
    from lrulm import config as config_lib
    from lrulm import experiment, tasks

    config = config_lib.load_with_overrides(
        "configs/lra/listops.py:tiny", [("optim.ema", "0.9"), ("model.dropout", "0.0")]
    )
    task = tasks.make_task(config, None, prepare_data=False)
    exp = experiment.build(config, task, experiment.make_mesh(config))
    state = jax.jit(exp.init_fn)(jax.random.key(0))
    assert set(state) >= {"ema_params", "ema_model_state"}
    b, length = config.train.global_batch_size, config.train.seq_len
    rng = np.random.default_rng(0)
    step = functools.partial(
        train.train_step, graphdef=exp.graphdef, task=task, tx=exp.tx, schedule=exp.schedule,
        accum=1, ema=0.9,
    )  # fmt: skip
    avg = jax.tree.map(np.asarray, state["model_state"])
    for t in range(3):
        batch = {
            "inputs": jnp.asarray(rng.integers(1, 10, (b, length)), jnp.int32),
            "mask": jnp.ones((b, length), bool),
            "label": jnp.asarray(rng.integers(0, 10, b), jnp.int32),
            "weight": jnp.ones((b,), jnp.float32),
        }
        state, _ = step(state, batch)
        d = min(0.9, (1 + t) / (10 + t))
        blend = functools.partial(lambda a, m, d: d * a + (1 - d) * np.asarray(m), d=d)
        avg = jax.tree.map(blend, avg, state["model_state"])
    for a, b_ in zip(jax.tree.leaves(avg), jax.tree.leaves(state["ema_model_state"])):
        np.testing.assert_allclose(a, b_, rtol=1e-5, atol=1e-7)
    raw = jax.tree.leaves(state["model_state"])
    assert any(not np.allclose(a, r) for a, r in zip(jax.tree.leaves(avg), raw))
    kept = jax.tree.map(np.asarray, state["ema_model_state"])
    nan_batch = {**batch, "weight": jnp.full((b,), jnp.nan)}  # a non-finite step
    same, _ = step(jax.tree.map(jnp.copy, state), nan_batch)
    for a, b_ in zip(jax.tree.leaves(kept), jax.tree.leaves(same["ema_model_state"])):
        np.testing.assert_array_equal(a, b_)
    out = train.eval_step(state, batch, graphdef=exp.graphdef, task=task)
    merged = nnx.merge(exp.graphdef, state["ema_params"], state["ema_model_state"])
    want, _, _ = task.loss(merged, batch, train=False, key=None)
    np.testing.assert_allclose(out["loss"], want, rtol=1e-5)

    lm_config = tiny_config("optim.ema=0.9")
    lm_task = tasks.make_task(lm_config, None, prepare_data=False)
    lm = experiment.build(lm_config, lm_task, experiment.make_mesh(lm_config))
    assert "ema_params" in lm.abstract_state and "ema_model_state" not in lm.abstract_state


def test_the_commands_pass_weights_on(lm_workdir, capsys, monkeypatch):
    """`lrulm generate/score --weights ema` on a run without an average: the error says so
    (the flag reaches the loader)."""
    from lrulm import metrics as metrics_lib
    from lrulm.main import main

    monkeypatch.setattr(metrics_lib, "_MESSAGES_TO_STDERR", metrics_lib._MESSAGES_TO_STDERR)
    for args in (["generate", "--prompt", "x", "--max_new_tokens", "2"], ["score", "--text", "x"]):
        assert main([*args, "--workdir", lm_workdir, "--weights", "ema"]) != 0
        assert "keeps no weight average" in capsys.readouterr().err
