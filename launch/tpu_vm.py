"""Creates a Cloud TPU VM slice, installs lrulm on every worker, and runs one command on all.

    python launch/tpu_vm.py up --name lru --zone us-east5-a --project my-proj \\
        --accelerator_type v5p-128 --config configs/lm/tiny.py --workdir /gcs/bucket/runs/lm

Subcommands: `create` (the TPU VM, or a queued resource with --queued), `setup` (copy the code
with `tpu-vm scp` of this checkout, or `git clone` of --repo_url at --ref, then install it in a
virtualenv), `run` (the command on every worker with `ssh --worker=all`; each worker is one JAX
process and `lrulm.distributed.initialize()` finds the others), `delete`, and `up` (all of them;
--delete_after deletes the slice when the run ends). The command comes after `--` and defaults to
`lrulm train --config C --workdir W`. On a multi-host slice the workdir must be on storage all
hosts mount (GCS FUSE: /gcs/BUCKET/...): the hosts write one checkpoint together. Re-running
`run` with the same workdir resumes. `up --max_restarts N` does that by itself, up to N times:
when the command stops for a preemption (lrulm train exits 75 after saving) or the ssh session
ends because the slice went away, it watches the slice's state for --settle_s seconds; a slice
still READY after an exit 75 runs the command again, a preempted one (or a SUSPENDED / FAILED
queued resource) is deleted, created, set up and run again. The command holds a lock on each
worker while it runs, so that a second one (gcloud re-runs an ssh command that lost its
connection) exits 74 instead of starting. `run` and `up` exit with the command's exit code.
--dry_run prints every command instead of running it.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time

import common  # first: puts the checkout on sys.path for lrulm

from lrulm.topologies import tpu_slice

# On the workers; $HOME because a quoted ~ is not expanded.
REMOTE_REPO = "$HOME/lrulm"
REMOTE_VENV = "$HOME/lrulm-venv"
REMOTE_LOG = "$HOME/lrulm-run.log"
# Held by the running command on each worker: gcloud re-runs an ssh command that ended with
# 255 (up to 10 times), and a second trainer beside a live one would share its workdir.
REMOTE_LOCK = "$HOME/lrulm-run.lock"
LOCKED_EXIT_CODE = 74  # the command was already running on a worker: this one did not start
PREEMPTED_EXIT_CODE = common.PREEMPTED_EXIT_CODE
# What `gcloud ... ssh` returns when the connection is lost (e.g. the VM was preempted).
SSH_LOST = 255
# States of a TPU VM, or a queued resource, whose hosts are gone: recreate to go on.
GONE = ("PREEMPTED", "TERMINATED", "SUSPENDED", "FAILED")
EXCLUDES = (".git", "__pycache__", "*.egg-info", ".venv", ".pytest_cache", ".ruff_cache", "runs")


def _gcloud(args: argparse.Namespace, *words: str) -> list[str]:
    return [
        "gcloud",
        "compute",
        "tpus",
        *words,
        "--zone",
        args.zone,
        "--project",
        args.project,
    ]


def _ssh_all(args: argparse.Namespace, remote: str) -> list[str]:
    return [*_gcloud(args, "tpu-vm", "ssh", args.name), "--worker=all", "--command", remote]


def create(args: argparse.Namespace, run: common.Runner) -> None:
    if not args.accelerator_type:
        sys.exit("error: create needs --accelerator_type (e.g. v5p-128, v5litepod-16)")
    slice_ = tpu_slice(args.accelerator_type)
    run.note(
        f"{slice_.accelerator_type}: {slice_.chips} chips, {slice_.hosts} hosts x "
        f"{slice_.chips_per_host} chips, topology {slice_.topology}"
    )
    version = args.runtime_version or slice_.runtime_version
    spot = ["--spot"] if args.spot else []
    if not args.queued:
        run(
            _gcloud(args, "tpu-vm", "create", args.name)
            + ["--accelerator-type", slice_.accelerator_type, "--version", version, *spot]
        )
        return
    run(
        _gcloud(args, "queued-resources", "create", args.name)
        + ["--node-id", args.name, "--accelerator-type", slice_.accelerator_type]
        + ["--runtime-version", version, *spot]
    )
    describe = _gcloud(args, "queued-resources", "describe", args.name) + [
        "--format",
        "value(state.state)",
    ]
    run.note("waiting until the queued resource is ACTIVE:")
    if run.dry_run:
        run(describe)
        return
    while True:
        state = subprocess.run(describe, capture_output=True, text=True, check=True).stdout.strip()
        print(f"# state: {state}", flush=True)
        if state == "ACTIVE":
            return
        if state in ("FAILED", "SUSPENDED"):
            sys.exit(f"error: queued resource {args.name} is {state}")
        time.sleep(30)


def setup(args: argparse.Namespace, run: common.Runner) -> None:
    if args.repo_url:
        fetch = (
            f"rm -rf {REMOTE_REPO} && git clone {shlex.quote(args.repo_url)} {REMOTE_REPO} "
            f"&& git -C {REMOTE_REPO} checkout {shlex.quote(args.ref)}"
        )
    else:
        tarball = f"/tmp/lrulm-{args.name}.tar.gz"
        excludes = [f"--exclude={e}" for e in EXCLUDES]
        run(["tar", "-czf", tarball, *excludes, "-C", str(common.REPO_ROOT), "."])
        run(_gcloud(args, "tpu-vm", "scp", tarball, f"{args.name}:lrulm.tar.gz") + ["--worker=all"])
        fetch = (
            f"rm -rf {REMOTE_REPO} && mkdir -p {REMOTE_REPO} "
            f"&& tar -xzf $HOME/lrulm.tar.gz -C {REMOTE_REPO}"
        )
    # uv provides the Python the package needs (TPU VM images ship an older python3).
    install = (
        "python3 -m pip install --user --quiet uv "
        f"&& $HOME/.local/bin/uv venv --allow-existing --python {args.python} {REMOTE_VENV} "
        f"&& $HOME/.local/bin/uv pip install --python {REMOTE_VENV}/bin/python "
        f'-e "{REMOTE_REPO}[tpu]"'
    )
    run(_ssh_all(args, f"set -e; {fetch} && {install}"))


def run_command(args: argparse.Namespace, run: common.Runner, command: list[str]) -> int:
    """Runs the command on every worker; returns its exit code (the first failing
    worker's, as `ssh --worker=all` reports it)."""
    if args.accelerator_type:
        common.check_shared_workdir(command, tpu_slice(args.accelerator_type).hosts)
    line = common.shell_line(command, common.parse_env(args.env))
    remote = (
        f"cd {REMOTE_REPO} && . {REMOTE_VENV}/bin/activate && "
        f"flock -n -E {LOCKED_EXIT_CODE} {REMOTE_LOCK} bash -c {shlex.quote(line)}"
    )
    if args.detach:
        # Survives the ssh session: the job keeps running if this machine disconnects.
        remote = f"nohup bash -c {shlex.quote(remote)} > {REMOTE_LOG} 2>&1 < /dev/null &"
        run.note(f"detached; logs in {REMOTE_LOG} on each worker")
    return run.status(_ssh_all(args, remote))


def slice_state(args: argparse.Namespace, run: common.Runner) -> str:
    """The queued resource's state (ACTIVE, SUSPENDED, ...) with --queued, else the TPU
    VM's (READY, PREEMPTED, ...); "UNKNOWN" when gcloud cannot say."""
    if args.queued:
        words, field = ("queued-resources", "describe", args.name), "value(state.state)"
    else:
        words, field = ("tpu-vm", "describe", args.name), "value(state)"
    argv = _gcloud(args, *words) + ["--format", field]
    print(shlex.join(argv), flush=True)
    if run.dry_run:
        return "READY"
    out = subprocess.run(argv, capture_output=True, text=True)
    return (out.stdout.strip() or "UNKNOWN") if out.returncode == 0 else "UNKNOWN"


def settled_state(args: argparse.Namespace, run: common.Runner) -> str:
    """The slice's state once it has stopped changing: a preempted VM still says READY
    for a while after its trainers saved and exited. Polls for --settle_s seconds, and
    as long as the state is a passing one (STOPPING, ...); returns at once when it is
    gone (GONE)."""
    deadline = time.monotonic() + args.settle_s
    poll_s = max(0.05, min(15.0, args.settle_s / 8))
    state = slice_state(args, run)
    while state not in GONE and not run.dry_run:
        passing = state not in ("READY", "ACTIVE", "UNKNOWN")
        if time.monotonic() >= deadline + (10 * args.settle_s if passing else 0):
            break
        time.sleep(poll_s)
        state = slice_state(args, run)
    return state


def up(args: argparse.Namespace, run: common.Runner, command: list[str]) -> int:
    """setup and run on the created slice; with --max_restarts, again after each
    preemption. Returns the command's last exit code."""
    setup(args, run)
    restarts = 0
    while True:
        code = run_command(args, run, command)
        if code == 0 or args.detach:
            return code
        if code == LOCKED_EXIT_CODE or restarts >= args.max_restarts:
            return code
        # Any other failure may be a preemption too: a run started on a slice that turned
        # PREEMPTED meanwhile gets gcloud's own error (exit 1, "unusable terminal state").
        state = settled_state(args, run)
        if state in ("READY", "ACTIVE") and code == PREEMPTED_EXIT_CODE:
            # A maintenance event: the trainers saved and the hosts are still there.
            restarts += 1
            run.note(f"stopped (exit {code}), slice {state}: restart {restarts} runs it again")
            continue
        if state not in GONE:
            # ssh lost to a slice still up (its trainers may still run), or a state gcloud
            # could not tell: not known to be a preemption, so the slice is left as it is.
            return code
        restarts += 1
        run.note(f"slice {state} (exit {code}): restart {restarts} recreates it")
        delete(args, run)
        create(args, run)
        setup(args, run)


def delete(args: argparse.Namespace, run: common.Runner) -> None:
    if args.queued:
        run(_gcloud(args, "queued-resources", "delete", args.name) + ["--force", "--quiet"])
    else:
        run(_gcloud(args, "tpu-vm", "delete", args.name) + ["--quiet"])


ACTIONS = {
    "create": "create the TPU VM slice (or a queued resource with --queued; --spot for spot "
    "capacity). Needs --accelerator_type.",
    "setup": "copy this checkout to every worker (or git clone --repo_url at --ref) and install "
    "lrulm in a virtualenv there.",
    "run": "run the command after `--` (default: lrulm train --config C --workdir W) on every "
    "worker, one JAX process each; exits with its exit code (75: preempted, run it again).",
    "delete": "delete the slice (or the queued resource).",
    "up": "create + setup + run; --max_restarts N runs again after a preemption (recreating a "
    "preempted slice), --delete_after deletes the slice at the end.",
}


def main(argv: list[str] | None = None) -> None:
    own, command = common.split_command(sys.argv[1:] if argv is None else argv)
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument("--name", required=True, help="TPU VM (and queued resource) name")
    shared.add_argument("--zone", required=True)
    shared.add_argument("--project", required=True)
    shared.add_argument("--accelerator_type", help="e.g. v5p-128, v5litepod-16, v6e-64, v4-32")
    shared.add_argument("--queued", action="store_true", help="use a queued resource")
    shared.add_argument("--spot", action="store_true", help="spot capacity (can be preempted)")
    shared.add_argument("--runtime_version", help="default: the generation's usual TPU VM image")
    shared.add_argument("--repo_url", help="git clone this on every worker instead of scp")
    shared.add_argument("--ref", default="main", help="git ref to check out with --repo_url")
    shared.add_argument("--python", default="3.11", help="Python version of the worker venv")
    shared.add_argument("--config", help="for the default command: lrulm train --config ...")
    shared.add_argument(
        "--workdir", help="for the default command; on pods a shared mount, e.g. /gcs/BUCKET/run"
    )
    shared.add_argument("--env", action="append", help="KEY=VALUE for the command (repeatable)")
    shared.add_argument("--detach", action="store_true", help="run under nohup, log to a file")
    shared.add_argument("--delete_after", action="store_true", help="`up`: delete at the end")
    shared.add_argument(
        "--max_restarts",
        type=int,
        default=0,
        help="`up`: after a preemption, run again (recreating a preempted slice) up to N times",
    )
    shared.add_argument(
        "--settle_s",
        type=float,
        default=120.0,
        help="`up --max_restarts`: watch the slice's state this long after the command "
        "stopped before taking it as still up (a preempted VM says READY for a while)",
    )
    shared.add_argument("--dry_run", action="store_true", help="print the commands only")
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="action", required=True)
    for action, what in ACTIONS.items():
        sub.add_parser(action, parents=[shared], help=what, description=what)
    args = parser.parse_args(own)
    if args.accelerator_type:
        try:  # before anything is created
            tpu_slice(args.accelerator_type)
        except ValueError as e:
            parser.error(str(e))
    if args.action == "up" and args.detach and args.delete_after:
        parser.error("--delete_after would delete the slice under a --detach'ed run")
    if args.settle_s < 0:
        parser.error("--settle_s must be >= 0")
    if args.max_restarts < 0 or (args.max_restarts and args.action != "up"):
        parser.error("--max_restarts N (N >= 0) is for `up`")
    if args.max_restarts and args.detach:
        parser.error("--max_restarts needs the run attached: a --detach'ed run's end is not seen")
    run = common.Runner(args.dry_run)
    code = 0
    if args.action in ("run", "up"):
        command = common.resolve_command(command, args.config, args.workdir)
    match args.action:
        case "create":
            create(args, run)
        case "setup":
            setup(args, run)
        case "run":
            code = run_command(args, run, command)
        case "delete":
            delete(args, run)
        case "up":
            create(args, run)  # outside the try: a name already taken is not deleted
            try:
                code = up(args, run, command)
            finally:
                if args.delete_after:
                    delete(args, run)
    if code:  # the command's own code, so that a wrapper can tell a preemption (75)
        hint = {
            PREEMPTED_EXIT_CODE: " (stopped for a preemption: run it again to resume)",
            LOCKED_EXIT_CODE: f" (the command was already running: {REMOTE_LOCK} is held)",
        }.get(code, "")
        print(f"error: the command exited with code {code}{hint}", file=sys.stderr)
        sys.exit(code)


if __name__ == "__main__":
    main()
