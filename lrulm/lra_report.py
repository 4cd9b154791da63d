"""`lrulm lra-report`: LRA test accuracy of finished runs beside the LRU paper's Table 3.

Each workdir holds the `results.json` the trainer writes after the last step (test
accuracy of the best-validation checkpoint) and the `config.json` it ran with.
When several runs of one task are given, the table reports the one with the best
validation accuracy, the way the paper selects (picking on test accuracy would
overstate it); every run is listed below the table, with what keeps its number from
being comparable with the paper's: settings other than the paper's Table 8/9 (a
smaller model, fewer steps), a run extended past its results, or a final state tested
in place of a lost best checkpoint.
"""

from __future__ import annotations

import glob
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

# Paper order and display names.
TASK_NAMES = {
    "listops": "ListOps",
    "text": "Text",
    "retrieval": "Retrieval",
    "image": "Image",
    "pathfinder": "Pathfinder",
    "pathx": "Path-X",
}

# LRU paper (Orvieto et al. 2023) Table 3, test accuracy in %.
PAPER: dict[str, dict[str, float]] = {
    "LRU": dict(listops=60.2, text=89.4, retrieval=89.9, image=89.0, pathfinder=95.1, pathx=94.2),
    "S4": dict(listops=59.6, text=86.8, retrieval=90.9, image=88.7, pathfinder=94.2, pathx=96.4),
    "S5": dict(listops=62.2, text=89.3, retrieval=91.4, image=88.0, pathfinder=95.3, pathx=98.6),
}
MISSING = "–"

# The paper's settings (Tables 8/9, App. D.2) as config.json keys: depth 6, BatchNorm,
# AdamW with weight decay 0.05 and 10% warm-up everywhere; configs/lra/*.py set them
# (tests/test_lra_train.py checks the two agree).
_COMMON = {
    "model.num_layers": 6,
    "model.norm": "batch",
    "optim.weight_decay": 0.05,
    "optim.warmup_fraction": 0.1,
    "optim.schedule": "cosine",
    "optim.no_decay": "",
    "optim.ema": 0.0,
    "optim.final_lr_fraction": 0.0,
    "train.label_smoothing": 0.0,
    # The paper's block, pooling, precision and AdamW, as every configs/lra/ file sets them.
    "model.d_ff": 0,
    "model.dtype": "float32",
    "lra.pooling": "mean",
    "optim.optimizer": "adamw",
    "optim.mu_dtype": "",
    "optim.grad_clip": 0.0,
    "optim.grad_accum_steps": 1,  # BatchNorm's statistics are of the micro-batch
}
# Keys added after runs were made: a config.json without one had this value.
_ADDED_KEYS = {
    "optim.schedule": "cosine",
    "optim.no_decay": "",
    "optim.ema": 0.0,
    "optim.final_lr_fraction": 0.0,
    "train.label_smoothing": 0.0,
    "optim.optimizer": "adamw",
    "optim.mu_dtype": "",
}
_KEYS = (
    "model.d_model", "model.d_state", "train.steps", "train.global_batch_size",
    "optim.lr_factor", "model.dropout", "model.r_min", "model.r_max", "model.max_phase",
    "train.seq_len", "model.bidirectional", "model.glu",
)  # fmt: skip
PAPER_SETTINGS: dict[str, dict[str, object]] = {
    task: {**_COMMON, **dict(zip(_KEYS, values))}
    for task, values in {
        "listops": (128, 256, 80_000, 32, 0.5, 0.0, 0.0, 0.99, 2 * math.pi, 2000, False, "full"),
        "text": (256, 192, 50_000, 32, 0.1, 0.1, 0.5, 0.9, 2 * math.pi, 4096, False, "full"),
        "retrieval": (128, 256, 100_000, 64, 0.5, 0.1, 0.5, 0.9, 2 * math.pi, 4000, False, "full"),
        "image": (512, 384, 180_000, 50, 0.25, 0.1, 0.9, 0.999, 2 * math.pi, 1024, False, "full"),
        "pathfinder": (
            192, 256, 500_000, 64, 0.25, 0.0, 0.9, 0.999, 2 * math.pi, 1024, True, "full"
        ),
        "pathx": (
            128, 256, 250_000, 32, 0.25, 0.0, 0.999, 0.9999, math.pi / 10, 16384, True, "half"
        ),
    }.items()
}  # fmt: skip


