"""checkpoint.keep_best: a language model keeps its best-on-eval checkpoint in WORKDIR/best/
(by a metric of the eval split or of a data.eval_sets set), which `lrulm eval`, `generate`,
`score` and tools/export_params.py read with --best; LRA runs keep eval accuracy's."""

import json
import math
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import pytest
from run_helpers import tiny_config

from lrulm import best_checkpoint as best_lib
from lrulm import checkpoint as ckpt_lib
from lrulm import config as config_lib
from lrulm import evaluation, generate, run_config, score, tasks, train


def _lm(*overrides):
    return tiny_config(*overrides)


def test_keep_best_names_a_metric_an_evaluation_reports():
    assert tasks.best_metric(_lm()) is None  # a language model keeps none by default
    assert tasks.best_metric(_lm("checkpoint.keep_best=loss")) == ("loss", "min")
    assert tasks.best_metric(_lm("checkpoint.keep_best=accuracy")) == ("accuracy", "max")
    held = "data.eval_sets=code=a.txt;prose=b.txt"
    assert tasks.best_metric(_lm(held, "checkpoint.keep_best=prose/bits_per_byte")) == (
        "prose/bits_per_byte",
        "min",
    )
    with pytest.raises(ValueError, match="'los' is no evaluation metric; give one of loss, perp"):
        tasks.best_metric(_lm("checkpoint.keep_best=los"))
    with pytest.raises(ValueError, match="no eval set 'books' \\(data.eval_sets names code, pro"):
        tasks.best_metric(_lm(held, "checkpoint.keep_best=books/loss"))
    with pytest.raises(ValueError, match="no eval set 'code' \\(data.eval_sets is empty\\)"):
        tasks.best_metric(_lm("checkpoint.keep_best=code/loss"))
    lra = config_lib.load_with_overrides("configs/lra/listops.py:tiny", [])
    assert tasks.best_metric(lra) == ("accuracy", "max")
    config_lib.override(lra, "checkpoint.keep_best", "loss")
    with pytest.raises(ValueError, match="an LRA run keeps its best checkpoint by eval accuracy"):
        tasks.best_metric(lra)


def test_a_bad_keep_best_fails_before_anything_is_written(tmp_path, corpus):
    config = tiny_config("checkpoint.keep_best=bpb", corpus=corpus)
    with pytest.raises(ValueError, match="'bpb' is no evaluation metric"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists() or not os.listdir(tmp_path / "run")


def test_a_nan_is_never_the_best(tmp_path):
    best = best_lib.BestCheckpoint(str(tmp_path), "loss", "min")
    assert not best.update(10, {"loss": math.nan}, {"w": jnp.zeros(2)})
    assert best.update(20, {"loss": 3.0}, {"w": jnp.ones(2)})
    assert not best.update(30, {"loss": math.nan}, {"w": jnp.zeros(2)})
    with pytest.raises(ValueError, match="keep_best='loss': the evaluation reports no such"):
        best.update(40, {"bits_per_byte": 1.0}, {"w": jnp.zeros(2)})
    assert best.step == 20 and best.ckpt.steps() == [20]
    best.close()


def _eval_rows(workdir, key):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r[key] for r in rows if key in r}


