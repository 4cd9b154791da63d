"""train_step, eval_step and the language-model task's loss and metrics, on hand-made
inputs where the right answer is known without running the code under test."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lrulm import config as config_lib
from lrulm import tasks, train
from lrulm.data import tokenizer as tok
from lrulm.data.cache import TokenStream
from lrulm.model import Classifier, LanguageModel
from lrulm.model_config import from_preset


def _lm_task(*overrides):
    config = config_lib.load_with_overrides(
        "configs/lm/tiny.py:test", [tuple(o.split("=", 1)) for o in overrides]
    )
    return tasks.LMTask(config, None, prepare_data=False)


class _DrawTask:
    """A task whose loss scales the weights by a draw from the step's key (as dropout
    would); the draw is reported."""

    def loss(self, model, batch, *, train, key):
        draw = jax.random.uniform(key)
        return jnp.sum(model.w[...]) * draw, 1.0, {"draw": draw}


class _Weights(nnx.Module):
    def __init__(self):
        self.w = nnx.Param(jnp.ones((3,)))


def test_each_step_draws_its_own_dropout_key():
    """The key is folded with the step: a new draw each step, the same one for the same
    step and seed (what makes a resumed run bit-identical)."""
    graphdef, params = nnx.split(_Weights(), nnx.Param)
    params = nnx.to_pure_dict(params)
    tx = optax.sgd(0.0)

    def draws(seed, steps):
        state = dict(
            step=jnp.int32(0),
            rng=jax.random.key_data(jax.random.key(seed)),
            params=params,
            model_state={},
            opt_state=tx.init(params),
            nonfinite_step=jnp.int32(-1),
        )
        out = []
        for _ in range(steps):
            state, m = train.train_step(
                state, {}, graphdef=graphdef, task=_DrawTask(), tx=tx,
                schedule=lambda s: 0.0, accum=1,
            )  # fmt: skip
            out.append(float(m["train/draw"]))
        return out

    first = draws(0, 3)
    assert len(set(first)) == 3, first
    assert draws(0, 3) == first and draws(1, 3) != first


def test_eval_step_uses_the_running_statistics():
    """A batch-norm classifier evaluates with its running statistics (train=False): a
    row's logits do not depend on the other rows of the batch."""
    cfg = from_preset("test", vocab_size=16, norm="batch", d_ff=0)
    graphdef, params, rest = nnx.split(
        Classifier(cfg, num_classes=3, rngs=nnx.Rngs(0)), nnx.Param, ...
    )
    state = {"params": nnx.to_pure_dict(params), "model_state": nnx.to_pure_dict(rest)}

    class FirstRow:
        def loss(self, model, batch, *, train, key):
            logits = model(batch["inputs"], batch["mask"], train=train, key=key)
            return jnp.sum(logits[0]), 1.0, {}

    rng = np.random.default_rng(0)
    inputs = rng.integers(1, 16, (4, 32))
    mask = jnp.ones((4, 32), bool)
    losses = []
    for scale in (1, 3):
        inputs[1:] = rng.integers(1, 16 // scale, (3, 32))  # other rows, other statistics
        batch = {"inputs": jnp.asarray(inputs), "mask": mask}
        losses.append(
            float(train.eval_step(state, batch, graphdef=graphdef, task=FirstRow())["loss"])
        )
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)


