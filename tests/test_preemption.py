"""Stopping and resuming a run: SIGKILL then an exact resume, SIGTERM and Ctrl-C (save,
exit 75, resume), a preemption while the data is prepared, a time limit, a data error
mid-run. The other checkpoint tests: test_checkpoint.py."""

import os
import re
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from run_helpers import logged_losses, run_train, saved_params, train_command, train_here, wait_for

from lrulm import checkpoint as ckpt_lib


@pytest.mark.optimize_xla
def test_sigkill_then_resume_is_bitwise_exact(tmp_path, corpus):
    # The tiny preset (~0.25 s a step here) leaves time to kill the run mid-way (~5 s
    # of steps after the first checkpoint).
    steps = ["train.steps=24", "checkpoint.every_steps=4", "model.preset=tiny", "train.seq_len=128"]
    straight = tmp_path / "straight"
    run_train(straight, corpus, *steps)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        train_command(killed, corpus, *steps), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for(killed / "checkpoints" / "4", proc)  # committed: Orbax renames at the end
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    out = run_train(killed, corpus, *steps)
    resumed_from = int(re.search(r"resumed from \S+/checkpoints/(\d+)", out).group(1))
    assert 4 <= resumed_from < 24, out
    a, b = logged_losses(straight), logged_losses(killed)
    assert sorted(a) == sorted(b) == list(range(1, 25))
    for s in range(resumed_from + 1, 25):
        assert a[s] == b[s], (s, a[s], b[s])  # identical, not merely close: same data order
    pa, pb = saved_params(straight, 24), saved_params(killed, 24)
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_array_equal(x, y)


def _as_a_foreground_job(command):
    """`python -m lrulm ...` with SIGINT at Python's default handler, as a terminal's
    foreground job has it, even where this test runner was started with SIGINT ignored
    (`pytest ... &` in a shell without job control), which every child inherits and which
    `lrulm train` rightly leaves alone (the Ctrl-C test below)."""
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        return command
    assert command[1:3] == ["-m", "lrulm"], command
    start = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    return [command[0], "-c", start + "from lrulm.main import run; run()", *command[3:]]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_saves_and_exits_75_then_resumes(tmp_path, corpus, signum):
    """A preemption (SIGTERM), or Ctrl-C (SIGINT) in a one-process run, saves the step it
    reached, exits 75, and the same command resumes there. (SIGUSR2 before it: every
    thread's stack written, and the run goes on.)"""
    workdir = tmp_path / "run"
    cmd = _as_a_foreground_job(
        train_command(workdir, corpus, "train.steps=100000", "checkpoint.every_steps=5")
    )
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(workdir / "checkpoints" / "5", proc)
    if signum == signal.SIGTERM:
        proc.send_signal(signal.SIGUSR2)  # where is it? (a hung job's question)
        wait_for(workdir / "checkpoints" / "10", proc)
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=120)
    # 75, not 0: whatever runs the trainer must not take the run for a finished one.
    assert proc.returncode == 75, out[-2000:]
    if signum == signal.SIGTERM:
        assert "Current thread 0x" in out and re.search(r'File ".*/lrulm/train\.py"', out), out
    assert "preemption signal; saving step" in out
    saved = int(re.search(r"saving step (\d+)", out).group(1))
    assert f"stopped at step {saved} of 100000 for a preemption signal" in out
    assert saved >= 5 and os.path.isdir(workdir / "checkpoints" / str(saved))
    out = run_train(workdir, corpus, f"train.steps={saved + 3}", "checkpoint.every_steps=5")
    assert f"resumed from {workdir}/checkpoints/{saved}" in out
    # train.steps 100000 -> saved + 3: the schedule is squeezed, and the jump is said.
    assert re.search(rf"at step {saved} the rate was [\d.e-]+ and is now [\d.e-]+", out), out
    assert max(logged_losses(workdir)) == saved + 3


