"""Runs one command as P cooperating JAX processes on this machine, as a pod would run them.

    python launch/local.py --num_processes 2 --devices_per_process 4 -- \\
        lrulm train --config configs/lm/tiny.py --workdir /tmp/run

Each process gets LRULM_COORDINATOR_ADDRESS / LRULM_NUM_PROCESSES / LRULM_PROCESS_ID (read by
`lrulm.distributed.initialize()`), JAX_PLATFORMS=cpu and D simulated CPU devices. Output is
streamed line by line with a `[pN] ` prefix. When a process fails, the others are stopped
(SIGTERM, then SIGKILL after --grace_s) and the launcher exits with the failing process's code
(128 + signal for a signal). A SIGTERM or SIGINT (Ctrl-C) sent to the launcher reaches every
process as SIGTERM, the preemption signal (a second one kills them); trainers that saved and
stopped for it exit 75 (lrulm.preemption), and so does the launcher once they all have.
Standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import queue
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

# `lrulm train`'s exit code after it saved and stopped for a preemption signal
# (lrulm.preemption.EXIT_CODE; this file imports only the standard library).
PREEMPTED_EXIT_CODE = 75
_DEVICE_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S*")
# Variables that would make a child join some other job instead of this one.
_FOREIGN_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
_PR_SET_PDEATHSIG = 1


# Held while writing a whole line: the children's prefixed lines (stdout) and the
# launcher's own (stderr) often share one pipe, and print() writes a message and its
# newline separately, so a child's line could land between them.
_OUTPUT_LOCK = threading.Lock()


def _log(message: str) -> None:
    with _OUTPUT_LOCK:
        sys.stderr.write(f"[local.py] {message}\n")
        sys.stderr.flush()


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(base: dict[str, str], *, port: int, num: int, index: int, devices: int) -> dict:
    """The environment of process `index`: coordinator, identity, CPU platform and devices.

    Args:
      base: The environment to start from (usually os.environ).
      port: Coordinator port on 127.0.0.1.
      num: Number of processes.
      index: This process's id.
      devices: Simulated CPU devices per process.

    Returns:
      A new environment dict.
    """
    env = {k: v for k, v in base.items() if k not in _FOREIGN_VARS}
    xla_flags = _DEVICE_COUNT_FLAG.sub("", env.get("XLA_FLAGS", "")).split()
    xla_flags.append(f"--xla_force_host_platform_device_count={devices}")
    env.update(
        LRULM_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
        LRULM_NUM_PROCESSES=str(num),
        LRULM_PROCESS_ID=str(index),
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=" ".join(xla_flags),
        # Line-by-line output, so the prefixed streams interleave as they happen.
        PYTHONUNBUFFERED="1",
    )
    return env


def _die_with_parent() -> None:
    # Runs in the child before exec: if the launcher is SIGKILLed, the kernel kills the child
    # too instead of leaving an orphan holding the coordinator port. Linux only; best effort.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _pump(index: int, stream) -> None:
    """Copies one of a child's streams to our stdout, each line prefixed with `[pN] `."""
    prefix = f"[p{index}] ".encode()
    out = sys.stdout.buffer
    for line in iter(stream.readline, b""):
        if not line.endswith(b"\n"):
            line += b"\n"
        with _OUTPUT_LOCK:
            out.write(prefix + line)
            out.flush()
    stream.close()


