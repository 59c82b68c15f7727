#!/usr/bin/env bash
# GPU machine (4 GPUs), one call: the in-context pretraining sweep. Needs .device_pack/corpus.tar.xz carried (a tar
# of ../shared/data's tinyshakespeare, gutenberg, gutenberg-more and wikitext-2 folders; see README.md here).
# No wheels: pretraining needs only torch, transformers and tokenizers, which the machine has.
set -u
export PYTHONPATH=$PWD/src HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" .device_data && tar xJf .device_pack/corpus.tar.xz -C .device_data || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
GPUS=$(nvidia-smi -L | wc -l) python3 studies/archive/pretrain_incontext_sweep.py .device_data "$OUT" ${CANDIDATES:-}
