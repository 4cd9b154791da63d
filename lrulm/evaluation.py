"""Scoring held-out splits: each evaluation of a training run (`evaluate_splits`), an LRA
run's final test with its best checkpoint (`final_test`, results.json), and `lrulm eval`
(`evaluate_workdir`: one saved checkpoint on the eval, and LRA's test, split)."""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from lrulm import best_checkpoint as best_lib
from lrulm import checkpoint as ckpt_lib
from lrulm import experiment, tasks
from lrulm import metrics as metrics_lib
from lrulm.experiment import Experiment, evaluated_state, restore_target, to_global


def evaluate(exp: Experiment, eval_jit, state, batches, split: str = "eval") -> dict:
    """The task's metrics of one split's batches (`finalize` of the summed statistics)."""
    state = evaluated_state(state, exp)
    sums: dict[str, float] = {}
    for local in batches:
        out = jax.device_get(eval_jit(state, to_global(local, exp)))
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    return exp.task.finalize(sums, split) if sums else {}


def evaluate_splits(exp: Experiment, eval_jit, state, batches_of) -> dict:
    """Every split an evaluation scores (task.eval_splits: "eval", then a language model's
    data.eval_sets), as one row of logged names (eval/loss, eval/NAME/loss, ...)."""
    row = {}
    for split in exp.task.eval_splits:
        metrics = evaluate(exp, eval_jit, state, batches_of(split), split)
        row.update({f"{tasks.metric_prefix(split)}/{k}": v for k, v in metrics.items()})
    return row


def say_eval(writer, step: int, row: dict) -> None:
    """The console lines of an evaluation: the eval split's, then each eval set's."""
    for prefix in sorted({k.rsplit("/", 1)[0] for k in row}, key=lambda p: (p != "eval", p)):
        metrics = {k.rsplit("/", 1)[1]: v for k, v in row.items() if k.rsplit("/", 1)[0] == prefix}
        where = "" if prefix == "eval" else f" {prefix.removeprefix('eval/')}"
        writer.summary_line(f"eval{where} at step {step}", metrics)


def final_test(best, exp, eval_jit, test_batches, writer, step, workdir, state, *, trained):
    """The "test" split evaluated with the best-on-"eval" checkpoint (LRA reports test
    accuracy at the best validation accuracy, as the paper does); also results.json.
    A finished run run again (`trained` False: no step this time) reads its result back
    rather than testing (and logging) it twice: delete results.json to test again."""
    done = None if trained else _results_at(workdir, step)
    skip = done is not None
    if jax.process_count() > 1:  # process 0's file decides: every process tests, or none
        from jax.experimental import multihost_utils

        skip = bool(multihost_utils.broadcast_one_to_all(np.int32(skip)))
    if skip:
        metrics_lib.say(f"lrulm: the test result of step {step} is in {workdir}/results.json")
        return done or {}
    try:
        # The best checkpoint's own tree: its weight average, if it keeps one, is evaluated.
        target = restore_target(exp, best.ckpt, best.step)
        restored = best.restore(target)
        best_state, best_step, best_value = restored.state, restored.step, best.value
    except (ckpt_lib.CheckpointsDamaged, FileNotFoundError) as e:  # not stuck for ever
        metrics_lib.say(
            f"lrulm: warning: {metrics_lib.brief(e)}; testing the final state (step {step}) "
            "instead of the best one"
        )
        best_state, best_step, best_value = state, step, None
    test = evaluate(exp, eval_jit, best_state, test_batches)
    result = {f"test/{k}": v for k, v in test.items()}
    result["best/step"] = best_step
    # The value is None (JSON null) when the final state stood in for the best checkpoint:
    # its own eval value is not known here, and NaN is not JSON.
    result[f"best/eval_{best.metric}"] = best_value
    writer.write(step, {k: v for k, v in result.items() if v is not None})
    if best_value is None:
        result["best/fallback"] = "final_state"
        writer.summary_line(f"test with the final state (step {step})", test)
    else:
        writer.summary_line(f"test with the best eval checkpoint (step {best_step})", test)
    if jax.process_index() == 0:
        tasks.write_atomic(
            os.path.join(workdir, "results.json"),
            json.dumps({"task": exp.task.name, "step": step, **result}, indent=2),
        )
    return result


