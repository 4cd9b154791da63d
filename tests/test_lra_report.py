"""`lrulm lra-report`: finished LRA runs beside the paper's Table 3, what keeps a run from
being comparable with the paper, and clear errors for what is not a finished run."""

from __future__ import annotations

import json
import math
import os

import pytest

from lrulm import config as config_lib
from lrulm import lra_report, main
from lrulm.data import lra

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _paper_config(task: str, **changes) -> dict:
    """A config.json with the paper's settings for task; changes as {"model.d_model": 64}."""
    config: dict = {"task": task}
    for key, value in {**lra_report.PAPER_SETTINGS.get(task, {}), **changes}.items():
        group, name = key.split(".")
        config.setdefault(group, {})[name] = value
    return config


def _fake_run(path, task: str, test: float, val, step: int | None = None, **changes):
    """A finished run's workdir; by default with the paper's settings, run to the end."""
    os.makedirs(path)
    paper = lra_report.PAPER_SETTINGS.get(task, {})  # none for an LM run
    step = paper.get("train.steps", 100) if step is None else step
    config = _paper_config(task, **{"train.steps": step, **changes})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(path, "results.json"), "w") as f:
        json.dump(
            {
                "task": task,
                "step": step,
                "test/accuracy": test,
                "test/loss": 1.0,
                "best/eval_accuracy": val,
                "best/step": step // 2,
            },
            f,
        )
    return str(path)


def test_report_table_and_plot(tmp_path):
    runs = [
        _fake_run(tmp_path / "a", "listops", test=0.553, val=0.50),
        _fake_run(tmp_path / "b", "listops", test=0.521, val=0.60),  # best on validation
        _fake_run(tmp_path / "c", "pathx", test=0.912, val=0.90),
    ]
    plot = tmp_path / "out" / "lra.png"
    text = lra_report.report(runs, plot=str(plot))
    lines = text.splitlines()

    def cells(first: str) -> list[str]:
        line = next(line for line in lines if line.startswith(f"| {first}"))
        return [c.strip() for c in line.strip("|").split("|")]

    tasks = ["ListOps", "Text", "Retrieval", "Image", "Pathfinder", "Path-X"]
    assert cells("model") == ["model", *tasks, "Avg"]
    # The run chosen on validation (52.1), not the better test number (55.3).
    assert cells("lrulm |") == ["lrulm", "52.1", "–", "–", "–", "–", "91.2", "–"]
    assert cells("LRU (paper)") == [
        "LRU (paper)",
        "60.2",
        "89.4",
        "89.9",
        "89.0",
        "95.1",
        "94.2",
        "86.3",
    ]
    assert cells("S4 (paper)")[1:7] == ["59.6", "86.8", "90.9", "88.7", "94.2", "96.4"]
    assert cells("S5 (paper)")[1:7] == ["62.2", "89.3", "91.4", "88.0", "95.3", "98.6"]
    assert cells("lrulm − LRU")[1:3] == ["-8.1", "–"]
    listed = [l for l in lines if l.startswith(("| ListOps", "| Path-X"))]
    assert len(listed) == 3 and sum("| ✓ |" in l for l in listed) == 2
    assert all(l.rstrip().endswith("| paper settings |") for l in listed)
    assert "not comparable" not in text
    data = plot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    svg = tmp_path / "out" / "lra.svg"  # the format the name says (was PNG bytes in any)
    lra_report.report(runs, plot=str(svg))
    assert b"<svg" in svg.read_bytes()[:2000]
    with pytest.raises(ValueError, match="give a .png, .svg or .pdf file"):
        lra_report.report(runs, plot=str(tmp_path / "lra.gif"))


