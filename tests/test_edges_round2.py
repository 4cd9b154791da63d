"""Edges a second mutation audit found untested: vocabulary padding and its floor, the
perplexity's cap, LRA eval batches and pooling, a stale results.json, the launchers'
argument checks, lra-report's tolerance and value types, where init_from's tokenizer is."""

import importlib.util
import json
import math
import os
import sys

import pytest
from ml_collections import ConfigDict

from lrulm import config as config_lib
from lrulm import evaluation, lra_report, lra_task, tasks, workdir_tokenizer


def _launch_common():
    """launch/common.py, as tests/test_launch.py loads the launchers (module "common")."""
    if "common" not in sys.modules:
        path = os.path.join(os.path.dirname(__file__), "..", "launch", "common.py")
        spec = importlib.util.spec_from_file_location("common", path)
        sys.modules["common"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["common"])
    return sys.modules["common"]


class _Pieces:
    def __init__(self, n):
        self.n = n

    def get_piece_size(self):
        return self.n


def test_the_vocabulary_is_padded_to_128_and_never_below_the_tokenizer():
    assert tasks.lm_vocab_size(_Pieces(300), None) == 384
    assert tasks.lm_vocab_size(_Pieces(256), None) == 256
    assert tasks.lm_vocab_size(_Pieces(300), 512) == 512
    with pytest.raises(ValueError, match="model.vocab_size=256 is smaller than the tokenizer's"):
        tasks.lm_vocab_size(_Pieces(300), 256)


def test_perplexity_of_a_high_loss():
    config = config_lib.load_with_overrides("configs/lm/tiny.py:test", [])
    task = tasks.LMTask(config, None, prepare_data=False)
    out = task.finalize({"loss": 80.0, "weight": 10.0, "accuracy": 0.0})
    assert out["perplexity"] == pytest.approx(math.exp(8.0))
    assert task.finalize({"loss": 1e4, "weight": 1.0, "accuracy": 0.0})["perplexity"] == (
        pytest.approx(math.exp(50.0))
    )  # capped: no overflow to inf


def test_lra_pooling_default_and_check():
    assert lra_task._pooling(ConfigDict()) == "mean"
    with pytest.raises(ValueError, match="lra.pooling='max'"):
        lra_task._pooling(ConfigDict({"lra": {"pooling": "max"}}))


def test_a_results_json_of_another_step_is_not_the_result(tmp_path):
    (tmp_path / "results.json").write_text(
        json.dumps({"task": "text", "step": 5, "test/accuracy": 0.5})
    )
    assert evaluation._results_at(str(tmp_path), 10) is None
    assert evaluation._results_at(str(tmp_path), 5) == {"test/accuracy": 0.5}


def test_launcher_argument_checks(capsys):
    launch_common = _launch_common()
    with pytest.raises(SystemExit, match="mount the bucket"):
        launch_common.resolve_command(["lrulm", "train", "--workdir=gs://b/r"], None, None)
    with pytest.raises(SystemExit, match="give the command after"):
        launch_common.resolve_command([], "c.py", None)
    for bad in (["FOO"], ["1A=x"], ["A B=x"]):
        with pytest.raises(SystemExit, match="is not KEY=VALUE"):
            launch_common.parse_env(bad)
    assert launch_common.parse_env(["A_1=x=y"]) == {"A_1": "x=y"}
    with pytest.raises(SystemExit, match="exited with code 3"):
        launch_common.Runner(False)([sys.executable, "-c", "raise SystemExit(3)"])


def test_lra_report_flags_small_differences_and_bool_accuracies(tmp_path):
    config = config_lib.to_dict(config_lib.load_with_overrides("configs/lra/listops.py", []))
    assert lra_report.differences("listops", config) == []
    config["model"]["r_max"] = 0.95
    assert "r_max 0.95≠0.99" in lra_report.differences("listops", config)
    with pytest.raises(ValueError, match="test/accuracy is True, not an accuracy"):
        lra_report._fraction("r/results.json", {"test/accuracy": True}, "test/accuracy")


def test_the_tokenizer_next_to_a_step_directory(lm_workdir):
    own = os.path.join(lm_workdir, "tokenizer.model")
    for path in (lm_workdir, os.path.join(lm_workdir, "checkpoints"),
                 os.path.join(lm_workdir, "checkpoints", "8")):  # fmt: skip
        assert workdir_tokenizer.next_to(path) == own


def test_lrulm_eval_with_another_tokenizer_is_refused(lm_workdir, corpus, tmp_path):
    """`lrulm eval --config.data.tokenizer=OTHER` on a run trained with another: its ids are
    not the embeddings' rows, refused; the run's own file given (or gone) evaluates."""
    import shutil

    from lrulm.data import documents
    from lrulm.data import tokenizer as tok

    other = str(tmp_path / "other.model")
    tok.train_tokenizer(documents.read_documents(corpus["eval"]), other, vocab_size=400)
    run_config = json.load(open(os.path.join(lm_workdir, "config.json")))

    def config_with(tokenizer):
        config = config_lib.from_dict(run_config)
        config.data.tokenizer = tokenizer
        config.train.eval_steps = 1
        return config

    with pytest.raises(ValueError, match="is not .*tokenizer.model, the tokenizer this workdir"):
        evaluation.evaluate_workdir(config_with(other), lm_workdir)
    copy = str(tmp_path / "own.model")
    shutil.copyfile(os.path.join(lm_workdir, "tokenizer.model"), copy)
    assert evaluation.evaluate_workdir(config_with(copy), lm_workdir)["step"] == 8
    gone = str(tmp_path / "gone.model")  # the file it was given once, since deleted
    assert evaluation.evaluate_workdir(config_with(gone), lm_workdir)["step"] == 8