def test_a_language_model_keeps_its_best_checkpoint(tmp_path, corpus, capsys):
    """The kept step is the eval set's best value so far; a resume without
    keep_best leaves it as it is (said); another metric is refused with nothing changed;
    eval, generate, score and export read it with best."""
    workdir = str(tmp_path / "run")
    common = [
        f"data.eval_sets=held={corpus['eval']}", "train.eval_every=2",
        "checkpoint.every_steps=4", "checkpoint.async_save=false",
    ]  # fmt: skip
    metric = "held/bits_per_byte"
    train.train_and_evaluate(
        tiny_config("train.steps=8", f"checkpoint.keep_best={metric}", *common, corpus=corpus),
        workdir,
    )
    values = _eval_rows(workdir, "eval/held/bits_per_byte")
    assert sorted(values) == [2, 4, 6, 8]
    want = min(values, key=values.get)
    kept = best_lib.kept_best(workdir)
    assert kept[0] == metric and kept[2] == want and kept[1] == pytest.approx(values[want])
    out = capsys.readouterr()
    assert f"the best eval {metric} ({values[want]:.4g}, step {want}) is kept in" in out.out

    # A resume without keep_best trains on; the best checkpoint stays the one it was. (A
    # save a killed process left half-written is removed by the trainer, said.)
    os.makedirs(os.path.join(workdir, "checkpoints", "9" + ckpt_lib.TMP_SUFFIX, "state"))
    train.train_and_evaluate(tiny_config("train.steps=12", *common, corpus=corpus), workdir)
    out = capsys.readouterr().out
    assert "is no longer updated: checkpoint.keep_best is unset" in out
    assert "left unfinished" in out and "9" + ckpt_lib.TMP_SUFFIX in out
    assert best_lib.kept_best(workdir)[2] == want
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints")), key=int) == ["4", "8", "12"]

    # Another metric would replace it by a checkpoint not better by the old one: refused.
    before = open(os.path.join(workdir, "config.json")).read()
    config = tiny_config("train.steps=16", "checkpoint.keep_best=loss", *common, corpus=corpus)
    with pytest.raises(
        ValueError, match=f"keeps the best eval loss: set checkpoint.keep_best='{metric}'"
    ):
        train.train_and_evaluate(config, workdir)
    assert open(os.path.join(workdir, "config.json")).read() == before
    assert ckpt_lib.checkpoint_steps(workdir)[-1] == 12 and best_lib.kept_best(workdir)[2] == want

    # What reads it: eval (the same figure), generate, score; the newest (12) otherwise.
    result = evaluation.evaluate_workdir(config_lib.from_dict(json.load(open(
        os.path.join(workdir, "config.json")))), workdir, best=True)  # fmt: skip
    assert result["step"] == want
    assert result["eval/held/bits_per_byte"] == pytest.approx(values[want], rel=1e-5)
    sample = generate.generate_texts(workdir, ["def "], max_new_tokens=4, best=True)[0]
    assert sample["step"] == want and sample["sampling"]["best"] is True
    again = generate.generate_texts(workdir, ["def "], **sample["sampling"])[0]
    assert again["completion"] == sample["completion"] and again["step"] == want
    assert score.score_texts(workdir, ["import os\n"], best=True)[0]["step"] == want
    assert score.score_texts(workdir, ["import os\n"])[0]["step"] == 12
    with pytest.raises(ValueError, match="give a step or best, not both"):
        generate.load_model(workdir, 4, best=True)
    tool = os.path.join(os.path.dirname(__file__), "..", "tools", "export_params.py")
    out = str(tmp_path / "best.npz")
    done = subprocess.run([sys.executable, tool, workdir, "--best", "--output", out],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0 and f"step {want}" in done.stdout, done.stderr[-2000:]

    # Evaluations of other batches (train.eval_steps) compare with it no more: moved aside.
    train.train_and_evaluate(
        tiny_config("train.steps=14", "train.eval_steps=1", f"checkpoint.keep_best={metric}",
                    *common, corpus=corpus), workdir,
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "best.superseded-1: train.eval_steps 2 -> 1" in out
    assert best_lib.kept_best(workdir)[2] == 14
    moved = os.path.join(workdir, "best.superseded-1", "checkpoints")
    assert os.listdir(moved) == [str(want)]

    # Nor do those of other text: the set now names a part of its file.
    part = tmp_path / "held-part.jsonl"
    part.write_text("".join(open(corpus["eval"]).readlines()[:2]))
    common[0] = f"data.eval_sets=held={part}"
    train.train_and_evaluate(
        tiny_config("train.steps=16", "train.eval_steps=1", f"checkpoint.keep_best={metric}",
                    *common, corpus=corpus), workdir,
    )  # fmt: skip
    assert "best.superseded-2: data.eval_sets held now names other files" in (
        capsys.readouterr().out
    )
    assert best_lib.kept_best(workdir)[2] == 16

    # A resume on the same data compares on; on other text under the same name, not.
    lines = open(corpus["eval"]).readlines()
    for steps, text in ((18, lines[:2]), (20, lines[2:4])):
        part.write_text("".join(text))
        train.train_and_evaluate(
            tiny_config(f"train.steps={steps}", "train.eval_steps=1",
                        f"checkpoint.keep_best={metric}", *common, corpus=corpus), workdir,
        )  # fmt: skip
        out = capsys.readouterr().out
        assert ("best.superseded-3: the held split holds other data than at step 1" in out) == (
            steps == 20
        ), out
    assert best_lib.kept_best(workdir)[2] == 20


def test_which_changes_make_evaluations_incomparable():
    """run_config.evals_incomparable: the checkpoint's config against the resumed one's,
    for one split (what keep_best's metric is of) or any."""
    base = ["data.train_files=t/*.txt", "data.eval_sets=code=c.txt;prose=p.txt"]
    trained = config_lib.to_dict(_lm(*base))

    def why(*changes, split=None):
        return run_config.evals_incomparable(trained, _lm(*base, *changes), split)

    assert why() == "" and why("train.steps=99", "optim.lr=0.1") == ""
    assert why("data.text_field=content") == "data.text_field 'text' -> 'content' reads other text"
    # Held out of the train files (data.eval_files empty): they follow the train files.
    held_out = "data.train_files / data.mixture changed"
    assert held_out in why("data.train_files=u/*.txt", split="eval")
    assert why("data.train_files=u/*.txt", split="code") == ""
    assert why("data.eval_files=e.txt", split="eval") == "data.eval_files '' -> 'e.txt'"
    sets = "data.eval_sets=code=c2.txt;prose=p.txt;new=n.txt"
    assert why(sets) == "data.eval_sets code now names other files"
    assert why(sets, split="code") == "data.eval_sets code now names other files"
    assert why(sets, split="prose") == why(sets, split="eval") == ""
    assert why("train.eval_steps=3") == "train.eval_steps 2 -> 3"
    assert "another train.seq_len" in why("train.seq_len=32")
    whole = config_lib.to_dict(_lm(*base, "train.eval_steps=0"))  # the whole split each time
    assert (
        run_config.evals_incomparable(whole, _lm(*base, "train.eval_steps=0", "train.seq_len=32"))
        == ""
    )
    assert run_config.evals_incomparable(None, _lm()) == ""  # nothing recorded


def test_a_new_run_beside_an_earlier_best_moves_it_aside(
    tmp_path, corpus, capsys, damage_checkpoint
):
    """A best checkpoint without checkpoints of its own run (a run killed after an
    evaluation and before its first save, started again; or one whose checkpoints were
    deleted) is another trajectory's, maybe of another metric: moved aside, not compared."""
    workdir = str(tmp_path / "run")
    common = ["train.eval_every=2", "checkpoint.async_save=false", "train.steps=2"]
    train.train_and_evaluate(
        tiny_config(*common, "checkpoint.keep_best=bits_per_byte", corpus=corpus), workdir
    )
    old = best_lib.kept_best(workdir)
    for name in ("checkpoints", "metrics.jsonl"):
        (shutil.rmtree if name == "checkpoints" else os.remove)(os.path.join(workdir, name))
    capsys.readouterr()
    train.train_and_evaluate(tiny_config(*common, "checkpoint.keep_best=loss", corpus=corpus),
                             workdir)  # fmt: skip
    out = capsys.readouterr().out
    assert f"(the best eval bits_per_byte, {old[1]:.4g} at step 2) to " in out
    assert "best.superseded-1: this run starts anew" in out
    assert best_lib.kept_best(workdir)[0] == "loss"
    assert os.listdir(os.path.join(workdir, "best.superseded-1", "checkpoints")) == ["2"]
    # A BestCheckpoint never compares values of another metric.
    with pytest.raises(ValueError, match="keeps the best eval loss, not accuracy; move it"):
        best_lib.BestCheckpoint(workdir, "accuracy", "max")
    # Damaged, it is said so (no "trying the one before": it is the only one).
    damage_checkpoint(os.path.join(workdir, "best", "checkpoints", "2"))
    with pytest.raises(
        ValueError, match=r"best/checkpoints/2 does not read back .*leave out --best"
    ):
        generate.load_model(workdir, best=True)


def test_a_metric_the_eval_split_does_not_report_is_refused_before_training():
    """bits_per_byte needs the split's bytes (ArrayRecord shards without their meta.json
    have none): refused once the data is ready, not after the steps."""
    task = tasks.LMTask(_lm(), None, prepare_data=False)  # no held-out bytes known
    with pytest.raises(ValueError, match="the eval split's evaluation reports no bits_per_b"):
        tasks.check_best_metric(task, ("bits_per_byte", "min"))
    tasks.check_best_metric(task, ("loss", "min"))
    tasks.check_best_metric(task, None)


def test_no_best_yet_says_so(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"checkpoint": {"keep_best": "loss"}}))
    assert "the run keeps the best eval loss from its first evaluation" in best_lib.no_best(
        str(tmp_path)
    )
    (tmp_path / "config.json").write_text(json.dumps({"checkpoint": {}}))
    assert "--config.checkpoint.keep_best=loss" in best_lib.no_best(str(tmp_path))


