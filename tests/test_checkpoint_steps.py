"""lrulm.checkpoint's small parts: the steps of a workdir, which checkpoint init_from
reads, what counts as unreadable storage rather than damage, a best checkpoint's ties,
the weights restore_params reads, and a read-only restore of damaged checkpoints."""

import errno
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lrulm import best_checkpoint as best_lib
from lrulm import checkpoint as ckpt_lib


def test_steps_are_ordered_as_numbers_and_the_newest_is_found(tmp_path):
    """Steps 9 and 10: 10 is the newer (not "9" > "10" as text); an unfinished save's
    temporary directory and other files are no steps."""
    checkpoints = tmp_path / "checkpoints"
    for name in ("9", "10", "11.orbax-checkpoint-tmp-1234"):
        (checkpoints / name / "state").mkdir(parents=True)
    (checkpoints / "notes").write_text("")
    assert ckpt_lib.checkpoint_steps(str(tmp_path)) == [9, 10]
    assert ckpt_lib.find_checkpoint_dir(str(tmp_path)) == (str(checkpoints), 10)
    assert ckpt_lib.find_checkpoint_dir(str(checkpoints)) == (str(checkpoints), 10)
    assert ckpt_lib.find_checkpoint_dir(str(checkpoints / "9")) == (str(checkpoints), 9)
    assert ckpt_lib.checkpoint_steps(str(tmp_path / "elsewhere")) == []


def _raised(make):
    try:
        make()
    except Exception as e:  # noqa: BLE001 - the error the test looks at
        return e
    raise AssertionError("nothing raised")


def _reraised(first: OSError, *, explicit: bool):
    """A ValueError raised while handling `first` (`raise ... from` it, or implicitly)."""

    def make():
        try:
            raise first
        except OSError as e:
            if explicit:
                raise ValueError("could not read the checkpoint") from e
            raise ValueError("could not read the checkpoint")  # noqa: B904 - the implicit case

    return _raised(make)


@pytest.mark.parametrize("explicit", [False, True])
def test_an_io_error_behind_another_error_is_unreadable_storage(explicit):
    """An EIO that a library re-raises as its own error (chained implicitly, __context__,
    or by `from`, __cause__) is the storage's failure; a file not found behind it is
    damage (the checkpoint lacks it). The messages name neither."""
    io = _reraised(OSError(errno.EIO, "boom"), explicit=explicit)
    assert ckpt_lib.unavailable(io)
    for damage in (errno.ENOENT, errno.ENOTDIR, errno.EISDIR):
        assert not ckpt_lib.unavailable(_reraised(OSError(damage, "boom"), explicit=explicit))
    assert ckpt_lib.unavailable(OSError(errno.EACCES, "boom"))
    assert not ckpt_lib.unavailable(ValueError("truncated array data"))


@pytest.mark.parametrize("mode", ["max", "min"])
def test_a_best_checkpoint_tie_saves_nothing(tmp_path, mode):
    """A later evaluation as good as the best (not better) keeps the earlier checkpoint."""
    best = best_lib.BestCheckpoint(str(tmp_path), "m", mode)
    assert best.update(10, {"m": 0.5}, {"w": jnp.full(2, 10.0)})
    assert not best.update(20, {"m": 0.5}, {"w": jnp.full(2, 20.0)})
    assert (best.step, best.value, best.ckpt.steps()) == (10, 0.5, [10])
    abstract = {"w": jax.ShapeDtypeStruct((2,), jnp.float32, sharding=jnp.zeros(2).sharding)}
    np.testing.assert_array_equal(best.restore(abstract).state["w"], np.full(2, 10.0))
    # A mismatch points at the run's own config.json, not at WORKDIR/best's (none there).
    other = {"w": jax.ShapeDtypeStruct((3,), jnp.float32, sharding=jnp.zeros(3).sharding)}
    with pytest.raises(ckpt_lib.CheckpointMismatch, match="config.json") as e:
        best.restore(other)
    assert f"({tmp_path}/config.json)" in str(e.value)
    best.close()


def test_restore_params_reads_the_trained_weights_unless_told(tmp_path):
    """A checkpoint with a weight average: restore_params reads "params" by default (raw),
    the average only when asked ("auto" or "ema")."""
    item = tmp_path / "checkpoints" / "3" / "state"
    raw, ema = np.arange(4.0, dtype=np.float32), np.full(4, 7.0, np.float32)
    ocp.PyTreeCheckpointer().save(str(item), {"params": {"w": raw}, "ema_params": {"w": ema}})
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = {"w": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=sharding)}
    params, step, key = ckpt_lib.restore_params(str(tmp_path), abstract)
    assert (step, key) == (3, "params")
    np.testing.assert_array_equal(params["w"], raw)
    for weights in ("auto", "ema"):
        params, _, key = ckpt_lib.restore_params(str(tmp_path), abstract, weights)
        assert key == "ema_params"
        np.testing.assert_array_equal(params["w"], ema)


