#!/usr/bin/env bash
# GPU machine, alone on the GPU (timings): benchmarks/tune_gemlite.py, gemlite's split-K kernel tuned for a shape's
# projections at the engine's row counts (8, 32 and 16 rows by default; TUNE_SECONDS of search in all). Writes
# $OUT/tune_gemlite_<shape>_<device>_<date>.json and $OUT/gemlite_<card>.json (the winners: what
# src/sdgrpo/assets/gemlite/ ships). Carry .whl (with gemlite's wheel).
set -u
source tools/device/env.sh
start=$(date +%s)
timeout $(( ${TUNE_SECONDS:-300} + 120 )) python3 benchmarks/tune_gemlite.py "$OUT" "${SHAPE:-qwen2.5-7b}" \
  > "$OUT/tune_gemlite.log" 2>&1
echo "tune_gemlite rc=$? after $(( $(date +%s) - start )) s"
grep -v '^{' "$OUT/tune_gemlite.log" | tail -8
python3 - "$OUT" <<'PY'
import json, sys, glob
for f in sorted(glob.glob(sys.argv[1] + "/tune_gemlite_*.json")):
    d = json.load(open(f))
    for r in d["results"]:
        print(r["rows"], r["projection"], round(r["shipped_ms"], 4), "->", round(r["best_ms"], 4), r["best"],
              "tried", r["tried"], "failed", r["failed"], "diff", f'{r["max_rel_diff_vs_shipped"]:.1e}')
    print(d["summary_ms_per_token_step"])
PY
# kept on this machine for a bench_step call that follows (tools/device/README.md): cp it to
# src/sdgrpo/assets/gemlite/<card>.json there
mkdir -p /tmp/tuned && cp "$OUT"/gemlite_*.json /tmp/tuned/ 2>/dev/null