def test_lm_loss_starts_a_new_document_after_each_eos():
    """With data.reset_at_doc_boundaries the loss of a packed row is the sum of its
    documents' losses, each document scored alone from a zero state; the EOS itself
    still belongs to the document it ends (its logits predict the next one's first token)."""
    task = _lm_task()
    model = LanguageModel(from_preset("test", vocab_size=64), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    row = rng.integers(4, 64, 25)
    row[[6, 15]] = tok.EOS_ID  # documents: [0..6], [7..15], [16..24]
    inputs, targets = jnp.asarray(row[None, :-1]), jnp.asarray(row[None, 1:])
    total, weight, _ = task.loss(
        model, {"inputs": inputs, "targets": targets}, train=False, key=None
    )
    parts = 0.0
    for start, stop in ((0, 7), (7, 16), (16, 24)):
        logits = model(inputs[:, start:stop])
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        parts -= float(jnp.take_along_axis(logp, targets[:, start:stop, None], -1).sum())
    assert float(weight) == 24
    np.testing.assert_allclose(float(total), parts, rtol=1e-5)
    # Without resets the state runs through the EOS: another (larger-context) loss.
    plain = _lm_task("data.reset_at_doc_boundaries=False")
    other, _, _ = plain.loss(model, {"inputs": inputs, "targets": targets}, train=False, key=None)
    assert abs(float(other) - parts) > 1e-3


@pytest.mark.parametrize("bytes_per_token", [1.0, 3.5])
def test_lm_metrics_from_summed_statistics(bytes_per_token):
    task = _lm_task()
    tokens = 1000
    stream = TokenStream("", tokens, int(tokens * bytes_per_token), num_docs=1)
    task.held_out["eval"] = tasks.HeldOut([], None, None, stream.bytes_per_token, stream)
    out = task.finalize({"loss": 2.0 * 50, "weight": 50.0, "accuracy": 20.0})
    assert out["loss"] == 2.0 and out["accuracy"] == 0.4 and out["tokens"] == 50
    np.testing.assert_allclose(out["perplexity"], math.exp(2.0))
    np.testing.assert_allclose(out["bits_per_byte"], 2.0 / math.log(2) / bytes_per_token)


def test_z_loss_is_trained_not_evaluated():
    """train.z_loss adds z * (log Z)**2 a scored token to the trained loss, reported as
    z_loss; an evaluation scores the plain cross-entropy."""
    task = _lm_task("train.z_loss=0.01")
    model = LanguageModel(from_preset("test", vocab_size=64), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    tokens = rng.integers(4, 64, (2, 17))
    tokens[1, 12:] = tok.PAD_ID  # padding: not scored
    batch = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:])}
    trained, weight, aux = task.loss(model, batch, train=True, key=jax.random.key(0))
    evaluated, _, eval_aux = task.loss(model, batch, train=False, key=None)
    logits = model(batch["inputs"]).astype(jnp.float32)
    weights = batch["targets"] != tok.PAD_ID
    want = 0.01 * jnp.sum(jnp.where(weights, jax.nn.logsumexp(logits, -1) ** 2, 0.0))
    np.testing.assert_allclose(aux["z_loss"], want, rtol=1e-5)
    np.testing.assert_allclose(trained - evaluated, want, rtol=1e-4)
    assert "z_loss" not in eval_aux and float(weight) == weights.sum()


@pytest.mark.parametrize("vocab_block", [0, 24])
def test_label_smoothing_trains_against_the_smoothed_targets(vocab_block):
    """train.label_smoothing=e: the trained loss is the cross-entropy against (1 - e)
    onehot + e uniform over the tokenizer's ids (the model's vocabulary may be larger),
    in value and gradient, with or without the vocabulary-blocked loss; train/cross_entropy
    and evaluations keep the plain cross-entropy."""
    import types

    task = _lm_task("train.label_smoothing=0.2", f"train.loss_vocab_block={vocab_block}")
    task.sp = types.SimpleNamespace(get_piece_size=lambda: 50)  # ids 50..63: padding rows
    graphdef, params = nnx.split(
        LanguageModel(from_preset("test", vocab_size=64), rngs=nnx.Rngs(0)), nnx.Param
    )
    rng = np.random.default_rng(2)
    tokens = rng.integers(4, 50, (2, 17))
    tokens[0, 10:] = tok.PAD_ID
    batch = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:])}

    def smoothed(params):
        logp = jax.nn.log_softmax(nnx.merge(graphdef, params)(batch["inputs"]).astype(jnp.float32))
        q = 0.8 * jax.nn.one_hot(batch["targets"], 64) + 0.2 * (jnp.arange(64) < 50) / 50
        per_token = -jnp.sum(q * logp, -1)
        return jnp.sum(jnp.where(batch["targets"] != tok.PAD_ID, per_token, 0.0))

    def trained(params):
        loss, _, aux = task.loss(nnx.merge(graphdef, params), batch, train=True, key=None)
        return loss, aux

    (value, aux), grads = jax.value_and_grad(trained, has_aux=True)(params)
    np.testing.assert_allclose(value, smoothed(params), rtol=1e-5)
    for g, want in zip(jax.tree.leaves(grads), jax.tree.leaves(jax.grad(smoothed)(params))):
        np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-6)
    evaluated, _, eval_aux = task.loss(nnx.merge(graphdef, params), batch, train=False, key=None)
    np.testing.assert_allclose(aux["cross_entropy"], evaluated, rtol=1e-6)
    assert "cross_entropy" not in eval_aux and abs(float(evaluated) - float(value)) > 1e-3


