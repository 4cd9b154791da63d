#!/usr/bin/env bash
# GPU check of the Pallas recurrence kernels (Triton and Mosaic GPU): launch-shape sweeps,
# the benchmark table, compiled tests.
#
#   bash tools/gpu_check.sh    # on a CUDA machine; at most ~10 minutes
#   (a lent machine without grain / ml-collections: see tools/device_wheels.sh)
#
# 1. tools/gpu_kernel_sweep.py: the Triton and Mosaic GPU kernels' launch shapes at B=8,
#    L=2048, N=1024, each checked against associative and timed; the fastest correct one
#    is exported (LRULM_PALLAS_GPU_TUNING) for the benchmark; the Mosaic GPU kernels'
#    compiled tests; then one 65,536-step sequence of 768 channels unsplit and split in
#    time;
# 2. tools/bench.py: the scan methods at the DESIGN.md §4 size (B=8, L=2048, N=1024,
#    complex64, and the planar form), an LRU layer (H=N=1024, 8 x 2048 bf16), the 350m
#    train step at 8 x 2048 with associative vs pallas, and 125m at 1 x 65536 (remat full,
#    vocabulary-blocked loss) with each: does a 64k context fit?
# 3. tests/test_scan_pallas{,_gpu}.py on the compiled kernels (not the interpreters).
# Outputs go to $OUT if set, else a temporary folder: 9 files (env.txt, rc.txt,
# {sweep,tests_mosaic,sweep_long,bench,tests}.log, sweep.json, bench.json). The step
# limits add up to 550 s, so that the summary is printed inside a 570 s call. The summary ends with the
# sweeps' and bench.py's tables. Each step has a time limit and the tools print or save
# as they go, so the script always reaches the tables with what was measured.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
BEST="${TMPDIR:-/tmp}/lrulm_best_tuning.txt"
rm -f "$BEST"
PY="${PYTHON:-python3}"
export JAX_PLATFORMS=cuda TF_CPP_MIN_LOG_LEVEL=3
# Keep XLA from taking 75% of the GPU up front, so the benchmarks' peak memory is real.
export XLA_PYTHON_CLIENT_PREALLOCATE=false

run() {  # run NAME SECONDS CMD...: logs to $OUT/NAME.log, records the exit code
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*"
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name $rc $((SECONDS - start))" >>"$OUT/rc.txt"
  tail -n 3 "$OUT/$name.log"
  echo "   (exit $rc, $((SECONDS - start)) s)"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/env.txt"
"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$OUT/env.txt"

# The kernel's launch shapes at the bench size, checked against associative; the fastest
# correct one is exported so that the benchmark uses it.
run sweep 130 "$PY" tools/gpu_kernel_sweep.py --budget_s 105 --json "$OUT/sweep.json" --best_out "$BEST"
if [ -s "$BEST" ]; then
  export LRULM_PALLAS_GPU_TUNING=$(cat "$BEST")
  echo "   LRULM_PALLAS_GPU_TUNING=$LRULM_PALLAS_GPU_TUNING"
fi
# The Mosaic GPU kernels' own tests, compiled, first: they have never run on hardware
# (forward with resets and h0, the fused backward in float32 and bfloat16, a full a, two
# thread groups a program (halves=2), the time split).
parallel=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8")
run tests_mosaic 60 env PYTHONUNBUFFERED=1 LRULM_TEST_PALLAS_COMPILED=1 "$PY" -m pytest -q \
  -p no:cacheprovider -rfE $parallel tests/test_scan_pallas_gpu.py -k mosaic
# One long sequence (125m's width): unsplit (segments=1) against the time split.
tuning=${LRULM_PALLAS_GPU_TUNING:-32,1,128,prefetch}
tuning=${tuning%%,segments=*}
run sweep_long 70 "$PY" tools/gpu_kernel_sweep.py --shape 1,65536,768 --repeats 3 --budget_s 55 \
  --configs "$tuning,segments=1 $tuning $tuning,segments=4 $tuning,segments=32"
# Budgets: a section starts no new row after its budget; the timeout is the hard limit.
run bench 240 "$PY" tools/bench.py --methods associative,chunked,pallas --presets 350m \
  --scan_methods associative,pallas --long 125m:65536:pallas,125m:65536:associative \
  --budget_s scan=40,lru=25,train=150 --json "$OUT/bench.json"
# The kernels' code paths (resets, h0, reverse, ragged blocks, bf16, the time split) on
# the hardware, with short chunks: each test compiles in seconds, where the full chunk
# takes ~10 s a kernel (the sweep checked the chosen launch shape at full size).
# pytest-xdist (when there) compiles in 8 processes; each takes GPU memory as it needs it.
run tests 50 env PYTHONUNBUFFERED=1 LRULM_TEST_PALLAS_COMPILED=1 \
  LRULM_PALLAS_GPU_TUNING=32,1,16,prefetch "$PY" -m pytest -q -p no:cacheprovider -rfE \
  $parallel tests/test_scan_pallas.py tests/test_scan_pallas_gpu.py

echo
echo "== summary ($OUT)"
while read -r name rc secs; do
  case $rc in 0) status=ok ;; 124) status="TIMED OUT" ;; *) status="FAILED (exit $rc)" ;; esac
  printf '%-8s %s, %s s\n' "$name" "$status" "$secs"
done <"$OUT/rc.txt"
echo "tests_mosaic: $(tail -n 1 "$OUT/tests_mosaic.log")"
echo "tests: $(tail -n 1 "$OUT/tests.log")"
echo
for name in sweep sweep_long; do  # the table, or (cut short) the rows logged as measured
  grep -q '^device' "$OUT/$name.log" && sed -n '/^device/,$p' "$OUT/$name.log" ||
    grep '^|' "$OUT/$name.log"
  echo
done
if [ -s "$OUT/bench.json" ]; then
  "$PY" tools/bench.py --render "$OUT/bench.json"
else
  echo "no benchmark results (see $OUT/bench.log)"
fi
