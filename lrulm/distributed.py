"""Multi-host start-up: one `initialize()` for single processes, local runs, TPU pods, SLURM."""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import signal
import socket
import sys
import time
import urllib.request

import jax
from jax.experimental import multihost_utils

from lrulm import preemption

logger = logging.getLogger(__name__)

# Explicit configuration; the LRULM_ name wins over the JAX-standard one. jax itself only reads
# JAX_COORDINATOR_ADDRESS, so the other two are passed on from here.
ADDRESS_VARS = ("LRULM_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS")
NUM_PROCESSES_VARS = ("LRULM_NUM_PROCESSES", "JAX_NUM_PROCESSES")
PROCESS_ID_VARS = ("LRULM_PROCESS_ID", "JAX_PROCESS_ID")
# Timeout overrides in whole seconds, for clusters where the defaults below do not fit.
INIT_TIMEOUT_VAR = "LRULM_INIT_TIMEOUT_S"
HEARTBEAT_TIMEOUT_VAR = "LRULM_HEARTBEAT_TIMEOUT_S"
SHUTDOWN_TIMEOUT_VAR = "LRULM_SHUTDOWN_TIMEOUT_S"

# jax's own default: GKE pods of one slice can start minutes apart (image pulls).
DEFAULT_INIT_TIMEOUT_S = 300
# jax defaults to 100 s. 60 s still tolerates long host stalls (heartbeats come from a C++
# thread, so compilation or a busy Python thread does not delay them) and frees a pod whose
# peer died 40 s sooner. Measured on CPU: peers abort heartbeat_timeout_s after a SIGKILL.
DEFAULT_HEARTBEAT_TIMEOUT_S = 60
# How long a process that exits normally waits in jax's shutdown barrier for the others.
# jax defaults to 300 s; training ends on a collective, so processes arrive within seconds.
DEFAULT_SHUTDOWN_TIMEOUT_S = 120

# What a CPU (gloo) collective raises when its peer process has died.
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer")
_PEER_LOST_PAUSE_S = 1.0

_fail_fast_installed = False


@dataclasses.dataclass(frozen=True)
class Environment:
    """Where this process runs, as `detect()` found it.

    Attributes:
      kind: "env" (explicit variables), "slurm", "ompi", "tpu", or "single".
      num_processes: Processes in the job; None when jax finds it (TPU without metadata).
      process_id: This process's index; None when jax finds it.
      coordinator_address: host:port of process 0; None when jax finds it.
    """

    kind: str
    num_processes: int | None = None
    process_id: int | None = None
    coordinator_address: str | None = None

    @property
    def is_multi_process(self) -> bool:
        """Whether `initialize()` has to start the distributed runtime."""
        return self.kind != "single" and self.num_processes != 1


def _first_env(names: tuple[str, ...]) -> tuple[str, str] | None:
    for name in names:
        if value := os.environ.get(name, "").strip():
            return name, value
    return None


def _int_env(found: tuple[str, str]) -> int:
    name, value = found
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer; set it to a whole number") from None


