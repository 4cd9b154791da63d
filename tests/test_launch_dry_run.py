"""The launchers as dry runs (local.py, tpu_vm.py, gke.py, slurm.py): the commands,
manifests and batch scripts they would run or submit; SLURM's requeue logic run in bash
with stand-in commands."""

import json
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import time

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parent.parent / "launch"


def _dry(script, *args):
    result = subprocess.run(
        [sys.executable, str(LAUNCH / script), *args], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    return result.stdout, result.stderr


TRAIN = ["lrulm", "train", "--config", "configs/lm/tiny.py", "--workdir", "/gcs/bkt/run"]


def test_local_dry_run_and_default_command(tmp_path):
    """Each printed line runs its process as the launcher would: the variables that differ
    from this environment set, the ones it drops unset (a real child's env, compared)."""
    env = dict(os.environ, XLA_FLAGS="--xla_dump_to=/tmp/x", JAX_PROCESS_ID="3")
    result = subprocess.run(
        [sys.executable, str(LAUNCH / "local.py"), "--num_processes", "2",
         "--devices_per_process", "3", "--port", "4321", "--config", "configs/lm/tiny.py",
         "--workdir", "runs/x", "--dry_run"],
        capture_output=True, text=True, timeout=30, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "# process 0" and lines[2] == "# process 1"
    for i in (0, 1):
        line = lines[2 * i + 1]
        assert line.startswith("env -u JAX_PROCESS_ID ")
        assert "LRULM_COORDINATOR_ADDRESS=127.0.0.1:4321 LRULM_NUM_PROCESSES=2" in line
        assert f"LRULM_PROCESS_ID={i} " in line
        assert "XLA_FLAGS='--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=3'" in line
        assert line.endswith("lrulm train --config configs/lm/tiny.py --workdir runs/x")
    # The printed line, run with `env` in this environment, gives what a real child gets.
    sys.path.insert(0, str(LAUNCH))
    import local

    want = local.child_env(env, port=4321, num=2, index=1, devices=3)
    words = shlex.split(lines[3])
    printed = subprocess.run(
        [*words[: words.index("lrulm")], sys.executable, "-c",
         "import json, os; print(json.dumps(dict(os.environ)))"],
        capture_output=True, text=True, timeout=30, env=env,
    )  # fmt: skip
    assert json.loads(printed.stdout) == want


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
    # Under a lock: gcloud re-runs a command whose ssh connection dropped, and a second
    # trainer must not start beside a live one.
    *start, lock, bash, dash_c, line = shlex.split(remote)
    assert start[-4:] == ["flock", "-n", "-E", "74"] and lock == "$HOME/lrulm-run.lock"
    assert (bash, dash_c) == ("bash", "-c")
    assert line == "A='1 2' lrulm train --config configs/lm/tiny.py --workdir /gcs/bkt/run"
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
    # A pod that saved and stopped for a preemption (exit 75) or was evicted fails its Job
    # with reason PodFailurePolicy, which restarts the slice without counting the restart.
    rules = spec["podFailurePolicy"]["rules"]
    assert {"containerName": "lrulm", "operator": "In", "values": [75]} in [
        r.get("onExitCodes") for r in rules if r["action"] == "FailJob"
    ]
    assert [{"type": "DisruptionTarget", "status": "True"}] in [
        r.get("onPodConditions") for r in rules if r["action"] == "FailJob"
    ]
    assert pod["restartPolicy"] == "Never"  # what a pod failure policy requires
    assert manifest["spec"]["failurePolicy"] == {
        "maxRestarts": 3,
        "rules": [
            {
                "name": "preemption",
                "action": "RestartJobSetAndIgnoreMaxRestarts",
                "onJobFailureReasons": ["PodFailurePolicy"],
            }
        ],
    }
    out, _ = _dry(
        "gke.py", "--name", "lru", "--image", "i", "--accelerator_type", "v5litepod-16",
        "--count_preemptions", "--max_restarts", "9", "--dry_run", "--", *TRAIN,
    )  # fmt: skip
    manifest = yaml.safe_load(out)
    assert manifest["spec"]["failurePolicy"] == {"maxRestarts": 9}
    assert "podFailurePolicy" not in manifest["spec"]["replicatedJobs"][0]["template"]["spec"]


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
    # xpk restarts on 42 and 127-255 only: a preempted run (75) is added.
    assert "--max-restarts 3 --restart-on-exit-codes 75 " in out
    assert "--command 'lrulm train --config configs/lm/tiny.py --workdir /gcs/bkt/run'" in out
    assert "gs://bkt at /gcs/bkt mounted" in err
    xpk = ["gke.py", "--name", "lru", "--image", "img", "--accelerator_type", "v5p-128"]
    bad = subprocess.run(
        [sys.executable, str(LAUNCH / xpk[0]), *xpk[1:], "--topology", "2x4x8", "--print_xpk",
         "--", *TRAIN], capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert bad.returncode == 2 and "--topology has no `xpk workload create` equiv" in bad.stderr
    _, err = _dry(*xpk, "--service_account", "ksa", "--print_xpk", "--", *TRAIN)
    assert "note: --service_account not passed on to xpk" in err


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
    # srun (SLURM >= 22.05) does not inherit sbatch's --cpus-per-task: it is given again.
    out, _ = _dry("slurm.py", "--nodes", "2", "--cpus_per_task", "32", "--dry_run", "--", *TRAIN)
    assert "#SBATCH --cpus-per-task=32\n" in out
    assert "\nsrun --kill-on-bad-exit=1 --cpus-per-task=32 " + " ".join(TRAIN) + "\n" in out
    # Without --requeue the trainers themselves get SIGTERM before the time limit.
    out, _ = _dry("slurm.py", "--nodes", "2", "--dry_run", "--", *TRAIN)
    assert "#SBATCH --signal=TERM@300\n" in out and "requeue" not in out
    assert "\nsrun --kill-on-bad-exit=1 " + " ".join(TRAIN) + "\n" in out


_FAKE_SRUN = """#!/bin/bash
echo $$ > "$LOG.srun_pid"
echo "srun $*" >> "$LOG"
# The trainers save and exit 75 (lrulm.preemption), or srun reports a signal when
# --kill-on-bad-exit ended the last ones after the first had exited.
trap 'echo "srun got TERM" >> "$LOG"; sleep 0.3; exit ${STOP_STATUS:-75}' TERM
for _ in $(seq 30); do sleep 0.05; done
echo "srun finished" >> "$LOG"
"""


@pytest.mark.parametrize(
    "time_limit, stop_status", [(True, 75), (True, 137), (True, 1), (False, 75)]
)
def test_slurm_requeue_script_requeues_after_the_time_limit_signal(
    tmp_path, time_limit, stop_status
):
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
    env.update(SLURM_JOB_ID="4242", STOP_STATUS=str(stop_status))
    proc = subprocess.Popen(["bash", str(tmp_path / "job.sh")], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while not (log.exists() and "srun " in log.read_text()):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.02)
    if time_limit:
        os.kill(proc.pid, signal.SIGUSR1)  # what --signal=B:USR1@N sends the batch shell
    _, err = proc.communicate(timeout=20)
    lines = log.read_text().splitlines()
    assert lines[0] == "srun --kill-on-bad-exit=1 " + " ".join(TRAIN)
    if time_limit and stop_status == 1:  # a trainer failed: no requeue, the job fails
        assert lines[1:] == ["scancel --signal=TERM 4242", "srun got TERM"], lines
        assert proc.returncode == 1 and b"requeueing" not in err
        return
    assert proc.returncode == 0, err
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


@pytest.mark.parametrize(
    "script, args",
    [
        ("tpu_vm.py", ["up", "--name", "a", "--zone", "z", "--project", "p",
                       "--accelerator_type", "v5p-128"]),
        ("gke.py", ["--name", "a", "--image", "i", "--accelerator_type", "v5p-128"]),
        ("slurm.py", ["--nodes", "2"]),
    ],
)  # fmt: skip
@pytest.mark.parametrize("default_command", [True, False])
def test_launchers_refuse_a_bucket_url_workdir_before_creating_anything(
    script, args, default_command
):
    """lrulm writes its workdir with file I/O: a `gs://` workdir would fail on every worker
    only after the slice was created and set up, so the launcher refuses it first."""
    workdir = ["--workdir", "gs://bkt/run"]
    tail = (
        ["--config", "configs/lm/tiny.py", *workdir]
        if default_command
        else ["--", *TRAIN[:-2], *workdir]
    )
    result = subprocess.run(
        [sys.executable, str(LAUNCH / script), *args, "--dry_run", *tail],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "gs://bkt/run" in result.stderr and "mount the bucket" in result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr


def test_launchers_know_the_trainers_preemption_exit_code():
    """The launchers import only the standard library: their copies of lrulm train's
    preemption exit code must match it (and the SLURM script's requeue test)."""
    from lrulm import preemption

    script, _ = _dry("slurm.py", "--nodes", "2", "--requeue", "--dry_run", "--", *TRAIN)
    assert f'[ "$status" -eq {preemption.EXIT_CODE} ]' in script
    for name in ("common.py", "local.py"):  # gke.py, tpu_vm.py, slurm.py use common's
        text = (LAUNCH / name).read_text()
        assert f"\nPREEMPTED_EXIT_CODE = {preemption.EXIT_CODE}\n" in text, name


# A stand-in gcloud: logs each call; `ssh` of the run command exits with the next code of
# $RUN_CODES, `describe` prints the next state of $STATES (exit 1 for "fail").
_FAKE_GCLOUD = r"""#!/usr/bin/env python3
import os, sys
args = sys.argv[1:]
running = "ssh" in args and "lrulm train" in args[-1]
with open(os.environ["LOG"], "a") as f:
    f.write(" ".join(args[:4]) + " RUN" * running + "\n")
def take(name):
    values = os.environ[name].split(",")
    counter = os.environ["LOG"] + "." + name
    n = int(open(counter).read()) if os.path.exists(counter) else 0
    open(counter, "w").write(str(n + 1))
    return values[min(n, len(values) - 1)]
if "describe" in args:
    state = take("STATES")
    if state == "fail":
        sys.exit(1)
    print(state)
elif running:
    sys.exit(int(take("RUN_CODES")))
"""


@pytest.mark.parametrize(
    "codes, states, restarts, want_rc, want_calls",
    [
        # Preempted: the slice is recreated, set up and the command run again.
        ("75,0", "PREEMPTED", 2, 0, ["create", "setup", "run", "describe", "delete", "create",
                                     "setup", "run"]),
        # The ssh session lost with the VM: the same.
        ("255,0", "PREEMPTED", 2, 0, ["create", "setup", "run", "describe", "delete", "create",
                                      "setup", "run"]),
        # A maintenance event on a slice still READY: run again on it.
        ("75,0", "READY", 2, 0, ["create", "setup", "run", "describe", "run"]),
        # A failure on a slice still up is not retried (its state is looked at first).
        ("1", "READY", 2, 1, ["create", "setup", "run", "describe"]),
        # A run started again on a slice that turned PREEMPTED meanwhile: gcloud refuses
        # with exit 1 before connecting; the slice is recreated all the same.
        ("75,1,0", "READY,PREEMPTED", 3, 0, ["create", "setup", "run", "describe", "run",
                                             "describe", "delete", "create", "setup", "run"]),
        # Out of restarts: the preemption's code, with a hint.
        ("75,75", "READY", 1, 75, ["create", "setup", "run", "describe", "run"]),
        # ssh lost and gcloud cannot say why, or to a slice still up (its trainers may still
        # run): the slice is left alone.
        ("255", "fail", 2, 255, ["create", "setup", "run", "describe"]),
        ("255", "READY", 2, 255, ["create", "setup", "run", "describe"]),
        # Already running on a worker (the lock is held): not started twice, not retried.
        ("74", "READY", 2, 74, ["create", "setup", "run"]),
    ],
)  # fmt: skip
def test_tpu_vm_up_restarts_after_a_preemption(
    tmp_path, codes, states, restarts, want_rc, want_calls, settle_s=0.0
):
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(_FAKE_GCLOUD)
    (bin_dir / "gcloud").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", LOG=str(log))
    env.update(RUN_CODES=codes, STATES=states)
    result = subprocess.run(
        [sys.executable, str(LAUNCH / "tpu_vm.py"), "up", "--name", "v", "--zone", "z",
         "--project", "p", "--accelerator_type", "v5litepod-8", "--repo_url", "https://x/l.git",
         "--max_restarts", str(restarts), "--settle_s", str(settle_s), "--", *TRAIN],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    # The command's own code: a wrapper can tell a preemption (75) from a failure.
    assert result.returncode == want_rc, result.stderr
    if want_rc:
        assert f"the command exited with code {want_rc}" in result.stderr
        assert ("run it again to resume" in result.stderr) == (want_rc == 75)
        assert ("lrulm-run.lock is held" in result.stderr) == (want_rc == 74)
    kinds = {"tpu-vm create": "create", "tpu-vm delete": "delete", "tpu-vm describe": "describe"}
    calls = []
    for line in log.read_text().splitlines():
        words = line.split()
        kind = kinds.get(" ".join(words[2:4]))
        if words[2:4] == ["tpu-vm", "ssh"]:
            kind = "run" if words[-1] == "RUN" else "setup"
        calls.append(kind)
    assert calls == want_calls, (calls, result.stdout)


def test_tpu_vm_up_waits_for_a_preempted_slice_to_say_so(tmp_path):
    """A spot VM still says READY for a while after its trainers saved and exited 75:
    `up` watches the state for --settle_s before taking the slice as still up, so one
    preemption costs one restart, a recreation, not a run on hosts about to go."""
    test_tpu_vm_up_restarts_after_a_preemption(
        tmp_path, "75,0", "READY,STOPPING,PREEMPTED", 1, 0,
        ["create", "setup", "run", "describe", "describe", "describe", "delete", "create",
         "setup", "run"],
        settle_s=2.0,
    )  # fmt: skip
