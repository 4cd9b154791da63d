"""Run outputs on process 0: metrics.jsonl, TensorBoard events, a progress line, a
profiler trace of a window of steps; and MFU."""

from __future__ import annotations

import json
import math
import os
import sys
import time

import jax

# Peak dense bf16 FLOP/s per chip, from the vendors' data sheets. MFU is reported against
# these; CPUs have no meaningful peak and get none.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5": 459e12,  # v5p reports "TPU v5"
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,  # SXM, dense (the longest matching name wins)
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12,
    "NVIDIA H200 NVL": 835e12,
    "NVIDIA A100": 312e12,
}


_MESSAGES_TO_STDERR = False


def messages_to_stderr(on: bool = True) -> None:
    """Sends `say`'s messages to stderr: for commands whose stdout is their result
    (`lrulm eval` prints JSON, `lrulm generate` the texts)."""
    global _MESSAGES_TO_STDERR
    _MESSAGES_TO_STDERR = on


def say(message: str, *, file=None) -> None:
    """Writes `message` and its newline to stdout (stderr after `messages_to_stderr()`;
    or `file`) in one write, flushed. print() writes them separately, and unbuffered (as
    every process under launch/local.py is) a line that another thread writes to the
    same stream between them (gloo writes "[Gloo] Rank ..." lines to stdout) would land
    inside this one."""
    if file is None:
        file = sys.stderr if _MESSAGES_TO_STDERR else sys.stdout
    file.write(message + "\n")
    file.flush()


def brief(error: BaseException, limit: int = 300) -> str:
    """An exception as one short line: its type and the start of its first line (Orbax
    and TensorStore errors carry whole array specs: cut, with their cause's line, which
    names the file and what is wrong with it)."""
    text = str(error).strip()
    spec = text.find(" See full TensorStore details")
    if spec >= 0:
        text = text[:spec]
        cause = error.__cause__ or error.__context__
        if cause is not None:
            text += f" ({brief(cause, limit)})"
    text = text.splitlines()
    first = text[0] if text else ""
    if len(first) > limit:
        first = first[: limit - 3] + "..."
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def peak_flops(device: jax.Device | None = None) -> float | None:
    """The device's peak bf16 FLOP/s, or None when unknown (e.g. CPU)."""
    kind = (device or jax.devices()[0]).device_kind
    for prefix in sorted(PEAK_FLOPS, key=len, reverse=True):
        if kind.startswith(prefix):
            return PEAK_FLOPS[prefix]
    return None


class MetricWriter:
    """Appends {"step": s, ...} rows to metrics.jsonl and TensorBoard (process 0 only).

    A run resumed at step S first moves the rows after S out of metrics.jsonl, into
    metrics.superseded.jsonl: rows an interrupted run wrote after its last checkpoint,
    which the resumed run writes again; a `fresh` run (no checkpoint) moves every row
    there, an earlier run's. TensorBoard hides them too (purge_step)."""

    def __init__(
        self, workdir: str, *, enabled: bool, progress: bool = True, start_step=0, fresh=False
    ):
        self.enabled = enabled
        self.progress = progress and enabled
        self._jsonl = None
        self._tb = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            path = os.path.join(workdir, "metrics.jsonl")
            superseded = _supersede_rows_after(path, None if fresh else start_step)
            self._jsonl = open(path, "a", buffering=1)
            try:
                from tensorboardX import SummaryWriter

                purge = {"purge_step": 0 if fresh else start_step + 1} if superseded else {}
                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), **purge)
            except ImportError:  # TensorBoard is optional; metrics.jsonl is the record
                self._tb = None

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        for k, v in metrics.items():
            v = float(v)
            row[k] = v if math.isfinite(v) else str(v)
        self._jsonl.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, float(v), int(step))

    @staticmethod
    def _console(metrics: dict) -> str:
        """`loss 3.752 tokens_per_s 10,040 tokens 32,768`: 4 significant figures, large
        values as grouped integers rather than 1.004e+04."""

        def number(v: float) -> str:
            if math.isfinite(v) and 1e4 <= abs(v) < 1e15:
                return f"{v:,.0f}"
            return f"{v:.4g}"

        return " ".join(f"{k.split('/')[-1]} {number(float(v))}" for k, v in metrics.items())

    def progress_line(self, step: int, total: int, metrics: dict) -> None:
        if not self.progress:
            return
        width = 24
        done = int(width * step / max(total, 1))
        bar = "#" * done + "-" * (width - done)
        line = f"[{bar}] {step}/{total} " + self._console(metrics)
        end = "\r" if sys.stderr.isatty() else "\n"
        print(line, end=end, file=sys.stderr, flush=True)

    def summary_line(self, label: str, metrics: dict) -> None:
        """One line on the console, e.g. an evaluation's metrics (the progress line stays)."""
        if not self.progress:
            return
        newline = "\n" if sys.stderr.isatty() else ""  # below the bar's \r-updated line
        print(f"{newline}{label}: " + self._console(metrics), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.progress and sys.stderr.isatty():
            print(file=sys.stderr)
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def _supersede_rows_after(path: str, step: int | None) -> int:
    """Moves metrics.jsonl's rows with a step above `step` (None: every row) to
    metrics.superseded.jsonl beside it (appended: nothing is lost); returns how many."""
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = f.readlines()
    keep, moved = [], []
    for line in lines:
        try:
            later = step is None or int(json.loads(line)["step"]) > step
        except (ValueError, KeyError, TypeError):  # a line cut short by a crash, say
            later = True
        (moved if later else keep).append(line if line.endswith("\n") else line + "\n")
    if moved:
        aside = os.path.join(os.path.dirname(path), "metrics.superseded.jsonl")
        with open(aside, "a") as f:
            f.writelines(moved)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)
        why = (
            "an earlier run's, with no checkpoint left"
            if step is None
            else f"after step {step}, written after the last checkpoint"
        )
        say(f"lrulm: {len(moved)} rows of metrics.jsonl ({why}) moved to metrics.superseded.jsonl")
    return len(moved)