def test_report_errors_name_the_directory(tmp_path, capsys):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    with pytest.raises(FileNotFoundError, match="unfinished has no config.json .* not a run"):
        lra_report.report([str(unfinished)])
    (unfinished / "config.json").write_text(json.dumps(_paper_config("text")))
    with pytest.raises(FileNotFoundError, match="unfinished has no results.json"):
        lra_report.report([str(unfinished)])
    lm_run = _fake_run(tmp_path / "lm", "lm", test=0.5, val=0.5)
    with pytest.raises(ValueError, match="is a 'lm' run"):
        lra_report.report([lm_run])
    # The command line prints the message and exits 2.
    assert main.main(["lra-report", str(tmp_path / "missing")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    # An LM run that wrote no results.json is named as such, not as unfinished.
    os.remove(os.path.join(lm_run, "results.json"))
    with pytest.raises(ValueError, match="is a 'lm' run"):
        lra_report.report([lm_run])
    # `lra-report runs/*`: other runs are left out and listed; none usable is an error.
    good = _fake_run(tmp_path / "good", "text", test=0.8, val=0.8)
    text = lra_report.report([lm_run, str(unfinished), good])
    assert "| lrulm | – | 80.0 |" in text
    left_out = text.split("Left out:\n")[1].splitlines()
    assert len(left_out) == 2 and "is a 'lm' run" in left_out[0]
    assert "unfinished has no results.json" in left_out[1]
    with pytest.raises(ValueError, match="none of the directories is a finished LRA run"):
        lra_report.report([lm_run, str(unfinished)])


def test_report_takes_the_task_from_results(tmp_path):
    """A later failed start with another task's config rewrote nothing the report uses:
    results.json names the task its numbers are for."""
    run = _fake_run(tmp_path / "a", "listops", test=0.5, val=0.5)
    with open(os.path.join(run, "config.json"), "w") as f:
        json.dump({"task": "text"}, f)
    text = lra_report.report([run])
    assert "| lrulm | 50.0* | – |" in text
    assert "config.json is now a 'text' run: settings unknown" in text


def test_paper_settings_are_the_configs():
    """The report's Table 8/9 settings and configs/lra/*.py say the same."""
    for task in lra.TASKS:
        config = config_lib.load(os.path.join(REPO, "configs", "lra", f"{task}.py"))
        assert lra_report.differences(task, json.loads(config.to_json())) == [], task
    # A config.json from before optim.schedule and optim.no_decay had the paper's; a run
    # with another schedule or fewer decayed weights differs from it.
    old = json.loads(config.to_json())
    del old["optim"]["schedule"], old["optim"]["no_decay"]
    assert lra_report.differences(task, old) == []
    old["optim"].update(schedule="wsd", no_decay="scale")
    assert lra_report.differences(task, old) == ["schedule wsd≠cosine", "no_decay scale≠"]
    # The block, pooling, precision and optimizer are the paper's too.
    other = json.loads(config.to_json())
    other["model"].update(d_ff=512, dtype="bfloat16")
    other["lra"]["pooling"] = "last"
    other["optim"].update(optimizer="muon", grad_clip=1.0, grad_accum_steps=2)
    assert sorted(lra_report.differences(task, other)) == sorted([
        "d_ff 512≠0", "dtype bfloat16≠float32", "pooling last≠mean", "optimizer muon≠adamw",
        "grad_clip 1≠0", "grad_accum_steps 2≠1",
    ])  # fmt: skip


def test_runs_unlike_the_paper_are_starred_with_their_differences(tmp_path):
    tiny = _fake_run(
        tmp_path / "tiny", "listops", test=0.14, val=0.9, step=6,
        **{"model.d_model": 64, "model.num_layers": 2, "model.max_phase": 3.0},
    )  # fmt: skip
    text = lra_report.report([tiny])
    assert "| lrulm | 14.0* | – |" in text and "\\* not comparable with the paper" in text
    row = next(line for line in text.splitlines() if line.startswith("| ListOps | "))
    assert row.rstrip().endswith(
        "| num_layers 2≠6; d_model 64≠128; steps 6≠80000; max_phase 3≠6.283 |"
    )
    # Beside a run with the paper's settings, that one is reported whatever the
    # validation accuracies; among several, the best on validation.
    paper = _fake_run(tmp_path / "paper", "listops", test=0.6, val=0.55)
    assert "| lrulm | 60.0 | – |" in lra_report.report([tiny, paper])
    # A config.json without a setting: unknown, not assumed.
    with open(os.path.join(paper, "config.json")) as f:
        config = json.load(f)
    del config["model"]["glu"]
    with open(os.path.join(paper, "config.json"), "w") as f:
        json.dump(config, f)
    assert "glu unknown" in lra_report.report([paper])


def test_an_extended_run_and_a_lost_best_checkpoint_are_noted(tmp_path):
    # Resumed with more steps and stopped: results.json is the shorter run's.
    extended = _fake_run(tmp_path / "extended", "text", test=0.8, val=0.8, step=6)
    with open(os.path.join(extended, "config.json")) as f:
        config = json.load(f)
    config["train"]["steps"] = 30_000
    with open(os.path.join(extended, "config.json"), "w") as f:
        json.dump(config, f)
    text = lra_report.report([extended])
    assert "results.json is of step 6 but the run now trains 30000 steps" in text
    # The final state tested in place of the best checkpoint: null (NaN from older
    # versions) is not a validation accuracy, ranks below any, and is said.
    fallback = _fake_run(tmp_path / "fallback", "image", test=0.9, val=None)
    older = _fake_run(tmp_path / "older", "image", test=0.95, val=math.nan)
    scored = _fake_run(tmp_path / "scored", "image", test=0.7, val=0.1)
    text = lra_report.report([fallback, older, scored])
    assert "| lrulm | – | – | – | 70.0 |" in text
    assert text.count("the best checkpoint was lost") == 2


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("test/accuracy", None, "test/accuracy is None, not an accuracy in [0, 1]"),
        ("test/accuracy", 60.2, "test/accuracy is 60.2, not an accuracy"),
        ("test/accuracy", "0.5", "test/accuracy is '0.5', not an accuracy"),
        ("best/eval_accuracy", "0.2", "best/eval_accuracy is '0.2'"),
        ("step", -1, "step is -1, not a count"),
        ("task", ["listops"], "is a ['listops'] run"),
    ],
)
def test_malformed_results_name_the_file_and_key(tmp_path, key, value, message):
    run = _fake_run(tmp_path / "a", "listops", test=0.5, val=0.5)
    path = os.path.join(run, "results.json")
    with open(path) as f:
        results = json.load(f)
    results[key] = value
    with open(path, "w") as f:
        json.dump(results, f)
    with pytest.raises(ValueError) as e:
        lra_report.report([run])
    assert message in str(e.value)
    assert key == "task" or "a/results.json: " in str(e.value)  # the task error names the run