def test_label_smoothing_of_a_classifier():
    config = config_lib.load_with_overrides(
        "configs/lra/listops.py:tiny", [("train.label_smoothing", "0.1")]
    )
    task = tasks.make_task(config, None, prepare_data=False)
    model = task.make_model(nnx.Rngs(0))
    rng = np.random.default_rng(0)
    batch = {
        "inputs": jnp.asarray(rng.integers(1, 10, (4, config.train.seq_len))),
        "mask": jnp.ones((4, config.train.seq_len), bool),
        "label": jnp.asarray([0, 3, 9, 1]),
        "weight": jnp.asarray([1.0, 1.0, 0.0, 1.0]),
    }
    loss, _, aux = task.loss(model, batch, train=True, key=jax.random.key(0))
    logits = model(batch["inputs"], batch["mask"], train=True, key=jax.random.key(0))
    q = 0.9 * jax.nn.one_hot(batch["label"], 10) + 0.1 / 10
    want = jnp.sum(-jnp.sum(q * jax.nn.log_softmax(logits), -1) * batch["weight"])
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    plain = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    np.testing.assert_allclose(aux["cross_entropy"], jnp.sum(plain * batch["weight"]), rtol=1e-5)


@pytest.mark.parametrize("resets", [True, False])
def test_eval_loss_by_context_length(resets):
    """train.eval_by_context: eval/loss_ctxN is the mean loss of the predictions that saw
    N to 2N - 1 tokens since the row's start or (with resets) the last document start."""
    task = _lm_task("train.eval_by_context=true", f"data.reset_at_doc_boundaries={resets}")
    model = LanguageModel(from_preset("test", vocab_size=64), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(3)
    tokens = rng.integers(4, 64, (2, 17))
    tokens[0, 5] = tokens[1, 11] = tok.EOS_ID  # a document starts after each
    tokens[1, 15:] = tok.PAD_ID
    batch = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:])}
    loss, weight, aux = task.loss(model, batch, train=False, key=None)
    x = model.features(batch["inputs"], resets=jnp.pad(batch["inputs"][:, :-1] == tok.EOS_ID,
                       ((0, 0), (1, 0))) if resets else None)  # fmt: skip
    logp = jax.nn.log_softmax(jnp.einsum("blh,hv->blv", x, model.head_weight(x.dtype)))
    per = -np.take_along_axis(np.asarray(logp), tokens[:, 1:, None], -1)[..., 0]
    sums: dict = {}
    for r in range(2):
        start = 0
        for t in range(16):
            if resets and t > 0 and tokens[r, t - 1] == tok.EOS_ID:
                start = t
            if tokens[r, t + 1] == tok.PAD_ID:
                continue
            n = 2 ** int(math.floor(math.log2(t - start + 1)))
            sums.setdefault(n, []).append(per[r, t])
    out = task.finalize({"loss": float(loss), "weight": float(weight), "accuracy": 0.0,
                         **{k: float(v) for k, v in aux.items()}})  # fmt: skip
    got = {int(k.removeprefix("loss_ctx")): v for k, v in out.items() if k.startswith("loss_ctx")}
    assert list(got) == sorted(got)  # reported in context order, not as strings sort
    assert sorted(got) == sorted(sums) and (1 in got) and (16 in got) != resets
    for n, values in sums.items():
        np.testing.assert_allclose(got[n], np.mean(values), rtol=1e-4)
    assert sum(float(aux[f"tokens_ctx{n}"]) for n in got) == float(weight)