class Throughput:
    """Tokens/s and step time between two log points (host wall clock), and the part of
    a step the host waited for its batch (`waited`: the input pipeline's share; the steps
    themselves run asynchronously, so a step time well above it is device time)."""

    def __init__(self):
        self._t, self._step, self._waited = time.perf_counter(), None, 0.0

    def start(self, step: int) -> None:
        self._t, self._step, self._waited = time.perf_counter(), step, 0.0

    def waited(self, seconds: float) -> None:
        self._waited += seconds

    def measure(self, step: int, tokens_per_step: int) -> dict:
        now = time.perf_counter()
        steps = max(step - (self._step if self._step is not None else step), 1)
        dt = (now - self._t) / steps
        wait = self._waited / steps
        self._t, self._step, self._waited = now, step, 0.0
        return {
            "perf/step_time_s": dt,
            "perf/tokens_per_s": tokens_per_step / dt,
            "perf/data_wait_s": wait,
        }


def device_memory(devices) -> dict:
    """The memory figures (GiB) of the most loaded of `devices` where the backend reports
    them (GPU, TPU; CPUs report none): in use now, the peak so far, and that peak as a
    fraction of the device's limit."""
    stats = []
    for d in devices:
        try:
            stats.append(d.memory_stats() or {})
        except Exception:  # noqa: BLE001 - a backend without memory statistics
            stats.append({})
    stats = [s for s in stats if "bytes_in_use" in s]
    if not stats:
        return {}
    top = max(stats, key=lambda s: s.get("peak_bytes_in_use", s["bytes_in_use"]))
    peak = top.get("peak_bytes_in_use", top["bytes_in_use"])
    out = {"perf/memory_gib": top["bytes_in_use"] / 2**30, "perf/peak_memory_gib": peak / 2**30}
    if top.get("bytes_limit"):
        out["perf/peak_memory_fraction"] = peak / top["bytes_limit"]
    return out


class ProfileWindow:
    """A jax.profiler trace of train steps `begin + 1 .. end` (steps as metrics.jsonl counts
    them) into `logdir`: TensorBoard's profile tab reads it there (`tensorboard --logdir
    WORKDIR/tensorboard`, with the xprof / tensorboard-plugin-profile package), and
    Perfetto (ui.perfetto.dev) opens its `*.trace.json.gz`.

    From the config's `train.profile_start_step` S and `train.profile_steps` N the window
    is the N steps after step S, never the first step of a run (it compiles): a run that
    starts (or resumes) at step R traces steps max(S, R + 1) + 1 .. S + N, and nothing when
    that range is empty. Call `before(step, state)` before each step and `after(step,
    state)` after it, with `step` the steps done; both wait for `state` at the window's
    edges, so work dispatched before the window stays out of it and the steps inside it
    are in it. `close()` in a `finally:` writes a trace cut short (preemption, an error).
    """

    def __init__(self, logdir, *, start_step, num_steps, run_from, total_steps, enabled=True):
        self.logdir = logdir
        self.active = False
        self.window = None
        if not enabled or num_steps <= 0:
            return
        begin, end = max(start_step, run_from + 1), min(start_step + num_steps, total_steps)
        if end > begin:
            self.window = (begin, end)
        else:
            say(
                f"lrulm: no profile: steps {start_step + 1}..{start_step + num_steps} "
                f"(train.profile_start_step, train.profile_steps) are not after this run's "
                f"first step {run_from + 1}, the one that compiles"
            )

    def before(self, step: int, state) -> None:
        if self.window is not None and step == self.window[0]:
            jax.block_until_ready(state)
            jax.profiler.start_trace(self.logdir)
            self.active = True
            say(f"lrulm: profiling steps {step + 1}..{self.window[1]}")

    def after(self, step: int, state) -> None:
        if self.active and step >= self.window[1]:
            jax.block_until_ready(state)
            self._stop(step)

    def close(self) -> None:
        if self.active:
            self._stop(None)

    def _stop(self, step) -> None:
        self.active = False
        jax.profiler.stop_trace()
        what = f"steps {self.window[0] + 1}..{step}"
        if step is None:
            what = "the steps it ran (cut short)"
        say(f"lrulm: profile of {what} written under {self.logdir}/plugins/profile")
