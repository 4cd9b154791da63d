"""Writes a checkpoint's parameters to one .npz file, for use outside lrulm.

    python tools/export_params.py WORKDIR [--step S | --best] [--weights W] --output params.npz

Keys are the parameter paths joined by "/" (e.g. `stack/blocks/lru/nu_log`); a stack of
scanned layers holds each array with the layer as its first axis, an unscanned one has
`stack/blocks/<i>/...`. The LRU's parameters keep the paper reference code's names
(`nu_log, theta_log, gamma_log, B_re, B_im, C_re, C_im, D`; docs/design.md §1), so a tree can be
mapped onto it. `__step__` holds the step, and `__model__` the resolved model config the
checkpoint was saved with (JSON text, from its metadata). Only the parameters are read
(not the optimizer state; the weight average of `optim.ema` where the checkpoint keeps one,
unless `--weights raw`; `__weights__` says which), as numpy arrays on the host, whatever
devices wrote them; `np.load(FILE)` reads them back. A model with BatchNorm (LRA's
`model.norm=batch`) also gets its running statistics, under `model_state/` (the average's,
with the average): evaluating it needs them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import numpy as np
import tool_args

from lrulm import best_checkpoint as best_lib
from lrulm import checkpoint as ckpt_lib
from lrulm import metrics as metrics_lib


def read_params(
    workdir: str, step: int | None = None, *, best: bool = False, weights: str = "auto"
) -> tuple[dict, int, str]:
    """The parameters of a run's checkpoint (default: the newest that reads back; best:
    the best-on-eval one an LRA run, or a language model with checkpoint.keep_best,
    keeps; weights: `checkpoint.weights_key`'s) as a flat {"a/b/c": np.ndarray}
    dict, the step and the state's key read ("params" or "ema_params")."""
    if weights not in ckpt_lib.WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(ckpt_lib.WEIGHTS)}; got {weights!r}")
    saved, steps = best_lib.steps_to_read(workdir, step, best)
    errors = []
    for candidate in [step] if step is not None else reversed(steps):
        try:
            return _read_step(saved, candidate, weights)
        except ckpt_lib.NoWeightAverage:
            raise
        except Exception as e:  # noqa: BLE001 - a damaged checkpoint: the one before
            if best:  # its only checkpoint
                raise ValueError(
                    best_lib.best_damaged(f"{saved}/checkpoints", candidate, e)
                ) from None
            if ckpt_lib.unavailable(e):  # the storage, not the checkpoint: said as it is
                raise ValueError(
                    f"checkpoint {saved}/checkpoints/{candidate} could not be read "
                    f"({metrics_lib.brief(e)}); check the storage"
                ) from None
            errors.append(e)
        if step is None:
            print(
                f"checkpoint {candidate} does not read ({metrics_lib.brief(errors[-1])}); "
                "trying the one before", file=sys.stderr,
            )  # fmt: skip
    if step is not None:
        raise ValueError(
            f"checkpoint {saved}/checkpoints/{step} does not read back "
            f"({metrics_lib.brief(errors[0])}): it is damaged; give another --step ("
            + (", ".join(str(s) for s in steps if s != step) or "none left")
            + ")"
        )
    raise ValueError(
        f"no checkpoint in {saved}/checkpoints reads back (all damaged): "
        + "; ".join(metrics_lib.brief(e) for e in errors[:2])
    )


def _read_step(saved: str, step: int, weights: str) -> tuple[dict, int, str]:
    item = os.path.join(saved, "checkpoints", str(step), ckpt_lib.STATE)
    key = ckpt_lib.weights_key(ckpt_lib.saved_tree(item), weights)  # damaged: an error
    tree = ckpt_lib.saved_tree(item)
    flat = _flat(ckpt_lib.read_numpy(item, key))
    # BatchNorm's running statistics (LRA's model.norm=batch), the average's with it: what
    # evaluating the exported model needs besides the weights. None in a language model.
    stats = "ema_model_state" if key == "ema_params" and "ema_model_state" in tree else None
    stats = stats or "model_state"
    if jax.tree.leaves(tree.get(stats) or {}):
        flat.update(_flat(ckpt_lib.read_numpy(item, stats), "model_state/"))
    return flat, step, key


def _flat(tree, prefix: str = "") -> dict:
    flat = {}
    for path, value in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        flat[prefix + name] = np.asarray(value)
    return flat


def checkpoint_model(workdir: str, step: int, *, best: bool = False) -> dict | None:
    """The resolved model config the checkpoint was saved with (its metadata), or None."""
    saved = os.path.join(workdir, "best") if best else workdir
    checkpointer = ckpt_lib.Checkpointer(saved, async_save=False)
    try:
        return checkpointer.metadata(step).get("model") or None
    except Exception:  # noqa: BLE001 - no or unreadable metadata: the arrays still export
        return None
    finally:
        checkpointer.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("workdir", help="a run's workdir")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, default=None, help="default: the newest checkpoint")
    which.add_argument(
        "--best", action="store_true", help="the best-on-eval checkpoint (LRA; keep_best)"
    )
    p.add_argument(
        "--weights",
        choices=ckpt_lib.WEIGHTS,
        default="auto",
        help="ema: the weight average of optim.ema; raw: the trained weights; auto: the "
        "average where the checkpoint keeps one",
    )
    p.add_argument("--output", required=True, help="the .npz file to write")
    args = tool_args.show_defaults(p).parse_args(argv)
    if not args.output.endswith(".npz"):
        p.error(f"--output {args.output}: give a .npz file name")
    tool_args.writable(p, args.output, "--output")
    if not os.path.isdir(args.workdir):
        p.error(f"{args.workdir} is not a directory")
    try:
        params, step, key = read_params(
            args.workdir, args.step, best=args.best, weights=args.weights
        )
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    extra = {"__step__": np.asarray(step), "__weights__": np.asarray(key)}
    model = checkpoint_model(args.workdir, step, best=args.best)
    if model:
        extra["__model__"] = np.asarray(json.dumps(model))
    tmp = args.output + ".tmp.npz"
    np.savez(tmp, **params, **extra)
    os.replace(tmp, args.output)
    total = sum(v.size for k, v in params.items() if not k.startswith("model_state/"))
    which = "the weight average" if key == "ema_params" else "the trained weights"
    print(f"wrote {args.output}: {len(params)} arrays, {total:,} parameters ({which}), step {step}")


if __name__ == "__main__":
    main()
