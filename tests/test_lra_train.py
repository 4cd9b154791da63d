"""LRA training end to end: every task's :tiny config, ListOps learning, the report, errors."""

from __future__ import annotations

import collections
import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lrulm import best_checkpoint as best_lib
from lrulm import config as config_lib
from lrulm import evaluation, experiment, lra_report, lra_task, train
from lrulm.data import lra
from lrulm.data.lra import generate
from lrulm.data.lra import synthetic as fx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(task: str, *overrides: str, arg: str = "tiny"):
    spec = os.path.join(REPO, "configs", "lra", f"{task}.py") + (f":{arg}" if arg else "")
    return config_lib.load_with_overrides(spec, [tuple(o.split("=", 1)) for o in overrides])


def _rows(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Tiny copies of all six tasks in the released layouts."""
    d = str(tmp_path_factory.mktemp("lra"))
    fx.write_all(d)
    return d


# -- every task's :tiny config trains end to end ------------------------------------------


@pytest.mark.parametrize("task", list(lra.TASKS))
def test_tiny_config_trains_and_reports_test_accuracy(task, data_dir, tmp_path, capsys):
    # 8 simulated devices on the data axis: every tiny batch (8 or 32) divides by 8.
    config = _config(
        task,
        f"data.data_dir={data_dir}",
        "mesh.data=8",
        "train.steps=2",
        "train.log_every=1",
        "train.eval_every=0",
        "checkpoint.every_steps=100",
        "train.progress=False",
    )
    workdir = str(tmp_path / task)
    train.train_and_evaluate(config, workdir)
    # A train split smaller than the batch (here some tasks' tiny data) is said, not silent.
    n_train = len(lra.load_split(task, data_dir, "train", seq_len=config.train.seq_len))
    warned = "each batch holds some of them twice" in capsys.readouterr().out
    assert warned == (n_train < config.train.global_batch_size), n_train

    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    n_val = len(lra.load_split(task, data_dir, "val", seq_len=config.train.seq_len))
    n_test = len(lra.load_split(task, data_dir, "test", seq_len=config.train.seq_len))
    assert results["task"] == task and results["step"] == 2
    # Every test example counted exactly once, the padding of the last batch not at all.
    assert results["test/examples"] == n_test
    correct = results["test/accuracy"] * n_test
    assert 0 <= correct <= n_test and abs(correct - round(correct)) < 1e-4
    rows = _rows(workdir)
    evals = [r for r in rows if "eval/accuracy" in r]  # eval_every=0: at the last step only
    assert [r["step"] for r in evals] == [2] and evals[0]["eval/examples"] == n_val
    assert results["best/eval_accuracy"] == evals[0]["eval/accuracy"] and results["best/step"] == 2
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))
    # The test split was scored with the best-validation checkpoint, which was kept.
    kept = os.listdir(os.path.join(workdir, "best", "checkpoints"))
    assert kept == [str(results["best/step"])]


def test_final_test_reads_the_whole_split_whatever_eval_steps(data_dir, tmp_path):
    """train.eval_steps shortens the validation passes; the test accuracy, the number
    reported beside the paper's, is always over every test example."""
    config = _config(
        "text", f"data.data_dir={data_dir}", "mesh.data=8", "train.steps=1",
        "train.eval_steps=1", "train.eval_every=0", "train.progress=False",
    )  # fmt: skip
    workdir = str(tmp_path / "text")
    train.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    n_test = len(lra.load_split("text", data_dir, "test", seq_len=config.train.seq_len))
    assert n_test > config.train.global_batch_size  # one batch would not hold them all
    assert results["test/examples"] == n_test
    (evals,) = [r for r in _rows(workdir) if "eval/examples" in r]
    assert evals["eval/examples"] == config.train.global_batch_size  # eval_steps=1
    (tested,) = [r for r in _rows(workdir) if "test/accuracy" in r]
    assert tested["best/eval_accuracy"] == results["best/eval_accuracy"] is not None
    # `lrulm eval --best` scores the checkpoint results.json is from, to the same numbers.
    rescored = evaluation.evaluate_workdir(config, workdir, best=True)
    assert rescored["step"] == results["best/step"]
    assert rescored["test/accuracy"] == pytest.approx(results["test/accuracy"], abs=1e-6)
    assert rescored["test/loss"] == pytest.approx(results["test/loss"], rel=1e-5)
    # It reads the eval and test splits alone: a data_dir without the train split will do.
    held_only = tmp_path / "held_only"
    shutil.copytree(data_dir, held_only)
    shutil.rmtree(held_only / "aclImdb" / "train")
    config.data.data_dir = str(held_only)
    again = evaluation.evaluate_workdir(config, workdir, best=True)
    assert again["test/accuracy"] == rescored["test/accuracy"]
    config.data.data_dir = data_dir
    # tools/export_params.py --best: the weights, BatchNorm's statistics (what evaluating
    # the exported classifier needs) and the model it was saved with.
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
    import export_params

    arrays, step, _ = export_params.read_params(workdir, best=True)
    assert step == results["best/step"] and any(k.endswith("/mean") for k in arrays)
    assert {k.split("/")[0] for k in arrays} >= {"model_state", "stack", "head"}
    model = export_params.checkpoint_model(workdir, step, best=True)
    assert model and model["norm"] == "batch" and model["d_model"] == config.model.d_model
    # Run again once finished: the result is read back, not tested and logged twice.
    rows = _rows(workdir)
    again = train.train_and_evaluate(config, workdir)
    assert _rows(workdir) == rows
    assert again == {k: v for k, v in results.items() if k not in ("task", "step")}
    # Trained again from step 0 (its checkpoints gone): tested again, not read back.
    shutil.rmtree(os.path.join(workdir, "checkpoints"))
    train.train_and_evaluate(config, workdir)
    assert [r["step"] for r in _rows(workdir) if "test/accuracy" in r] == [1]


def test_the_test_split_is_scored_with_the_best_checkpoint_not_the_last(
    data_dir, tmp_path, monkeypatch
):
    """When an earlier evaluation was the best (forced here: only step 1's is taken), the
    reported test numbers are that checkpoint's, not the final state's."""
    update = best_lib.BestCheckpoint.update
    monkeypatch.setattr(
        best_lib.BestCheckpoint,
        "update",
        lambda self, step, *a: step == 1 and update(self, step, *a),
    )
    config = _config(
        "text", f"data.data_dir={data_dir}", "mesh.data=8", "train.steps=2",
        "train.eval_every=1", "train.progress=False", "checkpoint.every_steps=1",
    )  # fmt: skip
    workdir = str(tmp_path / "text")
    result = train.train_and_evaluate(config, workdir)
    assert result["best/step"] == 1
    best = evaluation.evaluate_workdir(config, workdir, best=True)
    final = evaluation.evaluate_workdir(config, workdir, 2)
    assert best["step"] == 1 and final["step"] == 2
    assert result["test/loss"] == pytest.approx(best["test/loss"], rel=1e-5)
    assert abs(result["test/loss"] - final["test/loss"]) > 1e-4 * abs(final["test/loss"])


def test_a_damaged_best_checkpoint_falls_back_to_the_final_state(
    data_dir, tmp_path, damage_checkpoint, capsys
):
    """The best-on-eval checkpoint found damaged at the final test was an error on that
    run and every rerun; now the final state is tested instead, and it is said."""
    config = _config(
        "text", f"data.data_dir={data_dir}", "mesh.data=8", "train.steps=2",
        "train.eval_every=1", "train.progress=False",
    )  # fmt: skip
    workdir = str(tmp_path / "text")
    train.train_and_evaluate(config, workdir)
    (best_step,) = os.listdir(os.path.join(workdir, "best", "checkpoints"))
    damage_checkpoint(os.path.join(workdir, "best", "checkpoints", best_step))
    os.remove(os.path.join(workdir, "results.json"))  # as if the test had not run yet
    result = train.train_and_evaluate(config, workdir)
    assert "testing the final state (step 2) instead of the best one" in capsys.readouterr().out
    assert result["best/step"] == 2 and result["best/eval_accuracy"] is None
    with open(os.path.join(workdir, "results.json")) as f:
        saved = json.load(f)  # strict JSON: null, not NaN
    assert saved["test/examples"] == result["test/examples"] > 0
    assert saved["best/eval_accuracy"] is None and saved["best/fallback"] == "final_state"
    assert "the best checkpoint was lost" in lra_report.report([workdir])


def test_pixel_encoder_has_no_bias_under_batchnorm():
    """BatchNorm removes a constant per channel on every path from the encoder, so a bias
    there gets no gradient (Adam would move it by noise alone): there is none. Under
    layer norm, which does not remove it, the bias stays."""
    from flax import nnx

    from lrulm.model import Classifier
    from lrulm.model_config import ModelConfig

    for norm, has_bias in (("batch", False), ("layer", True)):
        cfg = ModelConfig(vocab_size=0, d_model=16, d_state=8, num_layers=2, norm=norm)
        model = Classifier(cfg, num_classes=2, rngs=nnx.Rngs(0))
        names = set(nnx.to_pure_dict(nnx.state(model.encoder, nnx.Param)))
        assert ("bias" in names) == has_bias, (norm, names)


@pytest.mark.parametrize("bidirectional, pooling", [(False, "mean"), (True, "mean"),
                                                    (False, "last")])  # fmt: skip
def test_padding_changes_nothing_real(bidirectional, pooling):
    """Variable-length tasks pad at the end. A bidirectional layer's reverse scan runs
    through the padding before the real tokens: the padding must carry nothing into
    them, so a padded row scores as it does alone, whatever the padding holds."""
    from flax import nnx

    from lrulm.model import Classifier
    from lrulm.model_config import from_preset

    cfg = from_preset("test", vocab_size=16, norm="batch", bidirectional=bidirectional, d_ff=0)
    model = Classifier(cfg, num_classes=3, pooling=pooling, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 16, (2, 48))
    mask = np.arange(48)[None] < np.array([[20], [48]])
    zeros, junk = np.where(mask, tokens, 0), np.where(mask, tokens, rng.integers(1, 16, (2, 48)))
    logits = model(jnp.asarray(zeros), jnp.asarray(mask))
    np.testing.assert_array_equal(logits, model(jnp.asarray(junk), jnp.asarray(mask)))
    alone = model(jnp.asarray(tokens[:, :20]), jnp.ones((2, 20), bool))
    np.testing.assert_allclose(logits[0], alone[0], rtol=1e-5, atol=1e-5)
    if pooling == "last":  # the unpadded row's last position, a prefix's last one
        assert np.isfinite(logits).all()
        assert np.abs(logits[1] - alone[1]).max() > 1e-3
        whole = model(jnp.asarray(tokens[1:]), jnp.ones((1, 48), bool))
        np.testing.assert_allclose(logits[1], whole[0], rtol=1e-5, atol=1e-5)


def test_accumulation_moves_batchnorm_statistics_once_a_step(data_dir, tmp_path):
    """With micro-batches, BatchNorm's running statistics take one step of the moving
    average a step (towards the micro-batches' mean statistics), not one per micro-batch.
    The first layer's inputs do not depend on the normalisation, so its running mean is
    the whole batch's exactly; deeper layers see micro-batch normalisation, so theirs are
    only close (one update per micro-batch made them about 3.4x larger)."""
    from lrulm import tasks

    means = {}
    for accum in (1, 4):
        config = _config(
            "listops", f"data.data_dir={data_dir}", "mesh.data=2", "train.global_batch_size=16",
            f"optim.grad_accum_steps={accum}", "model.dropout=0.0",
        )  # fmt: skip
        mesh = experiment.make_mesh(config, jax.devices()[:2])
        exp = experiment.build(config, tasks.make_task(config, str(tmp_path)), mesh)
        state = jax.jit(exp.init_fn, out_shardings=exp.state_shardings)(jax.random.key(0))
        rng = np.random.default_rng(0)
        batch = {}
        for k, (shape, dtype) in exp.batch_spec.items():
            high = {"inputs": 12, "label": 10}.get(k)  # tokens; the 10 classes
            x = rng.integers(0 if k == "label" else 1, high, shape) if high else np.ones(shape)
            batch[k] = jax.device_put(x.astype(dtype), exp.batch_shardings[k])
        state, metrics = train.jit_steps(exp)[0](state, batch)
        assert np.isfinite(jax.device_get(metrics["train/loss"]))
        means[accum] = [
            x
            for p, x in jax.tree_util.tree_leaves_with_path(jax.device_get(state["model_state"]))
            if "mean" in str(p)
        ]
    blocks = [i for i, m in enumerate(means[1]) if m.ndim == 2]  # (layers, width): scanned
    assert len(blocks) == 1 and len(means[1]) == 2  # the blocks' norms and the final one
    np.testing.assert_allclose(means[4][blocks[0]][0], means[1][blocks[0]][0], rtol=1e-5)
    for m4, m1 in zip(means[4], means[1]):
        assert np.abs(m1).max() > 1e-3  # they moved
        assert 0.6 < np.linalg.norm(m4) / np.linalg.norm(m1) < 1.6


# -- the batches: shuffled per epoch, split across processes, full eval passes ---------------


def _key(inputs: np.ndarray) -> bytes:
    return np.ascontiguousarray(inputs).tobytes()


def test_train_batches_reshuffle_each_epoch_and_split_across_processes(data_dir):
    task = lra_task.ClassificationTask(_config("listops", f"data.data_dir={data_dir}"))
    source = task.sources["train"]
    examples = collections.Counter(_key(source[i]["inputs"]) for i in range(len(source)))
    steps_per_epoch = len(source) // 4  # 12 fixture examples (two alike), global batch 4
    # Two "processes" of two rows each; together they must read every global batch.
    halves = [
        task.train_batches(global_batch=4, row_offset=off, local_batch=2, seed=7) for off in (0, 2)
    ]
    epochs = []
    for _ in range(2):
        order = []
        for _ in range(steps_per_epoch):
            parts = [next(it) for it in halves]
            assert all(p["inputs"].shape == (2, 64) and (p["weight"] == 1).all() for p in parts)
            order += [_key(x) for p in parts for x in p["inputs"]]
        epochs.append(order)
    for order in epochs:  # each epoch is a permutation of the training split
        assert collections.Counter(order) == examples
    assert epochs[0] != epochs[1]  # and the order changes between epochs
    other_seed = task.train_batches(global_batch=4, row_offset=0, local_batch=4, seed=8)
    assert [_key(x) for x in next(other_seed)["inputs"]] != epochs[0][:4]


def test_eval_batches_count_every_example_once(data_dir):
    task = lra_task.ClassificationTask(_config("retrieval", f"data.data_dir={data_dir}"))
    source = task.sources["test"]  # 8 pairs
    expected = collections.Counter(_key(source[i]["inputs"]) for i in range(len(source)))
    got: collections.Counter = collections.Counter()
    batches = 0
    for off in (0, 3):  # two "processes" of 3 rows of a global batch of 6: 2 batches, 4 pad
        for b in task.eval_batches(
            "test", global_batch=6, row_offset=off, local_batch=3, num_batches=0
        ):
            assert b["inputs"].shape == (3, 2, 256) and b["mask"].shape == (3, 2, 256)
            batches += 1
            got.update(_key(x) for x, w in zip(b["inputs"], b["weight"]) if w == 1)
            assert set(b["weight"]) <= {0.0, 1.0}
    assert batches == 4 and got == expected
    first = list(
        task.eval_batches("eval", global_batch=6, row_offset=0, local_batch=6, num_batches=1)
    )
    assert len(first) == 1 and first[0]["weight"].sum() == 6


# -- it learns ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.optimize_xla
def test_listops_tiny_learns_above_majority_class(tmp_path):
    data = str(tmp_path / "data")
    generate.generate_listops(
        data, num_train=4000, num_val=200, num_test=500, min_length=10, max_length=60, seed=0
    )
    test_labels = [int(r["label"]) for r in lra.load_split("listops", data, "test", seq_len=64)]
    majority = max(collections.Counter(test_labels).values()) / len(test_labels)
    config = _config("listops", f"data.data_dir={data}", "mesh.data=1", "train.progress=False")
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
    with open(os.path.join(workdir, "results.json")) as f:
        accuracy = json.load(f)["test/accuracy"]
    print(f"ListOps (10-60 tokens): test accuracy {accuracy:.3f}, majority class {majority:.3f}")
    assert accuracy > majority + 0.15, (accuracy, majority)


# -- bad input fails before anything compiles -------------------------------------------------


@pytest.mark.parametrize(
    "task, overrides, error, message",
    [
        ("listops", [], ValueError, "data.data_dir is not set"),
        (
            "listops",
            ["data.data_dir=/nonexistent/lra"],
            FileNotFoundError,
            "data_dir '/nonexistent/lra' does not exist",
        ),
        (
            "image",
            ["data.data_dir={data}", "train.seq_len=512"],
            ValueError,
            "set train.seq_len=1024",
        ),
        (
            "listops",
            ["data.data_dir={data}", "task=listopz"],
            ValueError,
            "unknown task 'listopz'; use 'lm' or an LRA task: listops, text",
        ),
    ],
)
def test_bad_input_fails_before_compiling(task, overrides, error, message, data_dir, tmp_path):
    config = _config(task, *(o.format(data=data_dir) for o in overrides))
    with pytest.raises(error, match=message):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def _matmul_flops(jaxpr) -> int:
    """FLOPs of the dot_generals a jaxpr runs (2 per multiply-add), a scan's body times
    its length, through nested calls."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += (
                2
                * int(np.prod(eqn.outvars[0].aval.shape))
                * int(np.prod([lhs[d] for d in contract]))
            )
        times = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            total += times * _matmul_flops(sub)
    return total


@pytest.mark.parametrize("task_name", ["lm", *lra.TASKS])
def test_parameter_and_flop_counts_match_the_model(task_name):
    """num_params equals the real parameter tree and flops_per_token the matmuls the
    forward runs (x3 for training) plus the recurrence, for the LM and every LRA
    classifier (they were counted with an LM's vocabulary-sized head)."""
    from flax import nnx

    from lrulm import tasks

    if task_name == "lm":
        config = config_lib.load(os.path.join(REPO, "configs", "lm", "tiny.py:test"))
    else:
        config = _config(task_name)
    task = tasks.make_task(config, None, prepare_data=False)
    model = nnx.eval_shape(lambda: task.make_model(nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    assert task.num_params() == sum(x.size for x in jax.tree.leaves(params))

    batch = {
        k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in task.batch_spec(2).items()
    }

    def forward(params, rest, batch):
        return task.loss(nnx.merge(graphdef, params, rest), batch, train=False, key=None)

    jaxpr = jax.make_jaxpr(forward)(params, rest, batch).jaxpr
    mc = task.model_config
    recurrence = 3 * mc.num_layers * (2 if mc.bidirectional else 1) * 8 * mc.d_state
    tokens = 2 * task.tokens_per_example()
    counted = (task.flops_per_token(config.train.seq_len) - recurrence) * tokens
    assert counted == pytest.approx(3 * _matmul_flops(jaxpr), rel=1e-6)


def test_a_weight_average_is_what_the_best_checkpoint_tests(data_dir, tmp_path):
    """optim.ema on an LRA task (BatchNorm statistics averaged too): the best checkpoint
    keeps the averages, results.json's test is of them, and `lrulm eval --best` agrees."""
    from lrulm import checkpoint as ckpt_lib
    from lrulm import evaluation

    config = _config(
        "listops", f"data.data_dir={data_dir}", "mesh.data=8", "train.steps=3",
        "train.eval_every=0", "checkpoint.every_steps=100", "train.progress=False",
        "optim.ema=0.9",
    )  # fmt: skip
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(config, workdir)
    best = os.path.join(workdir, "best", "checkpoints", "3", "state")
    assert {"ema_params", "ema_model_state"} <= set(ckpt_lib.saved_tree(best))
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    scored = evaluation.evaluate_workdir(config, workdir, best=True)
    assert scored["test/accuracy"] == pytest.approx(results["test/accuracy"], abs=1e-6)
    assert scored["test/loss"] == pytest.approx(results["test/loss"], rel=1e-5)
