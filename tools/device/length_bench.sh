#!/usr/bin/env bash
# GPU machine, one call: peak memory and step time against completion length (bench_step.py, real vocabulary, no
# cap unless a variant names one), then the PNG (benchmarks/plot_length.py). SHAPE (default qwen2.5-7b); LENGTHS
# (default 512 1024 2048 4096) for each variant stem in STEMS (default: the 4-bit base decoded as it is, with the
# plan's auto offloading and tiling forced on, and both off); EXTRA: whole variants added as they are (e.g.
# 'unsloth_bare_4bit+len2048'). BENCH_STEPS (default 2: 1 warm-up + 1 timed). Carry .whl.
set -u
source tools/device/env.sh
start=$(date +%s)
stems=${STEMS:-sdgrpo_hf_4bit+model+offload+tile sdgrpo_hf_4bit+model+plain}
variants=""
for stem in $stems; do for n in ${LENGTHS:-512 1024 2048 4096}; do variants="$variants $stem+len$n"; done; done
TAG=${TAG:-len} CAP= BENCH_STEPS=${BENCH_STEPS:-2} BENCH_VARIANT_SECONDS=${BENCH_VARIANT_SECONDS:-150} \
  BENCH_SECONDS=$(( ${TOTAL_SECONDS:-560} - ($(date +%s) - start) )) VARIANTS="$variants ${EXTRA:-}" \
  bash tools/device/bench_24gb.sh 2>&1 | tail -40
python3 benchmarks/plot_length.py "$OUT/length_${SHAPE:-qwen2.5-7b}.png" /tmp/bench_${TAG:-len}/bench_step_*.json \
  && echo "plot: $OUT/length_${SHAPE:-qwen2.5-7b}.png"
echo "total wall seconds: $(( $(date +%s) - start ))"
