"""The experiment's building blocks, shared by training, `lrulm eval` and `lrulm compile`:
the config's checks that need the mesh, the mesh, and the model, optimizer and train state
built abstractly (shapes and shardings, nothing materialised), with the state's optional
part (the weight average of optim.ema) as each checkpoint keeps it.

The train state is one pytree,

    {"step", "rng", "params", "model_state", "opt_state", "nonfinite_step"}

and "ema_params" (the weights' moving average) when optim.ema is set, with
"ema_model_state" (the same average of BatchNorm's running statistics) for models that
keep such statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lrulm import config as config_lib
from lrulm import metrics as metrics_lib
from lrulm import optim, sharding, tasks
from lrulm.data import documents
from lrulm.data import lm as lm_data


@dataclass
class Experiment:
    """Everything needed to run or compile the steps, with no parameter materialised."""

    config: Any
    task: Any
    mesh: Any
    graphdef: Any
    abstract_state: Any  # ShapeDtypeStructs with .sharding
    state_shardings: Any
    batch_shardings: dict
    batch_spec: dict
    init_fn: Any
    tx: Any
    schedule: Any


def _key_name(k) -> str:
    return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


def _opt_state_axes(abstract_opt_state, param_axes):
    """Logical axes of optimizer-state leaves: a leaf whose path ends with a parameter's
    path (Adam's mu and nu) shares that parameter's axes; the rest are replicated."""
    by_path = {
        tuple(_key_name(k) for k in path): axes
        for path, axes in jax.tree_util.tree_flatten_with_path(
            param_axes, is_leaf=lambda x: x is None or isinstance(x, tuple)
        )[0]
    }

    def axes_for(path, _):
        names = tuple(_key_name(k) for k in path)
        for i in range(len(names)):
            if names[i:] in by_path:
                return by_path[names[i:]]
        return None

    return jax.tree_util.tree_map_with_path(axes_for, abstract_opt_state)


def data_seed(config) -> int:
    """The seed of the train data's order: data.seed, or train.seed where it is -1 (as
    before data.seed existed: a resumed run keeps its order)."""
    seed = config.data.get("seed", -1)
    return config.train.seed if seed == -1 else seed


def validate(config, mesh) -> None:
    """Checks that need the mesh, after `check_config`'s, before anything compiles."""
    check_config(config)
    t = config.train
    dp = sharding.data_parallel_size(mesh)
    accum = config.optim.grad_accum_steps
    if t.global_batch_size % (dp * accum):
        unit = dp * accum
        raise ValueError(
            f"global batch {t.global_batch_size} is not divisible by {dp} data-parallel devices"
            + (f" x {accum} accumulation steps" if accum > 1 else "")
            + f"; use a multiple of {unit}"
        )
    if t.seq_len % mesh.shape["sequence"]:
        raise ValueError(
            f"train.seq_len {t.seq_len} is not divisible by mesh.sequence="
            f"{mesh.shape['sequence']}; use a multiple of it"
        )


