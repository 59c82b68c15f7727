#!/usr/bin/env bash
# One GPU-machine call: the reward benchmark and the GPU tests, results to $OUT. Carry .whl and .device_pack.
set -u
source tools/device/env.sh
python3 benchmarks/bench_reward.py "$OUT" 2>&1 | tail -40
python3 -m pytest -m gpu -q -rf --tb=short -p no:cacheprovider ${PYTEST_K:+-k "$PYTEST_K"} tests/gpu/test_gpu.py 2>&1 \
  | tee "$OUT/pytest_gpu.log" | tail -40
