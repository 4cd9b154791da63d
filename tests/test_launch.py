"""Launchers: real multi-process jobs through launch/local.py, and dry runs of the cluster ones."""

import contextlib
import importlib.util
import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parent.parent / "launch"
_JOB_VARS = ("LRULM_COORDINATOR_ADDRESS", "LRULM_NUM_PROCESSES", "LRULM_PROCESS_ID")


def _module(name):
    """Imports launch/<name>.py (the launchers are scripts, not a package)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, LAUNCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up here
        spec.loader.exec_module(module)
    return sys.modules[name]


@contextlib.contextmanager
def _launcher(*args, extra_env=None):
    """Starts launch/local.py in its own session; always kills it (its children follow it)."""
    env = {k: v for k, v in os.environ.items() if k not in _JOB_VARS}
    env.update(extra_env or {})
    proc = subprocess.Popen(
        [sys.executable, str(LAUNCH / "local.py"), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


def _timed_lines(proc, timeout_s):
    """Reads the launcher's output to the end: [(seconds since start, line)], then its exit."""
    start, lines = time.monotonic(), []
    for line in proc.stdout:
        lines.append((time.monotonic() - start, line.rstrip("\n")))
        assert time.monotonic() - start < timeout_s, "\n".join(text for _, text in lines)
    proc.wait(timeout=timeout_s)
    return lines, time.monotonic() - start


def _text(lines):
    return "\n".join(text for _, text in lines)


# The children's scripts print through say(): one write per line. gloo writes its own lines
# ("[Gloo] Rank 1 is connected to ...") to the same stdout from its own thread, and print()
# under the launcher's PYTHONUNBUFFERED writes each argument and the newline separately,
# so one of gloo's lines could land inside one of ours (seen in CI: "[p1] sum[Gloo] ...").
_SAY = """
import os as _os
def say(*args):
    _os.write(1, (" ".join(map(str, args)) + "\\n").encode())
"""


def _child_script(path, body):
    """Writes a child's script: say(), then the dedented body."""
    path.write_text(_SAY + textwrap.dedent(body))
    return path


# --- launch/local.py -------------------------------------------------------------------------


@pytest.mark.multiprocess
def test_two_processes_share_one_global_array(tmp_path):
    script = _child_script(
        tmp_path / "collective.py",
        """
        import os
        import jax, jax.numpy as jnp, numpy as np
        from jax.experimental import multihost_utils
        from jax.sharding import NamedSharding, PartitionSpec as P
        from lrulm import distributed

        distributed.initialize()
        distributed.initialize()  # idempotent
        i = jax.process_index()
        say("count", jax.process_count(), jax.device_count(), jax.local_device_count())
        say("flags", os.environ["XLA_FLAGS"])
        mesh = jax.make_mesh((jax.device_count(),), ("d",))
        # Process i holds rows [10**i, 2 * 10**i]: the sum 33 needs both processes' rows.
        local = np.array([1.0, 2.0], np.float32) * 10.0**i
        arr = jax.make_array_from_process_local_data(NamedSharding(mesh, P("d")), local)
        total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(arr)
        ids = multihost_utils.process_allgather(np.int32(i))
        say("sum", float(total), "ids", ids.tolist())
        distributed.barrier("done")
        """,
    )
    args = ["--num_processes", "2", "--devices_per_process", "2", "--timeout_s", "60"]
    # The launcher must replace the device count it inherits and keep the other flags.
    env = {
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=1"
    }
    with _launcher(*args, "--", sys.executable, str(script), extra_env=env) as proc:
        lines, _ = _timed_lines(proc, 60)
    out = _text(lines)
    assert proc.returncode == 0, out
    for p in ("[p0] ", "[p1] "):
        assert f"{p}count 2 4 2" in out, out
        assert f"{p}sum 33.0 ids [0, 1]" in out, out
        assert (
            f"{p}flags --xla_backend_optimization_level=1 "
            "--xla_force_host_platform_device_count=2" in out
        )


def test_large_output_does_not_deadlock():
    code = "import sys\nfor i in range(40000): sys.stdout.write(f'line {i} ' + 'x' * 80 + '\\n')"
    with _launcher("--num_processes", "2", "--", sys.executable, "-c", code) as proc:
        lines, _ = _timed_lines(proc, 60)
    assert proc.returncode == 0
    # Every line whole: the launcher's own lines ("[local.py] started ...") share the pipe.
    mixed = [
        text
        for _, text in lines
        if not re.fullmatch(r"\[p[01]\] line \d+ x{80}|\[local\.py\] .*", text)
    ]
    assert not mixed, mixed[:3]
    for p in ("[p0] ", "[p1] "):
        mine = [text for _, text in lines if text.startswith(p)]
        assert len(mine) == 40000 and mine[-1].startswith(f"{p}line 39999 ")


