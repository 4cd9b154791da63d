#!/usr/bin/env bash
# GPU check of the Pallas recurrence kernel: compiled tests, scan and training benchmarks.
#
#   bash tools/gpu_check.sh    # on a CUDA machine; at most ~8 minutes on an H100
#
# 1. tests/test_scan_pallas.py on the compiled Triton kernel (not the interpreter);
# 2. tools/bench_scan.py at the DESIGN.md §4 size (B=8, L=2048, N=1024, complex64);
# 3. tools/bench_train.py --preset 350m --batch 8 --seq_len 2048, associative vs pallas.
# Outputs (logs, JSON) go to $OUT if set, else a temporary folder; a compact table ends
# the run. Each step has a time limit, so the script always reaches the table.
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
# lax.scan (sequential) is left out: 30-55 ms per call at this size (DESIGN.md §4).
run bench_scan 120 python tools/bench_scan.py --B 8 --L 2048 --N 1024 \
  --methods associative,chunked,pallas --json "$OUT/bench_scan.json"
for method in associative pallas; do
  run "train_$method" 110 python tools/bench_train.py --preset 350m --batch 8 --seq_len 2048 \
    --scan_method "$method" --json "$OUT/train_$method.json"
done

python - "$OUT" <<'EOF'
import json, pathlib, sys

out = pathlib.Path(sys.argv[1])
read = lambda name: json.loads((out / name).read_text()) if (out / name).exists() else None
print(f"\n== summary ({out})")
for name in ("tests", "bench_scan", "train_associative", "train_pallas"):
    rc, secs = (out / f"{name}.rc").read_text().split()
    status = {"0": "ok", "124": "TIMED OUT"}.get(rc, f"FAILED (exit {rc})")
    print(f"{name:18s} {status}, {secs} s")
log = (out / "tests.log").read_text().strip().splitlines()
print("tests:", log[-1] if log else "no output")
scan = read("bench_scan.json")
if scan:
    print(f"\nscan on {scan['device']}, B={scan['B']} L={scan['L']} N={scan['N']} complex64, "
          f"copy {scan['copy_GBps']:.0f} GB/s, floors fwd {scan['floor_fwd_ms']:.3f} ms, "
          f"fwd+bwd {scan['floor_fwd_bwd_ms']:.3f} ms")
    print(f"{'method':12s} {'grad':10s} {'fwd ms':>8s} {'% copy':>7s} {'f+b ms':>8s} {'% copy':>7s}")
    for r in scan["rows"]:
        fwd = "-" if r["fwd_ms"] is None else f"{r['fwd_ms']:.3f}"
        fpct = "-" if r["fwd_ms"] is None else f"{r['fwd_pct_copy']:.0f}%"
        print(f"{r['method']:12s} {r['grad']:10s} {fwd:>8s} {fpct:>7s} "
              f"{r['fwd_bwd_ms']:8.3f} {r['fwd_bwd_pct_copy']:6.0f}%")
print(f"\n{'train 350m b8 L2048':20s} {'step ms':>8s} {'tokens/s':>10s} {'MFU':>6s} {'temp GiB':>9s}")
for method in ("associative", "pallas"):
    r = read(f"train_{method}.json")
    if r:
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
        temp = (r.get("temp_bytes_per_device") or 0) / 2**30
        print(f"{method:20s} {r['step_time_ms']:8.1f} {r['tokens_per_s']:10,.0f} {mfu:>6s} "
              f"{temp:9.2f}")
    else:
        print(f"{method:20s} no result (see {out}/train_{method}.log)")
EOF
