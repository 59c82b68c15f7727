#!/usr/bin/env bash
# GPU machine, one call: the engine's GPU test, benchmarks/bench_generate.py (decoding speed against generate and the
# bandwidth limit; BENCH_PROFILE=1 adds a torch.profiler table of one engine call), then benchmarks/bench_step.py
# for the engine (STEP_VARIANTS; none to skip). Carry .whl and .device_pack. Results come back in $OUT/engine.tar.
set -u
source tools/device/env.sh
W=/tmp/engine && mkdir -p $W/generate $W/step
timeout "${TEST_SECONDS:-240}" python3 -m pytest -m gpu -q -rA -s --tb=short -p no:cacheprovider \
  -k "${PYTEST_K:-engine}" tests/gpu/test_gpu.py > "$W/pytest_gpu_engine.log" 2>&1
tail -6 "$W/pytest_gpu_engine.log"
timeout "${BENCH_SECONDS:-300}" python3 benchmarks/bench_generate.py $W/generate ${SHAPES:-qwen2.5-0.5b qwen2.5-1.5b} \
  2>&1 | grep -v Warning | grep "^qwen\|^profile\|^copy\|Error" | cut -c1-300
tar cf "$OUT/engine.tar" -C $W .
if [ -n "${STEP_VARIANTS-sdgrpo_hf}" ]; then
  BENCH_STEPS=${BENCH_STEPS:-8} timeout "${STEP_SECONDS:-240}" python3 benchmarks/bench_step.py $W/step \
    "${SHAPE:-qwen2.5-1.5b}" ${STEP_VARIANTS-sdgrpo_hf} 2>&1 | grep "^{" | cut -c1-300
  tar cf "$OUT/engine.tar" -C $W .
fi
