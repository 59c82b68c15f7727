#!/usr/bin/env bash
# GPU machine: the Unsloth reward-reuse test on the Qwen2.5-0.5B shape, its probe's per-row records (where the
# reused and own log-probs differ most, the token there, where the pad/eos ids sit) packed into $OUT/reuse.tar.
# Carry .whl.
set -u
source tools/device/env.sh
rm -rf /tmp/reuse_pt
timeout "${TEST_SECONDS:-240}" python3 -m pytest -m gpu -q -rfx --tb=short -p no:cacheprovider --basetemp=/tmp/reuse_pt \
  -k "${PYTEST_K:-reuses_the_left_packed}" tests/gpu/test_gpu.py > "$OUT/reuse_pytest.log" 2>&1
echo "reuse tests exit $?"
tail -15 "$OUT/reuse_pytest.log"
(cd /tmp/reuse_pt && tar cf "$OUT/reuse.tar" $(find . -name 'reuse_check_*.jsonl' -o -name 'stderr.log'))
