"""tools/gpu_check.sh, the one script a GPU session runs, on a machine without one:
python3 stands in and checks each step's command line as its tool would, so that device
time is not spent finding a typo."""

import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Stands in for python3 in tools/gpu_check.sh, on a machine without a GPU: each step's
# command line is checked the way the real tool would check it, with nothing compiled or
# timed, so that a GPU session (15 minutes in all) is not spent finding a typo.
_GPU_CHECK_STUB = r"""
import json, os, re, subprocess, sys
os.environ["JAX_PLATFORMS"] = "cpu"  # gpu_check.sh exports cuda
args = sys.argv[1:]
with open(os.environ["STUB_LOG"], "a") as f:
    json.dump({"args": args, "tuning": os.environ.get("LRULM_PALLAS_GPU_TUNING", "")}, f)
    f.write("\n")
if args[0] == "-c":
    exec(args[1])
elif args[:2] == ["-m", "pytest"]:  # collected, not run: the selection must not be empty
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", *args[2:]],
                         capture_output=True, text=True)
    print(out.stdout[-2000:], out.stderr[-2000:])
    count = re.search(r"(\d+)(?:/\d+)? tests? collected", out.stdout)
    sys.exit(out.returncode or not (count and int(count.group(1))))
else:
    tool = os.path.basename(args[0])[:-3]
    sys.path.insert(0, os.path.dirname(args[0]))
    parsed = __import__(tool).parse_args(args[1:])
    if tool == "gpu_kernel_sweep":
        print("device stub\n" + "\n".join(parsed.configs))
        kind = "mosaic" if os.environ["STUB_BEST"].startswith("mosaic") else "triton"
        if parsed.best_out and parsed.best_kernel in ("any", kind):
            with open(parsed.best_out, "w") as f:
                f.write(os.environ["STUB_BEST"] + "\n")
"""


