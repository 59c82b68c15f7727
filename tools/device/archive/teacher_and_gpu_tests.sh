#!/usr/bin/env bash
# GPU machine, one call: pretrain the distillation teacher (background) while the GPU tests run.
# TEACHERS: comma-separated candidate names of studies/archive/pretrain_teacher.py (default: all of them).
# Carry .whl and .device_pack. Results to $OUT.
set -u
source tools/device/env.sh
( python3 studies/archive/pretrain_teacher.py .device_data /tmp/teacher_out ${TEACHERS:-} > "$OUT/teacher.log" 2>&1
  cp /tmp/teacher_out/teacher_sweep.json "$OUT/"
  tar cf - -C /tmp/teacher_out teacher | split -b 15M - "$OUT/teacher.tar.part-" ) &
if [ "${TEST_SECONDS:-470}" != 0 ]; then  # TEST_SECONDS=0: the teacher alone
  timeout "${TEST_SECONDS:-470}" python3 -m pytest -m gpu -q -rf --tb=short -p no:cacheprovider \
    ${PYTEST_K:+-k "$PYTEST_K"} tests/gpu/test_gpu.py 2>&1 | tee "$OUT/pytest_gpu.log" | tail -40
fi
wait
tail -5 "$OUT/teacher.log"