def check_config(config) -> None:
    """Checks of a config's values alone, needing no devices or data (`lrulm config` runs
    them too: a sweep's configs are vetted before they are launched)."""
    from lrulm.data import lra

    if config.task != "lm" and config.task not in lra.TASKS:  # before what depends on it
        raise ValueError(
            f"unknown task {config.task!r}; use 'lm' or an LRA task: {', '.join(lra.TASKS)}"
        )
    t = config.train
    if config.optim.grad_accum_steps < 1:
        raise ValueError(
            f"optim.grad_accum_steps must be >= 1; got {config.optim.grad_accum_steps}"
        )
    for name in ("steps", "log_every", "global_batch_size", "seq_len"):
        if t[name] < 1:
            raise ValueError(f"train.{name} must be positive; got {t[name]}")
    for key, minutes in (
        ("checkpoint.every_minutes", config.checkpoint.get("every_minutes", 0.0)),
        ("train.time_limit_minutes", t.get("time_limit_minutes", 0.0)),
    ):
        if not (minutes >= 0 and math.isfinite(minutes)):
            raise ValueError(f"{key} must be >= 0 (0: off); got {minutes}")
    if config.checkpoint.every_steps < 1:
        raise ValueError(
            f"checkpoint.every_steps must be positive; got {config.checkpoint.every_steps} "
            "(the last step is always saved: a value above train.steps saves only that)"
        )
    if t.eval_every < 0:
        raise ValueError(
            f"train.eval_every must be >= 0 (0: only after the last step); got {t.eval_every}"
        )
    if t.profile_steps < 0 or t.profile_start_step < 0:
        raise ValueError(
            f"train.profile_steps ({t.profile_steps}) and train.profile_start_step "
            f"({t.profile_start_step}) must be >= 0 (profile_steps=0: no profile)"
        )
    if t.profile_steps and t.profile_start_step >= t.steps:
        raise ValueError(
            f"train.profile_start_step {t.profile_start_step} is not before the last step "
            f"(train.steps={t.steps}): no step would be profiled; lower it"
        )
    if not 0 <= t.seed < 2**32:
        raise ValueError(f"train.seed must be in [0, 2**32); got {t.seed}")
    if not -1 <= data_seed(config) < 2**32:
        raise ValueError(
            f"data.seed must be in [0, 2**32), or -1 (train.seed's); got {config.data.seed}"
        )
    z_loss = t.get("z_loss", 0.0)
    if not (z_loss >= 0 and math.isfinite(z_loss)):
        raise ValueError(f"train.z_loss must be >= 0 (0: off); got {z_loss}")
    if z_loss and config.task != "lm":
        raise ValueError("train.z_loss is for language models (a classifier has few logits)")
    select = config.checkpoint.get("init_from_params", "")
    if select and not config.checkpoint.init_from:
        raise ValueError(
            "checkpoint.init_from_params selects parameters of checkpoint.init_from, which is "
            "not set; give both (or neither)"
        )
    optim.check_path_patterns(select, "checkpoint.init_from_params")
    smoothing = t.get("label_smoothing", 0.0)
    if not 0 <= smoothing < 1:
        raise ValueError(f"train.label_smoothing must be in [0, 1) (0: off); got {smoothing}")
    if t.get("eval_by_context", False) and config.task != "lm":
        raise ValueError(
            "train.eval_by_context is for language models (a classifier's loss is per example)"
        )
    eval_sets = config.data.get("eval_sets", "")
    if eval_sets and config.task != "lm":
        raise ValueError("data.eval_sets is for language models (LRA has its own splits)")
    lm_data.parse_eval_sets(eval_sets)  # its syntax, before the data is read
    mixture = config.data.get("mixture", "")
    if mixture and config.task != "lm":
        raise ValueError("data.mixture is for language models (LRA reads its task's files)")
    lm_data.parse_mixture(mixture)
    if config.task != "lm":  # an LRA task reads data.data_dir; these would be ignored
        base = config_lib.base_config()
        for key in ("train_files", "eval_files", "tokenizer", "cache_dir", "vocab_size"):
            if config.data.get(key, base.data[key]) != base.data[key]:
                raise ValueError(
                    f"data.{key} is for language models; an LRA task reads its files from "
                    "data.data_dir (and its vocabulary is the task's)"
                )
        if config.model.get("vocab_size") is not None:
            raise ValueError("model.vocab_size is for language models (an LRA task has its own)")
    field = config.data.get("text_field", documents.TEXT_FIELD)
    documents.check_text_field(field)
    if field != documents.TEXT_FIELD and config.task != "lm":
        raise ValueError("data.text_field is for language models (LRA reads its task's files)")
    optim.check_arguments(**_optimizer_args(config))
    ema = ema_of(config)
    if not (0 <= ema < 1):
        raise ValueError(f"optim.ema must be in [0, 1) (0: no weight average); got {ema}")
    model = tasks.resolve_model_config(config.model)  # the model's fields, before the data
    if config.task == "lm" and model.norm == "batch":
        raise ValueError(
            "model.norm='batch' is for the LRA classifiers: in a language model its batch "
            "statistics pool over every position, so each token would see the ones after "
            "it; use 'rms' or 'layer'"
        )


def _optimizer_args(config) -> dict:
    """config.optim's arguments of optim.make_optimizer (the schedule's length aside)."""
    names = ("lr", "lr_factor", "weight_decay", "warmup_fraction", "grad_clip", "b1", "b2")
    o = config.optim
    # A config.json from before these keys: the paper's cosine, decay on all but ν, θ, γ, B.
    kinds = dict(
        schedule_kind=o.get("schedule", "cosine"),
        decay_fraction=o.get("decay_fraction", 0.2),
        no_decay=o.get("no_decay", ""),
        final_lr_fraction=o.get("final_lr_fraction", 0.0),
        optimizer=o.get("optimizer", "adamw"),
        mu_dtype=o.get("mu_dtype", ""),
    )
    return {**{name: o[name] for name in names}, **kinds}


def ema_of(config) -> float:
    """optim.ema (0.0 in a config.json from before the key)."""
    return config.optim.get("ema", 0.0)


# The train state's averages (optim.ema) and what each averages.
AVERAGES = {"ema_params": "params", "ema_model_state": "model_state"}


def is_floating(x) -> bool:
    """Whether an array holds floats (averaged and accumulated; counters are not)."""
    return jnp.issubdtype(x.dtype, jnp.inexact)


def restore_target(exp: Experiment, checkpointer, step: int | None) -> dict:
    """exp.abstract_state as checkpoint `step` (None: none) keeps it: with the averages
    (`AVERAGES`, sharded as what they average) where it keeps them, without where it does
    not, whatever optim.ema says now (switched on or off since: `match_ema`)."""
    target = dict(exp.abstract_state)
    saved = checkpointer.saved_keys(step) if step is not None else None
    if saved is None:
        return target
    for key, source in AVERAGES.items():
        if key in saved and key not in target:
            target[key] = target[source]
        elif key not in saved:
            target.pop(key, None)
    return target


