"""The trainer: `train_and_evaluate(config, workdir)`, read top to bottom.

Sections: set-up -> mesh -> data -> model & optimizer -> sharded init -> restore ->
step functions -> loop (the model, optimizer and state built abstractly: lrulm.experiment).
The train state is one pytree,

    {"step", "rng", "params", "model_state", "opt_state", "nonfinite_step"}

(with "ema_params", the weights' moving average, when optim.ema is set), sharded by the
logical axis rules (lrulm.sharding) and donated to each step.
`nonfinite_step` records the first step whose loss or gradient was not finite; from
then on the step leaves the state unchanged and the loop stops at the next check,
naming that step, without overwriting a good checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from lrulm import best_checkpoint as best_lib
from lrulm import checkpoint as ckpt_lib
from lrulm import config as config_lib
from lrulm import distributed, evaluation, optim, preemption, run_config, sharding, tasks
from lrulm import metrics as metrics_lib
from lrulm.experiment import (
    Experiment,
    build,
    data_seed,
    ema_of,
    is_floating,
    local_rows,
    make_mesh,
    match_ema,
    restore_target,
    to_global,
    validate,
)

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    def __init__(self, step: int):
        super().__init__(
            f"the loss or gradient became non-finite at step {step}; the run stopped there "
            "(the last good checkpoint is kept). Lower optim.lr, raise the warm-up, or check "
            "the data of that step"
        )
        self.step = step


# ==========================================================================================
# Step functions (pure; jitted with explicit shardings in `jit_steps`).
# ==========================================================================================


def _merge(graphdef, params, model_state):
    return nnx.merge(graphdef, params, model_state) if model_state else nnx.merge(graphdef, params)


def train_step(state, batch, *, graphdef, task, tx, schedule, accum: int, ema: float = 0.0):
    """One optimizer step on a global batch (optionally in `accum` micro-batches); with
    `ema` (and the state's "ema_params"), the weights' moving average follows."""
    step = state["step"]
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
    params = state["params"]

    def loss_fn(params, model_state, micro, key):
        model = _merge(graphdef, params, model_state)
        loss_sum, weight, aux = task.loss(model, micro, train=True, key=key)
        new_model_state = nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param)))
        return loss_sum, (weight, aux, new_model_state)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum == 1:
        (loss_sum, (weight, aux, model_state)), grads = grad_fn(
            params, state["model_state"], batch, key
        )
    else:
        # Micro-batch j takes rows j, j + accum, ...: every device keeps its own rows.
        micro = jax.tree.map(
            lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1), batch
        )

        # Every micro-batch starts from the step's model state (BatchNorm's running
        # statistics) and the new states are averaged: one moving-average update a step,
        # with the mean of the micro-batches' statistics, as without accumulation.

        def body(carry, xs):
            g_acc, l_acc, w_acc, aux_acc, ms_acc = carry
            (l, (w, aux, ms)), g = grad_fn(params, state["model_state"], *xs)
            add = lambda a, b: jax.tree.map(jnp.add, a, b)
            ms_acc = jax.tree.map(lambda a, m: a + m if is_floating(m) else m, ms_acc, ms)
            return (add(g_acc, g), l_acc + l, w_acc + w, add(aux_acc, aux), ms_acc), None

        first = jax.tree.map(lambda x: x[0], micro)
        _, (_, aux0, _) = jax.eval_shape(loss_fn, params, state["model_state"], first, key)
        zeros = lambda t: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), t)
        ms0 = jax.tree.map(
            lambda m: jnp.zeros_like(m) if is_floating(m) else m, state["model_state"]
        )
        init = (zeros(params), 0.0, 0.0, zeros(aux0), ms0)
        (grads, loss_sum, weight, aux, model_state), _ = jax.lax.scan(
            body, init, (micro, jax.random.split(key, accum))
        )
        model_state = jax.tree.map(lambda m: m / accum if is_floating(m) else m, model_state)
    denom = jnp.maximum(weight, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    loss = loss_sum / denom
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    ok = finite & (state["nonfinite_step"] < 0)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    new_state = {
        "step": step + 1,
        "rng": state["rng"],
        "params": keep(new_params, params),
        "model_state": keep(model_state, state["model_state"]),
        "opt_state": keep(opt_state, state["opt_state"]),
        "nonfinite_step": jnp.where(
            (state["nonfinite_step"] < 0) & ~finite, step, state["nonfinite_step"]
        ),
    }
    if ema:
        new_state["ema_params"] = keep(
            optim.update_ema(state["ema_params"], new_params, step, ema), state["ema_params"]
        )
    if ema and "ema_model_state" in state:  # BatchNorm's running statistics, alike
        d = optim.ema_decay(step, ema)
        blend = lambda e, m: (e * d + m * (1 - d)).astype(e.dtype) if is_floating(m) else m
        old = state["ema_model_state"]
        new_state["ema_model_state"] = keep(jax.tree.map(blend, old, model_state), old)
    metrics = {
        "train/loss": loss,
        "train/grad_norm": grad_norm,
        "train/lr": schedule(step),
        "train/param_norm": optax.tree.norm(params),
    }
    metrics.update({f"train/{k}": v / denom for k, v in aux.items()})
    return new_state, metrics


def eval_step(state, batch, *, graphdef, task):
    """Summed loss statistics of one global batch, with the weights' moving average where
    the state keeps one (optim.ema)."""
    model = _merge(
        graphdef,
        state.get("ema_params", state["params"]),
        state.get("ema_model_state", state["model_state"]),
    )
    loss_sum, weight, aux = task.loss(model, batch, train=False, key=None)
    return {"loss": loss_sum, "weight": weight, **aux}


def jit_steps(exp: Experiment):
    """The jitted train and eval steps, with explicit in/out shardings (pjit semantics)."""
    accum = exp.config.optim.grad_accum_steps
    train_fn = functools.partial(
        train_step,
        graphdef=exp.graphdef,
        task=exp.task,
        tx=exp.tx,
        schedule=exp.schedule,
        accum=accum,
        ema=ema_of(exp.config),
    )
    eval_fn = functools.partial(eval_step, graphdef=exp.graphdef, task=exp.task)
    replicated = NamedSharding(exp.mesh, PartitionSpec())

    def with_mesh(fn):  # activation constraints are traced against this mesh
        def wrapped(*args):
            with sharding.activation_sharding(exp.mesh):
                return fn(*args)

        # Named after the step (jit_train_step in profiles, HLO dumps and compile reports).
        wrapped.__name__ = wrapped.__qualname__ = fn.func.__name__
        return wrapped

    train_jit = jax.jit(
        with_mesh(train_fn),
        in_shardings=(exp.state_shardings, exp.batch_shardings),
        out_shardings=(exp.state_shardings, replicated),
        donate_argnums=0,
    )
    eval_jit = jax.jit(
        with_mesh(eval_fn),
        in_shardings=(exp.state_shardings, exp.batch_shardings),
        out_shardings=replicated,
    )
    return train_jit, eval_jit


# ==========================================================================================
# The driver.
# ==========================================================================================


def train_and_evaluate(config, workdir: str, *, devices=None, ctrl_c: bool = False) -> dict:
    """Trains (or resumes) the experiment in workdir; returns the last eval metrics.

    Args:
      config: the experiment ConfigDict (lrulm.config).
      workdir: where config.json, metrics.jsonl, checkpoints/ and the tokenizer go.
      devices: the devices to build the mesh from (default: all of them).
      ctrl_c: in one process, a first Ctrl-C saves and stops as a preemption does
        (`lrulm train`); otherwise SIGINT is left to the caller.

    Raises:
      preemption.Preempted: a preemption signal (SIGTERM) stopped the run before
        train.steps, after every process saved that step; call again to resume.
    """
    created = not os.path.exists(workdir)
    try:
        return _train_and_evaluate(config, workdir, devices, ctrl_c)
    except BaseException:
        # A run that failed at its start (a bad config, missing data) leaves no empty
        # workdir behind to pass for a run; anything written is kept.
        if created and os.path.isdir(workdir) and not os.listdir(workdir):
            with contextlib.suppress(OSError):  # another process removed it first
                os.rmdir(workdir)
        raise


def _train_and_evaluate(config, workdir: str, devices, ctrl_c: bool) -> dict:
    # From the start: a SIGTERM while the data is prepared, the state restored or the step
    # compiled (minutes) still ends in a save and a clean stop at the loop's first step.
    latest = max(ckpt_lib.checkpoint_steps(workdir), default=0)  # where a resume starts
    with preemption.Watcher(start_step=latest, ctrl_c=ctrl_c) as watcher:
        # ---- Set-up ----------------------------------------------------------------------
        t, c = config.train, config.checkpoint
        limit = t.get("time_limit_minutes", 0.0)
        deadline = preemption.AgreedTimer(limit)  # from now: the job's time counts from here
        if "://" in workdir:
            raise ValueError(
                f"workdir {workdir}: lrulm writes its workdir with ordinary file I/O; mount the "
                "bucket (GCS FUSE: gcsfuse BUCKET /gcs/BUCKET) and use the mount path"
            )
        if os.path.exists(workdir) and not os.path.isdir(workdir):
            raise ValueError(
                f"workdir {workdir} is a file; give a directory (a new one, or a run's to resume)"
            )
        is_main = jax.process_index() == 0
        run_config.check_processes_agree(config)
        os.makedirs(workdir, exist_ok=True)

        # ---- Mesh ------------------------------------------------------------------------
        mesh = make_mesh(config, devices)
        validate(config, mesh)  # before the data is prepared: errors come at once
        keep_best = tasks.best_metric(config)  # a metric an evaluation reports
        run_config.check_start(config, workdir)

        # ---- Data ------------------------------------------------------------------------
        task = tasks.make_task(config, workdir)
        exp = build(config, task, mesh)
        if not latest:  # a new run (an old run's patterns that found nothing still resume)
            optim.check_no_decay(exp.abstract_state["params"], config.optim.get("no_decay", ""))
        row_offset, local_batch = local_rows(exp)
        batch_args = dict(
            global_batch=t.global_batch_size, row_offset=row_offset, local_batch=local_batch
        )
        train_size = task.train_size()
        if train_size < t.global_batch_size and is_main:
            metrics_lib.say(
                f"lrulm: warning: the train split has {train_size:,} examples, fewer "
                f"than one global batch of {t.global_batch_size}: each batch holds some of "
                "them twice (give more data or a smaller --config.train.global_batch_size)"
            )
        train_iter = task.train_batches(seed=data_seed(config), **batch_args)
        if hasattr(task, "check_eval"):  # fail now, not at the first evaluation
            task.check_eval(t.global_batch_size, t.eval_steps)
        tasks.check_best_metric(task, keep_best)

        # ---- Model & optimizer: sharded init, or restore ---------------------------------
        checkpointer = ckpt_lib.Checkpointer(
            workdir, max_to_keep=c.max_to_keep, keep_period=c.keep_period,
            async_save=c.async_save, writer=True,
        )  # fmt: skip
        try:
            restored = checkpointer.restore_latest(
                lambda s: restore_target(exp, checkpointer, s), train_iter
            )
        except ckpt_lib.CheckpointMismatch as e:
            trained = run_config.trained_config(checkpointer, latest)
            checkpointer.close()
            changed = run_config.state_keys_changed(trained, config)
            if not changed:
                raise
            raise ckpt_lib.CheckpointMismatch(
                f"{e}\nthe settings that shape the state changed since step {latest}: "
                + "; ".join(changed)
                + " (set them back to resume; a new workdir with checkpoint.init_from takes "
                "the parameters under new ones)"
            ) from None
        except ckpt_lib.CheckpointsDamaged as e:
            checkpointer.close()
            raise ckpt_lib.CheckpointsDamaged(
                f"{e}; the run did not start over on its own: run the same command again to "
                "train from step 0"
            ) from None
        data_signature = {
            "global_batch": t.global_batch_size,
            "seq_len": t.seq_len,
            "seed": data_seed(config),
            "train_examples": train_size,
            "train_fingerprint": task.train_fingerprint(),
        }
        check_data = restored is not None and not c.allow_data_change
        problem = checkpointer.data_change(restored.step, data_signature) if check_data else ""
        if problem:
            checkpointer.close()  # nothing moved: the same command works once fixed
            raise ValueError(problem)
        trained = None  # the config the resumed checkpoint was trained with
        if restored is not None:
            state = match_ema(restored.state, exp, restored.step)
            if not restored.data_restored:  # e.g. another number of processes
                position = checkpointer.data_position(restored.step)
                train_iter.set_state(position)
                if is_main:
                    where = (
                        f"row {position['rows']:,}" if "rows" in position
                        else f"step {position['next_index']}"
                    )  # fmt: skip
                    metrics_lib.say(
                        f"lrulm: the train data goes on at {where} of its order (from the "
                        "checkpoint's metadata: its per-process iterator state does not fit, "
                        "e.g. saved by another number of processes)"
                    )
            metrics_lib.say(f"lrulm: resumed from {checkpointer.directory}/{restored.step}")
            trained = run_config.trained_config(checkpointer, restored.step)
        else:
            init = jax.jit(exp.init_fn, out_shardings=exp.state_shardings)
            state = init(jax.random.key(t.seed))
            if c.init_from:
                # The weights that run evaluated: its average, where it kept one.
                select = c.get("init_from_params", "")
                params, from_step, key = ckpt_lib.restore_params(
                    c.init_from, exp.abstract_state["params"], weights="auto", select=select
                )
                state["params"] = ckpt_lib.merge_params(state["params"], params)
                if "ema_params" in state:
                    state["ema_params"] = jax.tree.map(jnp.copy, state["params"])
                which = "; its weight average" if key == "ema_params" else ""
                if select:
                    count = lambda tree: len(jax.tree.leaves(tree))
                    which += (
                        f"; the {count(params)} of {count(state['params'])} arrays "
                        "checkpoint.init_from_params selects, the others initialised"
                    )
                metrics_lib.say(f"lrulm: parameters from {c.init_from} (step {from_step}{which})")
        step = int(jax.device_get(state["step"]))
        if step > t.steps:
            metrics_lib.say(
                f"lrulm: the run is at step {step}, past train.steps={t.steps}: nothing to train "
                "(raise train.steps to continue it)"
            )
        elif is_main:  # only now: a run that fails to start leaves the workdir's config as it was
            run_config.record(
                config, workdir, trained, step, resumed=restored is not None, task=task
            )

        # ---- Step functions ----------------------------------------------------------------
        train_jit, eval_jit = jit_steps(exp)
        writer = metrics_lib.MetricWriter(
            workdir, enabled=is_main, progress=t.progress, start_step=step,
            fresh=restored is None,
        )  # fmt: skip
        start_step = step
        num_params = sum(x.size for x in jax.tree.leaves(state["params"]))
        tokens_per_step = t.global_batch_size * task.tokens_per_example()
        flops_per_token = task.flops_per_token(t.seq_len)
        peak = metrics_lib.peak_flops()
        if step == 0:
            info = {"model/num_params": num_params, "perf/flops_per_token": flops_per_token}
            entropy = None  # a pass over the corpus: where it is written (process 0) only
            if jax.process_index() == 0 and hasattr(task, "unigram_entropy"):
                entropy = task.unigram_entropy()
            if entropy is not None:
                info["data/unigram_entropy"] = entropy
            writer.write(0, info)
        metrics_lib.say(
            f"lrulm: {num_params:,} parameters, mesh {dict(mesh.shape)}, "
            f"{mesh.devices.size} devices, {jax.process_count()} processes; "
            f"step {step} of {t.steps}"
        )

        def eval_batches(split="eval"):
            # The test split is always read whole: its accuracy is the reported number.
            steps = t.eval_steps if split != "test" else 0
            return task.eval_batches(split, num_batches=steps, **batch_args)

        best_split = keep_best[0].rpartition("/")[0] or "eval" if keep_best else ""
        eval_data = task.eval_fingerprint(best_split) if keep_best else ""  # what it is of
        # On every process: opening an Orbax manager is collective.
        kept = best_lib.kept_metadata(workdir) if keep_best and restored else None
        if keep_best and is_main:  # an earlier best no longer compares with this run's
            why = (
                run_config.evals_incomparable(trained, config, best_split) if restored
                else "this run starts anew (no checkpoint of its own)"
            )  # fmt: skip
            if not why and kept and kept.get("eval_data", eval_data) != eval_data:
                why = f"the {best_split} split holds other data than at step {kept['step']}'s"
            if why:
                best_lib.supersede_best(workdir, why)
        distributed.barrier("lrulm_best")
        best = best_lib.BestCheckpoint(workdir, *keep_best) if keep_best else None

        def check_finite():
            bad = int(jax.device_get(state["nonfinite_step"]))
            if bad >= 0:
                raise NonFiniteLoss(bad)

        last_saved = restored.step if restored is not None else None
        save_timer = preemption.AgreedTimer(c.get("every_minutes", 0.0))

        def save(at_step):
            nonlocal last_saved
            save_timer.reset()
            if at_step == last_saved:
                return
            last_saved = at_step
            check_finite()  # a non-finite state never overwrites a good checkpoint
            meta = {
                "data": {**data_signature, "rows": train_iter.rows},
                "config": config_lib.to_dict(config),
                "mesh": dict(mesh.shape),
                "model": vars(task.model_config) if hasattr(task.model_config, "__dict__") else {},
            }
            checkpointer.save(at_step, state, train_iter, meta)

        # ---- Loop ------------------------------------------------------------------------
        stopped = ""  # why the loop stopped before train.steps: a signal, or the time limit
        profile = metrics_lib.ProfileWindow(
            os.path.join(workdir, "tensorboard"),
            start_step=t.profile_start_step,
            num_steps=t.profile_steps,
            run_from=step,
            total_steps=t.steps,
            enabled=is_main,
        )
        throughput = metrics_lib.Throughput()
        throughput.start(step)
        last_eval: dict = {}
        try:
            # The initial state's baseline: a new run's, not one resumed at step 0.
            if restored is None and t.get("eval_at_start", False):
                start_eval = evaluation.evaluate_splits(exp, eval_jit, state, eval_batches)
                writer.write(0, start_eval)
                evaluation.say_eval(writer, 0, start_eval)
                throughput.start(step)
            while step < t.steps:
                if watcher.reached(step):
                    metrics_lib.say(f"lrulm: preemption signal; saving step {step} and exiting")
                    save(step)
                    checkpointer.wait()
                    stopped = "a preemption signal"
                    break
                profile.before(step, state)
                fetch = time.perf_counter()
                try:
                    host_batch = next(train_iter)
                except Exception:
                    # A bad record (an image of another size, a truncated file) found now:
                    # the steps since the last checkpoint are kept. The stream's position
                    # counts the rows of completed steps, so a resume reads the failed batch
                    # again, once fixed. One process only: a save needs every process.
                    if jax.process_count() == 1 and step > start_step:
                        metrics_lib.say(
                            f"lrulm: reading the train data failed after step {step}; saving "
                            f"step {step} first (fix the data, then resume)"
                        )
                        save(step)
                        checkpointer.wait()
                    raise
                batch = to_global(host_batch, exp)
                throughput.waited(time.perf_counter() - fetch)
                state, metrics = train_jit(state, batch)
                step += 1
                profile.after(step, state)
                if step % t.log_every == 0 or step == t.steps:
                    check_finite()
                    row = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    row.update(throughput.measure(step, tokens_per_step))
                    row.update(metrics_lib.device_memory(jax.local_devices()))
                    if peak:
                        row["perf/mfu"] = (
                            flops_per_token
                            * row["perf/tokens_per_s"]
                            / (peak * exp.mesh.devices.size)
                        )
                    writer.write(step, row)
                    writer.progress_line(
                        step, t.steps, {k: row[k] for k in ("train/loss", "perf/tokens_per_s")}
                    )
                restart_timer = step % t.log_every == 0
                if (t.eval_every and step % t.eval_every == 0) or step == t.steps:
                    restart_timer = True
                    row = evaluation.evaluate_splits(exp, eval_jit, state, eval_batches)
                    writer.write(step, row)
                    evaluation.say_eval(writer, step, row)
                    # What a run returns: the eval split's metrics (eval/NAME/... as keys)
                    last_eval = {k.removeprefix("eval/"): v for k, v in row.items()}
                    if best is not None:
                        check_finite()
                        model = vars(task.model_config)  # for tools/export_params.py --best
                        best.update(
                            step, last_eval, state, {"model": model, "eval_data": eval_data}
                        )
                # The clock is read at log steps (where the host waits for the step anyway).
                timed = step % t.log_every == 0 and save_timer.due()
                if step % c.every_steps == 0 or step == t.steps or timed:
                    restart_timer = True
                    save(step)
                if restart_timer:  # eval and checkpoint time is not step time: timing starts
                    throughput.start(step)  # again after them (both wait for the steps before)
                if step % t.log_every == 0 and step < t.steps and deadline.due():
                    metrics_lib.say(
                        f"lrulm: train.time_limit_minutes={limit:g} reached; saving step {step} "
                        "and exiting"
                    )
                    save(step)
                    checkpointer.wait()
                    stopped = f"train.time_limit_minutes={limit:g}"
                    break
            checkpointer.wait()
            if best is not None and step >= t.steps and task.best_metric:
                last_eval = evaluation.final_test(
                    best, exp, eval_jit, eval_batches("test"), writer, step, workdir, state,
                    trained=step > start_step,
                )  # fmt: skip
            elif best is not None and best.step is not None and is_main:  # keep_best's
                metrics_lib.say(
                    f"lrulm: the best eval {best.metric} ({best.value:.4g}, step {best.step}) is "
                    f"kept in {best.ckpt.directory} (lrulm eval/generate/score --best)"
                )
        finally:
            profile.close()
            writer.close()
            checkpointer.close()
            if best is not None:
                best.close()
        if stopped:
            # No process leaves (and no launcher stops the rest) before all have saved.
            distributed.barrier("lrulm_preempted")
            raise preemption.Preempted(step, t.steps, stopped)
        return last_eval
