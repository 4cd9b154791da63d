"""Orbax checkpoints: the train state, each process's data-iterator state, and metadata.

Layout: WORKDIR/checkpoints/<step>/{state, data, metadata}, a standard Orbax
CheckpointManager directory: `state` is a StandardCheckpointHandler pytree
({"step", "rng", "params", "model_state", "opt_state", "nonfinite_step"}, and "ema_params"
with optim.ema) readable with the plain orbax.checkpoint API; `data` holds one JSON file
per process (Grain's iterator state); `metadata` the config, mesh and lrulm version.

Saves are asynchronous: arrays are copied off the devices, then written by a background
thread while training continues. A save is committed by Orbax's atomic rename of its
temporary directory, so a checkpoint killed mid-write is never listed. A listed
checkpoint that fails to restore (truncated or missing files) is reported with its path,
moved to WORKDIR/corrupt_checkpoints/ (kept for inspection, never deleted; `lrulm eval`
only skips it) and the previous one is tried. A checkpoint whose arrays do not fit the
run's state (its model or optimizer config changed) is not damage: that is an error
naming the arrays, and nothing is moved.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

import lrulm
from lrulm import metrics as metrics_lib

log = logging.getLogger(__name__)

STATE, DATA, METADATA = "state", "data", "metadata"


class _IteratorSnapshot:
    """The data-iterator state as it was when the save was requested.

    The async save writes later, while the live iterator has moved on (and prefetched);
    Grain's handler accepts any object whose get_state() returns the bytes to write.
    """

    def __init__(self, iterator):
        self._state = json.dumps(iterator.get_state(), indent=1).encode()

    def get_state(self) -> bytes:
        return self._state


class CheckpointUnavailable(ValueError):
    """A checkpoint could not be read for a reason outside it (I/O, permissions, device
    memory): nothing is moved or skipped."""


class CheckpointsDamaged(ValueError):
    """Every checkpoint of a run was damaged (and moved aside)."""


# Failures of the storage or the devices, not of a checkpoint's contents (TensorStore and
# XLA name them by status code; OSError by errno).
_UNAVAILABLE = ("RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED", "PERMISSION_DENIED",
                "Permission denied", "Input/output error", "Stale file handle")  # fmt: skip
_DAMAGE_ERRNOS = (errno.ENOENT, errno.ENOTDIR, errno.EISDIR)


def unavailable(e: BaseException) -> bool:
    """Whether e (or what caused it) is an I/O, permission or memory failure (not damage)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None and e.errno not in _DAMAGE_ERRNOS:
            return True
        if any(code in str(e) for code in _UNAVAILABLE):
            return True
        e = e.__cause__ or e.__context__
    return False


class CheckpointMismatch(ValueError):
    """A checkpoint that reads back but does not fit this run's state."""


def _flatten(tree):
    return jax.tree_util.tree_flatten_with_path(tree)[0]


def _path(keys) -> str:
    """A key path as "a/b/0/c", whether its nodes are dicts, sequences or named tuples (the
    saved metadata has dicts where the live optimizer state has named tuples)."""
    parts = []
    for k in keys:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _differences(saved, want, *, extra: bool) -> list[str]:
    """How two trees of arrays differ: shapes, arrays missing from `saved` and (extra)
    arrays only in `saved`; parameters first."""
    saved_shapes = {_path(k): tuple(v.shape) for k, v in _flatten(saved)}
    want_shapes = {_path(k): tuple(v.shape) for k, v in _flatten(want)}
    problems = [
        f"{name}: checkpoint {saved_shapes[name]} vs this run {shape}"
        for name, shape in want_shapes.items()
        if name in saved_shapes and saved_shapes[name] != shape
    ]
    problems += [
        f"{name}: not in the checkpoint" for name in want_shapes if name not in saved_shapes
    ]
    if extra:
        problems += [
            f"{name}: only in the checkpoint" for name in saved_shapes if name not in want_shapes
        ]
    return sorted(problems, key=lambda p: (not p.startswith("params"), p))


@dataclass
class Restored:
    step: int
    state: Any
    data_restored: bool


