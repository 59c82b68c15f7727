"""Two processes under `accelerate launch` on CPU: same rewards and metrics on both ranks, one writer.

`accelerate launch --cpu` starts a single process unless an MPI set-up is configured; `--multi_gpu` uses torch's
elastic launcher, which on a machine without GPUs runs the processes on CPU with the gloo backend.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate's launcher is not on PATH")
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the CPU multi-process path; GPUs take another")
def test_two_processes_train_and_agree(tmp_path, tiny_model_dir, shared_data):
    data = tmp_path / "data"
    r = subprocess.run([sys.executable, "-m", "sdgrpo.cli", "prepare", shared_data / "gutenberg" / "alice.txt",
                        "--output", data, "--model", tiny_model_dir, "--max_prompt_tokens", "24"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out, debug = tmp_path / "run", tmp_path / "debug"
    debug.mkdir()
    env = {**os.environ, "SDGRPO_DEBUG_REWARDS_DIR": str(debug)}

    def launch(*extra):
        return subprocess.run(["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "sdgrpo.cli", "train",
                               "--model_name_or_path", str(tiny_model_dir), "--dataset_path", str(data),
                               "--output_dir", str(out), "--per_device_train_batch_size", "4",
                               "--num_generations", "4", "--max_completion_length", "8", "--report_to", "none",
                               "--save_steps", "2", *extra], capture_output=True, text=True, env=env, timeout=900)

    r = launch("--max_steps", "2")
    assert r.returncode == 0, r.stderr[-4000:]
    ranks = [[json.loads(x) for x in (debug / f"rank{i}.jsonl").read_text().splitlines()] for i in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 2
    for a, b in zip(*ranks):
        assert len(a["rewards"]) == 8  # the whole generation batch: 2 processes x 4 completions
        assert a["rewards"] == b["rewards"] and a["collapse"] == b["collapse"]
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"reward"' in x]
    assert steps == [1, 2]  # written once, by the main process
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert (out / "adapter_model.safetensors").is_file()
    ckpt = out / "checkpoint-2"
    assert (ckpt / "rng_state_0.safetensors").is_file() and (ckpt / "rng_state_1.safetensors").is_file()

    # Resume with the same number of processes and a longer schedule.
    r = launch("--max_steps", "4", "--resume")
    assert r.returncode == 0, r.stderr[-4000:]
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"reward"' in x]
    assert steps == [1, 2, 3, 4]
    assert json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4