def test_a_read_only_restore_of_damaged_checkpoints_moves_nothing(
    lm_workdir, tmp_path, damage_checkpoint
):
    """quarantine=False (`lrulm eval`, which only reads): every checkpoint damaged, none
    restores (None) and all stay where they are, no corrupt_checkpoints/ made."""
    run = tmp_path / "run"
    shutil.copytree(lm_workdir, run)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    tree = ckpt_lib.saved_tree(str(run / "checkpoints" / "8" / "state"))  # while it reads
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree
    )
    checkpointer = ckpt_lib.Checkpointer(str(run), async_save=False)
    assert checkpointer.restore_latest(abstract, quarantine=False).step == 8  # undamaged
    for step in (4, 8):
        damage_checkpoint(run / "checkpoints" / str(step))
    assert checkpointer.restore_latest(abstract, quarantine=False) is None
    checkpointer.close()
    assert not (run / "corrupt_checkpoints").exists()
    assert ckpt_lib.checkpoint_steps(str(run)) == [4, 8]
    assert all(os.path.isdir(run / "checkpoints" / s / "state") for s in ("4", "8"))


def test_export_params_falls_back_past_a_damaged_checkpoint(
    lm_workdir, tmp_path, damage_checkpoint
):
    """tools/export_params.py, as generate and eval: the newest checkpoint damaged, the one
    before is exported (said in one line, the file and what is wrong named); a damaged
    --step is refused naming the others."""
    import subprocess
    import sys

    run = tmp_path / "run"
    shutil.copytree(lm_workdir, run)
    damage_checkpoint(run / "checkpoints" / "8")
    tool = os.path.join(os.path.dirname(__file__), "..", "tools", "export_params.py")
    out = str(tmp_path / "p.npz")
    export = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, tool, str(run), *a, "--output", out], capture_output=True, text=True
    )
    done = export()
    assert done.returncode == 0, done.stderr[-2000:]
    assert "step 4" in done.stdout and done.stderr.count("\n") == 1
    assert "checkpoint 8 does not read (ValueError: " in done.stderr
    assert "TensorStore details" not in done.stderr and "trying the one before" in done.stderr
    refused = export("--step", "8")
    assert refused.returncode == 1
    assert "checkpoint" in refused.stderr and "/8 does not read back (" in refused.stderr
    assert refused.stderr.rstrip().endswith("it is damaged; give another --step (4)")


def test_brief_cuts_a_tensorstore_spec_and_names_its_cause():
    from lrulm import metrics as metrics_lib

    try:
        try:
            raise ValueError('OUT_OF_RANGE: Error reading "params.w/0" in OCDBT database')
        except ValueError as cause:
            raise Exception(
                "Encountered error while reading array index: (slice(0, 2, 1),). See full "
                "TensorStore details: <bound method spec of TensorStore({\n  'base': {...}\n})>."
            ) from cause
    except Exception as e:  # noqa: BLE001
        line = metrics_lib.brief(e)
    assert line == (
        "Exception: Encountered error while reading array index: (slice(0, 2, 1),). "
        '(ValueError: OUT_OF_RANGE: Error reading "params.w/0" in OCDBT database)'
    )
    assert metrics_lib.brief(ValueError("a\nb")) == "ValueError: a"


def test_the_trainer_removes_unfinished_saves_and_a_reader_leaves_them(tmp_path, capsys):
    """Saves a killed process left half-written (Orbax's temporary directories) pile up
    at every kill: the trainer's checkpointer removes them (said); a reader's (`lrulm
    eval` beside a running training, whose saves in flight they may be) leaves them."""
    checkpoints = tmp_path / "checkpoints"
    left = ["13" + ckpt_lib.TMP_SUFFIX + "-1700000000", "15" + ckpt_lib.TMP_SUFFIX]
    for name in left:
        (checkpoints / name / "state").mkdir(parents=True)
        (checkpoints / name / "state" / "part").write_bytes(b"x" * 100)
    ckpt_lib.Checkpointer(str(tmp_path), async_save=False).close()
    assert sorted(os.listdir(checkpoints)) == sorted(left)
    assert "removed" not in capsys.readouterr().out
    ckpt_lib.Checkpointer(str(tmp_path), async_save=False, writer=True).close()
    assert os.listdir(checkpoints) == []
    assert f"left unfinished in {checkpoints}: {', '.join(sorted(left))}" in capsys.readouterr().out
