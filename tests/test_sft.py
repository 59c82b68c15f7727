"""`sdgrpo sft` and the held-out evaluation during training (both verbs), end to end through the CLI."""

from __future__ import annotations

import json
import math

import pytest

from conftest import reference_logps, run_cli


def independent_bpb(model_dir, adapter_dir, prepared, prompts: int) -> float:
    """Bits per byte of the test split's true continuations under base + adapter: one unpadded forward each."""
    from datasets import load_from_disk
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(adapter_dir)).eval()
    test = load_from_disk(str(prepared))["test"].select(range(prompts))
    nats = 0.0
    for prompt, cont in zip(test["prompt"], test["continuation"]):
        nats -= reference_logps(model, tok(prompt)["input_ids"],
                                tok(cont, add_special_tokens=False)["input_ids"]).sum().item()
    return nats / math.log(2) / sum(len(c.encode()) for c in test["continuation"])


def test_sft_trains_logs_heldout_and_keeps_the_best(tmp_path, prepared, tiny_model_dir):
    out = tmp_path / "sft"
    r = run_cli("sft", "--model_name_or_path", tiny_model_dir, "--dataset_path", prepared, "--output_dir", out,
                "--max_steps", 6, "--per_device_train_batch_size", 4, "--learning_rate", "3e-3", "--report_to",
                "none", "--heldout_eval_steps", 3, "--heldout_eval_prompts", 8, "--keep_best_heldout", "true",
                "--save_strategy", "no")
    assert r.returncode == 0, r.stderr[-3000:]
    assert {"adapter_model.safetensors", "adapter_config.json", "resolved_config.yaml", "metrics.jsonl",
            "heldout.json"} <= {p.name for p in out.iterdir()}
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows if "loss" in x] == [1, 2, 3, 4, 5, 6]
    logged = {x["step"]: x["heldout/bpb"] for x in rows if "heldout/bpb" in x}
    held = json.loads((out / "heldout.json").read_text())
    assert [h["step"] for h in held["history"]] == [0, 3, 6] and set(logged) == {3, 6}
    assert all(logged[h["step"]] == pytest.approx(h["heldout_bpb"]) for h in held["history"][1:])
    step, best = held["best"]
    assert best == min(h["heldout_bpb"] for h in held["history"]) and best < held["history"][0]["heldout_bpb"]
    # The final adapter is the best one, and its figure is what an independent computation gives.
    assert independent_bpb(tiny_model_dir, out, prepared, 8) == pytest.approx(best, rel=1e-4)
    assert "learning_rate: 0.003" in (out / "resolved_config.yaml").read_text()


def test_grpo_with_context_distill_logs_heldout(tmp_path, prepared, tiny_model_dir):
    out = tmp_path / "grpo"
    r = run_cli("train", "--model_name_or_path", tiny_model_dir, "--dataset_path", prepared, "--output_dir", out,
                "--reward", "context_distill", "--max_steps", 2, "--per_device_train_batch_size", 4,
                "--num_generations", 4, "--max_completion_length", 8, "--report_to", "none",
                "--heldout_eval_steps", 1, "--heldout_eval_prompts", 4, "--save_strategy", "no")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"reward"' in x]
    assert [x["step"] for x in rows] == [1, 2]
    assert all(math.isfinite(x["heldout/bpb"]) and math.isfinite(x["rewards/context_distill/mean"]) for x in rows)
    held = json.loads((out / "heldout.json").read_text())
    assert independent_bpb(tiny_model_dir, out, prepared, 4) == pytest.approx(held["history"][-1]["heldout_bpb"],
                                                                              rel=1e-4)


def test_missing_continuation_is_one_line(tmp_path, tiny_model_dir):
    from datasets import Dataset

    Dataset.from_dict({"prompt": ["In the beginning God created"] * 8}).save_to_disk(str(tmp_path / "d"))
    for verb, extra in (("train", ["--reward", "context_distill"]), ("sft", [])):
        r = run_cli(verb, "--model_name_or_path", tiny_model_dir, "--dataset_path", tmp_path / "d", "--output_dir",
                    tmp_path / verb, "--max_steps", 1, *extra)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert "'continuation' column" in r.stderr.strip().splitlines()[-1]
