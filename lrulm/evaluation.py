"""`lrulm eval`: one saved checkpoint of a run, scored on its eval (and LRA's test) split."""

from __future__ import annotations

from lrulm import checkpoint as ckpt_lib
from lrulm import tasks, train


def evaluate_workdir(config, workdir: str, step: int | None = None) -> dict:
    """Checkpoint `step` of workdir (None: the newest that reads back) on the eval data;
    for LRA also on the test split. Returns {"step": S, "eval/<metric>": ..., ...}."""
    mesh = train.make_mesh(config)
    task = tasks.make_task(config, workdir)
    exp = train.build(config, task, mesh)
    checkpointer = ckpt_lib.Checkpointer(workdir, async_save=False)
    try:
        if step is None:
            restored = checkpointer.restore_latest(exp.abstract_state, quarantine=False)
        else:
            restored = checkpointer.restore(step, exp.abstract_state)
    finally:
        checkpointer.close()
    if restored is None:
        raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints; train first")
    row_offset, local_batch = train.local_rows(exp)
    _, eval_jit = train.jit_steps(exp)
    result = {"step": restored.step}
    for split in ("eval", "test") if task.best_metric else ("eval",):
        batches = task.eval_batches(
            split,
            global_batch=config.train.global_batch_size,
            row_offset=row_offset,
            local_batch=local_batch,
            num_batches=config.train.eval_steps,
        )
        metrics = train.evaluate(exp, eval_jit, restored.state, batches)
        result.update({f"{split}/{k}": v for k, v in metrics.items()})
    return result