def test_best_flags_on_the_command_line(lm_workdir, tmp_path, lrulm_here):
    """--best and --step exclude each other; a run that keeps no best says how to keep one."""
    both = lrulm_here("score", "--workdir", lm_workdir, "--text", "x", "--best", "--step", "4")
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
    none = lrulm_here("generate", "--workdir", lm_workdir, "--prompt", "x", "--best")
    assert none.returncode == 2
    assert "language models with checkpoint.keep_best set" in none.stderr
    assert "--config.checkpoint.keep_best=loss" in none.stderr


def test_an_lra_eval_split_fingerprint_follows_its_data(tmp_path):
    """What an LRA run's best checkpoint records of its eval split: the same files give the
    same fingerprint, regenerated ones (same layout, other examples) another."""
    from lrulm import lra_task
    from lrulm.data.lra import synthetic

    def fingerprint(seed):
        data_dir = tmp_path / f"seed{seed}"
        synthetic.write_listops(str(data_dir), num=7, seed=seed)
        config = config_lib.load_with_overrides(
            "configs/lra/listops.py:tiny", [("data.data_dir", str(data_dir))]
        )
        return lra_task.ClassificationTask(config).eval_fingerprint("eval")

    assert fingerprint(0) == fingerprint(0) != fingerprint(1)