def quiet_orphaned_reads() -> None:
    """Called before a restore. When one fails (a damaged checkpoint), the reads it had
    in flight complete into an event loop Orbax has closed, and Python reports each
    ("Event loop is closed": hundreds of tracebacks, no harm done), or fail unawaited
    (Orbax's read coroutines, each with its TensorStore spec). Those reports are dropped
    from then on; any other unraisable exception is reported as before."""
    previous = sys.unraisablehook
    if getattr(previous, "_lrulm_quiet", False):
        return

    def hook(unraisable):
        e = unraisable.exc_value
        closed = isinstance(e, RuntimeError) and str(e) == "Event loop is closed"
        code = getattr(unraisable.object, "cr_code", None)  # a coroutine's
        orbax = code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename
        if not (closed or orbax):
            previous(unraisable)

    hook._lrulm_quiet = True
    sys.unraisablehook = hook
    # ... and the futures of those reads that failed with nobody left to await them.
    logging.getLogger("asyncio").addFilter(
        lambda record: not str(record.msg).startswith("Future exception was never retrieved")
    )


def checkpoint_steps(workdir: str) -> list[int]:
    """The steps saved in workdir/checkpoints, oldest first (no Orbax manager needed)."""
    checkpoints = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(checkpoints):
        return []
    return sorted(int(d) for d in os.listdir(checkpoints) if d.isdigit())


TMP_SUFFIX = ".orbax-checkpoint-tmp"  # a save's directory until it is complete


