"""AdamW with the LRU paper's parameter groups, warm-up + cosine schedule and clipping.

Paper App. D.2: the recurrent parameters (ν, θ, γ and B) train at lr x lr_factor with
no weight decay; everything else at lr with weight decay (but what optim.no_decay
names). The learning rate warms up linearly from ~1e-7 over the first warmup_fraction of
the steps, then follows a cosine to ~1e-7 (optim.schedule: also linear, constant, or wsd:
warm-up, stable, decay).

optim.optimizer="muon": the hidden layers' dense matrices (the stack's `kernel`s, each
layer's own) step by Muon (momentum orthogonalised by Newton-Schulz, Jordan et al. 2024;
its update's RMS scaled to 0.2 as Liu et al. 2025 do, so that optim.lr and the weight
decay carry over from AdamW); the embedding, the head, norms, biases, the LRU's readout
and the recurrent parameters keep AdamW.
"""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
import optax

# The paper's reference code names: ν, θ, γ and the input matrix B.
RECURRENT_PARAMS = frozenset({"nu_log", "theta_log", "gamma_log", "B_re", "B_im"})
_END_LR = 1e-7


def is_recurrent(path) -> bool:
    """Whether a parameter path (a jax key path or a tuple of names) is recurrent."""
    names = {str(getattr(k, "key", getattr(k, "name", k))) for k in path}
    return bool(names & RECURRENT_PARAMS)


SCHEDULES = ("cosine", "linear", "constant", "wsd")
OPTIMIZERS = ("adamw", "muon")
MU_DTYPES = ("", "float32", "bfloat16")  # "": the parameters' dtype


def schedule(
    lr: float,
    total_steps: int,
    warmup_fraction: float,
    kind: str = "cosine",
    decay_fraction: float = 0.2,
    final_lr_fraction: float = 0.0,
) -> optax.Schedule:
    """A linear warm-up from ~1e-7 to lr over warmup_fraction of the steps, then (kind):
    "cosine" to ~1e-7 at total_steps (the paper's); "linear" to ~1e-7; "constant" at lr;
    "wsd" (warm-up, stable, decay) at lr until the last decay_fraction of the steps, then
    linearly to ~1e-7 (a run extended before its decay continues at lr, and any stable
    step's checkpoint can be cooled down in a short run of its own). final_lr_fraction > 0
    ends the decay at lr * final_lr_fraction instead of ~1e-7."""
    end = max(lr * final_lr_fraction, _END_LR)
    warmup = int(round(warmup_fraction * total_steps))
    if warmup >= total_steps:
        return optax.linear_schedule(_END_LR, lr, max(warmup, 1))
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=_END_LR,
            peak_value=lr,
            warmup_steps=warmup,
            decay_steps=total_steps,
            end_value=end,
        )
    decay = {
        "linear": total_steps - warmup,
        "constant": 0,
        "wsd": min(int(round(decay_fraction * total_steps)), total_steps - warmup),
    }[kind]
    stable = total_steps - warmup - decay
    parts = [optax.linear_schedule(_END_LR, lr, max(warmup, 1)), optax.constant_schedule(lr)]
    boundaries = [warmup]
    if decay:  # from lr at its first step to ~1e-7 at the last trained one (total - 1)
        parts.append(optax.linear_schedule(lr, end, max(decay - 1, 1)))
        boundaries.append(warmup + stable)
    return optax.join_schedules(parts, boundaries)


