#!/usr/bin/env bash
# GPU machine, one call: benchmarks/bench_step.py on the 1.5B shape, the engine (sdgrpo_hf) against generate
# (sdgrpo_hf_generate) and Unsloth (sdgrpo_unsloth). Carry .whl and .device_pack. Results to $OUT.
set -u
source tools/device/env.sh
BENCH_STEPS=${BENCH_STEPS:-4} timeout "${BENCH_SECONDS:-540}" python3 benchmarks/bench_step.py "$OUT" \
  "${SHAPE:-qwen2.5-1.5b}" ${VARIANTS:-sdgrpo_hf sdgrpo_hf_generate sdgrpo_unsloth} 2>&1 | grep "^{" | cut -c1-600
ls "$OUT"
