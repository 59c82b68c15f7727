#!/usr/bin/env bash
# GPU machine: benchmarks/bench_step.py for VARIANTS on SHAPE (VOCAB=real: its own vocabulary, else 32k) under a CAP GiB memory cap (empty:
# none), written to /tmp/bench_<tag>; its results JSON, the bench log and each variant's stderr log and metrics file
# come back as one tar in $OUT (a call returns at most 8 files). A second call on the same warm machine reuses the
# random model made by the first (BENCH_WORK=/tmp/bench_step). Carry .whl.
set -u
source tools/device/env.sh
tag=${TAG:-run}; work=/tmp/bench_$tag; mkdir -p "$work"
start=$(date +%s)
BENCH_VOCAB=${VOCAB:-real} BENCH_CAP_GIB=${CAP-24} BENCH_STEPS=${BENCH_STEPS:-4} BENCH_VARIANT_SECONDS=${BENCH_VARIANT_SECONDS:-260} \
  BENCH_TAG=${BENCH_TAG:-} timeout "${BENCH_SECONDS:-540}" python3 benchmarks/bench_step.py "$work" "${SHAPE:-qwen2.5-7b}" \
  ${VARIANTS:-sdgrpo_hf_4bit sdgrpo_hf} > "$work/bench_$tag.log" 2>&1
python3 - "$work" <<'PY'
import json, sys, glob
for f in sorted(glob.glob(sys.argv[1] + "/bench_step_*.json")):
    for r in json.load(open(f))["results"]:
        print(r["variant"], {k: r.get(k) for k in ("step_s", "generation_s", "peak_gpu_gib", "engine_mode",
                                                   "mismatch_mean", "wall_s")}, (r.get("error") or "")[-400:])
        print("   ", {k: v for k, v in (r.get("logged") or {}).items() if v is not None})
PY
grep -h "decoding engine\|rollouts corrected\|Unsloth's loss\|rollout correction" "$work"/bench_step_*.stderr.log 2>/dev/null \
  | sort | uniq -c | cut -c1-300
(cd "$work" && tar cf "$OUT/bench_$tag.tar" $(ls *.json *.log 2>/dev/null) $(find . -name metrics.jsonl))
echo "total wall seconds: $(( $(date +%s) - start ))"
