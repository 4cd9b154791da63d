#!/usr/bin/env bash
# GPU check of the Pallas recurrence kernel: launch-shape sweep, benchmark table, compiled
# tests.
#
#   bash tools/gpu_check.sh    # on a CUDA machine; at most ~9 minutes and a half on an H100
#   (a lent machine without grain / ml-collections: see tools/device_wheels.sh)
#
# 1. tools/gpu_kernel_sweep.py: the Triton kernel's launch shapes at B=8, L=2048, N=1024,
#    each checked against associative and timed; the fastest correct one is exported
#    (LRULM_PALLAS_GPU_TUNING) for the steps below;
# 2. tools/bench.py: every scan method at the DESIGN.md §4 size (B=8, L=2048, N=1024,
#    complex64, and the planar form), an LRU layer (H=N=1024, 8 x 2048 bf16), the 350m
#    train step at 8 x 2048 with associative vs pallas, and 125m at 1 x 65536 (remat full,
#    vocabulary-blocked loss) with each: does a 64k context fit?
# 3. tests/test_scan_pallas.py on the compiled Triton kernel (not the interpreter).
# Outputs go to $OUT if set, else a temporary folder: at most 8 files (env.txt, rc.txt,
# {sweep,bench,tests}.log, sweep.json, bench.json, bench.md). The summary ends with the
# sweep's and bench.py's tables. Each step has a time limit and both tools rewrite or
# print as they go, so the script always reaches the tables with what was measured.
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
# correct one is exported so that the benchmark and the compiled tests use it.
run sweep 130 "$PY" tools/gpu_kernel_sweep.py --budget_s 90 --json "$OUT/sweep.json" \
  --best_out "$BEST"
if [ -s "$BEST" ]; then
  export LRULM_PALLAS_GPU_TUNING=$(cat "$BEST")
  echo "   LRULM_PALLAS_GPU_TUNING=$LRULM_PALLAS_GPU_TUNING"
fi
# Budgets: a section starts no new row after its budget; the timeout is the hard limit.
run bench 290 "$PY" tools/bench.py --methods associative,chunked,pallas --presets 350m \
  --scan_methods associative,pallas --long 125m:65536:pallas,125m:65536:associative \
  --budget_s scan=45,lru=40,train=170 \
  --json "$OUT/bench.json"
run tests 90 env PYTHONUNBUFFERED=1 LRULM_TEST_PALLAS_COMPILED=1 "$PY" -m pytest -q -p no:cacheprovider -rfE \
  tests/test_scan_pallas.py

echo
echo "== summary ($OUT)"
while read -r name rc secs; do
  case $rc in 0) status=ok ;; 124) status="TIMED OUT" ;; *) status="FAILED (exit $rc)" ;; esac
  printf '%-8s %s, %s s\n' "$name" "$status" "$secs"
done <"$OUT/rc.txt"
echo "tests: $(tail -n 1 "$OUT/tests.log")"
echo
sed -n '/^device/,$p' "$OUT/sweep.log"
echo
if [ -s "$OUT/bench.json" ]; then
  "$PY" tools/bench.py --render "$OUT/bench.json" | tee "$OUT/bench.md"
else
  echo "no benchmark results (see $OUT/bench.log)"
fi