def test_sigterm_while_the_data_is_prepared_still_saves_and_stops(tmp_path, corpus):
    """A SIGTERM before the first step (data preparation, restore, compilation: minutes
    on a pod) is held until the loop's first step, which saves and stops with 75; it
    used to kill the process (143), which the launchers count as a failure."""
    script = f"""
import os, signal, sys
from lrulm import config as config_lib, preemption, train
real = train.tasks.make_task
def make_task(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)  # a preemption while the data is prepared
    return real(*args, **kwargs)
train.tasks.make_task = make_task
config = config_lib.load_with_overrides("configs/lm/tiny.py", [
    ("data.train_files", {str(corpus["train"])!r}), ("data.eval_files", {str(corpus["eval"])!r}),
    ("train.steps", "50"), ("train.eval_every", "0")])
try:
    train.train_and_evaluate(config, {str(tmp_path / "run")!r})
except preemption.Preempted as e:
    print("preempted at", e.step)
    sys.exit(preemption.EXIT_CODE)
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 75, out.stderr[-3000:]
    assert "preempted at 0" in out.stdout
    assert os.path.isdir(tmp_path / "run" / "checkpoints" / "0")


def test_ctrl_c_is_taken_only_when_asked_and_not_ignored():
    """`lrulm train` (ctrl_c=True) takes SIGINT from Python's default handler; a library
    caller (a test runner) keeps it, as does a shell's `cmd &` that ignores it."""
    from lrulm import preemption

    # As Python starts where SIGINT is not ignored (this runner may have been started
    # with it ignored: `pytest ... &` in a shell without job control).
    runner = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _watchers_take_ctrl_c_only_when_asked(preemption)
    finally:
        signal.signal(signal.SIGINT, runner)


def _watchers_take_ctrl_c_only_when_asked(preemption):
    with preemption.Watcher():
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with preemption.Watcher(ctrl_c=True) as watcher:
        assert signal.getsignal(signal.SIGINT) == watcher._interrupt
        watcher._interrupt(signal.SIGINT, None)  # the first: save and stop
        assert watcher.reached(1)
        with pytest.raises(KeyboardInterrupt):  # the second: at once
            watcher._interrupt(signal.SIGINT, None)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with preemption.Watcher(ctrl_c=True):
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_time_limit_saves_and_stops_then_the_run_resumes(tmp_path, corpus, capsys):
    """train.time_limit_minutes: at the first log step past it the run saves and stops
    (Preempted: `lrulm train` exits 75); the same command without the limit goes on."""
    from lrulm import preemption

    files = (corpus["train"], corpus["eval"])
    common = ["train.steps=6", "train.log_every=2", "checkpoint.every_steps=1000"]
    with pytest.raises(preemption.Preempted, match="step 2 of 6 for train.time_limit_minutes"):
        train_here(tmp_path / "run", files, *common, "train.time_limit_minutes=1e-9")
    assert "time_limit_minutes=1e-09 reached; saving step 2" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["2"]
    train_here(tmp_path / "run", files, *common)
    assert "resumed from" in capsys.readouterr().out
    assert "6" in os.listdir(tmp_path / "run" / "checkpoints")


def test_a_data_error_mid_run_saves_the_steps_before_it(tmp_path, corpus, monkeypatch, capsys):
    """A record that fails when first drawn (as a bad image would) after step 3 of a run
    saving every 100: step 3 is saved before the error goes up; once the data reads, the
    resume gives the uninterrupted run's losses exactly (the failed batch read again)."""
    from lrulm.data import lm as lm_data

    files = (corpus["train"], corpus["eval"])
    steps = ("train.steps=6", "checkpoint.every_steps=100")
    train_here(tmp_path / "straight", files, *steps)
    original = lm_data.TrainStream.__next__

    def failing(self):
        if self.rows == 3 * self.global_batch:
            raise ValueError("sample_37.png: image is 64x64, expected 32x32")
        return original(self)

    monkeypatch.setattr(lm_data.TrainStream, "__next__", failing)
    with pytest.raises(ValueError, match="sample_37.png"):
        train_here(tmp_path / "failed", files, *steps)
    assert "reading the train data failed after step 3; saving step 3" in capsys.readouterr().out
    assert ckpt_lib.checkpoint_steps(str(tmp_path / "failed")) == [3]
    monkeypatch.setattr(lm_data.TrainStream, "__next__", original)
    train_here(tmp_path / "failed", files, *steps)
    a, b = logged_losses(tmp_path / "straight"), logged_losses(tmp_path / "failed")
    assert sorted(b) == list(range(1, 7)) and all(a[s] == b[s] for s in range(4, 7)), (a, b)