class Checkpointer:
    """Saves and restores a run's checkpoints (all processes call every method)."""

    def __init__(
        self,
        workdir: str,
        *,
        max_to_keep: int = 3,
        keep_period: int = 0,
        async_save: bool = True,
        writer: bool = False,
    ):
        """writer: the run's trainer, which removes the temporary directories of saves an
        earlier process left unfinished (a second Ctrl-C, a kill); a reader (`lrulm eval`
        beside a running training) must leave them alone: they may be saves in flight."""
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.workdir = os.path.abspath(workdir)
        self.run_dir = self.workdir  # the run's workdir (its config.json): BestCheckpoint's
        # checkpointer lives in WORKDIR/best
        unfinished = []
        if writer and os.path.isdir(self.directory):
            unfinished = sorted(d for d in os.listdir(self.directory) if TMP_SUFFIX in d)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep if max_to_keep > 0 else None,
            keep_period=keep_period if keep_period > 0 else None,
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=writer,
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                STATE: ocp.StandardCheckpointHandler(),
                DATA: grain.checkpoint.CheckpointHandler(),
                METADATA: ocp.JsonCheckpointHandler(),
            },
        )
        if unfinished:  # Orbax removes them in a thread: done before anything else
            getattr(self.manager, "_maybe_await_cleanup_tmp_directory", lambda: None)()
        if unfinished and jax.process_index() == 0:
            metrics_lib.say(
                f"lrulm: removed the saves an earlier process left unfinished in "
                f"{self.directory}: {', '.join(unfinished)}"
            )

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, iterator=None, metadata: dict | None = None) -> None:
        """Starts an (asynchronous) save of the state at `step`."""
        items = {STATE: ocp.args.StandardSave(state)}
        if iterator is not None:
            items[DATA] = grain.checkpoint.CheckpointSave(_IteratorSnapshot(iterator))
        meta = {"step": int(step), "lrulm_version": lrulm.__version__, "time": time.time()}
        meta.update(metadata or {})
        items[METADATA] = ocp.args.JsonSave(meta)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def wait(self) -> None:
        """Blocks until every started save has committed."""
        self.manager.wait_until_finished()

    def restore_latest(
        self, abstract_state, iterator=None, *, quarantine: bool = True
    ) -> Restored | None:
        """Restores the newest checkpoint that reads back, into abstract_state's shardings.

        Args:
          abstract_state: a pytree of jax.ShapeDtypeStruct with `.sharding` set: each
            array is read directly into that sharding (any mesh, any device count); or a
            function of the step giving it (checkpoints of one run may differ in optional
            parts: a weight average switched on or off, `experiment.restore_target`).
          iterator: the Grain iterator to restore in place; None to skip the data.
          quarantine: move a damaged checkpoint aside (a run that saves again); False
            (e.g. `lrulm eval`) only skips it.

        Returns None when there is no usable checkpoint. Raises CheckpointMismatch,
        touching nothing, when a checkpoint reads but holds another model's or
        optimizer's arrays (the run's config changed): that is not damage.
        """
        damaged = []
        target_for = abstract_state if callable(abstract_state) else lambda _: abstract_state
        for step in reversed(self.steps()):
            try:
                return self._restore(step, target_for(step), iterator)
            except CheckpointMismatch:
                raise
            except Exception as e:  # noqa: BLE001 - any other failure to read means damage
                path = os.path.join(self.directory, str(step))
                if unavailable(e):  # the storage or the devices, not the checkpoint
                    raise CheckpointUnavailable(
                        f"checkpoint {path} could not be read ({metrics_lib.brief(e)}); that "
                        "is not damage, so nothing was moved: check the storage (or the "
                        "devices' memory) and run again"
                    ) from e
                damaged.append(step)
                log.debug("checkpoint %s cannot be restored: %r", path, e)  # the whole spec
                metrics_lib.say(
                    f"lrulm: checkpoint {path} is damaged ({metrics_lib.brief(e)}); "
                    "trying the one before"
                )
                if quarantine:
                    self._quarantine(step)
        if damaged and quarantine:
            listed = ", ".join(map(str, sorted(damaged)))
            raise CheckpointsDamaged(
                f"no checkpoint in {self.directory} reads back (step{'s' * (len(damaged) > 1)} "
                f"{listed} damaged, now in {os.path.join(self.workdir, 'corrupt_checkpoints')})"
            )
        return None

    def saved_keys(self, step: int) -> set[str] | None:
        """The top-level keys of checkpoint `step`'s state ("params", "opt_state", ...);
        None when its metadata does not read (damage is the restore's to report)."""
        try:
            saved = self.manager.item_metadata(step)[STATE]
            return set(saved) if _flatten(saved) else None
        except Exception:  # noqa: BLE001 - unreadable metadata
            return None

    def check_fits(self, step: int, abstract_state) -> None:
        """Raises CheckpointMismatch if checkpoint `step`'s state tree (read from its
        metadata) has other arrays or shapes than abstract_state. Returns quietly when
        they fit, or when the metadata does not read (damage is the caller's case)."""
        try:
            saved = self.manager.item_metadata(step)[STATE]
            if not _flatten(saved):  # Orbax reads a lost tree description as an empty tree
                return
        except Exception:  # noqa: BLE001 - unreadable metadata is damage, not a mismatch
            return
        problems = _differences(saved, abstract_state, extra=True)
        if problems:
            raise CheckpointMismatch(
                f"{os.path.join(self.directory, str(step))} was saved by a run with another "
                f"model or optimizer config ({len(problems)} arrays differ):\n  "
                + "\n  ".join(problems[:10])
                + "\nresume or evaluate it with the run's own config "
                f"({os.path.join(self.run_dir, 'config.json')}), or start a new workdir "
                "(--config.checkpoint.init_from can take the parameters); nothing was changed"
            )

    def restore(self, step: int, abstract_state) -> Restored:
        """Restores checkpoint `step` (the state only), or fails naming the steps there."""
        if step not in self.steps():
            raise FileNotFoundError(
                f"no checkpoint of step {step} in {self.directory}; its steps: "
                + (", ".join(map(str, self.steps())) or "none")
            )
        try:
            return self._restore(step, abstract_state, None)
        except Exception as e:
            if isinstance(e, CheckpointMismatch) or not unavailable(e):
                raise
            raise CheckpointUnavailable(
                f"checkpoint {os.path.join(self.directory, str(step))} could not be read "
                f"({metrics_lib.brief(e)}); check the storage (or the devices' memory)"
            ) from e

    def _restore(self, step, abstract_state, iterator) -> Restored:
        self.check_fits(step, abstract_state)  # before Orbax reads (and fails) array by array
        quiet_orphaned_reads()
        items = {STATE: ocp.args.StandardRestore(abstract_state)}
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        data_restored = False
        if iterator is not None:
            try:
                self.manager.restore(
                    step,
                    args=ocp.args.Composite(**{DATA: grain.checkpoint.CheckpointRestore(iterator)}),
                )
                data_restored = True
            except (ValueError, FileNotFoundError, KeyError) as e:
                # E.g. restored with another number of processes: the caller positions
                # the (step-indexed) pipeline from the step instead.
                log.info("data-iterator state of step %d not restored (%s)", step, e)
        return Restored(step, restored[STATE], data_restored)

    def _quarantine(self, step: int) -> None:
        """Moves a damaged checkpoint aside (process 0), so the run can save that step again."""
        jax.experimental.multihost_utils.sync_global_devices(f"lrulm_quarantine_{step}")
        if jax.process_index() == 0:
            src = os.path.join(self.directory, str(step))
            dst_dir = os.path.join(self.workdir, "corrupt_checkpoints")
            os.makedirs(dst_dir, exist_ok=True)
            dst = os.path.join(dst_dir, f"{step}-{int(time.time())}")
            if os.path.exists(src):
                shutil.move(src, dst)
                metrics_lib.say(f"lrulm: moved the damaged checkpoint to {dst}")
        jax.experimental.multihost_utils.sync_global_devices(f"lrulm_quarantined_{step}")
        self.manager.reload()

    def metadata(self, step: int) -> dict:
        restored = self.manager.restore(
            step, args=ocp.args.Composite(**{METADATA: ocp.args.JsonRestore()})
        )
        return dict(restored[METADATA])

    def _saved_data(self, step: int) -> dict:
        """Checkpoint `step`'s data settings and position (its metadata's "data")."""
        try:
            return dict(self.metadata(step).get("data") or {})
        except Exception:  # noqa: BLE001 - unreadable metadata: nothing recorded
            return {}

    def data_change(self, step: int, signature: dict) -> str:
        """What differs between the data settings checkpoint `step` was trained with and
        `signature`, as an error message; "" when nothing does (or none were recorded).

        The saved position counts rows of the shuffled train order, so the global batch
        may change (unless the checkpoint predates that and counted steps); another
        seq_len, seed or train split would be another order, not the same one resumed."""
        saved = self._saved_data(step)
        counts_rows = "rows" in saved
        changed = [
            "the train data's content (its sampled examples differ: other files, another "
            "order of them, edited text, or other data.mixture weights)"
            if k == "train_fingerprint"
            else f"{k} {saved[k]:,} -> {v:,}"
            for k, v in signature.items()
            if saved.get(k, v) != v and not (k == "global_batch" and counts_rows)
        ]
        if not changed:
            return ""
        return (
            f"checkpoint {step} was trained with other data settings ({', '.join(changed)}): "
            "its data position would point into another order of the data. Put them back, "
            "resume anyway with --config.checkpoint.allow_data_change=true, or start a new "
            f"workdir with --config.checkpoint.init_from={self.directory}/{step}"
        )

    def data_position(self, step: int) -> dict:
        """The train stream's position after checkpoint `step`, from its metadata (for a
        restore whose per-process iterator files do not fit, e.g. another number of
        processes): {"rows": R}, or for older checkpoints the step and its global batch."""
        saved = self._saved_data(step)
        if "rows" in saved:
            return {"rows": saved["rows"]}
        return {
            "next_index": step,
            **({"global_batch": saved["global_batch"]} if "global_batch" in saved else {}),
        }

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def find_checkpoint_dir(path: str) -> tuple[str, int]:
    """Resolves --config.checkpoint.init_from: a workdir, its checkpoints/ directory, or
    one step's directory. Returns (checkpoints directory, step)."""
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")
    base = os.path.basename(path.rstrip("/"))
    if base.isdigit() and os.path.isdir(os.path.join(path, STATE)):
        return os.path.dirname(path), int(base)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint.init_from={path!r} does not exist")
    steps = sorted(int(d) for d in os.listdir(path) if d.isdigit())
    if not steps:
        raise FileNotFoundError(f"checkpoint.init_from={path!r} holds no checkpoints")
    return path, steps[-1]


