"""Edges of what a start checks and reads (found untested by a mutation audit): the state
settings a resume names, init_from as a resume sees it, paths from elsewhere, and the
train files a config's globs pick."""

import dataclasses
import gzip
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx
from run_helpers import tiny_config

from lrulm import checkpoint as ckpt_lib
from lrulm import config as config_lib
from lrulm import model_config as model_config_lib
from lrulm import run_config
from lrulm.data import documents
from lrulm.data import lm as lm_data
from lrulm.model import LanguageModel


def test_a_switched_optimizer_is_named_as_a_state_change():
    before = tiny_config()
    after = tiny_config("optim.optimizer=muon")
    changed = run_config.state_keys_changed(config_lib.to_dict(before), after)
    assert changed == ["optim.optimizer: 'adamw' -> 'muon'"]


# Another value for each ModelConfig field: whether it changes the model's state tree
# is what the test below finds out. A new field needs one here.
_OTHER_MODEL_VALUES = dict(
    vocab_size=384, d_model=64, d_state=64, num_layers=3, d_ff=0, glu="half", norm="layer",
    dropout=0.1, dropout_over_length=True, r_min=0.5, r_max=0.9, max_phase=1.0,
    bidirectional=True, tie_embeddings=False, dtype="bfloat16", scan_method="sequential",
    chunk_size=16, remat="full", scan_layers=False,
)  # fmt: skip


def _state_tree(model_config):
    """(path, shape, dtype) of every array of a language model's state, built abstractly."""
    model = nnx.eval_shape(lambda: LanguageModel(model_config, rngs=nnx.Rngs(0)))
    leaves = jax.tree_util.tree_leaves_with_path(nnx.state(model))
    return [(jax.tree_util.keystr(path), x.shape, x.dtype) for path, x in leaves]


def test_a_refused_resume_names_only_model_settings_that_shape_the_state():
    """run_config.MODEL_KEYS_OUTSIDE_STATE is exactly the ModelConfig fields whose change
    leaves the model's state tree as it is; state_keys_changed names the others."""
    base = model_config_lib.from_preset("test")
    fields = {f.name for f in dataclasses.fields(model_config_lib.ModelConfig)}
    assert fields == set(_OTHER_MODEL_VALUES), fields ^ set(_OTHER_MODEL_VALUES)
    assert all(getattr(base, name) != value for name, value in _OTHER_MODEL_VALUES.items())
    tree = _state_tree(base)
    outside = {
        name for name, value in _OTHER_MODEL_VALUES.items()
        if _state_tree(dataclasses.replace(base, **{name: value})) == tree
    }  # fmt: skip
    assert outside == run_config.MODEL_KEYS_OUTSIDE_STATE
    before = tiny_config()
    after = tiny_config("model.dropout=0.1", "model.remat=full", "model.d_state=64")
    changed = run_config.state_keys_changed(config_lib.to_dict(before), after)
    assert changed == ["model.d_state: None -> 64"]


def test_a_subscript_as_init_from_params_is_refused(tmp_path, lm_workdir):
    config = tiny_config(
        f"checkpoint.init_from={lm_workdir}", "checkpoint.init_from_params=['stack']"
    )
    with pytest.raises(ValueError, match="reads as a character class"):
        run_config.check_start(config, str(tmp_path / "new"))


def _resumable(tmp_path, monkeypatch, init_from: str) -> str:
    """A workdir that counts as holding checkpoints, whose run started from init_from."""
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    recorded = config_lib.to_dict(tiny_config(f"checkpoint.init_from={init_from}"))
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(recorded, f)
    with open(os.path.join(workdir, "starts.jsonl"), "w") as f:
        f.write(json.dumps({"cwd": str(tmp_path)}) + "\n")
    real = ckpt_lib.checkpoint_steps
    monkeypatch.setattr(ckpt_lib, "checkpoint_steps", lambda p: [4] if p == workdir else real(p))
    return workdir