class NotLRARun(ValueError):
    """A workdir of another task (e.g. a language model)."""


@dataclass(frozen=True)
class Run:
    """One finished LRA run, accuracies as fractions in [0, 1]."""

    workdir: str
    task: str
    step: int
    test_accuracy: float
    eval_accuracy: float | None  # best validation accuracy, None if not recorded
    best_step: int | None
    test_examples: int | None = None
    # Why the number is not comparable with the paper's (empty: it is).
    notes: tuple[str, ...] = field(default=())


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path} is not valid JSON ({e}); the run may have been cut off while writing "
            "it: resume it with the same `lrulm train` command"
        ) from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, expected a JSON object")
    return data


def _lookup(config: dict, key: str):
    node = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


_PLOT_FORMATS = ("png", "svg", "pdf")


def _plot_format(path: str) -> str:
    """The chart's format, from the file name's extension (none: png)."""
    return os.path.splitext(path)[1].lstrip(".").lower() or "png"


def _same(value, paper) -> bool:
    if isinstance(paper, (bool, str)):
        return value == paper
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return number and math.isclose(value, paper, rel_tol=1e-6, abs_tol=1e-12)


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def differences(task: str, config: dict) -> list[str]:
    """The paper settings (PAPER_SETTINGS) a run's config.json does not have, as
    "key value≠paper" strings ("key unknown" where config.json lacks the key)."""
    out = []
    for key, paper in PAPER_SETTINGS[task].items():
        name = key.split(".", 1)[1]
        try:
            value = _lookup(config, key)
        except KeyError:
            if key not in _ADDED_KEYS:
                out.append(f"{name} unknown")
                continue
            value = _ADDED_KEYS[key]
        if not _same(value, paper):
            out.append(f"{name} {_short(value)}≠{_short(paper)}")
    return out


def _fraction(path: str, results: dict, key: str, *, optional: bool = False) -> float | None:
    """results[key] checked to be an accuracy in [0, 1] (NaN or null: None if optional)."""
    value = results.get(key)
    if optional and (value is None or (isinstance(value, float) and math.isnan(value))):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(
            f"{path}: {key} is {value!r}, not an accuracy in [0, 1]; the trainer writes this "
            "file: rerun the run's `lrulm train` command after deleting it"
        )
    return float(value)


def _count(path: str, results: dict, key: str) -> int | None:
    value = results.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{path}: {key} is {value!r}, not a count")
    return int(value)


def _finished_runs_below(workdir: str) -> bool:
    return bool(glob.glob(os.path.join(glob.escape(workdir), "*", "results.json")))


def load_run(workdir: str) -> Run:
    """Reads one workdir's results.json (and config.json for the task and settings).

    Raises:
      FileNotFoundError: the directory or its results.json does not exist.
      ValueError: the files are malformed, or the run is not an LRA task.
    """
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"{workdir}: no such run directory")
    results_path = os.path.join(workdir, "results.json")
    config_path = os.path.join(workdir, "config.json")
    results = _read_json(results_path) if os.path.exists(results_path) else None
    config = _read_json(config_path) if os.path.exists(config_path) else None
    # results.json names the task its numbers are for; config.json is the last config a
    # run started with.
    task = (results or {}).get("task")
    if task is None and config is not None:
        task = config.get("task")
    if task is not None and (not isinstance(task, str) or task not in TASK_NAMES):
        raise NotLRARun(
            f"{workdir} is a {task!r} run; lra-report reads LRA runs: {', '.join(TASK_NAMES)}"
        )
    if results is None:
        if config is None and _finished_runs_below(workdir):
            raise FileNotFoundError(
                f"{workdir} holds runs rather than being one: give them, e.g. "
                f"`lrulm lra-report {os.path.join(workdir, '*')}`"
            )
        if config is None:
            raise FileNotFoundError(
                f"{workdir} has no config.json (written once a run's set-up is done) and no "
                "results.json: not a run, or one stopped before its set-up finished"
            )
        raise FileNotFoundError(
            f"{workdir} has no results.json: the trainer writes it after the last step, with "
            "the test accuracy of the best-validation checkpoint. Finish the run (re-running "
            "the same `lrulm train` command resumes it) or leave this directory out"
        )
    if task is None:
        raise ValueError(f"{results_path} does not name its task")
    if "test/accuracy" not in results:
        raise ValueError(f"{results_path} has no 'test/accuracy'; keys: {sorted(results)}")
    step = _count(results_path, results, "step") or 0
    best_step = _count(results_path, results, "best/step")
    eval_accuracy = _fraction(results_path, results, "best/eval_accuracy", optional=True)
    notes = []
    if config is None:
        notes.append("no config.json: settings unknown")
    else:
        if config.get("task") == task:
            notes += differences(task, config)
        else:  # a later start with another task's config rewrote config.json
            notes.append(f"config.json is now a {config.get('task')!r} run: settings unknown")
        steps = (config.get("train") or {}).get("steps")
        if config.get("task") == task and isinstance(steps, int) and steps != step:
            notes.append(f"results.json is of step {step} but the run now trains {steps} steps")
    if results.get("best/fallback") or eval_accuracy is None and "best/eval_accuracy" in results:
        notes.append(f"the final state (step {step}) tested: the best checkpoint was lost")
    return Run(
        workdir=workdir,
        task=task,
        step=step,
        test_accuracy=_fraction(results_path, results, "test/accuracy"),
        eval_accuracy=eval_accuracy,
        best_step=best_step,
        test_examples=_count(results_path, results, "test/examples"),
        notes=tuple(notes),
    )


