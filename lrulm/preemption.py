"""Preemption: a SIGTERM makes the trainer save at an agreed step and stop with exit code 75.

TPU VMs, GKE, SLURM and `launch/local.py` send SIGTERM before taking the machines away.
The trainer then saves at the next step (the same step on every process) and stops before
`train.steps`; `lrulm train` exits with `EXIT_CODE`, 75 (sysexits' EX_TEMPFAIL: try
again), not 0, so that whatever runs it sees an unfinished run: JobSet restarts the slice,
the SLURM `--requeue` script requeues the job, a shell loop
(`until lrulm train ...; do sleep 60; done`) runs it again, and `lrulm train ... && lrulm
eval ...` does not evaluate a half-trained model. The same command resumes from the saved
step. So does `train.time_limit_minutes` (a job's time limit: stop, saved, before the
scheduler kills the job) on its own, at an agreed log step.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

import numpy as np

EXIT_CODE = 75


class Preempted(Exception):
    """Raised by `train.train_and_evaluate` once every process has saved `step` and
    stopped for a preemption signal."""

    def __init__(self, step: int, total: int, reason: str = "a preemption signal"):
        super().__init__(
            f"stopped at step {step} of {total} for {reason}; step {step} is saved, "
            "and the same command resumes from it"
        )
        self.step = step


class AgreedTimer:
    """Whether `minutes` have passed since the start or the last `reset`, as every process
    of a run agrees: process 0's clock decides for all (one small broadcast a check, so the
    trainer asks at its log steps only). 0 minutes: never."""

    def __init__(self, minutes: float):
        self.period = minutes * 60.0
        self.last = time.monotonic()

    def due(self) -> bool:
        import jax

        if not self.period:
            return False
        due = time.monotonic() - self.last >= self.period
        # Tests: only this process's clock runs, so the processes cannot agree on their own.
        only = os.environ.get("LRULM_TEST_CLOCK_PROCESS")
        if only is not None and jax.process_index() != int(only):
            due = False
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            due = bool(multihost_utils.broadcast_one_to_all(np.int32(due)))
        return due

    def reset(self) -> None:
        self.last = time.monotonic()


class SignalBeforeStart(Exception):
    """A preemption signal came before the run started (while joining the other
    processes): nothing to save; exit with EXIT_CODE all the same."""


@contextlib.contextmanager
def stop_before_start():
    """Around Python code that waits before the run starts (for the coordinator: minutes
    where pods start apart): a SIGTERM there raises SignalBeforeStart, so that the process
    exits with EXIT_CODE ("try again"), not killed by the signal (143, which launchers
    take for a failure). Not around a call into C++ that blocks (jax's join): Python runs
    a handler only between its own instructions, so the signal would wait for the call."""

    def handler(signum, frame):
        raise SignalBeforeStart()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class Watcher:
    """Whether a preemption signal has arrived, agreed by every process.

    With several processes, jax's preemption sync point (jax owns SIGTERM once
    jax.distributed is initialised) makes every process agree on the same step; with one,
    this handler's flag is enough. Call `reached` at every step on every process; use
    it as a context manager (or call `close`) to put the previous handler back.

    `ctrl_c`: in one process, the first SIGINT (Ctrl-C) requests a save and stop too.

    `start_step`: the step the run starts from (its newest checkpoint's). jax agrees on
    one past the largest step any process has reported, and on 1 before any report: a
    signal during the set-up (data, restore, compile) of a run resuming at step S > 0
    agreed on a step its loop never reaches, so it never stopped. Told S at once, the
    processes agree on S + 1.
    """

    def __init__(self, start_step: int = 0, *, ctrl_c: bool = False):
        self.requested = False
        self._previous = self._previous_int = None
        import jax  # here: `lrulm` imports this module before it needs jax

        if jax.distributed.is_initialized():
            from jax.experimental import multihost_utils

            multihost_utils.reached_preemption_sync_point(start_step)
        else:
            try:
                self._previous = signal.signal(signal.SIGTERM, self._handler)
                # `lrulm train` in one process: Ctrl-C saves and stops too (a second one
                # interrupts). Not where SIGINT is ignored (a shell's `cmd &`) or handled by
                # the caller (a test runner); with several processes, launch/local.py turns
                # the launcher's SIGINT into SIGTERM.
                if ctrl_c and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                    self._previous_int = signal.signal(signal.SIGINT, self._interrupt)
            except ValueError:  # not the main thread (e.g. inside a test runner thread)
                self._previous = self._previous_int = None

    def _handler(self, signum, frame):
        self.requested = True

    def _interrupt(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        from lrulm import metrics as metrics_lib

        metrics_lib.say(
            "lrulm: interrupted (Ctrl-C): saving at the next step, then stopping; "
            "Ctrl-C again stops at once, without saving"
        )

    def reached(self, step: int) -> bool:
        import jax

        if jax.distributed.is_initialized():
            from jax.experimental import multihost_utils

            return bool(multihost_utils.reached_preemption_sync_point(step))
        return self.requested

    def close(self):
        """Puts back the SIGTERM and SIGINT handlers there were before."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
        if self._previous_int is not None:
            signal.signal(signal.SIGINT, self._previous_int)
            self._previous_int = None

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
