"""lrulm.distributed: environment detection, no-op single process, and failures of real jobs."""

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import pytest
from run_helpers import xla_flags

from lrulm import distributed

# Variables that would make a process join (or detect) some other job.
_JOB_VARS = [
    *distributed.ADDRESS_VARS,
    *distributed.NUM_PROCESSES_VARS,
    *distributed.PROCESS_ID_VARS,
    "SLURM_NTASKS",
    "SLURM_JOB_ID",
    "SLURM_STEP_NODELIST",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "OMPI_MCA_orte_hnp_uri",
    "TPU_WORKER_HOSTNAMES",
    "TPU_PROCESS_ADDRESSES",
    "MEGASCALE_NUM_SLICES",
    "CLOUD_TPU_TASK_ID",
]


@pytest.fixture
def clean_env(monkeypatch):
    for name in _JOB_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in _JOB_VARS}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(1))
    env.update(extra)
    return env


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _peer_envs(num, **extra):
    """The environments of `num` processes of one job, coordinated on a free local port."""
    address = f"127.0.0.1:{_free_port()}"
    return [
        _env(
            LRULM_COORDINATOR_ADDRESS=address,
            LRULM_NUM_PROCESSES=str(num),
            LRULM_PROCESS_ID=str(i),
            **extra,
        )
        for i in range(num)
    ]


