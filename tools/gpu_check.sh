#!/usr/bin/env bash
# GPU check of the Pallas recurrence kernel: compiled tests, then the benchmark table.
#
#   bash tools/gpu_check.sh    # on a CUDA machine; at most ~8 minutes on an H100
#   (a lent machine without grain / ml-collections: see tools/device_wheels.sh)
#
# 1. tests/test_scan_pallas.py on the compiled Triton kernel (not the interpreter);
# 2. tools/bench.py: every scan method at the DESIGN.md §4 size (B=8, L=2048, N=1024,
#    complex64, and the planar form where lrulm.scan has it), an LRU layer (H=N=1024,
#    8 x 2048 bf16), the 350m train step at 8 x 2048 with associative vs pallas, and 125m
#    at 1 x 65536 (remat full, vocabulary-blocked loss): does a 64k context fit?
# Outputs (logs, bench.json, bench.md) go to $OUT if set, else a temporary folder; the
# summary ends with bench.py's table. Each step has a time limit and bench.py rewrites its
# JSON after every row, so the script always reaches the table with what was measured.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
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
  echo "$rc $((SECONDS - start))" >"$OUT/$name.rc"
  tail -n 3 "$OUT/$name.log"
  echo "   (exit $rc, $((SECONDS - start)) s)"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import jax; print('jax', jax.__version__, jax.devices())" | tee "$OUT/jax.txt"

run tests 120 env LRULM_TEST_PALLAS_COMPILED=1 python -m pytest -q -p no:cacheprovider \
  tests/test_scan_pallas.py
# Budgets: a section starts no new row after its budget; the timeout is the hard limit.
run bench 330 python tools/bench.py --presets 350m --scan_methods associative,pallas \
  --long 125m:65536 --budget_s scan=60,lru=60,train=180 --json "$OUT/bench.json"

echo
echo "== summary ($OUT)"
for name in tests bench; do
  read -r rc secs <"$OUT/$name.rc"
  case $rc in 0) status=ok ;; 124) status="TIMED OUT" ;; *) status="FAILED (exit $rc)" ;; esac
  printf '%-8s %s, %s s\n' "$name" "$status" "$secs"
done
echo "tests: $(tail -n 1 "$OUT/tests.log")"
echo
if [ -s "$OUT/bench.json" ]; then
  python tools/bench.py --render "$OUT/bench.json" | tee "$OUT/bench.md"
else
  echo "no benchmark results (see $OUT/bench.log)"
fi