def test_a_childs_stdout_and_stderr_lines_stay_whole():
    """A child whose Python prints (unbuffered: print writes each piece) while another
    thread writes to fd 2 in pieces, as native code such as gloo does: every line arrives
    whole, each stream pumped on its own."""
    code = textwrap.dedent("""
        import os, threading
        def native():
            for i in range(3000):
                os.write(2, b"err "); os.write(2, str(i).encode()); os.write(2, b" done\\n")
        t = threading.Thread(target=native)
        t.start()
        for i in range(3000):
            print("out", i, "ok")
        t.join()
        """)
    with _launcher("--num_processes", "1", "--", sys.executable, "-c", code) as proc:
        lines, _ = _timed_lines(proc, 60)
    assert proc.returncode == 0
    texts = [text for _, text in lines if not text.startswith("[local.py] ")]
    mixed = [t for t in texts if not re.fullmatch(r"\[p0\] (out \d+ ok|err \d+ done)", t)]
    assert not mixed, mixed[:3]
    assert len(texts) == 6000


def test_lrulm_lines_stay_whole_beside_native_lines_on_stdout():
    """lrulm's console lines (lrulm.metrics.say) reach the launcher whole while another
    thread writes whole lines to the same fd 1, as gloo does. With print() in say's
    place (unbuffered under the launcher, the newline a write of its own) this check
    found 8, 214 and 40 of the 6000 lines mixed in three runs."""
    code = textwrap.dedent("""
        import os, sys, threading
        from lrulm.metrics import say
        def native():
            for i in range(3000):
                os.write(1, b"[Gloo] Rank 0 is connected\\n")
        t = threading.Thread(target=native)
        t.start()
        for i in range(3000):
            say(f"lrulm: line {i} of 3000")
        t.join()
        """)
    with _launcher("--num_processes", "1", "--", sys.executable, "-c", code) as proc:
        lines, _ = _timed_lines(proc, 120)
    assert proc.returncode == 0, _text(lines)[-2000:]
    texts = [text for _, text in lines if not text.startswith("[local.py] ")]
    pattern = r"\[p0\] (lrulm: line \d+ of 3000|\[Gloo\] Rank 0 is connected)"
    mixed = [t for t in texts if not re.fullmatch(pattern, t)]
    assert not mixed and len(texts) == 6000, mixed[:3]


GRACE_S = 2
# The launcher must exit within the grace period (survivors that ignore SIGTERM get SIGKILL)
# plus this much after process 1 dies.
SLACK_S = 3


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "death,survivor,code,reason",
    [
        # The survivor's collective fails too, a few ms later: process 1 must still be named
        # first, and its exit code returned.
        ("raise RuntimeError('boom')", "distributed.barrier('never')", 1, "exited with code 1"),
        ("os._exit(3)", "distributed.barrier('never')", 3, "exited with code 3"),
        # A survivor stuck outside any collective: jax owns SIGTERM after initialize, so only
        # the launcher's SIGKILL after the grace period ends it.
        ("os.kill(os.getpid(), 9)", "time.sleep(120)", 128 + 9, "was killed by SIGKILL"),
    ],
    ids=["exception", "exit3", "sigkill"],
)
def test_failed_process_stops_the_job(tmp_path, death, survivor, code, reason):
    script = _child_script(
        tmp_path / "fail.py",
        f"""
        import os, time
        import jax
        from lrulm import distributed
        distributed.initialize()
        distributed.barrier("up")
        if jax.process_index() == 1:
            time.sleep(0.3)
            say("dying")
            {death}
        {survivor}
        say("survivor done")
        """,
    )
    args = ["--num_processes", "2", "--devices_per_process", "1", "--grace_s", str(GRACE_S)]
    with _launcher(*args, "--timeout_s", "60", "--", sys.executable, str(script)) as proc:
        lines, total = _timed_lines(proc, 60)
    out = _text(lines)
    assert proc.returncode == code, out
    summary = next(text for _, text in lines if "FAILED:" in text)
    assert summary.startswith(f"[local.py] FAILED: process 1 {reason}"), out
    assert "survivor done" not in out
    died = next(t for t, text in lines if text == "[p1] dying")
    assert total - died < GRACE_S + SLACK_S, f"{total - died:.1f} s after the failure\n{out}"


