#!/usr/bin/env bash
# GPU machine, one call: the int4 / 4-bit GPU tests, then the step benchmark on the Qwen2.5-7B shape (vocabulary
# 152,064) under a 24 GiB cap for the given variants. Carry .whl. Results to $OUT. The tests are stopped by SIGINT
# at GPU_SECONDS, so that pytest still prints what passed and failed.
set -u
source tools/device/env.sh
start=$(date +%s)
timeout -s INT "${GPU_SECONDS:-240}" python3 -m pytest -m gpu -q -rA --tb=short -p no:cacheprovider -n "${WORKERS:-3}" -s \
  -k "${PYTEST_K:-int4 or 4bit}" tests/gpu/test_gpu.py > "$OUT/pytest_gpu.log" 2>&1
grep -E "engine token|PASSED|FAILED|ERROR|passed|failed" "$OUT/pytest_gpu.log" | tail -25
echo "gpu tests wall seconds: $(( $(date +%s) - start ))"
BENCH_VOCAB=real BENCH_CAP_GIB=${CAP:-24} BENCH_STEPS=${BENCH_STEPS:-4} timeout "${BENCH_SECONDS:-420}" \
  python3 benchmarks/bench_step.py "$OUT" "${SHAPE:-qwen2.5-7b}" ${VARIANTS:-sdgrpo_hf sdgrpo_hf_4bit} \
  > "$OUT/bench.log" 2>&1
python3 - "$OUT" <<'PY'
import json, sys, glob
for f in sorted(glob.glob(sys.argv[1] + "/bench_step_partial_*.json")):
    r = json.load(open(f))
    print(r["variant"], {k: r.get(k) for k in ("step_s", "generation_s", "peak_gpu_gib", "engine_mode",
                                               "mismatch_mean", "wall_s")}, (r.get("error") or "")[-600:])
PY
grep -h "decoding engine\|rollouts corrected" "$OUT"/bench_step_*.stderr.log 2>/dev/null | sort | uniq -c | cut -c1-400
echo "total wall seconds: $(( $(date +%s) - start ))"
