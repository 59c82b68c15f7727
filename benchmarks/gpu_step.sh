#!/usr/bin/env bash
# GPU machine: install the wheelhouse and run the step benchmark; results to $OUT (or benchmarks/results).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && tar xzf .whl/unsloth_pkg.tgz -C /tmp/site || exit 1
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 benchmarks/bench_step.py "${OUT:-benchmarks/results}" "$@"
