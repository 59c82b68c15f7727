#!/usr/bin/env bash
# Add DeepSpeed and the dependencies the GPU machine lacks to the wheelhouse (./.whl, from
# ../shared/device/make-wheelhouse.sh), for Python 3.12 / x86_64: about 3 MB. deepspeed ships only an sdist; it is
# built here without its CUDA ops (they are compiled on first use where needed) into a py3-none-any wheel.
# pydantic (which deepspeed imports) needs annotated-types, typing-inspection and a newer typing-extensions than the
# GPU image may have (the first two it lacks; an earlier run saw `No module named typing_inspection` there): without
# them, importing deepspeed fails there, and accelerate and transformers import it whenever it is installed.
# Then e.g.: WITH_DEEPSPEED=1 BENCH_RUNS=1gpu_nocompile,zero2_2gpu,zero3_2gpu bash tools/device/multigpu.sh (device kind
# nvidia-h100-x2; device/env.sh leaves deepspeed out unless WITH_DEEPSPEED=1).
set -euo pipefail
out=${1:-.whl}
tmp=$(mktemp -d)
python3 -m pip download -q --no-deps --no-binary=deepspeed deepspeed==0.19.8 -d "$tmp" 2>&1 | grep -v WARNING || true
python3 -m pip wheel -q --no-deps "$tmp"/deepspeed-0.19.8.tar.gz -w "$out" 2>&1 | grep -v WARNING || true
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d "$out" \
  einops==0.8.2 hjson==3.1.0 msgpack==1.2.4 ninja==1.13.2 py-cpuinfo==9.0.0 annotated-types==0.7.0 \
  typing-inspection==0.4.5 typing-extensions==4.16.0 2>&1 | grep -v WARNING || true
rm -rf "$tmp"
ls "$out" | grep -E "deepspeed|einops|hjson|msgpack|ninja|cpuinfo|annotated|typing"
