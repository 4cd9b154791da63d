#!/usr/bin/env bash
# GPU check of the Pallas recurrence kernels (Triton and Mosaic GPU): launch-shape sweeps,
# the benchmark table, compiled tests.
#
#   bash tools/gpu_check.sh        # on a CUDA machine; at most ~10 minutes
#   bash tools/gpu_check.sh quick  # at most ~4.5 minutes: the sweep, the scan and
#                                  # layer rows (no train step), the Mosaic GPU tests
#   bash tools/gpu_check.sh baseline  # at most ~3 minutes: docs/design.md §4's throughput
#                                  # target, lrulm's LRA step (associative and pallas)
#                                  # beside the minimal-LRU-style reference at the ListOps
#                                  # and sCIFAR paper sizes (tools/bench_baseline.py)
#   (a lent machine without grain / ml-collections: see tools/device_wheels.sh)
#
# 1. tools/gpu_kernel_sweep.py: the Triton and Mosaic GPU kernels' launch shapes at B=8,
#    L=2048, N=1024, each checked against associative and timed; the fastest correct
#    Triton one is exported (LRULM_PALLAS_GPU_TUNING) for the benchmark (the Mosaic GPU
#    kernels' tests have yet to pass on hardware: their rows are in the sweep's table);
# 2. tools/bench.py: the scan methods at the docs/design.md §4 size (B=8, L=2048, N=1024, the
#    planar form the kernels run, then complex64), an LRU layer (H=N=1024, 8 x 2048
#    bf16), the 350m train step at 8 x 2048 with associative vs pallas; then, on its own,
#    125m at 1 x 65536 (remat full, vocabulary-blocked loss) with each: does a 64k
#    context fit?
# 3. one 65,536-step sequence of 768 channels, unsplit and split in time; the Mosaic GPU
#    kernels' compiled tests; tests/test_scan_pallas{,_gpu}.py on the compiled kernels
#    (not the interpreters).
# Outputs go to $OUT if set, else a temporary folder: rc_MODE.txt, sweep.json,
# bench.json, long.json and logs_MODE.tgz (each step's log, repacked after every step:
# a lent machine returns at most 8 files, so the logs themselves stay outside $OUT). The
# step limits add up to 540 s, so that the summary is printed inside a 570 s call; it
# lists each test failure with its error, then the sweeps' and bench.py's tables. Each
# step has a time limit and the tools print or save as they go, so the script always
# reaches the tables with what was measured. Two modes may share one $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-full}
case $MODE in full | quick | baseline) ;; *) echo "usage: $0 [full|quick|baseline]" >&2; exit 2 ;; esac
OUT="${OUT:-$(mktemp -d)}"
LOGS=$(mktemp -d)  # packed into $OUT/logs_$MODE.tgz after each step
RC="$OUT/rc_$MODE.txt"
mkdir -p "$OUT"
rm -f "$RC"
BEST="${TMPDIR:-/tmp}/lrulm_best_tuning.txt"
rm -f "$BEST"
PY="${PYTHON:-python3}"
export JAX_PLATFORMS=cuda TF_CPP_MIN_LOG_LEVEL=3
# Keep XLA from taking 75% of the GPU up front, so the benchmarks' peak memory is real.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
# lrulm from this checkout (whatever PYTHONPATH the wheels were given), and tools/ for
# pytest's -p pytest_failures_at_once.
export PYTHONPATH="$PWD:$PWD/tools${PYTHONPATH:+:$PYTHONPATH}"

run() {  # run NAME SECONDS CMD...: logs to $LOGS/NAME.log, records the exit code
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*"
  local start=$SECONDS
  timeout -k 10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  echo "$name $rc $((SECONDS - start))" >>"$RC"
  tar czf "$OUT/logs_$MODE.tgz" -C "$LOGS" .
  tail -n 3 "$LOGS/$name.log"
  echo "   (exit $rc, $((SECONDS - start)) s)"
}

timeout 30 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader |
  tee "$LOGS/env.txt"
timeout 90 "$PY" -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$LOGS/env.txt"
# The train rows need grain and ml_collections (tools/device_wheels.sh): say now if they
# do not import (e.g. an older protobuf than grain's), not as failed rows minutes later.
timeout 90 "$PY" -c "import grain, ml_collections, lrulm.train; print('lrulm imports: ok')" 2>&1 |
  tail -n 1 | tee -a "$LOGS/env.txt"

if [ "$MODE" = baseline ]; then
  # The kernels' default launch shape (no sweep): each size compiles the reference once
  # and lrulm's step once per scan method (~10-20 s each on an H100).
  # JSON lines as each row is measured: a run cut off at its limit keeps what it timed.
  run baseline 170 "$PY" tools/bench_baseline.py --size listops,scifar --steps 10 \
    --scan_methods associative,pallas --json
  echo
  echo "== summary ($OUT)"
  read -r name rc secs <"$RC"
  echo "$name exit $rc, $secs s"
  "$PY" tools/bench_baseline.py --render "$LOGS/baseline.log" || tail -n 20 "$LOGS/baseline.log"
  rm -rf "$LOGS"
  exit 0
fi