def _address_env(found: tuple[str, str]) -> str:
    """The coordinator address `host:port` (or `[ipv6]:port`) of an explicit variable."""
    name, value = found
    host, sep, port = value.rpartition(":")
    if not (sep and host.strip("[]") and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(
            f"{name}={value!r} is not host:port; set it to process 0's host and a free port "
            "(1-65535), e.g. 10.0.0.2:1234"
        )
    return value


def _timeout(given: int | None, name: str, default: int) -> int:
    """Seconds: `given`, else $name, else the default; at least 1 (jax takes 0 as "at
    once": every process is declared dead at the first heartbeat)."""
    if given is None:
        value = os.environ.get(name, "").strip()
        given = _int_env((name, value)) if value else default
        source = name
    else:
        source = "the timeout"
    if given < 1:
        raise ValueError(f"{source}={given}: give a number of seconds, at least 1")
    return given


def _gce_metadata(key: str, timeout_s: float = 5.0) -> str | None:
    """A TPU VM's instance attribute from the GCE metadata server, or None."""
    host = os.environ.get("GCE_METADATA_IP", "metadata.google.internal")
    request = urllib.request.Request(
        f"http://{host}/computeMetadata/v1/instance/attributes/{key}",
        headers={"Metadata-Flavor": "Google"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.read().decode()
    except OSError:
        return None


def _on_cloud_tpu_vm() -> bool:
    # `import jax` probes the PCI bus for TPU chips and records the answer here; there is no
    # public API for it that does not start the backend (which must wait for initialize).
    from jax._src import cloud_tpu_init

    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def _tpu_environment() -> Environment | None:
    slices = int(os.environ.get("MEGASCALE_NUM_SLICES", "1") or 1)
    # GKE injects the worker list; TPU_PROCESS_ADDRESSES is the newer name.
    hosts = os.environ.get("TPU_PROCESS_ADDRESSES") or os.environ.get("TPU_WORKER_HOSTNAMES")
    if hosts:
        return Environment("tpu", num_processes=len(hosts.split(",")) * slices)
    on_tpu = _on_cloud_tpu_vm() or "CLOUD_TPU_TASK_ID" in os.environ
    if not on_tpu or "TPU_SKIP_MDS_QUERY" in os.environ:
        return None
    endpoints = _gce_metadata("worker-network-endpoints")
    if endpoints is None:  # jax's own detection would ask the same server, and fail
        raise ValueError(
            "this is a Cloud TPU VM, but its metadata server did not answer "
            "(worker-network-endpoints), so the slice's hosts are unknown: set "
            "TPU_SKIP_MDS_QUERY=1 to run on this host alone, or TPU_WORKER_HOSTNAMES="
            "host0,host1,... (every host of the slice, in order) for a multi-host slice"
        )
    return Environment("tpu", num_processes=len(endpoints.split(",")) * slices)


def detect() -> Environment:
    """Finds how this process is meant to join a multi-process job.

    In order: explicit variables (`LRULM_COORDINATOR_ADDRESS`, `LRULM_NUM_PROCESSES`,
    `LRULM_PROCESS_ID`, or their `JAX_` forms), Open MPI (`mpirun`), SLURM (`srun` with
    `SLURM_NTASKS` > 1), a Cloud TPU VM or GKE TPU pod with several workers. Anything else is a
    single process.

    Returns:
      The environment found; `kind == "single"` when nothing asks for several processes.

    Raises:
      ValueError: an explicit variable is malformed or only some of them are set.
    """
    address = _first_env(ADDRESS_VARS)
    num = _first_env(NUM_PROCESSES_VARS)
    pid = _first_env(PROCESS_ID_VARS)
    if num or pid:
        given = {ADDRESS_VARS[0]: address, NUM_PROCESSES_VARS[0]: num, PROCESS_ID_VARS[0]: pid}
        if missing := [name for name, found in given.items() if not found]:
            raise ValueError(
                f"incomplete multi-process configuration: also set {', '.join(missing)}, or "
                "unset the LRULM_/JAX_ process variables to run a single process"
            )
        num_processes, process_id = _int_env(num), _int_env(pid)
        if not 0 <= process_id < num_processes:
            raise ValueError(f"{pid[0]}={process_id} must be in [0, {num[0]}={num_processes})")
        return Environment("env", num_processes, process_id, _address_env(address))
    if address:
        # Only the address: jax finds the process count and index in the cluster environment.
        return Environment("env", coordinator_address=_address_env(address))
    env = os.environ
    if "OMPI_MCA_orte_hnp_uri" in env and int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return Environment(
            "ompi", int(env["OMPI_COMM_WORLD_SIZE"]), int(env["OMPI_COMM_WORLD_RANK"])
        )
    slurm_vars = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")
    if int(env.get("SLURM_NTASKS", "1")) > 1 and all(v in env for v in slurm_vars):
        return Environment("slurm", int(env["SLURM_NTASKS"]), int(env["SLURM_PROCID"]))
    tpu = _tpu_environment()
    if tpu is not None and tpu.is_multi_process:
        return tpu
    return Environment("single", 1, 0)


def _wait_for_coordinator(address: str, timeout_s: int, env: Environment) -> None:
    """Polls host:port until it accepts TCP connections; RuntimeError at the deadline.

    jax aborts the whole process (SIGABRT) when its client cannot connect in time, so the
    unreachable-coordinator case is caught here first, where it can still raise.
    """
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    deadline = time.monotonic() + timeout_s
    last_error: OSError | None = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            socket.create_connection((host, int(port)), timeout=min(remaining, 2.0)).close()
            return
        except OSError as e:
            last_error = e
            time.sleep(min(0.5, max(deadline - time.monotonic(), 0)))
    raise RuntimeError(
        f"process {env.process_id} of {env.num_processes} could not reach the coordinator at "
        f"{address} ({last_error}) within {timeout_s} s. Check that process 0 was started and "
        f"that {' / '.join(ADDRESS_VARS)} names its host and a free port reachable from here; "
        f"{' / '.join(NUM_PROCESSES_VARS)} and {' / '.join(PROCESS_ID_VARS)} must agree across "
        f"processes. Raise the timeout with {INIT_TIMEOUT_VAR}."
    )


def _check_port_free(address: str) -> None:
    """Raises if process 0 cannot bind the coordinator port (jax 0.10 segfaults instead)."""
    port = int(address.rpartition(":")[2])
    for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((host, port))
            return
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise RuntimeError(
                    f"process 0 cannot start the coordinator: port {port} of {address} is "
                    f"already in use on this host. Choose another port in {ADDRESS_VARS[0]} "
                    "(launch/local.py picks a free one when --port is not given) or stop the "
                    "process that holds it (an earlier run?)."
                ) from None
    # Neither family could bind for another reason: let jax report it.


def _install_fail_fast_excepthook() -> None:
    """Makes an uncaught exception end this process at once.

    Otherwise jax's exit handler waits in its shutdown barrier for processes that may be stuck
    in a collective with us, and the job hangs for shutdown_timeout_s before anyone exits.
    """
    global _fail_fast_installed
    if _fail_fast_installed:
        return
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        previous(exc_type, exc, tb)
        if any(marker in str(exc) for marker in _PEER_LOST):
            # Our collective failed because a peer died a few ms ago. Pausing lets the peer,
            # the cause, exit first, so launchers (launch/local.py, srun --kill-on-bad-exit)
            # report it rather than us.
            time.sleep(_PEER_LOST_PAUSE_S)
        print(
            f"lrulm: process {jax.process_index()} failed; exiting without waiting for the "
            "other processes (they stop within the heartbeat timeout).",
            file=sys.stderr,
        )
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(128 + signal.SIGINT if issubclass(exc_type, KeyboardInterrupt) else 1)

    sys.excepthook = hook
    _fail_fast_installed = True


def initialize(
    *,
    timeout_s: int | None = None,
    heartbeat_timeout_s: int | None = None,
    shutdown_timeout_s: int | None = None,
) -> None:
    """Joins the multi-process job this process belongs to; a no-op for a single process.

    Call once at the start of every command, before anything touches jax devices. Calling it
    again is a no-op. See `detect()` for how the job is found. With several processes it also
    selects gloo for CPU collectives (only the CPU client reads that flag, so accelerator runs
    are unaffected) and makes uncaught exceptions exit at once (exit code 1).

    Failure bounds (measured on CPU with gloo, 2 processes): when a process dies (crash,
    SIGKILL, OOM kill, or an uncaught exception, which exits at once), every other process exits
    with an error within `heartbeat_timeout_s` (60 s by default; measured: the timeout + <1 s):
    the coordination service stops hearing from it and aborts the rest (SIGABRT, exit 134).
    It is faster when the dead process was process 0 (the coordinator; <0.1 s) or when the
    others were in a CPU collective with it (they raise at once, then exit 1 about 1 s later).
    A process that exits normally (or by `sys.exit`) waits at most `shutdown_timeout_s` (120 s)
    in jax's shutdown barrier for the others; if they never arrive, every process aborts.
    During start-up, a process that never joins makes the others abort after `timeout_s`.

    Args:
      timeout_s: Seconds to wait for the coordinator and for every process to join;
        default `LRULM_INIT_TIMEOUT_S` or 300.
      heartbeat_timeout_s: Seconds without heartbeats after which a process is declared dead
        and the job stopped; default `LRULM_HEARTBEAT_TIMEOUT_S` or 60.
      shutdown_timeout_s: Seconds a finishing process waits for the others at exit; default
        `LRULM_SHUTDOWN_TIMEOUT_S` or 120.

    Raises:
      RuntimeError: the coordinator cannot be reached within `timeout_s`, or process 0 finds
        its port taken (the message names the address and the variables to check).
      ValueError: the explicit variables are malformed or incomplete.
    """
    if jax.distributed.is_initialized():
        return
    env = detect()
    if not env.is_multi_process:
        return
    timeout_s = _timeout(timeout_s, INIT_TIMEOUT_VAR, DEFAULT_INIT_TIMEOUT_S)
    heartbeat_timeout_s = _timeout(
        heartbeat_timeout_s, HEARTBEAT_TIMEOUT_VAR, DEFAULT_HEARTBEAT_TIMEOUT_S
    )
    shutdown_timeout_s = _timeout(
        shutdown_timeout_s, SHUTDOWN_TIMEOUT_VAR, DEFAULT_SHUTDOWN_TIMEOUT_S
    )
    if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")

    start = time.monotonic()
    explicit = env.kind == "env" and env.num_processes is not None
    if explicit and env.process_id == 0:
        _check_port_free(env.coordinator_address)
    elif explicit:
        # Pods and tasks start apart: this wait can be minutes, and a SIGTERM in it ends the
        # process with exit 75 ("try again"), not 143. (Inside jax's join below, which
        # signals cannot interrupt, it keeps its default action.)
        with preemption.stop_before_start():
            _wait_for_coordinator(env.coordinator_address, timeout_s, env)
    remaining = max(int(timeout_s - (time.monotonic() - start)), 1)
    logger.info(
        "joining %s job as process %s of %s (coordinator %s, timeout %d s)",
        env.kind,
        env.process_id,
        env.num_processes,
        env.coordinator_address or "auto",
        remaining,
    )
    jax.distributed.initialize(
        coordinator_address=env.coordinator_address,
        num_processes=env.num_processes if env.kind == "env" else None,
        process_id=env.process_id if env.kind == "env" else None,
        # Explicit variables are authoritative: stop jax from also reading SLURM/MPI variables,
        # e.g. when launch/local.py runs inside a SLURM allocation.
        cluster_detection_method="deactivate" if explicit else None,
        initialization_timeout=remaining,
        heartbeat_timeout_seconds=heartbeat_timeout_s,
        shutdown_timeout_seconds=shutdown_timeout_s,
    )
    _install_fail_fast_excepthook()


def process_index() -> int:
    """This process's index in [0, process_count())."""
    return jax.process_index()


def process_count() -> int:
    """Number of processes in the job (1 when not distributed)."""
    return jax.process_count()


def is_main_process() -> bool:
    """True on process 0, the one that writes logs, summaries and reports."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Blocks until every process reaches the barrier of the same `name`.

    Args:
      name: Identifies the barrier; processes reaching barriers of different names fail.
    """
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
