# Sourced by the scripts here and in archive/ on the GPU machine, from the project root with .whl
# (make-wheelhouse.sh) and .device_pack carried (.device_pack/corpus.tar.xz: a tar of ../shared/data's
# tinyshakespeare, gutenberg and gutenberg-more folders). Installs the wheelhouse into /tmp/site, sets the
# environment (NVLink multicast off, as the machine requires), unpacks the corpus as ../shared/data and
# .gpu_data, and sets OUT (default /tmp/out).
# deepspeed (tools/device/add_deepspeed_wheels.sh) only with WITH_DEEPSPEED=1: once installed, accelerate and
# transformers import it on every save, and any import failure of it stops runs that never use it.
wheels=$(ls .whl/*.whl | { if [ "${WITH_DEEPSPEED:-0}" = 1 ]; then cat; else grep -v '/deepspeed-'; fi; })
if [ ! -f /tmp/site/.sdgrpo_installed ]; then  # once per machine: a second script sources this again
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels \
    && tar xzf .whl/unsloth_pkg.tgz -C /tmp/site && touch /tmp/site/.sdgrpo_installed || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks:$PWD/studies HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PATH=/tmp/site/bin:$PATH NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" .device_data ../shared
if [ -f .device_pack/corpus.tar.xz ] && [ ! -d .device_data/wikitext-2 ]; then  # the studies need it
  tar xJf .device_pack/corpus.tar.xz -C .device_data || exit 1
  ln -sfn "$PWD/.device_data" ../shared/data && ln -sfn "$PWD/.device_data" .gpu_data
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
