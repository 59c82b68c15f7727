#!/usr/bin/env bash
# GPU machine, one call: (1) the distillation study's undertrained students (pretrain_incontext_sweep.py candidates
# student-h128-l4-1k and -3k, both on GPU 0), then (2) bench_step.py on the 1.5B shape with the per-phase timers,
# the engine against generate, BENCH_STEPS (default 8) steps each. Carry .whl and .device_pack. Everything comes
# back packed in $OUT/students.tar and $OUT/step.tar (a call returns at most 8 files).
set -u
source tools/device/env.sh
W=/tmp/diag && mkdir -p $W/students $W/step
if [ -n "${CANDIDATES-student-h128-l4-1k,student-h128-l4-3k}" ]; then
  GPUS=1 timeout 300 python3 studies/archive/pretrain_incontext_sweep.py .device_data $W/students \
    ${CANDIDATES-student-h128-l4-1k,student-h128-l4-3k} 2>&1 | tail -4
  tar cf "$OUT/students.tar" -C $W students
fi
BENCH_STEPS=${BENCH_STEPS:-8} timeout "${BENCH_SECONDS:-420}" python3 benchmarks/bench_step.py $W/step \
  "${SHAPE:-qwen2.5-1.5b}" ${VARIANTS:-sdgrpo_hf sdgrpo_hf_generate} 2>&1 | grep "^{" | cut -c1-900
tar cf "$OUT/step.tar" -C $W step
ls -la "$OUT"
