#!/usr/bin/env bash
# GPU machine, one call: gemlite's path checked (DIAG, default .diag/diag_gemlite.py, where carried; then its GPU tests) while the
# 7B model is made, then bench_step's 7B rows under a 24 GiB cap (VARIANTS), timed alone. Carry .whl.
set -u
source tools/device/env.sh
start=$(date +%s)
bash tools/device/make_7b.sh > "$OUT/make_7b.log" 2>&1 &
maker=$!
diag=${DIAG:-.diag/diag_gemlite.py}
[ -f "$diag" ] && timeout "${DIAG_SECONDS:-150}" python3 "$diag" 2>&1 | grep -v -i warn | tail -25
timeout "${TEST_SECONDS:-200}" python3 -m pytest -q -s -m gpu -p no:cacheprovider tests/gpu/test_gpu.py \
  -k "${TESTS:-gemlite}" > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests rc=$? after $(( $(date +%s) - start )) s"; grep -E "argmax|passed|failed|^E " "$OUT/gpu_tests.log" | head -20
wait $maker
TAG=c CAP=24 BENCH_STEPS=${BENCH_STEPS:-4} BENCH_VARIANT_SECONDS=${BENCH_VARIANT_SECONDS:-140} \
  BENCH_SECONDS=$(( ${TOTAL_SECONDS:-540} - ($(date +%s) - start) )) bash tools/device/bench_24gb.sh 2>&1 | tail -12
echo "total wall seconds: $(( $(date +%s) - start ))"