def test_a_resume_takes_init_from_as_its_run_started(tmp_path, monkeypatch, capsys):
    """The same source written another way (absolute, ./) is no other source: nothing is
    said; a resume naming none takes the recorded one, quietly."""
    workdir = _resumable(tmp_path, monkeypatch, "src")
    source = str(tmp_path / "src")
    for given in (source, os.path.join(str(tmp_path), ".", "src"), ""):
        config = tiny_config(f"checkpoint.init_from={given}")
        run_config.check_start(config, workdir)
        assert "is not read" not in capsys.readouterr().out, given
        assert os.path.realpath(config.checkpoint.init_from) == os.path.realpath(source)
    config = tiny_config(f"checkpoint.init_from={tmp_path / 'other'}")
    run_config.check_start(config, workdir)
    assert "is not read" in capsys.readouterr().out


def test_home_paths_are_not_rebased():
    config = tiny_config("data.train_files=~/corpus/*.jsonl,rel/*.jsonl")
    changed = run_config.rebase_paths(config, "/start")
    assert config.data.train_files == "~/corpus/*.jsonl,/start/rel/*.jsonl"
    assert changed == ["data.train_files"]
    config = tiny_config("data.train_files=~/corpus/*.jsonl")
    assert run_config.rebase_paths(config, "/start") == []


def test_the_globs_a_config_gives(tmp_path):
    """A file named twice (another spelling of its path, a symlink) is read once; a
    trailing comma adds no glob; one empty file among others is kept (only all empty is
    refused); gzip is read by its bytes whatever the name; a mix of shards and text is
    not "packed"."""
    a, b, c = (tmp_path / n for n in ("a.jsonl", "b.jsonl", "c.jsonl"))
    a.write_text('{"text": "alpha"}\n')
    b.write_text("")
    c.write_bytes(gzip.compress(b'{"text": "gamma"}\n'))
    os.symlink(a, tmp_path / "link.jsonl")
    d = str(tmp_path)
    assert lm_data.expand_globs(f"{d}/a.jsonl,{d}/./a.jsonl,{d}/link.jsonl,", "t") == [str(a)]
    assert lm_data.expand_globs(f"{d}/[ab].jsonl", "t") == [str(a), str(b)]
    with pytest.raises(ValueError, match="every file is empty"):
        lm_data.expand_globs(str(b), "t")
    assert list(documents.read_documents(str(c))) == ["gamma"]
    assert not documents.is_packed(["x.arrayrecord", "y.jsonl"])
    assert documents.is_packed(["x.arrayrecord", "y.ArrayRecord"])


def test_held_out_files_and_shared_ones(capsys):
    """The default corpus holds out every 50th file; a note on shared files only when
    some are shared."""
    train, held = lm_data.default_corpus()
    assert len(held) == -(-(len(train) + len(held)) // 50)
    lm_data.check_disjoint(["a"], ["b"], refuse=False)
    assert capsys.readouterr().out == ""


def test_the_train_data_fingerprint_reads_the_last_example():
    """A resume compares sample fingerprints: an edit of only the last example counts."""
    first = [{"inputs": np.arange(4) + i} for i in range(10)]
    last_edited = first[:9] + [{"inputs": np.arange(4) + 99}]
    assert lm_data.sample_fingerprint(first) != lm_data.sample_fingerprint(last_edited)


def test_config_and_compile_say_when_a_run_would_have_another_vocabulary():
    from lrulm import tasks

    assert tasks.vocab_note(tiny_config()) == ""  # the test preset's 512 = data.vocab_size
    note = tasks.vocab_note(tiny_config("data.vocab_size=1000"))
    assert "preset's vocabulary (512)" in note and "(data.vocab_size=1000: 1,024 at most)" in note
    assert note.endswith("add --config.model.vocab_size=1024 to see that one")
    assert tasks.vocab_note(tiny_config("data.vocab_size=1000", "model.vocab_size=2048")) == ""
