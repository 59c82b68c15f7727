#!/usr/bin/env bash
# GPU machine, one call: the GPU tests (benchmarks/gpu_suite.py: a results file), then the whole CPU test suite with
# the GPUs hidden (as CI runs it, but on 16 cores with pytest-xdist). Carry .whl (../shared/device/make-wheelhouse.sh).
# Logs to $OUT.
# CPU_ONLY=1: the CPU suite alone; GPU_ONLY=1: the GPU tests alone.
set -u
source tools/device/env.sh
if [ "${CPU_ONLY:-0}" != 1 ]; then
  # six workers on the one GPU (30 tests in 286 s on one H100, 2026-12-07; eight were slower: 29 of 34 done at 330 s):
  # the tests are independent subprocesses, each far from filling the card. The suite's record (counts, wall time,
  # each test's time) is $OUT/gpu_tests_<device>_<date>.json (benchmarks/gpu_suite.py).
  python3 benchmarks/gpu_suite.py "$OUT" --workers "${GPU_WORKERS:-6}" --timeout "${GPU_SECONDS:-400}" \
    ${PYTEST_K:+-k "$PYTEST_K"} 2>&1 | tee "$OUT/pytest_gpu.log" | tail -30
fi
if [ "${GPU_ONLY:-0}" != 1 ]; then
  CUDA_VISIBLE_DEVICES= timeout "${CPU_SECONDS:-420}" python3 -m pytest -q -p no:cacheprovider -n "${WORKERS:-12}" \
    --durations=10 -m "not gpu" tests 2>&1 | tee "$OUT/pytest_cpu.log" | tail -30
fi