# The kernel's launch shapes at the bench size, checked against associative; the fastest
# correct Triton one is exported so that the benchmark uses it.
if [ "$MODE" = quick ]; then sweep_s=(110 85); else sweep_s=(120 95); fi
run sweep "${sweep_s[0]}" "$PY" tools/gpu_kernel_sweep.py --budget_s "${sweep_s[1]}" \
  --json "$OUT/sweep.json" --best_out "$BEST" --best_kernel triton
if [ -s "$BEST" ]; then
  export LRULM_PALLAS_GPU_TUNING=$(cat "$BEST")
  echo "   LRULM_PALLAS_GPU_TUNING=$LRULM_PALLAS_GPU_TUNING"
fi
# The winner without its own time split: the long rows below need the automatic one.
tuning=${LRULM_PALLAS_GPU_TUNING:-32,1,128,prefetch}
tuning=${tuning%%,segments=*}
# pytest-xdist (when there) compiles in 8 processes; each takes GPU memory as it needs it.
# pytest-timeout (when there) ends a test that hangs, so that the step still reports
# which tests failed and why (xdist prints them only at the end).
parallel=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8")
per_test=$("$PY" -c "import pytest_timeout" 2>/dev/null && echo "--timeout 45")
# Each failure as it happens (tools/pytest_failures_at_once.py): a step cut off at its
# time limit still says which tests failed and why.
pytest_opts="-p no:cacheprovider -rfE --tb=short -p pytest_failures_at_once"
# The Mosaic GPU kernels' own tests, compiled: they have never passed on hardware
# (forward with resets and h0, the fused backward in float32 and bfloat16, a full a, two
# thread groups a program (halves=2), and the time split's Mosaic GPU case in
# test_scan_pallas_gpu.py).
tests_mosaic() {
  run tests_mosaic "$1" env PYTHONUNBUFFERED=1 LRULM_TEST_PALLAS_COMPILED=1 "$PY" -m pytest -q \
    $pytest_opts $parallel $per_test tests/test_scan_pallas_mosaic_gpu.py \
    tests/test_scan_pallas_gpu.py -k mosaic
}
if [ "$MODE" = quick ]; then
  run bench 80 "$PY" tools/bench.py --sections scan,lru --methods associative,pallas \
    --scan_methods associative,pallas --budget_s scan=35,lru=25 --json "$OUT/bench.json"
  tests_mosaic 60
else
  # Budgets: a section starts no new row after its budget (a row started just before it
  # runs on: its compiles take ~10-30 s); the timeout is the hard limit.
  run bench 175 "$PY" tools/bench.py --methods associative,pallas --presets 350m \
    --scan_methods associative,pallas --budget_s scan=35,lru=20,train=65 --json "$OUT/bench.json"
  # A 65,536-token context for 125m (remat full, vocabulary-blocked loss) with each scan:
  # does it fit, and how fast? A step of its own, so that the rows above cannot starve it.
  run long 100 env LRULM_PALLAS_GPU_TUNING="$tuning" "$PY" tools/bench.py --sections train \
    --presets "" --steps 2 --long 125m:65536:pallas,125m:65536:associative \
    --budget_s train=50 --json "$OUT/long.json"
  # One long sequence (125m's width): unsplit (segments=1) against the time split.
  run sweep_long 45 "$PY" tools/gpu_kernel_sweep.py --shape 1,65536,768 --repeats 3 --budget_s 30 \
    --configs "$tuning,segments=1 $tuning $tuning,segments=4 $tuning,segments=32"
  tests_mosaic 55
  # The kernels' code paths (resets, h0, reverse, ragged blocks, bf16, the time split) on
  # the hardware, with short chunks: each test compiles in seconds, where the full chunk
  # takes ~10 s a kernel (the sweep checked the chosen launch shape at full size).
  run tests 45 env PYTHONUNBUFFERED=1 LRULM_TEST_PALLAS_COMPILED=1 \
    LRULM_PALLAS_GPU_TUNING=32,1,16,prefetch "$PY" -m pytest -q $pytest_opts $parallel \
    $per_test tests/test_scan_pallas.py tests/test_scan_pallas_gpu.py
fi

echo
echo "== summary ($OUT)"
while read -r name rc secs; do
  case $rc in 0) status=ok ;; 124 | 137) status="TIMED OUT" ;; *) status="FAILED (exit $rc)" ;; esac
  printf '%-8s %s, %s s\n' "$name" "$status" "$secs"
done <"$RC"
for name in tests_mosaic tests; do  # the outcome line, then each failure and its error
  [ -f "$LOGS/$name.log" ] || continue
  echo "$name: $(tail -n 1 "$LOGS/$name.log")"
  grep -E '^(FAILED|ERROR) |^E ' "$LOGS/$name.log" | cut -c1-240 | head -n 30
done
echo
for name in sweep sweep_long; do  # the table, or (cut short) the rows logged as measured
  [ -f "$LOGS/$name.log" ] || continue
  grep -q '^device' "$LOGS/$name.log" && sed -n '/^device/,$p' "$LOGS/$name.log" ||
    grep '^|' "$LOGS/$name.log"
  echo
done
for name in bench long; do
  [ -f "$LOGS/$name.log" ] || continue
  if [ -s "$OUT/$name.json" ]; then
    "$PY" tools/bench.py --render "$OUT/$name.json"
  else
    echo "no $name results (see $name.log in $OUT/logs_$MODE.tgz)"
  fi
done
rm -rf "$LOGS"  # in logs_$MODE.tgz
