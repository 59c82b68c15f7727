#!/usr/bin/env bash
# GPU machine: bench_step.py's random Qwen2.5-7B model (real vocabulary) and prompts in /tmp/bench_step, made ahead
# (about 100 s), so that a later call on the same warm machine spends its time on the variants. Carry .whl.
source tools/device/env.sh > /dev/null
BENCH_VOCAB=real python3 -c "
import sys; from pathlib import Path; sys.argv = ['bench_step.py']
import bench_step; bench_step.make_assets(Path('/tmp/bench_step'), '${SHAPE:-qwen2.5-7b}')"
