"""tools/bench.py, bench_train.py, bench_baseline.py and the GPU kernel sweep through their command
lines (stubs where they need a GPU): tables, failing and skipped rows, budgets
(tools/gpu_check.sh: test_gpu_check_script.py)."""

import glob
import gzip
import json
import math
import os
import re
import subprocess
import sys
import threading

import pytest
from run_helpers import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench(*args, timeout=300, tool="tools/bench.py"):
    env = dict(os.environ)
    # One CPU device, as on a laptop (the suite's 8 simulated devices would split the batch).
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(1))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, tool, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _positive(row, *keys):
    for key in keys:
        assert isinstance(row[key], (int, float)) and math.isfinite(row[key]), (key, row)
        assert row[key] > 0, (key, row)


@pytest.mark.slow
def test_quick_table_has_every_section_and_reports_a_failing_row(tmp_path):
    path = tmp_path / "bench.json"
    out = _bench("--quick", "--json", str(path), "--long", "test:0")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(path.read_text())
    assert result["backend"] == "cpu" and result["jax_version"] and result["device"]
    _positive(result, "copy_GBps")

    scan = result["scan"]["rows"]
    assert {(r["method"], r["form"]) for r in scan if r["form"] == "complex"} == {
        ("sequential", "complex"),
        ("associative", "complex"),
        ("chunked", "complex"),
    }  # pallas would run in the interpreter on CPU: left out unless --methods names it
    for r in scan:
        assert r["status"] == "ok", r
        _positive(r, "fwd_bwd_ms", "fwd_bwd_GBps", "fwd_bwd_pct_copy")
        if r["fwd_ms"] is not None:
            _positive(r, "fwd_ms", "fwd_GBps", "fwd_pct_copy")

    lru = result["lru"]["rows"]
    assert [r["method"] for r in lru] == ["sequential", "associative", "chunked"]
    for r in lru:
        assert r["status"] == "ok", r
        _positive(r, "fwd_ms", "fwd_bwd_ms", "fwd_tokens_per_s", "fwd_bwd_tokens_per_s")
        _positive(r, "fwd_bwd_temp_bytes")
        # The backward pass keeps the forward's states: it needs more memory than the forward.
        assert r["fwd_bwd_temp_bytes"] > r["fwd_temp_bytes"], r

    train = {r["name"]: r for r in result["train"]["rows"]}
    assert set(train) == {"test", "test long"}
    assert train["test"]["status"] == "ok"
    _positive(train["test"], "step_time_ms", "tokens_per_s", "temp_bytes_per_device")
    _positive(train["test"], "argument_bytes_per_device", "params")
    assert train["test"]["scan_method"] == "sequential"  # "auto" on CPU, resolved
    assert train["test long"]["status"].startswith("failed: ValueError: train.seq_len must be")

    table = out.stdout
    for header in (
        "## Linear scan",
        "| method | form | grad | fwd ms | fwd GB/s | fwd % copy |",
        "## LRU layer",
        "| method | fwd ms | fwd tokens/s | fwd temp |",
        "## Train step",
        "| row | batch x seq | scan | params M | remat | step ms | tokens/s | MFU |",
        "| test long | 1 x 0 | preset's | failed: ValueError",
    ):
        assert header in table, header

    # The saved JSON renders the same table (how tools/gpu_check.sh prints its summary).
    again = _bench("--render", str(path), timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout == table
    # A GPU run names the kernels' tuning (Triton or Mosaic GPU) its pallas rows ran with.
    assert result["gpu_tuning"] == "" and "tuning" not in table.splitlines()[0]
    path.write_text(json.dumps({**result, "gpu_tuning": "mosaic,32,3"}))
    gpu = _bench("--render", str(path), timeout=120)
    assert gpu.stdout.splitlines()[0].endswith(", pallas GPU tuning mosaic,32,3"), gpu.stdout


def test_bench_train_traces_steps_after_the_timed_ones(tmp_path):
    out = _bench(
        *("--preset", "test", "--batch", "2", "--seq_len", "64", "--steps", "2"),
        *("--profile", str(tmp_path / "prof")),
        tool="tools/bench_train.py",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "tokens/s" in out.stdout and "profile of 3 steps" in out.stdout
    (trace,) = glob.glob(str(tmp_path / "prof/plugins/profile/*/*.trace.json.gz"))
    events = json.load(gzip.open(trace))["traceEvents"]
    assert any("train_step" in e.get("name", "") for e in events)


def test_unknown_methods_and_presets_stop_before_anything_runs(monkeypatch, capsys):
    """A misspelt scan method or preset, or a count or budget out of range, is refused
    (with the names to use) before the copy bandwidth is measured or anything compiled,
    not as a failed row minutes later. (bench.main in this process: one import, not one
    per case; it exits before it would need the one-device set-up of _bench.)"""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "tools"))
    import bench as bench_tool

    for args, message in (
        (("--long", "nosuch:64"), "--long: unknown preset 'nosuch'; use tiny, test"),
        (("--presets", "test,350M"), "--presets: unknown preset '350M'"),
        (("--scan_methods", "associative,palas"), "--scan_methods: unknown scan method 'palas'"),
        (("--methods", "assoc"), "--methods: unknown scan method 'assoc'; use sequential"),
        (("--budget_s", "foo"), "--budget_s: 'foo' is not a number of seconds (>= 0)"),
        (("--budget_s", "scan=-1"), "--budget_s: '-1' is not a number of seconds"),
        (("--steps", "0"), "--steps must be positive; got 0"),
        (("--repeats", "0"), "--repeats must be positive; got 0"),
    ):
        with pytest.raises(SystemExit) as exit_:
            bench_tool.main(["--quick", *args])
        out, code = capsys.readouterr(), exit_.value.code
        said = out.err + (code if isinstance(code, str) else "")  # sys.exit(text): status 1
        assert code not in (0, None) and message in said, (args, said[-2000:])
        assert not out.out, out.out  # nothing measured