def saved_tree(item_dir: str) -> dict:
    """The tree of array metadata (shapes, dtypes) of a checkpoint's state item; a
    ValueError naming the directory when it does not read (a damaged checkpoint)."""
    item_dir = os.path.abspath(item_dir)  # Orbax reads no metadata from a relative path
    quiet_orphaned_reads()
    # The item's metadata is complete; absl warns that the step's own file is elsewhere.
    logging.getLogger("absl").setLevel(logging.ERROR)
    try:
        saved = ocp.PyTreeCheckpointer().metadata(item_dir)
        saved = saved.item_metadata if hasattr(saved, "item_metadata") else saved
        tree = saved.tree
    except Exception as e:  # noqa: BLE001 - missing or unreadable files
        raise ValueError(
            f"{item_dir}: the checkpoint's array metadata does not read "
            f"({metrics_lib.brief(e)}); it is damaged, use another step"
        ) from None
    if not tree:
        raise ValueError(f"{item_dir}: the checkpoint lists no arrays; it is damaged")
    return tree


WEIGHTS = ("auto", "ema", "raw")


class NoWeightAverage(ValueError):
    """The weight average was asked for, and the checkpoint keeps none."""


def weights_key(tree: dict, weights: str = "auto") -> str:
    """Which of a saved state's trees holds the weights to use: "ema_params" (the moving
    average of optim.ema) or "params". weights: "auto" (the average where the checkpoint
    keeps one), "ema" (it, or a ValueError) or "raw" (the trained weights)."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}; got {weights!r}")
    if weights == "ema" and "ema_params" not in tree:
        raise NoWeightAverage(
            "the checkpoint keeps no weight average (its run had optim.ema=0); leave out "
            "--weights ema"
        )
    return "ema_params" if weights != "raw" and "ema_params" in tree else "params"


def select_params(abstract_params, patterns: str, whose: str = "this model's") -> dict:
    """The subtree of a (nested dict) parameter tree whose paths ("stack/blocks/lru/B_re")
    one of the comma-separated regular expressions finds (re.search); "" = all of it.
    A ValueError (naming `whose` parameters) where they find none."""
    compiled = [re.compile(p.strip()) for p in patterns.split(",") if p.strip()]
    if not compiled:
        return abstract_params
    chosen: dict = {}
    for keys, leaf in _flatten(abstract_params):
        if any(p.search(_path(keys)) for p in compiled):
            node = chosen
            names = [getattr(k, "key", getattr(k, "idx", k)) for k in keys]
            for name in names[:-1]:
                node = node.setdefault(name, {})
            node[names[-1]] = leaf
    if not chosen:
        some = ", ".join(_path(k) for k, _ in _flatten(abstract_params)[:4])
        raise ValueError(
            f"checkpoint.init_from_params={patterns!r} finds none of {whose} parameter "
            f"paths (e.g. {some}, ...)"
        )
    return chosen


def merge_params(params: dict, part: dict) -> dict:
    """params with the arrays of `part` (a subtree of the same nesting) in their place."""
    out = dict(params)
    for name, value in part.items():
        out[name] = merge_params(params[name], value) if isinstance(value, dict) else value
    return out


def restore_params(path: str, abstract_params, weights: str = "raw", select: str = ""):
    """Reads only the parameters of another run's checkpoint into abstract_params'
    shapes and shardings (fine-tuning; `weights_key` says which: "raw" = the trained
    ones), or only those `select` finds (`select_params`: that subtree); a clear error
    when the shapes do not fit. Returns (params, step, the key read)."""
    abstract_params = select_params(abstract_params, select)
    directory, step = find_checkpoint_dir(path)
    item_dir = os.path.join(directory, str(step), STATE)
    quiet_orphaned_reads()
    checkpointer = ocp.PyTreeCheckpointer()
    tree = saved_tree(item_dir)
    key = weights_key(tree, weights)
    mismatches = _differences(tree[key], abstract_params, extra=False)
    if mismatches:
        hint = "use the same model config (preset, widths, vocab) as the run you start from"
        hint += " (for the parameters checkpoint.init_from_params selects)" if select else ""
        if select and all("/reverse/" in m and "not in the checkpoint" in m for m in mismatches):
            hint = (  # a bidirectional model's backward direction: a causal source has none
                f"the source has no backward direction: select its own with e.g. "
                f"--config.checkpoint.init_from_params='{select.split(',')[0].strip()}"
                "(?!reverse/)' (the reverse layers are then initialised)"
            )
        raise CheckpointMismatch(
            f"{path}: step {step}'s parameters do not fit this model:\n  "
            + "\n  ".join(mismatches[:10])
            + "\n"
            + hint
        )
    restore_args = jax.tree.map(
        lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), abstract_params
    )
    restored = checkpointer.restore(
        item_dir,
        args=ocp.args.PyTreeRestore(
            item={key: abstract_params},
            restore_args={key: restore_args},
            partial_restore=True,
        ),
    )
    return restored[key], step, key


def read_numpy(item_dir: str, key: str | None = None):
    """A saved pytree item (e.g. CHECKPOINT/state), or only its subtree `key` (e.g.
    "params": the optimizer state is not read), as host numpy arrays, whatever the devices
    or processes that wrote it. Only the orbax API is used."""
    quiet_orphaned_reads()
    checkpointer = ocp.PyTreeCheckpointer()
    item_dir = os.path.abspath(item_dir)  # Orbax reads no metadata from a relative path
    meta = checkpointer.metadata(item_dir)
    tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree
    as_numpy = lambda t: jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), t)
    if key is None:
        return checkpointer.restore(
            item_dir, args=ocp.args.PyTreeRestore(restore_args=as_numpy(tree))
        )
    args = ocp.args.PyTreeRestore(
        item={key: tree[key]}, restore_args={key: as_numpy(tree[key])}, partial_restore=True
    )
    return checkpointer.restore(item_dir, args=args)[key]
