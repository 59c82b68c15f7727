#!/usr/bin/env bash
# GPU machine, one call: rerun the Unsloth reuse test on the real-shape model, then the step benchmark (0.5B shape).
# Carry .whl and .device_pack. Results to $OUT.
set -u
source tools/device/env.sh
timeout "${TEST_SECONDS:-150}" python3 -m pytest -m gpu -q -rf --tb=short -p no:cacheprovider \
  -k "${PYTEST_K:-reuse and qwen}" tests/gpu/test_gpu.py > "$OUT/pytest_gpu.log" 2>&1
tail -25 "$OUT/pytest_gpu.log"
BENCH_STEPS=${BENCH_STEPS:-3} timeout "${BENCH_SECONDS:-420}" python3 benchmarks/bench_step.py "$OUT" \
  "${SHAPE:-qwen2.5-0.5b}" ${VARIANTS:-sdgrpo_unsloth unsloth_bare sdgrpo_hf trl_plain sdgrpo_hf_cb sdgrpo_hf_compile}
