"""checkpoint.init_from_params: another run's parameters, only those a selection finds."""

import json
import os

import jax
import numpy as np
import pytest
from run_helpers import tiny_config

from lrulm import checkpoint as ckpt_lib
from lrulm import config as config_lib
from lrulm import experiment, tasks, train


def _saved_params(workdir, step):
    item = os.path.join(workdir, "checkpoints", str(step), "state")
    return ckpt_lib.read_numpy(item, "params")


def test_a_backbone_under_a_new_vocabulary(lm_workdir, tmp_path, corpus, capsys):
    """An LM with another tokenizer (its own: the source's embedding rows are not taken)
    starts from the source's recurrent stack; its embedding is initialised afresh."""
    workdir = str(tmp_path / "new_vocab")
    config = tiny_config(
        "data.vocab_size=384", "train.steps=1", "train.eval_every=0", "optim.lr=1e-12",
        "optim.weight_decay=0", "checkpoint.async_save=false",
        f"checkpoint.init_from={lm_workdir}", "checkpoint.init_from_params=^stack/",
        corpus=corpus,
    )  # fmt: skip
    train.train_and_evaluate(config, workdir)
    out = capsys.readouterr().out
    assert "checkpoint.init_from_params selects, the others initialised" in out
    assert "the tokenizer of checkpoint.init_from" not in out
    with open(os.path.join(workdir, "tokenizer.json")) as f:
        assert json.load(f)["vocab_size"] == 384
    source, started = _saved_params(lm_workdir, 8), _saved_params(workdir, 1)
    for a, b in zip(jax.tree.leaves(source["stack"]), jax.tree.leaves(started["stack"])):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert started["embed"]["embedding"].shape[0] == 384 != source["embed"]["embedding"].shape[0]


def test_a_language_models_recurrence_under_a_classifier(lm_workdir):
    """An LRA classifier of the same widths takes the LM's LRU layers ("lru/"): the
    arrays read are the LM's; a selection that finds nothing, or arrays of other shapes,
    is refused with what to do."""
    config = config_lib.load_with_overrides("configs/lra/text.py:tiny", [])
    task = tasks.make_task(config, None, prepare_data=False)
    exp = experiment.build(config, task, experiment.make_mesh(config))
    abstract = exp.abstract_state["params"]
    part, step, key = ckpt_lib.restore_params(lm_workdir, abstract, select="lru/")
    assert (step, key, set(part)) == (8, "params", {"stack"})
    lm = _saved_params(lm_workdir, 8)["stack"]["blocks"]["lru"]
    for name, value in part["stack"]["blocks"]["lru"].items():
        np.testing.assert_array_equal(np.asarray(value), lm[name])
    merged = ckpt_lib.merge_params(jax.tree.map(lambda x: 0, abstract), part)
    assert merged["head"]["kernel"] == 0 and merged["stack"]["blocks"]["norm"]["scale"] == 0
    assert merged["stack"]["blocks"]["lru"]["nu_log"] is part["stack"]["blocks"]["lru"]["nu_log"]
    with pytest.raises(ValueError, match="finds none of this model's parameter paths"):
        ckpt_lib.restore_params(lm_workdir, abstract, select="nothing_like_this")
    with pytest.raises(ckpt_lib.CheckpointMismatch, match="encoder/embedding: not in the"):
        ckpt_lib.restore_params(lm_workdir, abstract, select="lru/,encoder")
    # A bidirectional classifier (Pathfinder's): the LM has no backward direction, said
    # with the selection that works; that one takes the forward LRU and leaves the rest.
    config = config_lib.load_with_overrides(
        "configs/lra/pathfinder.py:tiny", [("model.d_model", "32"), ("model.d_state", "32")]
    )
    task = tasks.make_task(config, None, prepare_data=False)
    abstract = experiment.build(config, task, experiment.make_mesh(config)).abstract_state
    with pytest.raises(
        ckpt_lib.CheckpointMismatch, match=r"init_from_params='lru/\(\?!reverse/\)'"
    ):
        ckpt_lib.restore_params(lm_workdir, abstract["params"], select="lru/")
    part, _, _ = ckpt_lib.restore_params(lm_workdir, abstract["params"], select="lru/(?!reverse/)")
    assert "reverse" not in part["stack"]["blocks"]["lru"]
