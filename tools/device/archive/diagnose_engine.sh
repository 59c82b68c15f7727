#!/usr/bin/env bash
# GPU machine, one call: bench_step.py (1.5B shape, per-phase timers and per-step diagnostics: garbage collection,
# allocator mallocs, graphs compiled) for the engine and generate, then bench_generate.py on the 1.5B shape (the
# engine in reduce-overhead and max-autotune modes, and a torch.profiler table of one engine call). Carry .whl and
# .device_pack. Results come back packed in $OUT/diag.tar.
set -u
source tools/device/env.sh
W=/tmp/diag2 && mkdir -p $W/step $W/generate
BENCH_STEPS=${BENCH_STEPS:-10} timeout "${STEP_SECONDS:-300}" python3 benchmarks/bench_step.py $W/step \
  "${SHAPE:-qwen2.5-1.5b}" ${VARIANTS:-sdgrpo_hf sdgrpo_hf_generate} 2>&1 | grep "^{" | cut -c1-400
tar cf "$OUT/diag.tar" -C $W .
BENCH_PROFILE=1 BENCH_VARIANTS="${GEN_VARIANTS:-engine engine_autotune}" timeout "${GEN_SECONDS:-240}" \
  python3 benchmarks/bench_generate.py $W/generate "${SHAPE:-qwen2.5-1.5b}" 2>&1 | grep -v Warning | tail -8
tar cf "$OUT/diag.tar" -C $W .