def test_rows_past_the_budget_are_skipped_not_run(tmp_path):
    path = tmp_path / "bench.json"
    out = _bench("--quick", "--sections", "scan", "--budget_s", "0", "--json", str(path))
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(path.read_text())
    assert set(result) >= {"scan"} and "train" not in result and "lru" not in result
    rows = result["scan"]["rows"]
    assert rows and all(r["status"] == "skipped: scan budget of 0 s spent" for r in rows)
    assert "skipped: scan budget" in out.stdout


@pytest.mark.parametrize(
    "full_a, configs",
    [
        (False, "32,1,8,prefetch 16,1,8,segments=2 mosaic,32,2"),
        (True, "32,1,8 mosaic,16,2 mosaic,16,2,halves=2"),
    ],
)
def test_gpu_kernel_sweep_checks_times_and_picks_a_launch_shape(tmp_path, full_a, configs):
    """tools/gpu_kernel_sweep.py in the Pallas interpreters: every shape (Triton, one
    forced into a time split, and Mosaic GPU) is checked against associative and timed,
    and the winner is written; --full_a: the same for a (B, L, N) decay, on its floors.
    (32 steps: two 16-step chunks through a ring of 2; the interpreter's time is by step.)"""
    path, best = tmp_path / "sweep.json", tmp_path / "best.txt"
    out = _bench(
        "--shape", "1,32,128", "--configs", configs, "--repeats", "1", "--json", str(path),
        "--best_out", str(best), *(["--full_a"] if full_a else []),
        tool="tools/gpu_kernel_sweep.py",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(path.read_text())
    assert result["full_a"] == full_a and (" full a " in out.stdout) == full_a
    floors = (3, 8) if full_a else (2, 5)  # arrays of B*L*N complex64 moved at least once
    seconds = lambda arrays: arrays * 32 * 128 * 8 / (result["copy_GBps"] * 1e9)
    assert result["floor_fwd_ms"] == pytest.approx(1e3 * seconds(floors[0]))
    assert result["floor_fwd_bwd_ms"] == pytest.approx(1e3 * seconds(floors[1]))
    assert [r["config"] for r in result["rows"]] == configs.split()
    for row in result["rows"]:
        assert row["ok"] and row["max_rel_err"] < 1e-5, row
        _positive(row, "fwd_ms", "fwd_bwd_ms", "fwd_pct_copy", "fwd_bwd_pct_copy")
        # A Mosaic GPU row also times its ring copying b without the scan (checked exact).
        assert ("ring_pct_copy" in row) == row["config"].startswith("mosaic"), row
        assert "ring_error" not in row, row
    _positive(result["rows"][-1], "ring_pct_copy")
    assert best.read_text().strip() == result["best"] in configs.split()
    assert "best (fwd+bwd, correct)" in out.stdout


def test_gpu_kernel_sweep_starts_no_row_past_its_budget(tmp_path):
    """--budget_s: rows not started in time are reported as skipped, never chosen, and
    the table still prints (gpu_check.sh's step limit would otherwise cut it off)."""
    path, best = tmp_path / "sweep.json", tmp_path / "best.txt"
    out = _bench(
        "--shape", "1,32,128", "--configs", "32,1,8 mosaic,16,2", "--repeats", "1",
        "--budget_s", "0", "--json", str(path), "--best_out", str(best),
        tool="tools/gpu_kernel_sweep.py",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(path.read_text())["rows"]
    assert [(r["ok"], "past the 0 s budget" in r["error"]) for r in rows] == [(False, True)] * 2
    assert "best (fwd+bwd, correct): None" in out.stdout and not best.exists()


def test_gpu_kernel_sweep_saves_every_row_and_logs_where_a_row_failed(monkeypatch):
    """A row that fails says where (a KeyError's key alone said nothing on the H100), its
    traceback is logged once, and the result so far (with the best row measured) is
    handed over after every row, so a sweep killed at its time limit has still saved it."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "tools"))
    import gpu_kernel_sweep as sweep_tool

    from lrulm.kernels import gpu

    monkeypatch.delenv(gpu.TUNING_ENV, raising=False)
    programs = sweep_tool._programs

    def failing(a, b, dh, method):
        if method == "pallas" and os.environ.get(gpu.TUNING_ENV, "").startswith("16,"):
            raise KeyError(object())  # like jax's KeyError: <OrderedIOEffect object at ...>
        return programs(a, b, dh, method)

    monkeypatch.setattr(sweep_tool, "_programs", failing)
    saved, logged = [], []
    configs = ["32,1,8", "16,1,8", "16,1,8,segments=2"]
    result = sweep_tool.sweep(
        1, 32, 128, configs, repeats=1, rtol=1e-3, log=logged.append,
        on_row=lambda r: saved.append(json.loads(json.dumps(r))),
    )  # fmt: skip
    assert gpu.TUNING_ENV not in os.environ  # the lowering thread restored it, and ended
    assert [len(r["rows"]) for r in saved] == [1, 2, 3]
    # The failed rows may be taken first (a row is taken once compiled or failed); the
    # best, once there, stays.
    bests = [r["best"] for r in saved]
    assert bests[-1] == result["best"] == "32,1,8"
    assert bests == sorted(bests, key=bool) and set(bests) <= {None, "32,1,8"}, bests
    errors = [r["error"] for r in result["rows"][1:]]
    assert all(e.startswith("KeyError: <object object at") for e in errors), errors
    assert all("(at test_bench_tool.py:" in e and " failing" in e for e in errors), errors
    tracebacks = [s for s in logged if "Traceback (most recent call last)" in s]
    assert len(tracebacks) == 1 and tracebacks[0].startswith("16,1,8 failed:"), logged


def test_gpu_kernel_sweep_times_a_row_compiled_early_before_a_slow_one(monkeypatch):
    """A row whose compile is slow (a pingpong kernel takes several times the default's)
    holds back no row compiled after it; the table still lists the rows in order."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "tools"))
    import gpu_kernel_sweep as sweep_tool

    from lrulm.kernels import gpu

    monkeypatch.delenv(gpu.TUNING_ENV, raising=False)
    programs, measured = sweep_tool._programs, threading.Event()

    class Slow:  # a lowering whose compile waits until another row was measured
        def __init__(self, lowered):
            self.lowered = lowered

        def as_text(self):
            return self.lowered.as_text()

        def compile(self):
            assert measured.wait(60), "the slow compile held back the other rows"
            return self.lowered.compile()

    def slow_first(a, b, dh, method):
        lowered = programs(a, b, dh, method)
        if method == "pallas" and os.environ.get(gpu.TUNING_ENV) == "16,1,8":
            return tuple(Slow(x) for x in lowered)
        return lowered

    monkeypatch.setattr(sweep_tool, "_programs", slow_first)
    order = []

    def on_row(result):
        order.append(result["rows"][-1]["config"])
        measured.set()

    result = sweep_tool.sweep(
        1, 32, 128, ["16,1,8", "32,1,8"], repeats=1, rtol=1e-3, log=lambda s: None,
        on_row=on_row,
    )  # fmt: skip
    assert order == ["32,1,8", "16,1,8"]
    assert [r["config"] for r in result["rows"]] == ["16,1,8", "32,1,8"]
    assert all(r["ok"] for r in result["rows"]), result["rows"]


def test_pytest_failures_at_once_prints_each_failure_before_the_session_ends(tmp_path):
    """tools/pytest_failures_at_once.py (gpu_check.sh's test steps): a failed test's line,
    with its E lines, is printed when the test fails, before a later test runs, so a step
    killed at its time limit still says why."""
    (tmp_path / "test_x.py").write_text(
        "import sys\n"
        "def test_bad():\n    assert {'a': 1}['a'] == 2, 'the value'\n"
        "def test_later():\n    sys.stderr.write('LATER\\n')\n"
        "def test_setup_error(nosuch):\n    pass\n"
    )  # fmt: skip
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "tools"))
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-p",
         "pytest_failures_at_once", str(tmp_path / "test_x.py")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 1, out.stdout + out.stderr
    lines = out.stderr.splitlines()
    bad = "FAILED test_x.py::test_bad (call) - E AssertionError: the value | E assert 1 == 2"
    assert bad in lines and lines.index(bad) < lines.index("LATER"), out.stderr
    assert any(x.startswith("FAILED test_x.py::test_setup_error (setup) - ") for x in lines)


def test_baseline_reference_lru_computes_what_lrulm_computes(monkeypatch):
    """tools/bench_baseline.py's reference layer (complex parameters, associative_scan,
    one example at a time) and lrulm.lru.LRU give the same values and gradients with the
    same parameters, so the benchmark compares two ways of computing one model."""
    from flax import nnx

    from lrulm.lru import LRU

    monkeypatch.syspath_prepend(os.path.join(ROOT, "tools"))
    import bench_baseline
    import jax
    import jax.numpy as jnp
    import numpy as np

    h, n, l = 8, 6, 37
    ref = bench_baseline.ReferenceLRU(h, n)
    u = jax.random.normal(jax.random.key(1), (3, l, h))
    params = ref.init(jax.random.key(2), u[0])["params"]
    # A layer with other random parameters; the reference's are put in its place.
    graph, state = nnx.split(LRU(h, n, scan_method="sequential", rngs=nnx.Rngs(7)))
    assert set(nnx.to_pure_dict(state)) == set(params)

    def lrulm_loss(p, u):
        nnx.replace_by_pure_dict(state, p)
        y = nnx.merge(graph, state)(u)
        return jnp.sum(jnp.sin(y)), y

    def ref_loss(p, u):
        y = jax.vmap(lambda x: ref.apply({"params": p}, x))(u)
        return jnp.sum(jnp.sin(y)), y

    (g_p, g_u), y = jax.grad(lrulm_loss, argnums=(0, 1), has_aux=True)(dict(params), u)
    (r_p, r_u), y_ref = jax.grad(ref_loss, argnums=(0, 1), has_aux=True)(params, u)
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(g_u, r_u, rtol=1e-4, atol=1e-5)
    for name in params:
        np.testing.assert_allclose(g_p[name], r_p[name], rtol=1e-3, atol=1e-4, err_msg=name)


def test_baseline_tool_times_both_steps_and_states_the_ratio(monkeypatch, tmp_path):
    out = _bench("--size", "tiny", "--steps", "2", "--json", tool="tools/bench_baseline.py")
    assert out.returncode == 0, out.stderr[-3000:]
    (row,) = [json.loads(line) for line in out.stdout.splitlines()]
    _positive(row, "reference_step_s", "lrulm_step_s", "reference_tokens_per_s", "ratio")
    assert row["ratio"] == pytest.approx(row["reference_step_s"] / row["lrulm_step_s"])
    # Both models start near chance on 10 classes (log 10 = 2.3 nats).
    assert 1.0 < row["reference_loss"] < 4.0 and 1.0 < row["lrulm_loss"] < 4.0, row
    monkeypatch.syspath_prepend(os.path.join(ROOT, "tools"))
    import bench_baseline

    log = tmp_path / "log"  # --render reads the rows back from a log with other lines
    log.write_text("starting\n" + out.stdout + "warning: x\n")
    assert bench_baseline.read_rows(str(log)) == [row]
    table = bench_baseline.markdown([row])
    number = r"[\d.,]+"
    assert re.search(
        rf"\| tiny \| 2 x 64, 16, 8 \| {number} \| auto \(sequential\) \| {number} \| "
        rf"{number} \| {number}x",
        table,
    )
    assert ("(met)" in table) == (row["ratio"] >= 2.0)
    with pytest.raises(SystemExit) as e:
        bench_baseline.main(["--size", "huge"])
    assert e.value.code == 2


def test_baseline_tool_reports_a_failing_step_as_a_row(monkeypatch):
    """An out-of-memory or a kernel that does not lower, on the reference or on one scan
    method, is a row with its error; the other methods are still timed."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "tools"))
    import bench_baseline

    def no_memory(*args, **kwargs):
        raise RuntimeError("RESOURCE_EXHAUSTED: out of memory\n(the whole spec)")

    real_step = bench_baseline.lrulm_step
    monkeypatch.setattr(bench_baseline, "reference_step", no_memory)
    monkeypatch.setattr(
        bench_baseline,
        "lrulm_step",
        lambda size, host, method: (no_memory if method == "pallas" else real_step)(
            size, host, method
        ),
    )
    rows = list(bench_baseline.bench("tiny", steps=1, scan_methods=("pallas", "sequential")))
    assert [r["scan_method"] for r in rows] == ["pallas", "sequential"]
    assert rows[0]["lrulm_step_s"] is None and "RESOURCE_EXHAUSTED" in rows[0]["error"]
    assert rows[1]["lrulm_step_s"] > 0 and rows[1]["ratio"] is None  # no reference time
    table = bench_baseline.markdown(rows)
    assert "| tiny | 2 x 64, 16, 8 | failed | pallas | failed | – | – |" in table
    assert "- failed: tiny reference: RuntimeError: RESOURCE_EXHAUSTED: out of memory" in table
    assert "- failed: tiny pallas: RuntimeError" in table and "whole spec" not in table


def test_bench_lra_table_and_arguments(monkeypatch, capsys):
    """The LRA step-time table: steps/s beside the paper's A100 rate, the device named in
    the projection's column, and an extrapolated (smaller-batch) row starred as such."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "tools"))
    import bench_lra

    row = dict(
        task="listops", device="NVIDIA H100", params=1, measured_batch=8, paper_batch=32,
        seq_len=2000, compile_s=1.0, step_s_measured=0.1, step_s_paper_batch=0.4, scaled=True,
        tokens_per_s=1.0, iterations=80_000, projected_run_h=0.4 * 80_000 / 3600,
        paper_a100_steps_per_s=2.1, paper_a100_run_h=80_000 / 2.1 / 3600,
    )  # fmt: skip
    text = bench_lra.markdown([row])
    assert "| steps/s at paper batch |" in text and "projected full run (NVIDIA H100)" in text
    assert "| listops | 8 of 32 | 0.10 | 2.5 * | 80,000 | 8.9 h | 2.1 (10.6 h) |" in text
    assert "rough extrapolation" in text
    assert "extrapolation" not in bench_lra.markdown([{**row, "scaled": False}])
    for args, message in (
        (["--max_tokens", "-1"], "--max_tokens must be >= 0"),
        (["--tasks", "listop"], "unknown task(s) ['listop']"),
        (["--steps", "0"], "--steps must be at least 1"),
    ):
        with pytest.raises(SystemExit):
            bench_lra.main(args)
        assert message in capsys.readouterr().err


def test_peak_flops_by_device_kind():
    """MFU's denominator: dense bf16 peaks, the longest matching device name first (an
    H100 PCIe or NVL card is not an SXM one); none for a CPU."""
    import types

    from lrulm import metrics

    def peak(kind):
        return metrics.peak_flops(types.SimpleNamespace(device_kind=kind))

    assert peak("NVIDIA H100 80GB HBM3") == peak("NVIDIA H200") == 989e12
    assert peak("NVIDIA H100 PCIe") == 756e12 and peak("NVIDIA H100 NVL") == 835e12
    assert peak("NVIDIA H200 NVL") == 835e12 and peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak("TPU v5 lite") == 197e12 and peak("TPU v5") == 459e12
    assert peak("TPU v6 lite") == 918e12 and peak("TPU v4") == 275e12
    assert peak("cpu") is None


@pytest.mark.parametrize(
    "tool, args, message",
    [
        ("bench_scan", ["--methods", "bogus"], "--methods 'bogus': use some of sequential"),
        ("bench_scan", ["--B", "0"], "--B must be positive; got 0"),
        ("bench_scan", ["--json", "/nonexistent/x.json"], "existing, writable directory"),
        ("bench_checkpoint", ["--steps", "0"], "--steps must be positive; got 0"),
        ("bench_checkpoint", ["--preset", "bogus"], "--preset 'bogus': use one of tiny"),
        ("bench_train", ["--preset", "bogus"], "--preset 'bogus': use one of tiny"),
        ("bench_generate", ["--workdir", "/nonexistent"], "no checkpoints/ there"),
        ("seq_parallel_memory", ["--lengths", "256,256"], "two different positive lengths"),
        ("seq_parallel_memory", ["--lengths", "256"], "--lengths takes two context lengths"),
        ("lru_layer_aot", ["--shape", "1,2"], "--shape takes B,L,H,N"),
    ],
)
def test_tools_refuse_bad_arguments_before_measuring(monkeypatch, capsys, tool, args, message):
    """A usage error (exit 2, one line) before anything is compiled or timed; NaN-filled
    JSON (bench_checkpoint --steps 0) and tracebacks after the measurement are gone."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "tools"))
    module = __import__(tool)
    monkeypatch.setattr(sys, "argv", [f"{tool}.py", *args])
    with pytest.raises(SystemExit) as e:
        module.main()
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    "tool, args, shown",
    [
        ("bench_scan", ["--help"], ["--B B", "default: 4", "default: 1024"]),
        ("make_lra_data", ["listops", "--help"], ["default: 500", "default: 2000"]),
        ("bench_generate", ["--help"], ["default: tiny"]),
    ],
)
def test_tools_help_shows_each_options_default(monkeypatch, capsys, tool, args, shown):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "tools"))
    module = __import__(tool)
    monkeypatch.setattr(sys, "argv", [f"{tool}.py", *args])
    with pytest.raises(SystemExit) as e:
        module.main()
    out = capsys.readouterr().out
    assert e.value.code == 0 and all(s in out for s in shown), out


def test_show_defaults_keeps_a_default_the_help_names():
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import tool_args

    p = tool_args.argparse.ArgumentParser()
    p.add_argument("--a", type=int, default=3, help="count")
    p.add_argument("--b", default="x", help="x (default: x)")
    p.add_argument("--c", action="store_true", help="flag")
    p.add_argument("--d", default="", help="empty")
    p.add_argument("--e", type=float, default=0.0, help="scale")
    p.add_argument("--f", type=int, default=0, help="the defaults of other tools")
    text = tool_args.show_defaults(p).format_help()
    assert "count (default: 3)" in text and "scale (default: 0.0)" in text, text
    assert "other tools (default: 0)" in text and text.count("default") == 5, text