def _run_gpu_check(tmp_path, best, *mode):
    """tools/gpu_check.sh [mode] with python3 standing in (_GPU_CHECK_STUB): its stdout,
    the steps in rc_MODE.txt as (name, rc, seconds), the stub's calls, and the output folder."""
    stub = tmp_path / "stub.py"
    stub.write_text(_GPU_CHECK_STUB)
    python = tmp_path / "python3"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{stub}" "$@"\n')
    python.chmod(0o755)
    log, out_dir = tmp_path / "calls.jsonl", tmp_path / "out"
    env = dict(os.environ, PYTHON=str(python), OUT=str(out_dir), STUB_LOG=str(log))
    env.update(STUB_BEST=best, TMPDIR=str(tmp_path))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    env.pop("LRULM_PALLAS_GPU_TUNING", None)
    run = subprocess.run(
        ["bash", "tools/gpu_check.sh", *mode], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    rc = out_dir / f"rc_{mode[0] if mode else 'full'}.txt"
    steps = [line.split() for line in rc.read_text().splitlines()]
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    return run.stdout, steps, calls, out_dir


def test_gpu_check_script_passes_each_tool_arguments_it_takes(tmp_path):
    """tools/gpu_check.sh on this host, with python3 standing in (_GPU_CHECK_STUB):
    every step's arguments are accepted by its tool, each pytest selection collects
    tests, the sweep's Triton winner (here with its own time split) reaches the benchmark
    as it is and the 64k rows and the long sweep without its split, and the summary
    prints every step. The headline rows come first."""
    best = "32,1,128,prefetch,segments=1"
    stdout, steps, calls, out_dir = _run_gpu_check(tmp_path, best)
    steps = [line.split() for line in (out_dir / "rc_full.txt").read_text().splitlines()]
    assert [(name, rc) for name, rc, _ in steps] == [
        (name, "0") for name in ("sweep", "bench", "long", "sweep_long", "tests_mosaic", "tests")
    ], (steps, stdout[-3000:])
    sweep = next(c["args"] for c in calls if c["args"][0] == "tools/gpu_kernel_sweep.py")
    assert sweep[sweep.index("--best_kernel") + 1] == "triton"  # Mosaic GPU: untested yet
    long = [c for c in calls if "--shape" in c["args"] and "1,65536,768" in c["args"]]
    configs = long[0]["args"][long[0]["args"].index("--configs") + 1].split()
    base = best.split(",segments=")[0]
    assert configs == [f"{base},segments=1", base, f"{base},segments=4", f"{base},segments=32"]
    bench, long_row = [c for c in calls if c["args"][0] == "tools/bench.py"]
    assert bench["tuning"] == best and long_row["tuning"] == base
    assert long_row["args"][long_row["args"].index("--steps") + 1] == "2"
    assert "lrulm imports: ok" in stdout  # grain, ml_collections: said before any step
    summary = stdout[stdout.index("== summary") :]
    for name, _, _ in steps:
        assert re.search(rf"^{name} +ok, \d+ s$", summary, re.M), summary
    assert "no bench results" in summary and "no long results" in summary  # the stub: none
    long_row = [c for c in calls if c["args"][0] == "tools/bench.py" and "--long" in c["args"]]
    assert [c["args"][c["args"].index("--long") + 1] for c in long_row] == [
        "125m:65536:pallas,125m:65536:associative"
    ]
    assert sorted(os.listdir(out_dir)) == ["logs_full.tgz", "rc_full.txt"]  # + the tools' JSON


def test_gpu_check_quick_runs_the_sweep_mosaic_tests_and_kernel_rows(tmp_path):
    """`gpu_check.sh quick` (for a session with ~5 minutes of device time left): the
    sweep, the Mosaic GPU tests and bench.py's scan and layer rows; no train step, no long
    sequence; the summary lists only those steps. The sweep's winner here is a Mosaic GPU
    one, which is not exported (its tests have not passed on hardware): bench.py runs with
    the default tuning (a Triton winner is exported: the test above)."""
    best = "mosaic,16,4"
    stdout, steps, calls, _ = _run_gpu_check(tmp_path, best, "quick")
    assert [(name, rc) for name, rc, _ in steps] == [
        ("sweep", "0"),
        ("bench", "0"),
        ("tests_mosaic", "0"),
    ], (steps, stdout[-3000:])
    bench = [c for c in calls if c["args"][0] == "tools/bench.py"]
    assert len(bench) == 1 and bench[0]["tuning"] == ""
    assert bench[0]["args"][bench[0]["args"].index("--sections") + 1] == "scan,lru"
    sweep = next(c["args"] for c in calls if c["args"][0] == "tools/gpu_kernel_sweep.py")
    assert int(sweep[sweep.index("--budget_s") + 1]) <= 85
    summary = stdout[stdout.index("== summary") :]
    assert not re.search(r"^(sweep_long|long|tests)\b", summary, re.M), summary
    assert "no bench results" in summary


def test_gpu_check_rejects_an_unknown_mode():
    run = subprocess.run(["bash", "tools/gpu_check.sh", "fast"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert run.returncode == 2 and "usage" in run.stderr


def test_gpu_check_baseline_mode_times_both_scans_at_the_paper_sizes(tmp_path):
    """`gpu_check.sh baseline`: only tools/bench_baseline.py, at the ListOps and sCIFAR
    sizes with associative and pallas, arguments the tool accepts (the stub parses them)."""
    stdout, steps, calls, _ = _run_gpu_check(tmp_path, "32,1,128,prefetch", "baseline")
    assert [(name, rc) for name, rc, _ in steps] == [("baseline", "0")], stdout[-3000:]
    timed, render = [c["args"] for c in calls if c["args"][0].startswith("tools/")]
    assert timed[0] == render[0] == "tools/bench_baseline.py"
    assert timed[timed.index("--size") + 1] == "listops,scifar"
    assert timed[timed.index("--scan_methods") + 1] == "associative,pallas"
    assert "--json" in timed  # rows saved as measured: a step cut off keeps them
    assert render[1] == "--render" and render[2].endswith("baseline.log")
    assert "baseline exit 0" in stdout[stdout.index("== summary") :]
