#!/usr/bin/env bash
# GPU machine, one call: pretrain the distillation teacher (background) while the GPU tests run.
# Carry .whl (make-wheelhouse.sh) and .device_pack (corpus.tar.xz of ../shared/data's three book folders).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && tar xzf .whl/unsloth_pkg.tgz -C /tmp/site || exit 1
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" .device_data ../shared && tar xJf .device_pack/corpus.tar.xz -C .device_data
ln -sfn "$PWD/.device_data" ../shared/data
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
( python3 benchmarks/pretrain_teacher.py .device_data /tmp/teacher_out > "$OUT/teacher.log" 2>&1
  cp /tmp/teacher_out/teacher_sweep.json "$OUT/"
  tar cf - -C /tmp/teacher_out teacher | split -b 15M - "$OUT/teacher.tar.part-" ) &
timeout "${TEST_SECONDS:-470}" python3 -m pytest -m gpu -q -rf --tb=short -p no:cacheprovider ${PYTEST_K:+-k "$PYTEST_K"} tests/test_gpu.py 2>&1 \
  | tee "$OUT/pytest_gpu.log" | tail -40
wait
tail -5 "$OUT/teacher.log"
