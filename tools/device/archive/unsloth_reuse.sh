#!/usr/bin/env bash
# GPU machine: the Unsloth reward-reuse test on the Qwen2.5-0.5B shape, its probe's per-row records (where the
# reused and own log-probs differ most, the token there, where the pad/eos ids sit) packed into $OUT/reuse_<setting>.tar.
# SETTINGS: environment settings to run it under, one run each ("default" for none), e.g. Unsloth's own switches of
# the paths its reference pass takes: SETTINGS="default UNSLOTH_GRPO_PREFIX_GROUPER=0 UNSLOTH_GRPO_SEQ_PACKING=0".
# Carry .whl.
set -u
source tools/device/env.sh
for setting in ${SETTINGS:-default}; do
  name=${setting//=/-}  # a file that comes back from $OUT is named in letters, digits, '.', '_' and '-' alone
  rm -rf "/tmp/reuse_pt_$name"
  extra=(); [ "$setting" != default ] && extra=("$setting")
  env "${extra[@]}" timeout -s INT "${TEST_SECONDS:-240}" python3 -m pytest -m gpu -q -rA --tb=short -p no:cacheprovider \
    --basetemp="/tmp/reuse_pt_$name" -k "${PYTEST_K:-reuses_the_left_packed}" tests/gpu/test_gpu.py > "$OUT/reuse_pytest_$name.log" 2>&1
  echo "$setting: reuse tests exit $?"
  grep -E "PASSED|FAILED|XFAIL|XPASS|passed|failed|max_token_diff" "$OUT/reuse_pytest_$name.log" | cut -c1-300 | tail -8
  (cd "/tmp/reuse_pt_$name" && tar cf "$OUT/reuse_$name.tar" $(find . -name 'reuse_check_*.jsonl' -o -name 'stderr.log'))
done
