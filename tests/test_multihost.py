"""Multi-host training for real: several processes on this machine through launch/local.py."""

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from run_helpers import train_command, xla_flags

from lrulm.checkpoint import read_numpy

pytestmark = pytest.mark.multiprocess

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _train_args(workdir, corpus, *overrides):
    # Every process saves the best checkpoint too.
    return train_command(
        workdir, corpus, "train.eval_every=4", "mesh.data=4", "mesh.fsdp=2",
        "checkpoint.keep_best=loss", *overrides,
    )  # fmt: skip


def _launch(cmd, extra_env=None, **kw):
    launcher = [
        sys.executable,
        str(ROOT / "launch" / "local.py"),
        "--num_processes",
        "2",
        "--devices_per_process",
        "4",
        "--",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LRULM_")}
    env.update(extra_env or {})
    return subprocess.Popen(
        launcher + cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        **kw,
    )


def _finish(proc, timeout=400):
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # Where each process is stuck: `lrulm` dumps its threads' stacks on SIGUSR2.
        for pid in _children(proc.pid):
            os.kill(pid, signal.SIGUSR2)
        time.sleep(3)
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"launcher did not finish in {timeout} s:\n{out[-12000:]}")
    return out


def _children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def _rows(workdir):
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def _losses(workdir, key="train/loss"):
    return {r["step"]: r[key] for r in _rows(workdir) if key in r}


def _params(workdir, step):
    tree = read_numpy(os.path.join(workdir, "checkpoints", str(step), "state"))
    return jax.tree.leaves(tree["params"])


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory, corpus):
    """The reference: one process with 8 simulated devices, same config and seed."""
    workdir = tmp_path_factory.mktemp("single") / "run"
    env = dict(os.environ, XLA_FLAGS=xla_flags(8))
    env = {k: v for k, v in env.items() if not k.startswith("LRULM_")}
    out = subprocess.run(
        _train_args(workdir, corpus, "train.steps=8", "checkpoint.every_steps=4"),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, corpus):
    """2 processes x 4 devices, a (data=4, fsdp=2) mesh spanning both, uninterrupted."""
    workdir = tmp_path_factory.mktemp("two") / "run"
    out = _finish(
        _launch(_train_args(workdir, corpus, "train.steps=8", "checkpoint.every_steps=4"))
    )
    return workdir, out


def test_two_processes_match_one(two_process_run, single_process_run):
    workdir, out = two_process_run
    assert "[p0]" in out and "[p1]" in out, out[-2000:]
    assert "8 devices, 2 processes" in out, out[-3000:]
    two, one = _losses(workdir), _losses(single_process_run)
    assert sorted(two) == sorted(one) == list(range(1, 9))
    np.testing.assert_allclose([two[s] for s in one], list(one.values()), rtol=1e-5)
    ev2, ev1 = _losses(workdir, "eval/loss"), _losses(single_process_run, "eval/loss")
    np.testing.assert_allclose([ev2[s] for s in ev1], list(ev1.values()), rtol=1e-5)
    # Only process 0 writes the run's files: one row per step, one config.
    assert [r["step"] for r in _rows(workdir) if "train/loss" in r] == list(range(1, 9))
    # Each process saved its own data-iterator state in the checkpoint.
    data = sorted(
        f for f in os.listdir(workdir / "checkpoints" / "8" / "data") if f.startswith("process_")
    )
    assert data == ["process_0-of-2.json", "process_1-of-2.json"], data
    # Both kept the same best checkpoint (the lower eval loss of steps 4 and 8).
    from lrulm import best_checkpoint as best_lib

    kept2, kept1 = best_lib.kept_best(str(workdir)), best_lib.kept_best(str(single_process_run))
    assert kept2[0] == "loss" and kept2[2] == kept1[2] == min(ev1, key=ev1.get)
    np.testing.assert_allclose(kept2[1], kept1[1], rtol=1e-5)


