"""Pieces the cluster launchers share: the command after `--`, env flags, and dry runs."""

from __future__ import annotations

import pathlib
import re
import shlex
import subprocess
import sys

# The launchers run as scripts from this checkout, on machines that may not have lrulm (or jax)
# installed; `import common` makes the checkout's standard-library-only `lrulm.topologies`
# importable. First on the path, so an older installed lrulm does not shadow it.
REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# `lrulm train`'s exit code after it saved and stopped for a preemption signal: a copy of
# lrulm.preemption.EXIT_CODE, which imports jax (local.py, standard library only, has its
# own; tests check both).
PREEMPTED_EXIT_CODE = 75


def split_command(argv: list[str]) -> tuple[list[str], list[str]]:
    """Splits `[launcher flags] -- command ...` into the two parts (command may be empty)."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


def resolve_command(command: list[str], config: str | None, workdir: str | None) -> list[str]:
    """The command to run: the one after `--`, else `lrulm train --config C --workdir W`.

    Raises:
      SystemExit: neither a command nor both --config and --workdir were given, or the
        workdir is a URL (`gs://...`), which lrulm cannot write.
    """
    if not command:
        if not (config and workdir):
            sys.exit(
                "error: give the command after `--`, or --config and --workdir for lrulm train"
            )
        command = ["lrulm", "train", "--config", config, "--workdir", workdir]
    url = workdir_of(command) or ""
    if "://" in url:  # refused here, before a slice or a job is paid for
        sys.exit(
            f"error: --workdir {url}: lrulm writes its workdir with ordinary file I/O; mount the "
            "bucket (GCS FUSE: /gcs/BUCKET) and give the mount path"
        )
    return command


def parse_env(pairs: list[str] | None) -> dict[str, str]:
    """`["K=V", ...]` from repeated --env flags, as a dict."""
    env = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        # The key goes unquoted into shell lines (`export K=V`, `K=V command`): a name with a
        # space or a quote in it would run something else.
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            sys.exit(
                f"error: --env {pair!r} is not KEY=VALUE with KEY a variable name "
                "(letters, digits, _; not starting with a digit)"
            )
        env[key] = value
    return env


def workdir_of(command: list[str]) -> str | None:
    """The value of `--workdir` in a command line, if any."""
    for i, arg in enumerate(command):
        if arg == "--workdir" and i + 1 < len(command):
            return command[i + 1]
        if arg.startswith("--workdir="):
            return arg.split("=", 1)[1]
    return None


# Where shared storage is usually mounted on TPU VMs and GKE (GCS FUSE, Filestore / NFS).
SHARED_PREFIXES = ("/gcs/", "/mnt/", "/nfs/", "/shared/")


def check_shared_workdir(command: list[str], hosts: int) -> None:
    """Warns when a multi-host job writes to a path the hosts do not share."""
    workdir = workdir_of(command)
    if hosts > 1 and workdir and not workdir.startswith(SHARED_PREFIXES):
        print(
            f"warning: --workdir {workdir} is not under {', '.join(SHARED_PREFIXES)}. All {hosts} "
            "hosts write one checkpoint together, so the workdir must be a filesystem they share "
            "(a GCS FUSE mount of a bucket, NFS / Filestore); a local path gives each host a "
            "partial copy that cannot be resumed.",
            file=sys.stderr,
        )


def shell_line(command: list[str], env: dict[str, str]) -> str:
    """`K=V ... command` as one shell-quoted line."""
    assignments = [f"{k}={shlex.quote(v)}" for k, v in env.items()]
    return " ".join([*assignments, shlex.join(command)])


class Runner:
    """Prints each command; runs it unless this is a dry run."""

    def __init__(self, dry_run: bool):
        self.dry_run = dry_run

    def note(self, text: str) -> None:
        print(f"# {text}", flush=True)

    def __call__(self, argv: list[str], *, stdin: str | None = None) -> None:
        """Prints `argv` (and `stdin` in a dry run); runs it and exits on failure otherwise."""
        returncode = self.status(argv, stdin=stdin)
        if returncode:
            sys.exit(f"error: {argv[0]} exited with code {returncode}")

    def status(self, argv: list[str], *, stdin: str | None = None) -> int:
        """Prints `argv` (and `stdin` in a dry run); runs it and returns its exit code (0
        in a dry run)."""
        print(shlex.join(argv), flush=True)
        if self.dry_run:
            if stdin is not None:
                print(stdin, end="" if stdin.endswith("\n") else "\n", flush=True)
            return 0
        return subprocess.run(argv, input=stdin, text=True).returncode