@contextlib.contextmanager
def _processes(script, envs):
    """Starts one `python script` per env, each in its own session; always kills them all."""
    procs = [
        subprocess.Popen(
            [sys.executable, str(script)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for env in envs
    ]
    try:
        yield procs
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


# --- detection -------------------------------------------------------------------------------


def test_no_variables_is_single_process(clean_env):
    assert distributed.detect() == distributed.Environment("single", 1, 0)


@pytest.mark.parametrize("prefix", ["LRULM", "JAX"])
def test_explicit_variables(clean_env, prefix):
    clean_env.setenv(f"{prefix}_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    clean_env.setenv(f"{prefix}_NUM_PROCESSES", "4")
    clean_env.setenv(f"{prefix}_PROCESS_ID", "3")
    assert distributed.detect() == distributed.Environment("env", 4, 3, "10.0.0.1:1234")


def test_lrulm_variables_win_over_jax_ones(clean_env):
    clean_env.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.9:9")
    clean_env.setenv("LRULM_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    clean_env.setenv("LRULM_NUM_PROCESSES", "2")
    clean_env.setenv("LRULM_PROCESS_ID", "0")
    assert distributed.detect().coordinator_address == "10.0.0.1:1234"


def test_incomplete_variables_name_what_is_missing(clean_env):
    clean_env.setenv("LRULM_NUM_PROCESSES", "2")
    with pytest.raises(ValueError, match="LRULM_COORDINATOR_ADDRESS, LRULM_PROCESS_ID"):
        distributed.detect()


def test_process_id_out_of_range(clean_env):
    clean_env.setenv("LRULM_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    clean_env.setenv("LRULM_NUM_PROCESSES", "2")
    clean_env.setenv("LRULM_PROCESS_ID", "2")
    with pytest.raises(ValueError, match=r"LRULM_PROCESS_ID=2 must be in \[0, "):
        distributed.detect()


@pytest.mark.parametrize("ntasks,kind", [("4", "slurm"), ("1", "single")])
def test_slurm_needs_more_than_one_task(clean_env, ntasks, kind):
    for name, value in dict(
        SLURM_NTASKS=ntasks,
        SLURM_JOB_ID="77",
        SLURM_STEP_NODELIST="gpu[01-04]",
        SLURM_PROCID="0",
        SLURM_LOCALID="0",
    ).items():
        clean_env.setenv(name, value)
    assert distributed.detect().kind == kind


def test_gke_tpu_pod_counts_workers(clean_env):
    clean_env.setenv("TPU_WORKER_HOSTNAMES", "w-0,w-1,w-2,w-3")
    clean_env.setenv("MEGASCALE_NUM_SLICES", "2")
    env = distributed.detect()
    assert (env.kind, env.num_processes, env.process_id) == ("tpu", 8, None)


def test_a_tpu_vm_whose_metadata_does_not_answer_says_what_to_set(clean_env):
    """jax's own detection asks the same metadata server: it ended in a ConnectionError
    traceback. A slice whose hosts answer is counted."""
    clean_env.setattr(distributed, "_on_cloud_tpu_vm", lambda: True)
    clean_env.delenv("TPU_SKIP_MDS_QUERY", raising=False)
    clean_env.setattr(distributed, "_gce_metadata", lambda key: None)
    with pytest.raises(ValueError, match="set TPU_SKIP_MDS_QUERY=1 to run on this host alone"):
        distributed.detect()
    clean_env.setattr(distributed, "_gce_metadata", lambda key: "a,b,c,d")
    assert distributed.detect().num_processes == 4
    clean_env.setenv("TPU_SKIP_MDS_QUERY", "1")
    assert distributed.detect().kind == "single"


def test_single_process_initialize_is_an_idempotent_no_op(clean_env):
    distributed.initialize()
    distributed.initialize(timeout_s=1)
    assert not jax.distributed.is_initialized()
    assert (distributed.process_count(), distributed.process_index()) == (1, 0)
    assert distributed.is_main_process()
    distributed.barrier("single")  # returns at once


# --- real processes --------------------------------------------------------------------------


def test_unreachable_coordinator_raises_quickly(tmp_path):
    script = tmp_path / "join.py"
    script.write_text(
        textwrap.dedent("""
        from lrulm import distributed
        try:
            distributed.initialize(timeout_s=2)
        except RuntimeError as e:
            print("RuntimeError:", e)
        """)
    )
    port = _free_port()  # nothing listens there
    env = _env(
        LRULM_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", LRULM_NUM_PROCESSES="2", LRULM_PROCESS_ID="1"
    )
    start = time.monotonic()
    with _processes(script, [env]) as (proc,):
        out, _ = proc.communicate(timeout=30)
    assert time.monotonic() - start < 15
    assert proc.returncode == 0, out
    assert (
        f"RuntimeError: process 1 of 2 could not reach the coordinator at 127.0.0.1:{port}" in out
    )
    assert "within 2 s" in out and "LRULM_COORDINATOR_ADDRESS" in out


def test_coordinator_port_in_use_raises(tmp_path):
    import socket

    script = tmp_path / "lead.py"
    script.write_text("from lrulm import distributed\ndistributed.initialize(timeout_s=5)\n")
    with socket.socket() as held:
        held.bind(("0.0.0.0", 0))
        held.listen()
        port = held.getsockname()[1]
        env = _env(
            LRULM_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            LRULM_NUM_PROCESSES="2",
            LRULM_PROCESS_ID="0",
        )
        with _processes(script, [env]) as (proc,):
            out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 1, out  # a Python error, not jax's segfault
    assert f"RuntimeError: process 0 cannot start the coordinator: port {port}" in out


HEARTBEAT_S = 3
# Survivors must be gone within the heartbeat timeout plus this much (process start-up of the
# abort, scheduling on a loaded 2-core machine).
SLACK_S = 6


@pytest.mark.multiprocess
@pytest.mark.parametrize("victim", [1, 0], ids=["worker_dies", "coordinator_dies"])
def test_survivor_exits_within_heartbeat_when_a_peer_dies(tmp_path, victim):
    # The survivor sleeps, standing in for a collective that never errors out on its own (on
    # TPUs a dead peer makes an ICI collective hang): only the coordination service frees it.
    script = tmp_path / "peer.py"
    script.write_text(
        textwrap.dedent(f"""
        import os, signal, time
        import jax
        from lrulm import distributed
        distributed.initialize(timeout_s=60)
        distributed.barrier("up")
        print("ready", flush=True)
        if jax.process_index() == {victim}:
            time.sleep(0.5)
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(120)
        """)
    )
    envs = _peer_envs(2, LRULM_HEARTBEAT_TIMEOUT_S=str(HEARTBEAT_S))
    with _processes(script, envs) as procs:
        procs[victim].wait(timeout=60)
        died = time.monotonic()
        survivor = procs[1 - victim]
        survivor.wait(timeout=HEARTBEAT_S + SLACK_S + 30)
        elapsed = time.monotonic() - died
        out = survivor.stdout.read()
    assert procs[victim].returncode == -signal.SIGKILL
    assert "ready" in out
    assert survivor.returncode != 0, out
    assert elapsed < HEARTBEAT_S + SLACK_S, f"survivor took {elapsed:.1f} s\n{out}"


@pytest.mark.multiprocess
def test_dcn_axes_span_processes_where_devices_have_no_slices(tmp_path):
    """GPU and CPU hosts have no TPU slice_index: mesh.dcn_* then groups devices by process
    (each process a granule), so the data axis's DCN factor goes across processes, and a
    collective over the mesh adds up both processes' shards."""
    script = tmp_path / "dcn.py"
    script.write_text(
        textwrap.dedent("""
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import NamedSharding, PartitionSpec as P
        from lrulm import distributed, sharding
        distributed.initialize(timeout_s=60)
        mesh = sharding.make_mesh({"data": 1, "fsdp": 2}, dcn={"data": 2})
        owners = np.vectorize(lambda d: d.process_index)(mesh.devices)
        rows = jax.make_array_from_callback(
            (4,), NamedSharding(mesh, P(("data", "fsdp"))),
            lambda index: np.arange(4, dtype=np.float32)[index],
        )
        total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(rows)
        print("owners", owners.reshape(2, -1).tolist(), "total", float(total), flush=True)
        """)
    )
    envs = _peer_envs(2, XLA_FLAGS=xla_flags(2))
    with _processes(script, envs) as procs:
        outs = [p.communicate(timeout=120)[0] for p in procs]
    for proc, out in zip(procs, outs):
        assert proc.returncode == 0, out[-3000:]
        assert "owners [[0, 0], [1, 1]] total 6.0" in out, out[-3000:]


def test_dcn_axes_in_one_process_are_a_clear_error():
    from lrulm import sharding

    with pytest.raises(ValueError, match=r"devices are in one process, .*set mesh.dcn_data and"):
        sharding.make_mesh({"data": 1, "fsdp": 2}, devices=jax.devices()[:4], dcn={"data": 2})


def test_sigterm_while_waiting_for_the_coordinator_exits_75(tmp_path):
    """A process waiting for a coordinator that starts later (pods start apart) and told
    to stop exits 75, "try again", not 143, which launchers take for a failure."""
    port = _free_port()  # nothing listens there yet
    env = _env(
        LRULM_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", LRULM_NUM_PROCESSES="2",
        LRULM_PROCESS_ID="1", LRULM_INIT_TIMEOUT_S="120",
    )  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "lrulm", "train", "--config", "configs/lm/tiny.py:test",
         "--workdir", str(tmp_path / "run")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    time.sleep(6)  # imports, then the wait
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 75, out[-2000:]
    assert "a preemption signal came before the run started; nothing to save" in out


def test_bad_timeouts_are_refused(clean_env, monkeypatch):
    """0 made jax declare every process dead at its first heartbeat."""
    monkeypatch.setenv("LRULM_HEARTBEAT_TIMEOUT_S", "0")
    with pytest.raises(ValueError, match="LRULM_HEARTBEAT_TIMEOUT_S=0: give a number of seconds"):
        distributed._timeout(None, "LRULM_HEARTBEAT_TIMEOUT_S", 60)
    with pytest.raises(ValueError, match="the timeout=-5"):
        distributed._timeout(-5, "LRULM_INIT_TIMEOUT_S", 300)
    monkeypatch.delenv("LRULM_HEARTBEAT_TIMEOUT_S")
    assert distributed._timeout(None, "LRULM_HEARTBEAT_TIMEOUT_S", 60) == 60


def test_a_resumed_run_tells_jax_its_step_before_setting_up(monkeypatch):
    """jax agrees on one past the largest step reported (1 before any report): a SIGTERM
    during a resumed run's set-up agreed on step 1, which the loop, starting at its
    checkpoint's step, never reached, so the run never saved or stopped."""
    from jax.experimental import multihost_utils

    from lrulm import preemption

    reported = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", reported.append)
    with preemption.Watcher(start_step=432) as watcher:
        assert reported == [432]
        watcher.reached(433)
    assert reported == [432, 433]


def test_processes_with_other_configs_are_refused(monkeypatch):
    """Each process builds its config from its own command line; one lr on one host and
    another on the next trained a mixture, silently."""
    import numpy as np
    from jax.experimental import multihost_utils

    from lrulm import config as config_lib
    from lrulm import run_config

    config = config_lib.load("configs/lm/tiny.py:test")
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    same = lambda x: np.stack([x, x])
    monkeypatch.setattr(multihost_utils, "process_allgather", same)
    run_config.check_processes_agree(config)
    other = lambda x: np.stack([x, x + 1])
    monkeypatch.setattr(multihost_utils, "process_allgather", other)
    with pytest.raises(ValueError, match=r"process\(es\) 1 run another config than process 0"):
        run_config.check_processes_agree(config)
    # A process's own reader threads (or process 0's console and profile) may differ.
    seen = []
    monkeypatch.setattr(multihost_utils, "process_allgather", lambda x: seen.append(x) or same(x))
    run_config.check_processes_agree(config)
    config.data.num_threads, config.train.progress = 2, not config.train.progress
    run_config.check_processes_agree(config)
    np.testing.assert_array_equal(seen[0], seen[1])
