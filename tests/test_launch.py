"""launch/local.py: real multi-process jobs on this machine (dry runs of every launcher:
test_launch_dry_run.py)."""

import contextlib
import importlib.util
import os
import pathlib
import re
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
        import jax
        from jax.experimental import multihost_utils
        from lrulm import distributed
        distributed.initialize()
        distributed.barrier("up")
        say("ready")
        for step in range(100000):
            if multihost_utils.reached_preemption_sync_point(step):
                say(f"saving at step {step}")
                distributed.barrier("saved")
                if jax.process_index() == 0:  # the last to leave is not stopped
                    time.sleep(0.5)
                    say("left last")
                sys.exit(75)  # lrulm.preemption.EXIT_CODE
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
    assert proc.returncode == 75, out  # stopped for preemption: not finished, not failed
    assert "received SIGTERM; sending SIGTERM to every process" in out
    assert "[p0] left last" in out and "FAILED" not in out
    assert "process 0, 1 stopped for the preemption signal after saving (exit 75)" in out
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