def select(runs: Sequence[Run]) -> dict[str, Run]:
    """Per task, the run with the best validation accuracy (the first on ties) among
    those comparable with the paper (no notes), or among all if none is."""

    def rank(run: Run) -> tuple[bool, float]:
        return (not run.notes, -1.0 if run.eval_accuracy is None else run.eval_accuracy)

    chosen: dict[str, Run] = {}
    for run in runs:
        best = chosen.get(run.task)
        if best is None or rank(run) > rank(best):
            chosen[run.task] = run
    return chosen


def _pct(x: float | None) -> str:
    return MISSING if x is None else f"{x:.1f}"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _average(values: dict[str, float]) -> float | None:
    """The LRA average, over all six tasks only (a partial average would mislead)."""
    return sum(values.values()) / len(TASK_NAMES) if len(values) == len(TASK_NAMES) else None


def table(runs: Sequence[Run]) -> str:
    """The markdown report: lrulm beside the paper's models, then every run."""
    chosen = select(runs)
    ours = {t: 100 * r.test_accuracy for t, r in chosen.items()}
    header = ["model", *TASK_NAMES.values(), "Avg"]
    lines = ["## LRA test accuracy (%)", "", _row(header), _row(["---"] * len(header))]
    starred = {t for t, r in chosen.items() if r.notes}
    cells = [_pct(ours.get(t)) + ("*" if t in starred else "") for t in TASK_NAMES]
    lines.append(_row(["lrulm", *cells, _pct(_average(ours))]))
    for model, scores in PAPER.items():
        cells = [_pct(scores[t]) for t in TASK_NAMES]
        lines.append(_row([f"{model} (paper)", *cells, _pct(_average(scores))]))
    lru = PAPER["LRU"]
    delta = [MISSING if t not in ours else f"{ours[t] - lru[t]:+.1f}" for t in TASK_NAMES]
    ours_avg, lru_avg = _average(ours), _average(lru)
    delta.append(MISSING if ours_avg is None else f"{ours_avg - lru_avg:+.1f}")
    lines.append(_row(["lrulm − LRU (paper)", *delta]))
    lines += [
        "",
        f"lrulm: {len(runs)} run(s); per task the run with the best validation accuracy. "
        f"Paper numbers: Orvieto et al. 2023, Table 3. {MISSING} = not run; Avg only when "
        "all six tasks ran.",
    ]
    if starred:
        lines.append(
            "\n\\* not comparable with the paper's number: the run's notes below say why "
            "(settings other than the paper's Table 8/9, or not final)."
        )
    lines += [
        "",
        "### Runs",
        "",
        _row(
            [
                "task",
                "workdir",
                "step",
                "best val acc (step)",
                "test acc (examples)",
                "reported",
                "notes",
            ]
        ),
        _row(["---"] * 7),
    ]
    order = list(TASK_NAMES)
    for run in sorted(runs, key=lambda r: order.index(r.task)):
        val = MISSING if run.eval_accuracy is None else f"{100 * run.eval_accuracy:.1f}"
        if run.best_step is not None:
            val += f" ({run.best_step})"
        mark = "✓" if chosen[run.task] is run else ""
        lines.append(
            _row(
                [
                    TASK_NAMES[run.task],
                    run.workdir,
                    str(run.step),
                    val,
                    f"{100 * run.test_accuracy:.1f}"
                    + ("" if run.test_examples is None else f" ({run.test_examples})"),
                    mark,
                    "; ".join(run.notes) or "paper settings",
                ]
            )
        )
    return "\n".join(lines)


