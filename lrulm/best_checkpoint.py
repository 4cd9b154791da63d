"""The best-on-eval checkpoint: WORKDIR/best/, kept beside WORKDIR/checkpoints/.

LRA runs always keep one (their results.json and `lrulm lra-report` report it); language
models with checkpoint.keep_best ("loss", "bits_per_byte", "perplexity", "accuracy", or
"NAME/METRIC" of a data.eval_sets set). `lrulm eval/generate/score --best` and
tools/export_params.py read it. It is an Orbax CheckpointManager directory like
WORKDIR/checkpoints/ (max_to_keep=1) whose metadata also holds the metric and its value,
so the best so far survives a resume.
"""

from __future__ import annotations

import json
import math
import os

import jax

from lrulm import checkpoint as ckpt_lib
from lrulm import metrics as metrics_lib


class BestCheckpoint:
    """The checkpoint with the best value of an "eval" metric, under WORKDIR/best/.

    Its value survives a resume (it is in the checkpoint's metadata). In one process its
    saves are asynchronous (training goes on while a better state is written; `restore`
    and `close` wait for it); with several they are not: two Orbax managers saving the
    same step at once take the same barrier names ("_async_write_complete.<step>").
    """

    def __init__(self, workdir: str, metric: str, mode: str, *, async_save: bool = True):
        if mode not in ("max", "min"):
            raise ValueError(f"best-checkpoint mode must be 'max' or 'min'; got {mode!r}")
        self.metric, self.mode = metric, mode
        async_save = async_save and jax.process_count() == 1
        self.ckpt = ckpt_lib.Checkpointer(
            os.path.join(workdir, "best"), max_to_keep=1, async_save=async_save, writer=True
        )
        self.ckpt.run_dir = os.path.abspath(workdir)
        self.value, self.step = None, None
        steps = self.ckpt.steps()
        if steps:
            try:
                meta = self.ckpt.metadata(steps[-1])
                self.value, self.step = meta["best_value"], steps[-1]
            except Exception as e:  # noqa: BLE001 - damaged metadata: the next eval saves anew
                if ckpt_lib.unavailable(e):
                    raise
                metrics_lib.say(
                    f"lrulm: the best checkpoint {self.ckpt.directory}/{steps[-1]} is damaged "
                    f"({metrics_lib.brief(e)}); the next evaluation saves a new one"
                )
                self.ckpt._quarantine(steps[-1])
                meta = {}
            if meta.get("metric", metric) != metric:  # run_config.check_start refuses it
                self.ckpt.close()
                raise ValueError(
                    f"{self.ckpt.directory} keeps the best eval {meta['metric']}, not {metric}; "
                    "move it aside to keep the best by this one"
                )

    def update(self, step: int, metrics: dict, state, metadata: dict | None = None) -> bool:
        """Saves state (with `metadata`, e.g. the resolved model) if metrics[metric] is the
        best so far; returns whether it was."""
        if self.metric not in metrics:
            raise ValueError(
                f"checkpoint.keep_best={self.metric!r}: the evaluation reports no such metric "
                f"(it reports {', '.join(sorted(metrics))})"
            )
        value = metrics[self.metric]
        if not math.isfinite(value):  # a NaN is never the best
            return False
        if self.value is not None and (
            value <= self.value if self.mode == "max" else value >= self.value
        ):
            return False
        self.value, self.step = value, step
        if step in self.ckpt.steps():  # saved before a resume from an earlier checkpoint
            self.ckpt.wait()
            self.ckpt.manager.delete(step)
        meta = {**(metadata or {}), "best_value": value, "metric": self.metric}
        self.ckpt.save(step, state, metadata=meta)  # the arrays are copied before it returns
        return True

    def restore(self, abstract_state) -> ckpt_lib.Restored:
        """The best checkpoint's state. Raises FileNotFoundError when there is none, and
        CheckpointsDamaged (having moved it aside) when it does not read back."""
        self.ckpt.wait()  # a save in flight
        restored = self.ckpt.restore_latest(abstract_state)
        if restored is None:
            raise FileNotFoundError(f"no best checkpoint under {self.ckpt.directory}")
        return restored

    def close(self) -> None:
        self.ckpt.close()


