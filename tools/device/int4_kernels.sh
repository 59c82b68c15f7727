#!/usr/bin/env bash
# GPU machine: the 4-bit decoding study in one call. First, alone on the GPU (timings): benchmarks/bench_int4.py
# (the 7B shape's projections per kernel and rows). Then, side by side (nothing timed): benchmarks/bench_mismatch.py
# (the sampler-policy mismatch per engine mode on the shipped model) and the GPU tests of gemlite's path. Results and
# logs in $OUT. Carry .whl (with gemlite's wheel: pip wheel --no-deps gemlite==0.6.0.post2 -w .whl).
set -u
source tools/device/env.sh
start=$(date +%s)
timeout "${KERNEL_SECONDS:-260}" python3 benchmarks/bench_int4.py "$OUT" qwen2.5-7b ${KERNELS:-} > "$OUT/bench_int4.log" 2>&1
echo "bench_int4 rc=$? after $(( $(date +%s) - start )) s"; grep -v '^{' "$OUT/bench_int4.log" | tail -5
# the 7B shape's random model for a bench_step call that follows on this warm machine (nothing timed from here on)
[ "${MAKE_7B:-1}" = 1 ] && { bash tools/device/make_7b.sh > "$OUT/make_7b.log" 2>&1 & }
timeout "${MISMATCH_SECONDS:-280}" python3 benchmarks/bench_mismatch.py "$OUT" > "$OUT/bench_mismatch.log" 2>&1 &
timeout "${TEST_SECONDS:-280}" python3 -m pytest -q -m gpu -p no:cacheprovider tests/gpu/test_gpu.py \
  -k "${TESTS:-gemlite or 16bit_copies_where or int4_copies_on_the_gpu}" > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests rc=$?"; tail -5 "$OUT/gpu_tests.log"
wait
echo "mismatch done after $(( $(date +%s) - start )) s"; tail -3 "$OUT/bench_mismatch.log"
python3 - "$OUT" <<'PY'
import json, sys, glob
for f in sorted(glob.glob(sys.argv[1] + "/bench_int4_*.json")):
    for r in json.load(open(f))["results"]:
        print(r.get("kernel"), r.get("rows"), round(r["ms_per_step"], 3) if "ms_per_step" in r else r.get("error"),
              round(r.get("x_bytes", 0), 2))
for f in sorted(glob.glob(sys.argv[1] + "/bench_mismatch_*.json")):
    for r in json.load(open(f))["results"]:
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
PY
echo "total wall seconds: $(( $(date +%s) - start ))"
