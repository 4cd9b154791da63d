"""What a start checks against its workdir before any data is read or written: a resume
of the run's own task, the init_from a run started from, the settings that shape the
train state; a new run's init_from must hold a checkpoint."""

import json
import os
import shutil

import pytest
from run_helpers import tiny_config

from lrulm import checkpoint as ckpt_lib
from lrulm import config as config_lib
from lrulm import train


def _copy(lm_workdir, tmp_path) -> str:
    workdir = str(tmp_path / "run")
    shutil.copytree(lm_workdir, workdir)
    return workdir


def _contents(workdir):
    return sorted(os.listdir(workdir))


def test_a_missing_init_from_fails_before_the_data(tmp_path, corpus):
    for source in (tmp_path / "nowhere", tmp_path / "empty"):
        if source.name == "empty":
            (source / "checkpoints").mkdir(parents=True)
            (source / "tokenizer.model").write_text("not read")
        config = tiny_config(f"checkpoint.init_from={source}", corpus=corpus)
        with pytest.raises(FileNotFoundError, match="does not exist|holds no checkpoints"):
            train.train_and_evaluate(config, str(tmp_path / "new"))
        assert not (tmp_path / "new").exists()  # no tokenizer trained, nothing tokenized


def test_init_from_params_finding_nothing_fails_before_the_data(tmp_path, corpus, lm_workdir):
    """Patterns that find none of the source checkpoint's parameters (a typo): said in
    seconds, from the checkpoint's metadata, before a tokenizer is trained or data read."""
    config = tiny_config(f"checkpoint.init_from={lm_workdir}",
                         "checkpoint.init_from_params=^nomatch/,^stak/", corpus=corpus)  # fmt: skip
    with pytest.raises(ValueError, match=f"finds none of {lm_workdir}'s parameter paths"):
        train.train_and_evaluate(config, str(tmp_path / "new"))
    assert not (tmp_path / "new").exists()


def test_a_resume_with_another_tasks_config_changes_nothing(lm_workdir, tmp_path):
    workdir = _copy(lm_workdir, tmp_path)
    before = _contents(workdir)
    config = config_lib.load_with_overrides("configs/lra/listops.py:tiny", [])
    message = r"holds a run of task 'lm' \(its config.json\), and this config trains 'listops'"
    with pytest.raises(ValueError, match=message):
        train.train_and_evaluate(config, workdir)
    assert _contents(workdir) == before


def test_a_resume_keeps_the_init_from_it_started_from(lm_workdir, tmp_path, corpus, capsys):
    """checkpoint.init_from is read by a new run only: a resume naming another says so,
    and config.json keeps the source the run started from."""
    workdir = _copy(lm_workdir, tmp_path)
    path = os.path.join(workdir, "config.json")
    recorded = json.load(open(path))
    recorded["checkpoint"]["init_from"] = "runs/source"
    json.dump(recorded, open(path, "w"))
    other = _copy(lm_workdir, tmp_path / "o")
    os.remove(os.path.join(other, "tokenizer.model"))  # its tokenizer would be refused
    config = tiny_config(
        "train.steps=9", "train.eval_every=0", "checkpoint.every_steps=4",
        "checkpoint.async_save=false", f"checkpoint.init_from={other}", corpus=corpus,
    )  # fmt: skip
    train.train_and_evaluate(config, workdir)
    out = capsys.readouterr().out
    source = os.path.abspath("runs/source")  # relative to where the run started: here
    assert f"checkpoint.init_from='{other}' is not read" in out and f"'{source}'" in out
    assert json.load(open(path))["checkpoint"]["init_from"] == source
    assert ckpt_lib.checkpoint_steps(workdir)[-1] == 9


def test_a_changed_setting_that_shapes_the_state_is_named(lm_workdir, tmp_path, corpus):
    workdir = _copy(lm_workdir, tmp_path)
    config = tiny_config("train.steps=9", "optim.no_decay=bias$", corpus=corpus)
    message = r"since step 8: optim.no_decay: '' -> 'bias\$'"
    with pytest.raises(ckpt_lib.CheckpointMismatch, match=message):
        train.train_and_evaluate(config, workdir)
    config = tiny_config("train.steps=9", "model.d_model=48", corpus=corpus)
    with pytest.raises(ckpt_lib.CheckpointMismatch, match="model.d_model: None -> 48"):
        train.train_and_evaluate(config, workdir)


def test_a_resume_keeps_the_runs_vocab_size(lm_workdir, tmp_path, corpus, capsys):
    """The workdir's tokenizer is kept on a resume (the embeddings are its ids): another
    data.vocab_size is said to be unused, and config.json keeps the run's."""
    workdir = _copy(lm_workdir, tmp_path)
    config = tiny_config("train.steps=9", "data.vocab_size=600", "train.eval_every=0",
                         "checkpoint.async_save=false", corpus=corpus)  # fmt: skip
    train.train_and_evaluate(config, workdir)
    assert "data.vocab_size=600 is not used" in capsys.readouterr().out
    assert json.load(open(os.path.join(workdir, "config.json")))["data"]["vocab_size"] == 512
    assert ckpt_lib.checkpoint_steps(workdir)[-1] == 9


def test_a_resume_whose_tokenizer_is_gone_trains_none(lm_workdir, tmp_path, corpus):
    workdir = _copy(lm_workdir, tmp_path)
    os.remove(os.path.join(workdir, "tokenizer.model"))
    config = tiny_config("train.steps=9", corpus=corpus)
    with pytest.raises(FileNotFoundError, match="tokenizer.model is gone"):
        train.train_and_evaluate(config, workdir)
    assert not os.path.exists(os.path.join(workdir, "tokenizer.model"))


def test_a_run_resumed_from_elsewhere_by_its_config_json(lm_workdir, tmp_path):
    """A run started in START with relative paths (its files, init_from), resumed from
    another directory with `--config START/run/config.json`: the same files, so its
    tokenizer is not "made for other data", and the same init_from, not "another"; its
    config.json then holds paths that read from anywhere."""
    import subprocess
    import sys

    from lrulm import workdir_tokenizer

    start = tmp_path / "start"
    run = start / "run"
    shutil.copytree(lm_workdir, run)
    shutil.copytree(lm_workdir, start / "src")
    recorded = json.load(open(run / "config.json"))
    os.makedirs(start / "corpus")
    for key in ("train_files", "eval_files"):
        shutil.copy(recorded["data"][key], start / "corpus" / f"{key}.jsonl")
        recorded["data"][key] = f"corpus/{key}.jsonl"
    recorded["checkpoint"]["init_from"] = "src"
    json.dump(recorded, open(run / "config.json", "w"))
    config = config_lib.from_dict(recorded)
    spec = workdir_tokenizer._spec(
        config, [str(start / "corpus" / "train_files.jsonl")], str(start)
    )
    json.dump(spec, open(run / "tokenizer.json", "w"))  # as the run made it in START
    with open(run / "starts.jsonl", "a") as f:
        f.write(json.dumps({"step": 0, "cwd": str(start)}) + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-m", "lrulm", "train", "--config", str(run / "config.json"),
         "--workdir", str(run), "--config.train.steps=9"],
        cwd=elsewhere, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": root},
    )  # fmt: skip
    said = out.stdout + out.stderr
    assert out.returncode == 0, said[-2000:]
    assert "resumed from" in said and "made for other data" not in said, said
    assert "is not read" not in said
    now = json.load(open(run / "config.json"))
    assert now["checkpoint"]["init_from"] == str(start / "src")
    assert now["data"]["train_files"] == str(start / "corpus" / "train_files.jsonl")