def make_optimizer(
    *,
    lr: float,
    total_steps: int,
    lr_factor: float = 1.0,
    weight_decay: float = 0.05,
    warmup_fraction: float = 0.1,
    grad_clip: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    schedule_kind: str = "cosine",
    decay_fraction: float = 0.2,
    no_decay: str = "",
    final_lr_fraction: float = 0.0,
    optimizer: str = "adamw",
    mu_dtype: str = "",
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer and its (base) learning-rate schedule.

    Args:
      lr: peak learning rate of the non-recurrent parameters.
      total_steps: optimizer steps of the whole run (the schedule's length).
      lr_factor: the recurrent parameters' learning rate is lr * lr_factor.
      weight_decay: decoupled weight decay of the non-recurrent parameters.
      warmup_fraction: share of the steps spent warming up.
      grad_clip: clip the global gradient norm to this value; 0 disables.
      schedule_kind, decay_fraction, final_lr_fraction: the schedule after the warm-up
        (`schedule`).
      no_decay: comma-separated regular expressions; a non-recurrent parameter whose path
        ("stack/blocks/norm/scale") one of them finds (re.search) gets no weight decay,
        e.g. "scale,bias,embed" for the norms, biases and the embedding.
      optimizer: "adamw", or "muon" for the hidden matrices (the module docstring).
      mu_dtype: the first moment's dtype ("bfloat16": half its memory); "" = the
        parameters'. The second moment stays float32.
    """
    check_arguments(
        lr=lr,
        lr_factor=lr_factor,
        weight_decay=weight_decay,
        warmup_fraction=warmup_fraction,
        grad_clip=grad_clip,
        b1=b1,
        b2=b2,
        schedule_kind=schedule_kind,
        decay_fraction=decay_fraction,
        no_decay=no_decay,
        final_lr_fraction=final_lr_fraction,
        optimizer=optimizer,
        mu_dtype=mu_dtype,
    )
    if total_steps < 1:
        raise ValueError(f"train.steps must be positive; got {total_steps}")
    adamw = functools.partial(optax.adamw, b1=b1, b2=b2, mu_dtype=mu_dtype or None)
    base = schedule(
        lr, total_steps, warmup_fraction, schedule_kind, decay_fraction, final_lr_fraction
    )
    recurrent = lambda step: base(step) * lr_factor
    patterns = [re.compile(p.strip()) for p in no_decay.split(",") if p.strip()]
    groups = {
        "recurrent": adamw(recurrent, weight_decay=0.0),
        "default": adamw(base, weight_decay=weight_decay),
    }
    if patterns:  # only then: the optimizer state of every other run keeps its tree
        groups["no_decay"] = adamw(base, weight_decay=0.0)
    if optimizer == "muon":
        from optax import contrib

        # Each layer's matrix apart: the leading axes (a scanned stack's layer) are batch.
        def dims(params):
            shape = lambda p: contrib.MuonDimensionNumbers(p.ndim - 2, p.ndim - 1)  # noqa: E731
            return jax.tree.map(shape, params)

        groups["matrix"] = contrib.muon(
            base,
            weight_decay=weight_decay,
            consistent_rms=0.2,
            muon_weight_dimension_numbers=dims,
            mu_dtype=mu_dtype or None,
        )
    labels = functools.partial(_labels, no_decay=patterns, muon=optimizer == "muon")
    tx = optax.multi_transform(groups, labels)
    if grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(grad_clip), tx)
    return tx, base


def ema_decay(step, decay: float):
    """The weight average's decay at optimizer step `step` (from 0): min(decay, (1 + step)
    / (10 + step)), TensorFlow's ExponentialMovingAverage with num_updates, so the average
    of a short or young run is not dominated by its initial weights."""
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def update_ema(ema, params, step, decay: float):
    """One step of the weight average: ema * d + params * (1 - d), in the weights' dtypes."""
    d = ema_decay(step, decay)
    return jax.tree.map(lambda e, p: (e * d + p * (1 - d)).astype(e.dtype), ema, params)


def check_path_patterns(patterns: str, key: str) -> None:
    """Raises ValueError naming `key` where one of its comma-separated regular expressions
    of parameter paths (optim.no_decay, checkpoint.init_from_params) does not compile."""
    for pattern in patterns.split(","):
        try:
            re.compile(pattern.strip())
        except re.error as e:
            raise ValueError(f"{key}: {pattern.strip()!r} is no regular expression ({e})") from None


def check_not_subscript(patterns: str, key: str) -> None:
    """Refuses a pattern written as a Python subscript (['stack'], as a tree prints): as a
    regular expression it is a character class, finding nearly every path."""
    for pattern in patterns.split(","):
        if pattern.strip().startswith(("['", '["')):
            raise ValueError(
                f"{key}: {pattern.strip()!r} reads as a character class (any one of those "
                "letters); write parameter paths joined by '/', e.g. '^stack/' or 'norm/scale$'"
            )


def check_arguments(
    *, lr, lr_factor, weight_decay, warmup_fraction, grad_clip, b1, b2,
    schedule_kind="cosine", decay_fraction=0.2, no_decay="", final_lr_fraction=0.0,
    optimizer="adamw", mu_dtype="",
) -> None:  # fmt: skip
    """Raises ValueError naming the optim.* value that is out of range (NaN included)."""
    check_path_patterns(no_decay, "optim.no_decay")
    if mu_dtype not in MU_DTYPES:
        raise ValueError(
            f"optim.mu_dtype must be one of {', '.join(map(repr, MU_DTYPES))}; got {mu_dtype!r}"
        )
    if optimizer not in OPTIMIZERS:
        raise ValueError(
            f"optim.optimizer must be one of {', '.join(OPTIMIZERS)}; got {optimizer!r}"
        )
    if schedule_kind not in SCHEDULES:
        raise ValueError(
            f"optim.schedule must be one of {', '.join(SCHEDULES)}; got {schedule_kind!r}"
        )
    if schedule_kind == "constant" and final_lr_fraction:
        raise ValueError(
            "optim.final_lr_fraction is where a decay ends, and the constant schedule has "
            "none; leave it at 0 or choose cosine, linear or wsd"
        )
    if schedule_kind == "wsd" and not (0 < decay_fraction <= 1 - warmup_fraction):
        raise ValueError(
            f"optim.decay_fraction must be in (0, 1 - optim.warmup_fraction = "
            f"{1 - warmup_fraction:g}] for the wsd schedule; got {decay_fraction}"
        )
    ranges = [
        ("lr", lr, lr > 0, "positive"),
        ("lr_factor", lr_factor, lr_factor > 0, "positive"),
        ("weight_decay", weight_decay, weight_decay >= 0, ">= 0"),
        ("warmup_fraction", warmup_fraction, 0 <= warmup_fraction <= 1, "in [0, 1]"),
        ("grad_clip", grad_clip, grad_clip >= 0, ">= 0 (0: no clipping)"),
        ("b1", b1, 0 <= b1 < 1, "in [0, 1)"),
        ("b2", b2, 0 <= b2 < 1, "in [0, 1)"),
        ("final_lr_fraction", final_lr_fraction, 0 <= final_lr_fraction <= 1, "in [0, 1]"),
    ]
    for name, value, ok, want in ranges:
        if not (ok and math.isfinite(value)):
            raise ValueError(f"optim.{name} must be {want}; got {value}")


def check_no_decay(params, no_decay: str) -> None:
    """Raises ValueError where one of optim.no_decay's patterns finds none of the decayed
    parameters' paths of `params` (a typo, or a path written another way, would leave the
    weight decay on without a word)."""
    check_not_subscript(no_decay, "optim.no_decay")
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    names = [_name(path) for path, _ in flat if not is_recurrent(path)]
    for pattern in (p.strip() for p in no_decay.split(",")):
        if pattern and not any(re.search(pattern, name) for name in names):
            shown = ", ".join(names[:16]) + (", ..." if len(names) > 16 else "")
            raise ValueError(
                f"optim.no_decay: {pattern!r} finds none of this model's decayed parameters "
                f"(regular expressions searched in their paths: {shown})"
            )


def _name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def is_hidden_matrix(path) -> bool:
    """A hidden layer's dense matrix (what optim.optimizer="muon" steps by Muon)."""
    name = _name(path)
    return name.startswith("stack/") and name.endswith("/kernel") and not is_recurrent(path)


def _labels(tree, no_decay=(), muon=False):
    def label(path, _):
        if is_recurrent(path):
            return "recurrent"
        if any(p.search(_name(path)) for p in no_decay):
            return "no_decay"
        return "matrix" if muon and is_hidden_matrix(path) else "default"

    return jax.tree_util.tree_map_with_path(label, tree)