def bar_chart(runs: Sequence[Run], path: str) -> None:
    """Writes a grouped bar chart (PNG) of lrulm's and the paper's accuracy per task."""
    # The object-oriented Agg API draws without touching pyplot's global backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    chosen = select(runs)
    series = {"lrulm": {t: 100 * r.test_accuracy for t, r in chosen.items()}}
    series.update({f"{m} (paper)": s for m, s in PAPER.items()})
    fig = Figure(figsize=(9, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / len(series)
    for i, (label, scores) in enumerate(series.items()):
        xs = [k + (i - (len(series) - 1) / 2) * width for k in range(len(TASK_NAMES))]
        heights = [scores.get(t, 0.0) for t in TASK_NAMES]
        bars = ax.bar(xs, heights, width, label=label)
        if label == "lrulm":
            for x, t, bar in zip(xs, TASK_NAMES, bars):
                text = _pct(scores.get(t)) if t in scores else "not run"
                ax.text(
                    x, bar.get_height() + 1, text, ha="center", va="bottom", fontsize=7, rotation=90
                )
    ax.set_xticks(range(len(TASK_NAMES)), list(TASK_NAMES.values()))
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 118)  # headroom above 100% for the legend
    ax.set_title("Long Range Arena: lrulm vs the LRU paper (Table 3)")
    ax.legend(loc="upper center", ncol=len(series), fontsize=8, frameon=False)
    fig.tight_layout()
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, format=_plot_format(path))


def report(workdirs: Sequence[str], plot: str | None = None) -> str:
    """The markdown accuracy table for finished LRA runs; optionally a bar chart.

    Args:
      workdirs: run directories, each with results.json and config.json; several
        runs of one task are allowed (the best-validation one is reported).
      plot: a PNG path to also write a bar chart to; None for none.

    Returns:
      The markdown report (the table beside the paper's LRU, S4 and S5, then each run).

    Raises:
      FileNotFoundError: a directory or its results.json is missing (one workdir given).
      ValueError: no workdirs, malformed files, or a run that is not an LRA task (one
        workdir given); with several, such directories are left out and listed, and
        only none usable is an error.
    """
    if not workdirs:
        raise ValueError("give at least one run directory")
    if plot:  # before reading anything: a bad path must not cost the table
        parent = os.path.dirname(os.path.abspath(plot))
        while not os.path.isdir(parent) and os.path.dirname(parent) != parent:
            parent = os.path.dirname(parent)  # the chart's folder is made if missing
        if os.path.isdir(plot) or not os.access(parent, os.W_OK):
            raise ValueError(f"--plot {plot}: give a .png file in a writable directory")
        if _plot_format(plot) not in _PLOT_FORMATS:
            raise ValueError(f"--plot {plot}: give a .png, .svg or .pdf file")
    seen, unique = set(), []
    for workdir in workdirs:  # `runs/a runs/a/ runs/*` names runs/a three times
        key = os.path.realpath(workdir)
        if key not in seen:
            seen.add(key)
            unique.append(workdir)
    workdirs = unique
    if len(workdirs) == 1:
        runs, skipped = [load_run(workdirs[0])], []
    else:  # e.g. `runs/*`: LM runs and unfinished runs are left out, and listed
        runs, skipped = [], []
        for workdir in workdirs:
            try:
                runs.append(load_run(workdir))
            except (FileNotFoundError, ValueError) as e:
                skipped.append(str(e))
        if not runs:
            raise ValueError(
                "none of the directories is a finished LRA run:\n  " + "\n  ".join(skipped)
            )
    text = table(runs)
    if skipped:
        text += "\n\nLeft out:\n" + "\n".join(f"- {reason}" for reason in skipped)
    if plot:
        try:
            bar_chart(runs, plot)
        except OSError as e:
            raise ValueError(f"--plot {plot}: cannot write it ({e}); the table:\n\n{text}") from e
        text += f"\n\nBar chart: {plot}"
    return text