def match_ema(state: dict, exp: Experiment, step: int) -> dict:
    """A restored state with the averages exactly where optim.ema asks for them: a new
    average starts from the restored weights (and statistics); one no longer asked for is
    dropped."""
    wanted = {k for k in AVERAGES if k in exp.abstract_state}
    kept = {k for k in AVERAGES if k in state}
    if wanted == kept:
        return state
    state = dict(state)
    for key in wanted - kept:
        state[key] = jax.tree.map(jnp.copy, state[AVERAGES[key]])
    for key in kept - wanted:  # freed now: the restored dict stays referenced, and only
        for x in jax.tree.leaves(state.pop(key)):  # donated arrays go
            x.delete()
    if "ema_params" in wanted - kept:
        metrics_lib.say(f"lrulm: optim.ema: the weight average starts from step {step}'s weights")
    if "ema_params" in kept - wanted:
        metrics_lib.say(
            f"lrulm: optim.ema is 0: the weight average of step {step}'s checkpoint is not "
            "carried on (its checkpoints keep it; set optim.ema to go on with it)"
        )
    return state


def make_mesh(config, devices=None):
    """The configured mesh over `devices` (default: every device of every process)."""
    m = config.mesh
    return sharding.make_mesh(
        dict(data=m.data, fsdp=m.fsdp, tensor=m.tensor, sequence=m.sequence),
        devices=devices,
        dcn=dict(data=m.dcn_data, fsdp=m.dcn_fsdp),
    )


def build(config, task, mesh) -> Experiment:
    """Model, optimizer and shardings of the train state, all abstract."""
    validate(config, mesh)
    abstract_model = nnx.eval_shape(lambda: task.make_model(nnx.Rngs(0)))
    graphdef, abs_params, abs_rest = nnx.split(abstract_model, nnx.Param, ...)
    param_axes = sharding.logical_axes_tree(abs_params)
    rest_axes = sharding.logical_axes_tree(abs_rest)
    tx, schedule = optim.make_optimizer(total_steps=config.train.steps, **_optimizer_args(config))

    def init_fn(key):
        model = task.make_model(nnx.Rngs(params=key))
        _, params, rest = nnx.split(model, nnx.Param, ...)
        params = nnx.to_pure_dict(params)
        state = {
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.fold_in(key, 1)),
            "params": params,
            "model_state": nnx.to_pure_dict(rest),
            "opt_state": tx.init(params),
            "nonfinite_step": jnp.full((), -1, jnp.int32),
        }
        # Only with a weight average: every other run's state keeps its tree; BatchNorm's
        # statistics are averaged too (a model without any keeps no such entry).
        if ema_of(config):
            state["ema_params"] = params
            if any(is_floating(x) for x in jax.tree.leaves(state["model_state"])):
                state["ema_model_state"] = state["model_state"]
        return state

    abstract = jax.eval_shape(init_fn, jax.random.key(0))
    axes = {
        "step": None,
        "rng": None,
        "nonfinite_step": None,
        "params": param_axes,
        "model_state": rest_axes,
        "opt_state": _opt_state_axes(abstract["opt_state"], param_axes),
    }
    source_axes = {"params": param_axes, "model_state": rest_axes}
    axes.update({k: source_axes[s] for k, s in AVERAGES.items() if k in abstract})
    state_shardings = sharding.tree_shardings(abstract, axes, mesh)
    warning = sharding.indivisible_warning(abstract["params"], param_axes, mesh)
    if warning and jax.process_index() == 0:
        metrics_lib.say(f"lrulm: warning: {warning}")
    abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, state_shardings
    )
    spec = task.batch_spec(config.train.global_batch_size)
    seq_sharded = mesh.shape["sequence"] > 1
    batch_shardings = {
        k: sharding.batch_sharding(mesh, len(shape), seq_sharded=seq_sharded and len(shape) == 2)
        for k, (shape, _) in spec.items()
    }
    return Experiment(
        config,
        task,
        mesh,
        graphdef,
        abstract_state,
        state_shardings,
        batch_shardings,
        spec,
        init_fn,
        tx,
        schedule,
    )


def evaluated_state(state: dict, exp: Experiment) -> dict:
    """A restored state in the tree eval_jit takes, evaluating the checkpoint's weight
    average where it keeps one (whatever optim.ema says now) and its weights otherwise."""
    state = dict(state)
    for key, source in AVERAGES.items():
        wanted, kept = key in exp.abstract_state, key in state
        if kept and not wanted:
            state[source] = state.pop(key)
        elif wanted and not kept:
            state[key] = state[source]
    return state


def local_rows(exp: Experiment) -> tuple[int, int]:
    """(first row, number of rows) of each global batch this process reads."""
    name = next(iter(exp.batch_spec))
    return sharding.process_rows(exp.batch_shardings[name], exp.batch_spec[name][0])


def to_global(local: dict, exp: Experiment) -> dict:
    """This process's rows of a batch (`local_rows`) as the global batch's sharded arrays."""
    return {
        k: jax.make_array_from_process_local_data(exp.batch_shardings[k], local[k], shape)
        for k, (shape, _) in exp.batch_spec.items()
    }
