"""The CLI end to end: prepare then train, the original recipe's batch settings, teachers, bad inputs."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import make_llama, run_cli
from sdgrpo.callbacks import read_metrics

EXPECTED_KEYS = {"reward", "reward_std", "kl", "loss", "completions/mean_length", "rewards/self_nll/mean",
                 "collapse/distinct_1", "collapse/distinct_2", "collapse/group_distinct_2", "collapse/seq_rep_4",
                 "collapse/compression_ratio", "collapse/length", "collapse/eos_rate", "collapse/unscored_rate",
                 "frac_reward_zero_std"}


def compact_lines(stdout: str) -> list[dict]:
    """The per-step lines of sdgrpo.progress on the terminal, each as {key: value} ("step": "N/M", "s/step": "x")."""
    rows = []
    for line in stdout.splitlines():
        if line.startswith("step "):
            assert len(line) <= 120, line
            *fields, last = line.split("  ")
            row = dict(field.rsplit(" ", 1) for field in fields)
            value, unit = last.split(" ")
            rows.append({**row, unit: value})
    return rows


def test_cli_prepare_then_two_training_steps(tmp_path, prepared, tiny_model_dir):
    out = tmp_path / "run"
    r = run_cli("train", "--model_name_or_path", tiny_model_dir, "--dataset_path", prepared, "--output_dir", out,
               "--max_steps", 2, "--per_device_train_batch_size", 4, "--num_generations", 4,
               "--max_completion_length", 12, "--learning_rate", "1e-3", "--save_steps", 100,
               "--heldout_eval_steps", 2, "--heldout_eval_prompts", 4)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_metrics(out / "metrics.jsonl")
    # The terminal: one compact line per logging step (sdgrpo.progress), not the whole metric record; its figures
    # are the step's record in metrics.jsonl.
    lines = compact_lines(r.stdout)
    assert [line["step"] for line in lines] == ["1/2", "2/2"]
    assert set(lines[0]) == {"step", "reward", "kl", "entropy", "distinct-2", "s/step"}
    assert set(lines[1]) == set(lines[0]) | {"heldout/bpb"}
    for line, row in zip(lines, rows):
        for key, name in (("reward", "reward"), ("kl", "kl"), ("entropy", "entropy"), ("distinct-2",
                                                                                    "collapse/distinct_2"),
                          ("heldout/bpb", "heldout/bpb")):
            if key in line:
                assert float(line[key]) == pytest.approx(row[name], rel=1e-3, abs=1e-6), (key, line, row)
        assert float(line["s/step"]) > 0
    assert "{'" not in r.stdout and "completions/mean_length" not in r.stdout + r.stderr
    assert "trained to step 2/2 in" in r.stdout
    assert "accelerator" not in r.stdout  # DeepSpeed's "Setting accelerator to CPU" (where installed), no more
    assert "Loading weights" not in r.stderr  # the training bar is the run's one
    assert [row["step"] for row in rows] == [1, 2]
    for row in rows:
        assert EXPECTED_KEYS <= set(row)
        assert all(row[k] is not None and math.isfinite(row[k]) for k in EXPECTED_KEYS)
        assert row["reward"] < 0
        assert row["collapse/length"] == pytest.approx(row["completions/mean_length"])
        assert 0 <= row["collapse/seq_rep_4"] <= 1 and 0 < row["collapse/distinct_2"] <= 1
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert "learning_rate: 0.001" in (out / "resolved_config.yaml").read_text()
    assert list((out / "runs").rglob("events.out.tfevents.*")), "TensorBoard events missing"
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 16
    assert {m.rsplit(".", 1)[-1] for m in cfg["target_modules"]} == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                                   "gate_proj", "up_proj", "down_proj"}


def test_cli_original_recipe_batch_settings_run(tmp_path, prepared, tiny_model_dir):
    out = tmp_path / "original-recipe"
    r = run_cli("train", "--model_name_or_path", tiny_model_dir, "--dataset_path", prepared, "--output_dir", out,
               "--max_steps", 1, "--per_device_train_batch_size", 1, "--gradient_accumulation_steps", 4,
               "--num_generations", 8, "--max_completion_length", 8, "--max_prompt_length", 10)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(read_metrics(out / "metrics.jsonl")) == 1


def test_bad_inputs_exit_2_with_one_line(tmp_path, prepared, tiny_model_dir, corpus):
    four_bit = "4-bit loading needs a CUDA GPU" if not torch.cuda.is_available() else "needs bitsandbytes"
    cases = [
        (["prepare", tmp_path / "missing", "--output", tmp_path / "o"], "no such file or directory"),
        (["train", "--dataset_path", tmp_path / "nothing"], "no such dataset folder"),
        (["train", "--dataset_path", prepared, "--model_name_or_path", tmp_path], "not a model folder"),
        (["train", "--dataset_path", prepared, "--model_name_or_path", tiny_model_dir, "--output_dir",
          tmp_path / "x", "--lora_target_modules", "nope_proj", "--max_steps", 1], "LoRA: Target modules"),
        (["train", "--dataset_path", prepared, "--model_name_or_path", tiny_model_dir, "--output_dir",
          tmp_path / "q", "--load_in_4bit", "true"], four_bit),
        (["train", "--dataset_path", prepared, "--model_name_or_path", tiny_model_dir, "--output_dir",
          tmp_path / "q8", "--load_in_8bit", "true"], "--load_in_8bit: sdgrpo quantises a base to 4 bits only"),
        # raw text: refused before it is prepared (a folder of text can take minutes)
        (["train", "--dataset_path", corpus / "jonah.txt", "--model_name_or_path", tiny_model_dir, "--output_dir",
          tmp_path / "qraw", "--load_in_4bit", "true"], four_bit),
        (["train", "--dataset_path", corpus / "jonah.txt", "--model_name_or_path", tiny_model_dir, "--output_dir",
          tmp_path / "traw", "--reward", "teacher_nll", "--teacher_model_name_or_path", tiny_model_dir,
          "--teacher_load_in_4bit", "true"], four_bit),
        # sft took --load_in_4bit and trained a 16-bit base
        (["sft", "--dataset_path", corpus / "jonah.txt", "--model_name_or_path", tiny_model_dir, "--output_dir",
          tmp_path / "sq", "--load_in_4bit", "true", "--max_steps", 1], four_bit),
        (["sft", "--dataset_path", prepared, "--model_name_or_path", tiny_model_dir, "--output_dir",
          tmp_path / "sfull", "--load_in_4bit", "true", "--use_peft", "false"], "with --use_peft false every weight"),
        (["frobnicate"], "unknown command"),
        # refused by the parser before the model loads (sdgrpo.checks.OPTIONS), not when training reaches them
        (["train", "--dataset_path", prepared, "--output_dir", tmp_path / "seed", "--seed", -1],
         "--seed must be in [0, 2**32 - 1]"),
        (["train", "--dataset_path", prepared, "--output_dir", tmp_path / "rp", "--repetition_penalty", 1.2],
         "--repetition_penalty 1.2: the decoding engine does not apply a repetition penalty"),
        # gemlite's kernels asked for where they cannot run (not installed, or no GPU): before the text is prepared
        (["train", "--dataset_path", corpus / "jonah.txt", "--model_name_or_path", tiny_model_dir, "--output_dir",
          tmp_path / "gk", "--generation_int4_kernel", "gemlite"], "--generation_int4_kernel gemlite: gemlite"),
    ]
    for args, message in cases:
        r = run_cli(*args)
        assert r.returncode == 2, (args, r.stderr[-2000:])
        lines = [line for line in r.stderr.splitlines() if "error" in line]
        assert len(lines) == 1 and message in lines[0], r.stderr[-2000:]
        assert "Traceback" not in r.stderr
    # nothing written where a run was refused
    for refused in ("q", "q8", "qraw", "traw", "sq", "sfull", "seed", "rp", "gk"):
        assert not (tmp_path / refused).exists() or not any((tmp_path / refused).iterdir())


def test_unsloth_backend_without_gpu_is_one_line(tmp_path, prepared):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    r = run_cli("train", "--backend", "unsloth", "--dataset_path", prepared, "--output_dir", tmp_path / "u")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("sdgrpo train: error: --backend unsloth needs a CUDA GPU")
    assert "Traceback" not in r.stderr and "unsloth" not in sys.modules


def test_cli_trains_with_a_teacher(tmp_path, tiny_model_dir, tiny_tokenizer, corpus):
    import json
    import sys

    teacher_dir = tmp_path / "teacher"
    make_llama(tiny_tokenizer, seed=21, layers=3).save_pretrained(teacher_dir)
    tiny_tokenizer.save_pretrained(teacher_dir)
    data = tmp_path / "data"
    r = subprocess.run([sys.executable, "-m", "sdgrpo.cli", "prepare", corpus / "ruth.txt",
                        "--output", data, "--model", tiny_model_dir, "--max_prompts", "40"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for reward in ("teacher_nll", "distill"):
        out = tmp_path / reward
        r = subprocess.run([sys.executable, "-m", "sdgrpo.cli", "train", "--model_name_or_path", tiny_model_dir,
                            "--teacher_model_name_or_path", teacher_dir, "--reward", reward, "--dataset_path", data,
                            "--output_dir", out, "--max_steps", "1", "--per_device_train_batch_size", "4",
                            "--num_generations", "4", "--max_completion_length", "8", "--report_to", "none"],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "teacher" in r.stderr and "MiB on cpu" in r.stderr
        row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
        assert f"rewards/{reward}/mean" in row
    if not torch.cuda.is_available():  # a 4-bit teacher needs a GPU: one line, exit 2
        r = subprocess.run([sys.executable, "-m", "sdgrpo.cli", "train", "--model_name_or_path", tiny_model_dir,
                            "--teacher_model_name_or_path", teacher_dir, "--teacher_load_in_4bit", "true",
                            "--reward", "teacher_nll", "--dataset_path", data, "--output_dir", tmp_path / "q4"],
                           capture_output=True, text=True)
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert r.stderr.strip().splitlines()[-1].endswith("4-bit loading needs a CUDA GPU (bitsandbytes); drop the "
                                                          "4-bit option")


def test_guard_does_not_crash_on_one_token_completions(tmp_path, prepared, tiny_model_dir):
    out = tmp_path / "run"
    r = run_cli("train", "--model_name_or_path", tiny_model_dir, "--dataset_path", prepared, "--output_dir", out,
                "--max_steps", 2, "--per_device_train_batch_size", 4, "--num_generations", 4,
                "--max_completion_length", 1, "--report_to", "none", "--save_steps", 1)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    saved = json.loads((out / "checkpoint-2" / "guard_state.json").read_text())
    assert saved["baseline"]["length"] == 1.0 and "distinct_2" not in saved["baseline"]