@pytest.mark.multiprocess
def test_sigterm_is_forwarded_and_processes_save_at_the_same_step(tmp_path):
    script = _child_script(
        tmp_path / "preempt.py",
        """
        import sys, time
        from jax.experimental import multihost_utils
        from lrulm import distributed
        distributed.initialize()
        distributed.barrier("up")
        say("ready")
        for step in range(100000):
            if multihost_utils.reached_preemption_sync_point(step):
                say(f"saving at step {step}")
                distributed.barrier("saved")
                sys.exit(0)
            time.sleep(0.01)
        sys.exit(5)
        """,
    )
    args = ["--num_processes", "2", "--timeout_s", "60", "--", sys.executable, str(script)]
    with _launcher(*args) as proc:
        lines, ready = [], 0
        for line in proc.stdout:
            lines.append((0, line.rstrip("\n")))
            ready += line.rstrip().endswith("] ready")
            if ready == 2:
                break
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        rest, _ = _timed_lines(proc, 30)
    out = _text(lines + rest)
    assert proc.returncode == 0, out
    assert "received SIGTERM; forwarding it" in out
    steps = {text.split("] ")[1] for _, text in rest if "saving at step" in text}
    assert len(steps) == 1 and "[p0] saving" in out and "[p1] saving" in out, out


