#!/usr/bin/env bash
# GPU machine with 2 GPUs (device kind nvidia-h100-x2): the multi-GPU throughput benchmark. Carry .whl, .device_pack.
set -u
source tools/device/env.sh
python3 benchmarks/bench_multigpu.py "$OUT" "${SHAPE:-qwen2.5-1.5b}" "${COMPLETION:-256}" "${STEPS:-4}"