def _describe(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


class _Job:
    """P child processes, each in its own process group, with output pumps and exit waiters."""

    def __init__(self, command: list[str], envs: list[dict]):
        self.procs: list[subprocess.Popen] = []
        self.exits: queue.Queue = queue.Queue()
        self.threads: list[threading.Thread] = []
        for index, env in enumerate(envs):
            proc = subprocess.Popen(
                command,
                env=env,
                stdin=subprocess.DEVNULL,
                # A pipe per stream, each pumped by whole lines: on one shared pipe, a line
                # that native code writes to stderr from its own thread can land in the
                # middle of one that Python writes to stdout unbuffered. (Within one stream
                # nothing can be separated: gloo also writes "[Gloo] Rank ..." lines to
                # stdout, so a line the command prints in pieces can still be split.)
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                # Own process group: signals reach the command's whole tree (e.g. a shell and
                # its python), and a Ctrl-C at the terminal reaches only the launcher.
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
            self.procs.append(proc)
            pumps = [
                threading.Thread(target=_pump, args=(index, stream), daemon=True)
                for stream in (proc.stdout, proc.stderr)
            ]
            waiter = threading.Thread(target=self._wait, args=(index,), daemon=True)
            for thread in (*pumps, waiter):
                thread.start()
            self.threads += pumps

    def _wait(self, index: int) -> None:
        # One waiter per child, so exits are seen in the order they happen.
        self.exits.put((index, self.procs[index].wait()))

    def signal_all(self, signum: int) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signum)

    def alive(self) -> bool:
        return any(proc.poll() is None for proc in self.procs)

    def stop(self, grace_s: float) -> None:
        """SIGTERM every live process group, then SIGKILL what is left after `grace_s`."""
        self.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        # Also reaps grandchildren that outlived their parent in the group.
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def join_output(self, timeout_s: float = 5.0) -> None:
        for thread in self.threads:
            thread.join(timeout_s)


def run(
    command: list[str],
    *,
    num_processes: int,
    devices: int,
    port: int,
    grace_s: float,
    timeout_s: float | None,
) -> int:
    """Runs the job to completion; returns the launcher's exit code.

    Args:
      command: The command line every process runs.
      num_processes: How many processes.
      devices: Simulated CPU devices per process.
      port: Coordinator port.
      grace_s: Seconds between SIGTERM and SIGKILL when stopping processes.
      timeout_s: Stop everything after this many seconds (None: no limit).

    Returns:
      0 when all succeed; 75 when all stopped for a preemption signal (some may have
      finished); the first failure's exit code (128 + signal for a signal); 124 on timeout.
    """
    envs = [
        child_env(os.environ, port=port, num=num_processes, index=i, devices=devices)
        for i in range(num_processes)
    ]
    received: list[int] = []
    job: _Job | None = None

    def forward(signum, frame):
        received.append(signum)
        if job is None:
            return  # forwarded once the processes exist
        if len(received) == 1:  # Ctrl-C too: the trainers save and stop on SIGTERM
            _log(
                f"received {signal.Signals(signum).name}; sending SIGTERM to every process "
                "(a second signal kills them)"
            )
            job.signal_all(signal.SIGTERM)
        else:
            _log("second signal; killing every process")
            job.signal_all(signal.SIGKILL)

    # A Python handler (unlike SIG_IGN) is reset to the default in the children at exec.
    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        job = _Job(command, envs)
        if received:
            job.signal_all(signal.SIGTERM)
        _log(f"started {num_processes} processes x {devices} devices on 127.0.0.1:{port}")
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        # Failures in the order seen. When a process dies, its peers often fail a few ms later
        # (a collective loses its partner), so later entries are usually consequences.
        failures: list[tuple[int, int]] = []
        stopped: list[int] = []
        preempted: list[int] = []
        remaining = num_processes
        while remaining:
            wait_s = 0.2 if deadline is None else min(0.2, max(deadline - time.monotonic(), 0))
            try:
                index, returncode = job.exits.get(timeout=wait_s)
            except queue.Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    _log(f"timed out after {timeout_s} s; stopping every process")
                    job.stop(grace_s)
                    job.join_output()
                    return 124
                continue
            remaining -= 1
            if returncode == 0:
                continue
            if returncode == PREEMPTED_EXIT_CODE and not failures:
                preempted.append(index)  # saved; the others stop at the same step
                continue
            if failures and returncode in (-signal.SIGTERM, -signal.SIGKILL):
                stopped.append(index)  # by us
                continue
            failures.append((index, returncode))
            if len(failures) == 1 and remaining:
                _log(f"process {index} {_describe(returncode)}; stopping the others")
                job.stop(grace_s)
        job.join_output()
        if failures:
            index, returncode = failures[0]
            message = f"FAILED: process {index} {_describe(returncode)}"
            for later, code in failures[1:]:
                message += f"; then process {later} {_describe(code)}"
            if stopped:
                message += f"; stopped process {', '.join(map(str, sorted(stopped)))}"
            _log(message)
            return _exit_code(returncode)
        if preempted:
            _log(
                f"process {', '.join(map(str, sorted(preempted)))} stopped for the preemption "
                f"signal after saving (exit {PREEMPTED_EXIT_CODE}); run the same command to "
                "resume"
            )
            return PREEMPTED_EXIT_CODE
        _log(f"all {num_processes} processes exited 0")
        return 0
    finally:
        if job is not None and job.alive():
            job.stop(0)
        for s, handler in previous.items():
            signal.signal(s, handler)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num_processes", type=int, required=True)
    parser.add_argument("--devices_per_process", type=int, default=1)
    parser.add_argument("--port", type=int, default=None, help="default: a free port")
    parser.add_argument(
        "--timeout_s", type=float, default=None, help="stop every process after this long"
    )
    parser.add_argument(
        "--grace_s", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL"
    )
    parser.add_argument("--config", help="without a command: lrulm train --config ...")
    parser.add_argument("--workdir", help="without a command: lrulm train ... --workdir ...")
    parser.add_argument(
        "--dry_run", action="store_true", help="print each process's environment and command"
    )
    args = parser.parse_args(argv[:split])
    command = argv[split + 1 :]
    if not command:
        if not (args.config and args.workdir):
            parser.error("give the command after --, or --config and --workdir for lrulm train")
        command = ["lrulm", "train", "--config", args.config, "--workdir", args.workdir]
    if args.num_processes < 1 or args.devices_per_process < 1:
        parser.error("--num_processes and --devices_per_process must be at least 1")
    if args.port is not None and not 0 < args.port < 65536:
        parser.error(f"--port {args.port} is not a TCP port (1-65535)")
    if args.dry_run:
        port = args.port or free_port()
        base = dict(os.environ)
        for i in range(args.num_processes):
            env = child_env(base, port=port, num=args.num_processes, index=i,
                            devices=args.devices_per_process)  # fmt: skip
            # What differs from this environment: the line runs process i as `run` would.
            unset = [f"-u {k}" for k in sorted(base) if k not in env]
            changed = sorted(k for k, v in env.items() if base.get(k) != v)
            assignments = [f"{k}={shlex.quote(env[k])}" for k in changed]
            words = ["env", *unset, *assignments, shlex.join(command)]
            print(f"# process {i}\n" + " ".join(words))
        return 0
    if shutil.which(command[0]) is None:  # a path to no executable file, or not on PATH
        parser.error(f"{command[0]!r} is no command here (not on PATH, or not executable)")
    return run(
        command,
        num_processes=args.num_processes,
        devices=args.devices_per_process,
        port=args.port or free_port(),
        grace_s=args.grace_s,
        timeout_s=args.timeout_s,
    )


if __name__ == "__main__":
    sys.exit(main())