def supersede_best(workdir: str, why: str) -> None:
    """Moves WORKDIR/best/ aside (to best.superseded-N/, said) where the run's evaluations
    no longer compare with its value (`why`): a run started anew beside an earlier one's
    best checkpoint, or a resume that evaluates other tokens. Process 0 only."""
    where = os.path.join(workdir, "best")
    if not os.path.isdir(where):
        return
    kept = kept_best(workdir)
    n = 1
    while os.path.exists(f"{where}.superseded-{n}"):
        n += 1
    os.rename(where, f"{where}.superseded-{n}")
    what = f" (the best eval {kept[0]}, {kept[1]:.4g} at step {kept[2]})" if kept else ""
    metrics_lib.say(
        f"lrulm: moved {where}{what} to {where}.superseded-{n}: {why}; the run keeps its "
        "best checkpoint anew from its next evaluation"
    )


def no_best(workdir: str) -> str:
    """The error for --best where WORKDIR/best/ holds no checkpoint."""
    try:
        with open(os.path.join(workdir, "config.json")) as f:
            keep = (json.load(f).get("checkpoint") or {}).get("keep_best", "")
    except (OSError, ValueError, AttributeError):
        keep = ""
    if keep:
        return (
            f"no best checkpoint in {os.path.join(workdir, 'best', 'checkpoints')} yet: the "
            f"run keeps the best eval {keep} from its first evaluation on (none has been, or "
            "none was finite); leave out --best"
        )
    return (
        f"no best checkpoint in {os.path.join(workdir, 'best', 'checkpoints')}: LRA runs keep "
        "one from their first evaluation on, language models with checkpoint.keep_best set "
        "(e.g. --config.checkpoint.keep_best=loss); leave out --best"
    )


def best_damaged(directory: str, step: int, error: BaseException) -> str:
    """The error for --best where the best checkpoint does not read back."""
    return (
        f"the best checkpoint {directory}/{step} does not read back "
        f"({metrics_lib.brief(error)}): it is damaged; leave out --best (the newest "
        "checkpoint), or give --step"
    )


def kept_best(workdir: str) -> tuple[str, float, int] | None:
    """(metric, value, step) of the best checkpoint WORKDIR/best/ holds; None if there is
    none, or its metadata does not read (the run's next evaluation then saves anew)."""
    meta = kept_metadata(workdir)
    return (meta["metric"], meta["best_value"], meta["step"]) if meta else None


def kept_metadata(workdir: str) -> dict | None:
    """The metadata of the best checkpoint WORKDIR/best/ holds (its "step", "metric",
    "best_value", and "eval_data": the evaluated split's fingerprint where recorded);
    None if there is none or it does not read."""
    directory = os.path.join(workdir, "best")
    steps = ckpt_lib.checkpoint_steps(directory)
    if not steps:
        return None
    ckpt = ckpt_lib.Checkpointer(directory, max_to_keep=1, async_save=False)
    try:
        meta = ckpt.metadata(steps[-1])
        return {**meta, "step": steps[-1]} if "metric" in meta and "best_value" in meta else None
    except Exception:  # noqa: BLE001 - damaged: BestCheckpoint says so and moves it aside
        return None
    finally:
        ckpt.close()


def steps_to_read(workdir: str, step: int | None, best: bool) -> tuple[str, list[int]]:
    """(the directory whose checkpoints/ a reader reads, its steps) for checkpoint `step`
    of workdir (None: the newest that reads back) or, with best, the best-on-eval one.
    Raises, saying what to do, where there is none or no such step; reads no arrays."""
    if best and step is not None:
        raise ValueError("give a step or best, not both")
    saved = os.path.join(workdir, "best") if best else workdir
    directory = os.path.join(saved, "checkpoints")
    steps = ckpt_lib.checkpoint_steps(saved)
    if not steps:
        raise FileNotFoundError(
            no_best(workdir) if best else f"no checkpoint in {directory}; run `lrulm train` first"
        )
    if step is not None and step not in steps:
        best_steps = ckpt_lib.checkpoint_steps(os.path.join(workdir, "best"))
        hint = f" (step {step} is the best-on-eval checkpoint: add --best)" * (step in best_steps)
        raise FileNotFoundError(
            f"no checkpoint of step {step} in {directory}; its steps: "
            + ", ".join(map(str, steps))
            + hint
        )
    return saved, steps
