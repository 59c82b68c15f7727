#!/usr/bin/env bash
# GPU machine, one call: the engine's GPU test, then benchmarks/bench_generate.py (decoding speed against generate
# and the bandwidth limit, both Qwen2.5 shapes). Carry .whl and .device_pack. Results to $OUT.
set -u
source benchmarks/device/env.sh
timeout "${TEST_SECONDS:-240}" python3 -m pytest -m gpu -q -rf -s --tb=short -p no:cacheprovider \
  -k "${PYTEST_K:-engine}" tests/gpu/test_gpu.py > "$OUT/pytest_gpu_engine.log" 2>&1
tail -15 "$OUT/pytest_gpu_engine.log"
timeout "${BENCH_SECONDS:-420}" python3 benchmarks/bench_generate.py "$OUT" ${SHAPES:-qwen2.5-0.5b qwen2.5-1.5b} 2>&1 \
  | grep -v Warning | tail -40