def test_report_arguments(tmp_path, capsys):
    run = _fake_run(tmp_path / "runs" / "a", "listops", test=0.5, val=0.5)
    # One run named three ways is one run.
    text = lra_report.report([run, run + "/", str(tmp_path / "runs" / "*").replace("*", "a")])
    assert "lrulm: 1 run(s)" in text
    # The folder that holds the runs: the error says to give the runs.
    with pytest.raises(FileNotFoundError, match=r"holds runs rather than being one.*runs/\*"):
        lra_report.report([str(tmp_path / "runs")])
    # A chart path that cannot be written is refused before anything is read.
    assert main.main(["lra-report", run, "--plot", str(tmp_path)]) == 2
    assert "give a .png file in a writable directory" in capsys.readouterr().err


def test_eval_of_the_best_step_without_best_says_to_add_it(tmp_path):
    """An LRA run's best-on-eval checkpoint lives in best/, not checkpoints/: asking
    `lrulm eval --step S` for it names --best."""
    from lrulm import evaluation

    (tmp_path / "checkpoints" / "20").mkdir(parents=True)
    (tmp_path / "best" / "checkpoints" / "10").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"its steps: 20 \(step 10 is the best-on-eval"):
        evaluation.evaluate_workdir(None, str(tmp_path), 10)
    with pytest.raises(FileNotFoundError, match="its steps: 20$"):
        evaluation.evaluate_workdir(None, str(tmp_path), 5)


@pytest.mark.parametrize(
    "key, value",
    [
        ("train.label_smoothing", 0.1),
        ("optim.ema", 0.999),
        ("optim.final_lr_fraction", 0.1),
        ("optim.optimizer", "muon"),
        ("optim.mu_dtype", "bfloat16"),
    ],
)
def test_keys_added_since_are_the_papers_when_absent_and_named_when_set(key, value):
    section, name = key.split(".")
    config = {}
    for k, v in lra_report.PAPER_SETTINGS["listops"].items():
        s, n = k.split(".")
        config.setdefault(s, {})[n] = v
    del config[section][name]  # a config.json from before the key
    assert lra_report.differences("listops", config) == []
    config[section][name] = value
    (diff,) = lra_report.differences("listops", config)
    assert diff.startswith(name)