def _results_at(workdir: str, step: int) -> dict | None:
    """results.json's test result if it is of `step` (else None)."""
    try:
        with open(os.path.join(workdir, "results.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return None
    if saved.get("step") != step or saved.get("task") is None:
        return None
    return {k: v for k, v in saved.items() if k not in ("task", "step")}


def _mesh(config):
    """The run's mesh, or where its sizes do not fit these devices (a pod run scored on
    one host), data parallelism over all of them: checkpoints restore onto any mesh, and
    evaluation gives the same numbers on each."""
    try:
        return experiment.make_mesh(config)
    except ValueError as e:
        m = config.mesh
        if m.data == -1 and m.fsdp == m.tensor == m.sequence == m.dcn_data == m.dcn_fsdp == 1:
            raise  # already the fallback: the error is about something else
        metrics_lib.say(
            f"lrulm: the run's mesh does not fit these {jax.device_count()} devices "
            f"({metrics_lib.brief(e)}); evaluating data-parallel over all of them"
        )
    m = config.mesh
    m.data, m.fsdp, m.tensor, m.sequence, m.dcn_data, m.dcn_fsdp = -1, 1, 1, 1, 1, 1
    return experiment.make_mesh(config)


def evaluate_workdir(config, workdir: str, step: int | None = None, *, best: bool = False) -> dict:
    """Checkpoint `step` of workdir (None: the newest that reads back) on the eval data
    (and a language model's data.eval_sets); for LRA also on the test split. Returns
    {"step": S, "eval/<metric>": ..., "eval/<set>/<metric>": ..., ...}.
    With best, the best-on-eval checkpoint the run keeps (WORKDIR/best/): an LRA run's
    results.json and `lrulm lra-report` report it; a language model keeps one with
    checkpoint.keep_best."""
    saved, steps = best_lib.steps_to_read(workdir, step, best)  # before anything is written
    directory = os.path.join(saved, "checkpoints")
    mesh = _mesh(config)
    task = tasks.make_task(config, workdir, eval_only=True)
    if hasattr(task, "check_eval"):
        task.check_eval(config.train.global_batch_size, config.train.eval_steps)
    exp = experiment.build(config, task, mesh)
    checkpointer = ckpt_lib.Checkpointer(saved, async_save=False)
    if best:  # one checkpoint, none before it to fall back to
        step = steps[-1]
    try:
        # Each checkpoint's own tree: its weight average (optim.ema) where it keeps one.
        target = lambda s: experiment.restore_target(exp, checkpointer, s)  # noqa: E731
        if step is None:
            restored = checkpointer.restore_latest(target, quarantine=False)
        else:
            restored = checkpointer.restore(step, target(step))
    except (ckpt_lib.CheckpointMismatch, ckpt_lib.CheckpointUnavailable):
        raise
    except Exception as e:  # noqa: BLE001 - the asked-for checkpoint does not read back
        if best:
            raise ValueError(best_lib.best_damaged(directory, step, e)) from None
        raise ValueError(
            f"checkpoint {directory}/{step} does not read back ({metrics_lib.brief(e)}): it "
            "is damaged; give another --step ("
            + (", ".join(str(s) for s in steps if s != step) or "none left")
            + ")"
        ) from None
    finally:
        checkpointer.close()
    if restored is None:
        raise ValueError(
            f"no checkpoint in {directory} reads back (steps "
            + ", ".join(map(str, steps))
            + "): all are damaged"
        )
    from lrulm import train  # here: train imports this module

    row_offset, local_batch = experiment.local_rows(exp)
    _, eval_jit = train.jit_steps(exp)

    def batches_of(split):
        return task.eval_batches(
            split,
            global_batch=config.train.global_batch_size,
            row_offset=row_offset,
            local_batch=local_batch,
            num_batches=config.train.eval_steps if split != "test" else 0,  # test: whole
        )

    result = {"step": restored.step}
    result.update(evaluate_splits(exp, eval_jit, restored.state, batches_of))
    if task.best_metric:  # LRA: also the test split, as the run's final test scores it
        test = evaluate(exp, eval_jit, restored.state, batches_of("test"), "test")
        result.update({f"test/{k}": v for k, v in test.items()})
    return result
