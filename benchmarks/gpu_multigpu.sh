#!/usr/bin/env bash
# GPU machine with 2 GPUs (device kind nvidia-h100-x2): the multi-GPU throughput benchmark. Carry .whl, .device_pack.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && tar xzf .whl/unsloth_pkg.tgz -C /tmp/site || exit 1
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PATH=/tmp/site/bin:$PATH
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" .device_data && tar xJf .device_pack/corpus.tar.xz -C .device_data && ln -sfn "$PWD/.device_data" .gpu_data
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 benchmarks/bench_multigpu.py "$OUT" "${SHAPE:-qwen2.5-1.5b}" "${COMPLETION:-256}" "${STEPS:-4}"