def test_local_usage_errors():
    result = subprocess.run(
        [sys.executable, str(LAUNCH / "local.py"), "--num_processes", "2"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2 and "give the command after --" in result.stderr


def test_local_dry_run_and_default_command():
    out, _ = _dry(
        "local.py", "--num_processes", "2", "--devices_per_process", "3", "--port", "4321",
        "--config", "configs/lm/tiny.py", "--workdir", "runs/x", "--dry_run",
    )  # fmt: skip
    lines = out.splitlines()
    assert lines[0] == "# process 0" and lines[2] == "# process 1"
    for i in (0, 1):
        line = lines[2 * i + 1]
        assert "LRULM_COORDINATOR_ADDRESS=127.0.0.1:4321 LRULM_NUM_PROCESSES=2" in line
        assert f"LRULM_PROCESS_ID={i} " in line and "device_count=3" in line
        assert line.endswith("lrulm train --config configs/lm/tiny.py --workdir runs/x")


def test_child_env_replaces_device_count_and_sets_identity():
    local = _module("local")
    base = {"XLA_FLAGS": "--a=1 --xla_force_host_platform_device_count=8", "JAX_PROCESS_ID": "7"}
    env = local.child_env(base, port=1234, num=3, index=2, devices=4)
    assert env["XLA_FLAGS"] == "--a=1 --xla_force_host_platform_device_count=4"
    assert env["LRULM_COORDINATOR_ADDRESS"] == "127.0.0.1:1234"
    assert (env["LRULM_NUM_PROCESSES"], env["LRULM_PROCESS_ID"]) == ("3", "2")
    assert env["JAX_PLATFORMS"] == "cpu" and "JAX_PROCESS_ID" not in env


@pytest.mark.parametrize("address", ["localhost", "10.0.0.1:70000", "10.0.0.1:", ":1234"])
def test_a_coordinator_address_without_a_usable_port_is_refused(monkeypatch, address):
    """What the launchers and launch/README.md's table set: a missing or out-of-range port
    is a ValueError naming the variable (it was an int() error, or an OverflowError
    traceback from process 0's port check), before jax is started."""
    from lrulm import distributed

    for name in (*_JOB_VARS, "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LRULM_COORDINATOR_ADDRESS", address)
    monkeypatch.setenv("LRULM_NUM_PROCESSES", "2")
    monkeypatch.setenv("LRULM_PROCESS_ID", "0")
    with pytest.raises(ValueError, match=r"LRULM_COORDINATOR_ADDRESS=.* is not host:port"):
        distributed.detect()
    monkeypatch.setenv("LRULM_COORDINATOR_ADDRESS", "[::1]:1234")
    assert distributed.detect().coordinator_address == "[::1]:1234"
    result = subprocess.run(
        [sys.executable, str(LAUNCH / "local.py"), "--num_processes", "2", "--port", "70000",
         "--dry_run", "--", "true"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2 and "--port 70000 is not a TCP port" in result.stderr


# --- dry runs of the cluster launchers -------------------------------------------------------


def _dry(script, *args):
    result = subprocess.run(
        [sys.executable, str(LAUNCH / script), *args], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    return result.stdout, result.stderr


TRAIN = ["lrulm", "train", "--config", "configs/lm/tiny.py", "--workdir", "/gcs/bkt/run"]


def test_tpu_vm_up_dry_run():
    flags = ["--name", "lru", "--zone", "us-east5-a", "--project", "proj"]
    out, err = _dry(
        "tpu_vm.py",
        "up",
        *flags,
        "--accelerator_type",
        "v5p-128",
        "--env",
        "A=1 2",
        "--delete_after",
        "--dry_run",
        "--",
        *TRAIN,
    )
    lines = out.splitlines()
    assert "16 hosts x 4 chips, topology 4x4x4" in lines[0]
    create, *rest = [line for line in lines if line.startswith("gcloud")]
    assert create.startswith("gcloud compute tpus tpu-vm create lru --zone us-east5-a")
    assert "--project proj --accelerator-type v5p-128 --version v2-alpha-tpuv5" in create
    assert any(line.startswith("tar -czf") for line in lines)
    assert any("tpu-vm scp" in line and "--worker=all" in line for line in rest)
    ssh = [line for line in rest if " ssh lru " in line]
    assert len(ssh) == 2 and all("--worker=all" in line for line in ssh)
    assert "pip install" in ssh[0] and "[tpu]" in ssh[0]
    remote = shlex.split(ssh[1])[-1]  # the --command value, as the workers' shell gets it
    assert remote.endswith("A='1 2' lrulm train --config configs/lm/tiny.py --workdir /gcs/bkt/run")
    assert (
        rest[-1] == "gcloud compute tpus tpu-vm delete lru --zone us-east5-a --project proj --quiet"
    )
    assert err == ""


def test_tpu_vm_queued_git_and_default_command():
    out, err = _dry(
        "tpu_vm.py",
        "up",
        "--name",
        "q",
        "--zone",
        "z",
        "--project",
        "p",
        "--accelerator_type",
        "v5litepod-16",
        "--queued",
        "--spot",
        "--repo_url",
        "https://example.com/lrulm.git",
        "--ref",
        "v1",
        "--config",
        "c.py",
        "--workdir",
        "/local/run",
        "--dry_run",
    )
    assert "queued-resources create q --zone z --project p --node-id q" in out
    assert "--accelerator-type v5litepod-16 --runtime-version v2-alpha-tpuv5-lite --spot" in out
    assert "queued-resources describe q" in out
    assert "git clone https://example.com/lrulm.git $HOME/lrulm" in out and "checkout v1" in out
    assert "scp" not in out
    assert "lrulm train --config c.py --workdir /local/run" in out
    assert "is not under /gcs/" in err and "4 hosts" in err


def test_gke_jobset_dry_run():
    yaml = pytest.importorskip("yaml")
    out, _ = _dry(
        "gke.py",
        "--name",
        "lru",
        "--image",
        "img:1",
        "--accelerator_type",
        "v5litepod-16",
        "--env",
        "A=1",
        "--dry_run",
        "--",
        *TRAIN,
    )
    manifest = yaml.safe_load(out)
    assert manifest["kind"] == "JobSet" and manifest["metadata"]["name"] == "lru"
    (job,) = manifest["spec"]["replicatedJobs"]
    spec = job["template"]["spec"]
    assert spec["parallelism"] == spec["completions"] == 4
    pod = spec["template"]["spec"]
    assert pod["nodeSelector"] == {
        "cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
        "cloud.google.com/gke-tpu-topology": "4x4",
    }
    (container,) = pod["containers"]
    assert container["image"] == "img:1" and container["command"] == TRAIN
    assert container["resources"]["limits"] == {"google.com/tpu": 4}
    assert container["resources"]["requests"] == {"google.com/tpu": 4}
    assert {"name": "A", "value": "1"} in container["env"]
    # The workdir's bucket is mounted where the command looks for it.
    template = spec["template"]
    assert template["metadata"]["annotations"] == {"gke-gcsfuse/volumes": "true"}
    assert container["volumeMounts"] == [{"name": "gcs-0", "mountPath": "/gcs/bkt"}]
    assert pod["volumes"][0]["csi"]["driver"] == "gcsfuse.csi.storage.gke.io"
    assert pod["volumes"][0]["csi"]["volumeAttributes"]["bucketName"] == "bkt"


def test_gke_mounts_the_volumes_the_command_uses():
    yaml = pytest.importorskip("yaml")
    base = ["--name", "lru", "--image", "img", "--accelerator_type", "v5p-16", "--dry_run"]
    command = [
        *TRAIN[:-1],
        "/fs/runs/a",
        "--config.data.train_files=/gcs/data-1/lm/*.jsonl,/gcs/bkt/more",
    ]
    out, _ = _dry(
        "gke.py", *base, "--pvc", "filestore:/fs", "--service_account", "ksa", "--", *command
    )
    pod = yaml.safe_load(out)["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    mounts = pod["containers"][0]["volumeMounts"]
    assert [m["mountPath"] for m in mounts] == ["/gcs/data-1", "/gcs/bkt", "/fs"]
    assert [v["csi"]["volumeAttributes"]["bucketName"] for v in pod["volumes"][:2]] == [
        "data-1",
        "bkt",
    ]
    assert pod["volumes"][2]["persistentVolumeClaim"] == {"claimName": "filestore"}
    assert pod["serviceAccountName"] == "ksa"
    # A bucket only an --env value names (launch/README.md: the compilation cache) too.
    cache = ["--env", "JAX_COMPILATION_CACHE_DIR=/gcs/cache-bkt/xla"]
    out, _ = _dry("gke.py", *base, *cache, "--", *TRAIN)
    pod = yaml.safe_load(out)["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    mounts = pod["containers"][0]["volumeMounts"]
    assert [m["mountPath"] for m in mounts] == ["/gcs/bkt", "/gcs/cache-bkt"]
    assert {"name": "JAX_COMPILATION_CACHE_DIR", "value": "/gcs/cache-bkt/xla"} in (
        pod["containers"][0]["env"]
    )
    # A multi-host run whose workdir is on no mount is refused; on one host, a warning.
    local = [*TRAIN[:-1], "/local/run"]
    refused = subprocess.run(
        [sys.executable, str(LAUNCH / "gke.py"), *base, "--", *local],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert refused.returncode == 1 and "--workdir /local/run is on no mounted volume" in (
        refused.stderr
    )
    one_host = [a if a != "v5p-16" else "v6e-8" for a in base]
    out, err = _dry("gke.py", *one_host, "--", *local)
    assert "warning: --workdir /local/run is on no mounted volume" in err and "JobSet" in out


def test_gke_single_host_and_xpk():
    yaml = pytest.importorskip("yaml")
    out, _ = _dry(
        "gke.py",
        "--name",
        "one",
        "--image",
        "img",
        "--accelerator_type",
        "v6e-8",
        "--dry_run",
        "--",
        *TRAIN,
    )
    spec = yaml.safe_load(out)["spec"]["replicatedJobs"][0]["template"]["spec"]
    assert spec["parallelism"] == 1
    assert spec["template"]["spec"]["containers"][0]["resources"]["limits"] == {"google.com/tpu": 8}
    out, err = _dry(
        "gke.py",
        "--name",
        "lru",
        "--image",
        "img",
        "--accelerator_type",
        "v5p-128",
        "--print_xpk",
        "--cluster",
        "c1",
        "--env",
        "A=1",
        "--",
        *TRAIN,
    )
    assert out.startswith("xpk workload create --cluster c1 --workload lru --tpu-type v5p-128")
    assert "--docker-image img" in out and "--env A=1" in out
    assert "--command 'lrulm train --config configs/lm/tiny.py --workdir /gcs/bkt/run'" in out
    assert "gs://bkt at /gcs/bkt mounted" in err


def test_slurm_dry_run():
    out, _ = _dry(
        "slurm.py",
        "--nodes",
        "4",
        "--gpus_per_node",
        "8",
        "--partition",
        "gpu",
        "--time",
        "2:00:00",
        "--requeue",
        "--env",
        "X=1",
        "--dry_run",
        "--",
        *TRAIN,
    )
    assert out.startswith("#!/bin/bash\n")
    for directive in (
        "--nodes=4",
        "--ntasks-per-node=1",
        "--gpus-per-node=8",
        "--partition=gpu",
        "--time=2:00:00",
        "--signal=B:USR1@300",  # to the batch shell, which stops the trainers and requeues
        "--requeue",
        "--open-mode=append",
    ):
        assert f"#SBATCH {directive}\n" in out
    assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7\n" in out
    assert "export X=1\n" in out
    assert "srun --kill-on-bad-exit=1 " + " ".join(TRAIN) in out
    # Without --requeue the trainers themselves get SIGTERM before the time limit.
    out, _ = _dry("slurm.py", "--nodes", "2", "--dry_run", "--", *TRAIN)
    assert "#SBATCH --signal=TERM@300\n" in out and "requeue" not in out
    assert "\nsrun --kill-on-bad-exit=1 " + " ".join(TRAIN) + "\n" in out


_FAKE_SRUN = """#!/bin/bash
echo $$ > "$LOG.srun_pid"
echo "srun $*" >> "$LOG"
trap 'echo "srun got TERM" >> "$LOG"; sleep 0.3; exit 0' TERM  # the trainers save, exit 0
for _ in $(seq 30); do sleep 0.05; done
echo "srun finished" >> "$LOG"
"""


@pytest.mark.parametrize("time_limit", [True, False])
def test_slurm_requeue_script_requeues_after_the_time_limit_signal(tmp_path, time_limit):
    """SLURM requeues a --requeue job only after a preemption, not at the time limit: the
    script itself must stop the trainers when SLURM signals it and requeue the job, and
    leave a job that finished on its own alone. Run with bash and stand-in srun, scancel
    and scontrol."""
    script, _ = _dry("slurm.py", "--nodes", "2", "--requeue", "--dry_run", "--", *TRAIN)
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(_FAKE_SRUN)
    (bin_dir / "scontrol").write_text('#!/bin/bash\necho "scontrol $*" >> "$LOG"\n')
    # scancel --signal=TERM: SLURM signals the tasks (here the stand-in srun), not the script
    scancel = '#!/bin/bash\necho "scancel $*" >> "$LOG"\nkill -TERM "$(cat "$LOG.srun_pid")"\n'
    (bin_dir / "scancel").write_text(scancel)
    for name in ("srun", "scontrol", "scancel"):
        (bin_dir / name).chmod(0o755)
    (tmp_path / "job.sh").write_text(script)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", LOG=str(log))
    env["SLURM_JOB_ID"] = "4242"
    proc = subprocess.Popen(["bash", str(tmp_path / "job.sh")], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while not (log.exists() and "srun " in log.read_text()):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.02)
    if time_limit:
        os.kill(proc.pid, signal.SIGUSR1)  # what --signal=B:USR1@N sends the batch shell
    _, err = proc.communicate(timeout=20)
    lines = log.read_text().splitlines()
    assert proc.returncode == 0, err
    assert lines[0] == "srun --kill-on-bad-exit=1 " + " ".join(TRAIN)
    if time_limit:
        expected = ["scancel --signal=TERM 4242", "srun got TERM", "scontrol requeue 4242"]
        assert lines[1:] == expected, lines
        assert b"requeueing job 4242" in err
    else:
        assert lines[1:] == ["srun finished"], lines


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("gke.py", ["--name", "a", "--image", "i", "--accelerator_type", "v5p-127"],
         "v5p-127 is not a whole number of chips"),
        ("gke.py", ["--name", "a", "--image", "i", "--accelerator_type", "v5p-128",
                    "--topology", "4x4x5"], "topology 4x4x5 does not have the 64 chips"),
        ("tpu_vm.py", ["up", "--name", "a", "--zone", "z", "--project", "p",
                       "--accelerator_type", "v5e-12"], "no default topology"),
        ("tpu_vm.py", ["run", "--name", "a", "--zone", "z", "--project", "p",
                       "--accelerator_type", "tpu-8"], "unknown TPU accelerator type 'tpu-8'"),
        ("slurm.py", ["--nodes", "2", "--env", "A B=1"], "is not KEY=VALUE"),
        ("tpu_vm.py", ["run", "--name", "a", "--zone", "z", "--project", "p",
                       "--env", "X;rm -rf ~=1"], "is not KEY=VALUE"),
    ],
)  # fmt: skip
def test_launchers_refuse_bad_flags_with_a_message(script, args, message):
    """A misspelt slice or an --env name that is no variable name (it goes unquoted into
    shell lines) is an error message before anything runs, not a traceback."""
    result = subprocess.run(
        [sys.executable, str(LAUNCH / script), *args, "--dry_run", "--", *TRAIN],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode in (1, 2) and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
