"""`lrulm eval`: one saved checkpoint of a run, scored on its eval (and LRA's test) split."""

from __future__ import annotations

import os

from lrulm import checkpoint as ckpt_lib
from lrulm import experiment, tasks, train
from lrulm import metrics as metrics_lib


def _mesh(config):
    """The run's mesh, or where its sizes do not fit these devices (a pod run scored on
    one host), data parallelism over all of them: checkpoints restore onto any mesh, and
    evaluation gives the same numbers on each."""
    import jax

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
    saved = os.path.join(workdir, "best") if best else workdir
    directory = os.path.join(saved, "checkpoints")
    steps = ckpt_lib.checkpoint_steps(saved)  # before anything is written to workdir
    if not steps and best:
        raise FileNotFoundError(ckpt_lib.no_best(workdir))
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {directory}; train first")
    if step is not None and step not in steps:
        best_steps = [] if best else ckpt_lib.checkpoint_steps(os.path.join(workdir, "best"))
        hint = f" (step {step} is the best-on-eval checkpoint: add --best)" * (step in best_steps)
        raise FileNotFoundError(
            f"no checkpoint of step {step} in {directory}; its steps: "
            + ", ".join(map(str, steps))
            + hint
        )
    mesh = _mesh(config)
    task = tasks.make_task(config, workdir, eval_only=True)
    if hasattr(task, "check_eval"):
        task.check_eval(config.train.global_batch_size, config.train.eval_steps)
    exp = experiment.build(config, task, mesh)
    checkpointer = ckpt_lib.Checkpointer(saved, async_save=False)
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
    row_offset, local_batch = train.local_rows(exp)
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
    result.update(train.evaluate_splits(exp, eval_jit, restored.state, batches_of))
    if task.best_metric:  # LRA: also the test split, as the run's final test scores it
        test = train.evaluate(exp, eval_jit, restored.state, batches_of("test"), "test")
        result.update({f"test/{k}": v for k, v in test.items()})
    return result
