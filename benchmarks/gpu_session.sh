#!/usr/bin/env bash
# One GPU-machine session: install the wheelhouse, run the reward benchmark and the GPU tests, results to $OUT.
# Run from the project root on the device machine with .whl (make-wheelhouse.sh) and .device_pack carried;
# .device_pack/corpus.tar.xz is a tar of ../shared/data's tinyshakespeare, gutenberg and gutenberg-more folders.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && tar xzf .whl/unsloth_pkg.tgz -C /tmp/site || exit 1
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" .device_data ../shared && tar xJf .device_pack/corpus.tar.xz -C .device_data
ln -sfn "$PWD/.device_data" ../shared/data && ln -sfn "$PWD/.device_data" .gpu_data
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 benchmarks/bench_reward.py "$OUT" 2>&1 | tail -40
python3 -m pytest -m gpu -q -rf --tb=short -p no:cacheprovider ${PYTEST_K:+-k "$PYTEST_K"} tests/test_gpu.py 2>&1 \
  | tee "$OUT/pytest_gpu.log" | tail -40