def test_generate_runs_as_two_processes(two_process_run, tmp_path):
    """`lrulm generate` under launch/local.py: each process restores the parameters onto
    a device of its own (process 1 cannot address process 0's) and decodes; process 0
    alone prints and writes the samples."""
    workdir, _ = two_process_run
    output = tmp_path / "samples.jsonl"
    cmd = [sys.executable, "-m", "lrulm", "generate", "--workdir", str(workdir),
           "--prompt", "def f", "--max_new_tokens", "4", "--temperature", "0",
           "--output", str(output)]  # fmt: skip
    out = _finish(_launch(cmd))
    assert "FAILED" not in out and "error" not in out, out[-3000:]
    assert out.count("[p0] def f") == 1 and "[p1] def f" not in out, out[-3000:]
    (sample,) = [json.loads(line) for line in output.read_text().splitlines()]
    assert sample["prompt"] == "def f"


def test_two_process_checkpoint_resumes_in_one_process(tmp_path, corpus, two_process_run):
    """Restored by one process, the two processes' iterator files do not fit: the data
    position comes from the checkpoint's metadata, and the run goes on as the two-process
    run did (same batches, so the same losses and parameters)."""
    reference, _ = two_process_run
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    shutil.rmtree(workdir / "checkpoints" / "8")
    (workdir / "metrics.jsonl").write_text("")
    env = dict(os.environ, XLA_FLAGS=xla_flags(8))
    env = {k: v for k, v in env.items() if not k.startswith("LRULM_")}
    out = subprocess.run(
        _train_args(workdir, corpus, "train.steps=8", "checkpoint.every_steps=4"),
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resumed from {workdir}/checkpoints/4" in out.stdout + out.stderr
    assert "the train data goes on at row 32 of its order (from the checkpoint's" in out.stdout
    assert "WARNING" not in out.stderr  # nothing was lost
    two, one = _losses(reference), _losses(workdir)
    assert sorted(one) == [5, 6, 7, 8]
    np.testing.assert_allclose([one[s] for s in one], [two[s] for s in one], rtol=1e-5)
    for a, b in zip(_params(workdir, 8), _params(reference, 8)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    data = sorted((workdir / "checkpoints" / "8" / "data").glob("process_*"))
    assert [(f.name, json.loads(f.read_text())) for f in data] == [
        ("process_0-of-1.json", {"rows": 64, "global_batch": 8})
    ]


def test_killed_job_resumes_to_the_same_parameters(tmp_path, corpus, two_process_run):
    workdir = tmp_path / "run"
    cmd = _train_args(workdir, corpus, "train.steps=8", "checkpoint.every_steps=4")
    proc = _launch(cmd)
    start = time.time()
    while not os.path.isdir(workdir / "checkpoints" / "4"):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() - start < 300
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both processes, no goodbye
    proc.communicate()
    out = _finish(_launch(cmd))
    resumed = int(re.search(r"resumed from \S+/checkpoints/(\d+)", out).group(1))
    assert 4 <= resumed < 8, out[-2000:]
    reference, _ = two_process_run
    for a, b in zip(_params(workdir, 8), _params(reference, 8)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_to_the_launcher_saves_on_every_process(tmp_path, corpus, signum):
    """SIGTERM (a preemption) or SIGINT (Ctrl-C) to the launcher: every process gets
    SIGTERM, saves at one agreed step and stops; the launcher exits 75. (The SIGINT run
    saves by time, checkpoint.every_minutes, at log steps, where only process 0's clock
    runs: process 1 saves because process 0's clock decides for both.)"""
    workdir = tmp_path / "run"
    every = ["checkpoint.every_steps=5"]
    if signum == signal.SIGINT:
        every = ["checkpoint.every_steps=100000", "checkpoint.every_minutes=1e-6"]
        every += ["train.log_every=5"]
    clock = {"LRULM_TEST_CLOCK_PROCESS": "0"}
    proc = _launch(_train_args(workdir, corpus, "train.steps=100000", *every), clock)
    start = time.time()
    while not os.path.isdir(workdir / "checkpoints" / "5"):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() - start < 300
        time.sleep(0.05)
    proc.send_signal(signum)  # the launcher sends both processes SIGTERM
    out = _finish(proc, timeout=180)
    assert proc.returncode == 75, out[-3000:]  # lrulm.preemption.EXIT_CODE
    assert "stopped for the preemption signal after saving" in out and "FAILED" not in out
    steps = re.findall(r"\[p(\d)\].*preemption signal; saving step (\d+)", out)
    assert {p for p, _ in steps} == {"0", "1"} and len({s for _, s in steps}) == 1, out[-3000:]
    assert os.path.isdir(workdir / "checkpoints" / steps[0][1])
