"""Evaluating a run: any checkpoint, the resolved model, other text, a full pass, damaged
checkpoints, step 0."""

import dataclasses
import json
import math
import os
import shutil

import numpy as np
import pytest
from run_helpers import tiny_config as _config

from lrulm import config as config_lib
from lrulm import evaluation, tasks, train


def test_eval_any_checkpoint(lm_workdir):
    """`lrulm eval --step`: the newest by default, equal to the run's own eval there."""
    with open(os.path.join(lm_workdir, "config.json")) as f:
        config = config_lib.from_dict(json.load(f))
    rows = [json.loads(line) for line in open(os.path.join(lm_workdir, "metrics.jsonl"))]
    logged = {r["step"]: r["eval/loss"] for r in rows if "eval/loss" in r}
    newest = evaluation.evaluate_workdir(config, lm_workdir)
    assert newest["step"] == 8 and abs(newest["eval/loss"] - logged[8]) < 1e-4
    assert evaluation.evaluate_workdir(config, lm_workdir, step=8) == newest
    early = evaluation.evaluate_workdir(config, lm_workdir, step=4)
    assert early["step"] == 4 and early["eval/loss"] > newest["eval/loss"]
    with pytest.raises(FileNotFoundError, match="no checkpoint of step 5 .* its steps: 4, 8"):
        evaluation.evaluate_workdir(config, lm_workdir, step=5)


def test_model_json_holds_the_resolved_model(lm_workdir):
    """config.json keeps model.* as given (unset: the preset's); model.json says what
    they resolved to, and the parameter count the run logged."""
    with open(os.path.join(lm_workdir, "model.json")) as f:
        model = json.load(f)
    rows = [json.loads(line) for line in open(os.path.join(lm_workdir, "metrics.jsonl"))]
    (logged,) = [r["model/num_params"] for r in rows if "model/num_params" in r]
    assert model["num_params"] == logged
    with open(os.path.join(lm_workdir, "config.json")) as f:
        config = config_lib.from_dict(json.load(f))
    resolved = tasks.resolve_model_config(config.model, vocab_size=model["vocab_size"])
    assert model == {**dataclasses.asdict(resolved), "num_params": logged}
    assert model["d_model"] > 0 and model["num_layers"] > 0


def test_eval_on_other_text_reads_only_the_held_out_split(lm_workdir, corpus, tmp_path, capsys):
    """`lrulm eval` prepares the held-out split alone, with the run's tokenizer: the train
    files are not read (here: gone) nor tokenized; other eval files get a cache of their
    own, so the run's own eval cache is kept; a default-corpus run takes eval files too."""
    from lrulm.data import lm as lm_data

    run = str(tmp_path / "run")
    shutil.copytree(lm_workdir, run)
    with open(os.path.join(run, "config.json")) as f:
        config = config_lib.from_dict(json.load(f))
    config.data.train_files = str(tmp_path / "gone" / "*.jsonl")
    data = os.path.join(run, "data")
    for name in ("train.tokens.npy", "train.meta.json"):
        os.remove(os.path.join(data, name))
    own_cache = {f: os.stat(os.path.join(data, f)).st_mtime_ns for f in os.listdir(data)}
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    logged = [r["eval/loss"] for r in rows if "eval/loss" in r][-1]
    own = evaluation.evaluate_workdir(config, run)
    assert own["eval/loss"] == pytest.approx(logged, abs=1e-4)

    other = tmp_path / "other.jsonl"
    with open(other, "w") as f:
        for path in lm_data.default_corpus()[0][200:203]:
            f.write(json.dumps({"text": open(path, errors="replace").read()}) + "\n")
    config.data.eval_files = str(other)
    config.train.eval_steps = 10**6
    elsewhere = evaluation.evaluate_workdir(config, run)
    assert abs(elsewhere["eval/loss"] - own["eval/loss"]) > 1e-3
    assert "the eval split holds fewer than train.eval_steps=1000000" in capsys.readouterr().out
    config.data.train_files = ""  # as a run on the embedded default corpus has it
    assert evaluation.evaluate_workdir(config, run)["eval/loss"] == elsewhere["eval/loss"]
    added = set(os.listdir(data)) - set(own_cache)
    assert len(added) == 2 and all(f.startswith("eval-") for f in added), added
    assert {f: os.stat(os.path.join(data, f)).st_mtime_ns for f in own_cache} == own_cache
    # Text the run trained on is scored, and said (training refuses it as held-out text).
    config.data.train_files, config.data.eval_files = corpus["train"], corpus["train"]
    trained_on = evaluation.evaluate_workdir(config, run)
    assert "this evaluation scores text the model trained on" in capsys.readouterr().out
    assert abs(trained_on["eval/loss"] - own["eval/loss"]) > 1e-4


