#!/usr/bin/env bash
# GPU machine, one call (~9 min): the Unsloth GPU tests that check the corrected path (the engine under Unsloth, 16-bit
# and 4-bit; the reward read from Unsloth's left-packed KL pass, tiny and Qwen2.5-0.5B shapes), each in its own
# process beside the 7B shape's random model being made; then bench_24gb.sh on the Qwen2.5-7B shape under the 24 GiB
# cap for VARIANTS (default: hf 4-bit, Unsloth 4-bit through the engine, and the same with the reward reused), in
# the time left. Logs and the bench tar in $OUT. Carry .whl.
set -u
source tools/device/env.sh
start=$(date +%s)
bash tools/device/make_7b.sh > "$OUT/make_7b.log" 2>&1 &
# TESTS: the pytest -k expressions, one process each, separated by ';' (empty: none)
IFS=';' read -ra tests <<< "${TESTS-decodes_through_the_engine and False;decodes_through_the_engine and True;reuses_the_left_packed and tiny;reuses_the_left_packed and qwen}"
for k in "${tests[@]}"; do
  name=$(echo "$k" | tr -c 'A-Za-z0-9\n' _)
  timeout -s INT "${TEST_SECONDS:-170}" python3 -m pytest -m gpu -q -rA --tb=short -p no:cacheprovider \
    --basetemp="/tmp/pt_$name" -k "$k" tests/gpu/test_gpu.py > "$OUT/pytest_$name.log" 2>&1 &
done
wait
for f in "$OUT"/pytest_*.log; do echo "== $f"; grep -E "^(PASSED|FAILED|XFAIL|XPASS|ERROR)|passed|failed|Error" "$f" | cut -c1-400 | tail -6; done
tail -3 "$OUT/make_7b.log"
echo "tests wall seconds: $(( $(date +%s) - start ))"
left=$(( ${CALL_SECONDS:-585} - ($(date +%s) - start) ))
TAG=${TAG:-c} BENCH_SECONDS=$left VARIANTS=${VARIANTS:-"sdgrpo_hf_4bit sdgrpo_unsloth_4bit_engine sdgrpo_unsloth_4bit_engine_reuse"} \
  bash tools/device/bench_24gb.sh