def test_full_eval_pass_scores_every_token_once(lm_workdir):
    """train.eval_steps <= 0: every token of the eval split is a target exactly once, in
    order, split over processes' rows as any batch is; the padding weighs nothing."""
    with open(os.path.join(lm_workdir, "config.json")) as f:
        config = config_lib.from_dict(json.load(f))
    config.train.eval_steps = 0
    task = tasks.make_task(config, lm_workdir)
    stream = np.asarray(task.held_out["eval"].stream.tokens())
    assert (stream.size - 1) % config.train.seq_len  # the split ends in a partial sequence
    for global_batch, local_batch in [(8, 8), (8, 4), (5, 5)]:
        rows = {}
        for offset in range(0, global_batch, local_batch):
            batches = task.eval_batches(
                "eval",
                global_batch=global_batch,
                row_offset=offset,
                local_batch=local_batch,
                num_batches=0,
            )
            for step, batch in enumerate(batches):
                for j in range(local_batch):
                    rows[step * global_batch + offset + j] = (
                        batch["inputs"][j],
                        batch["targets"][j],
                    )
        inputs = np.concatenate([rows[i][0] for i in sorted(rows)])
        targets = np.concatenate([rows[i][1] for i in sorted(rows)])
        real = targets != 0
        assert real.sum() == stream.size - 1 and not real[real.sum() :].any()
        np.testing.assert_array_equal(targets[real], stream[1:])
        np.testing.assert_array_equal(inputs[real], stream[:-1])
    full = evaluation.evaluate_workdir(config, lm_workdir)
    assert full["eval/tokens"] == stream.size - 1
    config.train.eval_steps = 2
    part = evaluation.evaluate_workdir(config, lm_workdir)
    assert part["eval/tokens"] == 2 * config.train.global_batch_size * config.train.seq_len
    assert abs(full["eval/loss"] - part["eval/loss"]) < 0.5 and full["step"] == part["step"]


@pytest.mark.parametrize("damage", ["_METADATA", "manifest.ocdbt"])
def test_reading_commands_skip_a_damaged_newest_checkpoint(lm_workdir, tmp_path, damage):
    """`lrulm eval` and `lrulm generate` fall back to the previous checkpoint and move
    nothing, whichever file of the newest one is lost; a step asked for by name fails."""
    import shutil

    from lrulm import generate as gen

    workdir = str(tmp_path / "run")
    shutil.copytree(lm_workdir, workdir)
    os.remove(os.path.join(workdir, "checkpoints", "8", "state", damage))
    with open(os.path.join(workdir, "config.json")) as f:
        config = config_lib.from_dict(json.load(f))
    assert evaluation.evaluate_workdir(config, workdir)["step"] == 4
    _, _, step = gen.load_model(workdir)
    assert step == 4
    with pytest.raises(ValueError, match="no checkpoint in .* reads back:\n  step 8"):
        gen.load_model(workdir, step=8)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "8"]


def test_eval_at_start_scores_the_initial_state_once(tmp_path, corpus):
    """train.eval_at_start: an evaluation at step 0 (near ln(vocab): the initial logits have
    unit scale), before any step; a resumed run does not repeat it."""
    run = str(tmp_path / "run")
    common = ["train.eval_at_start=True", "train.eval_every=2", "checkpoint.every_steps=2"]
    train.train_and_evaluate(_config(*common, "train.steps=2", corpus=corpus), run)
    train.train_and_evaluate(_config(*common, "train.steps=4", corpus=corpus), run)
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    evals = {r["step"]: r["eval/loss"] for r in rows if "eval/loss" in r}
    assert sorted(evals) == [0, 2, 4], evals
    with open(os.path.join(run, "model.json")) as f:
        vocab = json.load(f)["vocab_size"]
    assert abs(evals[0] - math.log(vocab)) < 1.0 and evals[4] < evals[0]


def test_a_runs_relative_paths_are_read_from_where_it_started(lm_workdir, tmp_path):
    """A run started in START with relative data paths: `lrulm eval --workdir` from
    elsewhere reads START's files (starts.jsonl records where each start ran), and gives
    the run's own evaluation; paths given on the command line stay relative to here."""
    import subprocess
    import sys

    from lrulm import run_config

    run = str(tmp_path / "run")
    shutil.copytree(lm_workdir, run)
    start = tmp_path / "start"
    recorded = json.load(open(os.path.join(run, "config.json")))
    for key in ("train_files", "eval_files"):
        os.makedirs(start / "corpus", exist_ok=True)
        shutil.copy(recorded["data"][key], start / "corpus" / f"{key}.jsonl")
        recorded["data"][key] = f"corpus/{key}.jsonl"
    json.dump(recorded, open(os.path.join(run, "config.json"), "w"))
    with open(os.path.join(run, "starts.jsonl"), "a") as f:
        f.write(json.dumps({"step": 8, "cwd": str(start)}) + "\n")
    assert run_config.started_in(run) == str(start)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-m", "lrulm", "eval", "--workdir", run],
        cwd=elsewhere, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": root},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in open(os.path.join(lm_workdir, "metrics.jsonl"))]
    logged = [r["eval/loss"] for r in rows if "eval/loss" in r][-1]
    assert abs(json.loads(out.stdout)["eval/loss"] - logged) < 1e-4
    config = config_lib.from_dict(recorded)
    config.data.eval_sets = "a=x/*.jsonl,/abs/y.txt;b=z.txt"
    config.data.tokenizer = "/abs/t.model"
    changed = run_config.rebase_paths(config, "/s")
    assert changed == ["data.train_files", "data.eval_files", "data.eval_sets"]
    assert config.data.eval_sets == "a=/s/x/*.jsonl,/abs/y.txt;b=/s/z.txt"
    assert config.data.tokenizer == "/abs/t.model" and config.data.data_dir == ""
    config.data.train_files, config.data.mixture = "", "w=web/*.jsonl@0.7;c=/c/*.py@0.3"
    assert run_config.rebase_paths(config, "/s") == ["data.mixture"]
    assert config.data.mixture == "w=/s/web/*.jsonl@0.7;c=/c/*.py@0.3"
