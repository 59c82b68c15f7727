"""Training end to end: the CLI runs prepare then 2 GRPO steps; the KL-pass reuse equals the reward's own pass."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from conftest import run_cli
from sdgrpo.compat import ensure_trl_runs_without_triton
from sdgrpo.config import parse_train_args
from sdgrpo.rewards import SelfNLLReward
from sdgrpo.scoring import adapters_disabled, completion_logprobs
from sdgrpo.trainer import SelfDistillGRPOTrainer, read_metrics

EXPECTED_KEYS = {"reward", "reward_std", "kl", "loss", "completions/mean_length", "rewards/self_nll/mean",
                 "collapse/distinct_1", "collapse/distinct_2", "collapse/group_distinct_2", "collapse/seq_rep_4",
                 "collapse/compression_ratio", "collapse/length", "collapse/eos_rate", "collapse/unscored_rate",
                 "frac_reward_zero_std"}


def test_cli_prepare_then_two_training_steps(tmp_path, prepared, tiny_model_dir):
    out = tmp_path / "run"
    r = run_cli("train", "--model_name_or_path", tiny_model_dir, "--dataset_path", prepared, "--output_dir", out,
               "--max_steps", 2, "--per_device_train_batch_size", 4, "--num_generations", 4,
               "--max_completion_length", 12, "--learning_rate", "1e-3", "--save_steps", 100)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_metrics(out / "metrics.jsonl")
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


def test_cli_sketch_batch_settings_run(tmp_path, prepared, tiny_model_dir):
    out = tmp_path / "sketch"
    r = run_cli("train", "--model_name_or_path", tiny_model_dir, "--dataset_path", prepared, "--output_dir", out,
               "--max_steps", 1, "--per_device_train_batch_size", 1, "--gradient_accumulation_steps", 4,
               "--num_generations", 8, "--max_completion_length", 8, "--max_prompt_length", 10)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(read_metrics(out / "metrics.jsonl")) == 1


class RecordingReward(SelfNLLReward):
    def __call__(self, prompts, completions, completion_ids, **kwargs):
        self.calls = getattr(self, "calls", []) + [(kwargs.get("prompt_ids"), completion_ids,
                                                    kwargs.get("ref_per_token_logps"))]
        out = super().__call__(prompts, completions, completion_ids, **kwargs)
        self.outputs = getattr(self, "outputs", []) + [out]
        return out


def _trainer(tiny_model_dir, prepared, tmp_path, *extra):
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import get_peft_config

    ensure_trl_runs_without_triton()
    train_cfg, model_cfg = parse_train_args([
        "--output_dir", str(tmp_path), "--max_steps", "1", "--per_device_train_batch_size", "4",
        "--num_generations", "4", "--max_completion_length", "10", "--report_to", "none", "--save_strategy", "no",
        "--max_prompt_length", "12", *extra])
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    reward = RecordingReward(None, tok)
    trainer = SelfDistillGRPOTrainer(model=model, reward_funcs=[reward], args=train_cfg,
                                     train_dataset=load_from_disk(str(prepared))["train"].select(range(8)),
                                     processing_class=tok, peft_config=get_peft_config(model_cfg),
                                     max_prompt_length=train_cfg.max_prompt_length)
    reward.model = trainer.model
    # Non-zero adapters: the reference (adapters off) and the policy differ from the first step.
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return trainer, reward, tok


def test_reference_reuse_equals_own_pass_and_runs_no_extra_forward(tmp_path, prepared, tiny_model_dir):
    trainer, reward, tok = _trainer(tiny_model_dir, prepared, tmp_path)
    assert trainer.reuse_reference_logprobs
    trainer.train()
    assert reward.forward_passes == 0 and trainer.reference_reuses == 1
    prompt_ids, completion_ids, ref = reward.calls[0]
    assert ref is not None and all(len(p) <= 12 for p in prompt_ids)
    with adapters_disabled(trainer.model):
        own = completion_logprobs(trainer.model, prompt_ids, completion_ids, pad_token_id=tok.pad_token_id)
    # The adapters were changed by the one optimizer step after scoring, but disabled they don't matter.
    want = [lp.mean().item() for lp in own]
    assert reward.outputs[0] == pytest.approx(want, abs=1e-5)


def test_temperature_not_one_falls_back_to_own_pass(tmp_path, prepared, tiny_model_dir):
    trainer, reward, tok = _trainer(tiny_model_dir, prepared, tmp_path, "--temperature", "0.7")
    assert not trainer.reuse_reference_logprobs
    trainer.train()
    assert reward.forward_passes == 1 and reward.calls[0][2] is None
    prompt_ids, completion_ids, _ = reward.calls[0]
    assert all(len(p) <= 12 for p in prompt_ids)


def test_bad_inputs_exit_2_with_one_line(tmp_path, prepared, tiny_model_dir):
    cases = [
        (["prepare", tmp_path / "missing", "--output", tmp_path / "o"], "no such file or directory"),
        (["train", "--dataset_path", tmp_path / "nothing"], "no such dataset folder"),
        (["train", "--dataset_path", prepared, "--model_name_or_path", tmp_path], "not a model folder"),
        (["train", "--dataset_path", prepared, "--model_name_or_path", tiny_model_dir, "--output_dir",
          tmp_path / "x", "--lora_target_modules", "nope_proj", "--max_steps", 1], "LoRA: Target modules"),
        (["frobnicate"], "unknown command"),
    ]
    for args, message in cases:
        r = run_cli(*args)
        assert r.returncode == 2, (args, r.stderr[-2000:])
        lines = [line for line in r.stderr.splitlines() if "error" in line]
        assert len(lines) == 1 and message in lines[0], r.stderr[-2000:]
        assert "Traceback" not in r.stderr


def test_unsloth_backend_without_gpu_is_one_line(tmp_path, prepared):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    r = run_cli("train", "--backend", "unsloth", "--dataset_path", prepared, "--output_dir", tmp_path / "u")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("sdgrpo train: error: --backend unsloth needs a CUDA GPU")
    assert "Traceback" not in r.stderr and "unsloth" not in sys.modules


def test_generation_compile_turns_trl_auto_compile_back_on(tmp_path, prepared, tiny_model_dir):
    """TRL builds its GenerationConfig with disable_compile=True; --generation_compile true undoes that (with a static
    cache transformers then compiles the decoding step on a GPU; on CPU it runs uncompiled) and a step trains."""
    trainer, _, _ = _trainer(tiny_model_dir, prepared, tmp_path, "--generation_compile", "true",
                             "--cache_implementation", "static")
    assert trainer.generation_config.disable_compile is False
    assert trainer.generation_config.cache_implementation == "static"
    trainer.train()
    assert trainer.state.global_step == 1
    plain, _, _ = _trainer(tiny_model_dir, prepared, tmp_path / "plain")
    assert plain.generation_config.disable_compile is True


def test_trainer_asks_for_gathered_weights_only_under_fsdp_with_the_option(tmp_path, prepared, tiny_model_dir,
                                                                           monkeypatch):
    """Under FSDP the trainer generates inside `gathered_weights(model_wrapped)` (tests/test_fsdp.py shows what that
    does to the all-gathers and the hooks), unless --fsdp_gather_for_generation false; without FSDP it never does.
    The hooks are skipped unless --fsdp_skip_hooks_in_generation false."""
    from contextlib import contextmanager

    import sdgrpo.trainer as trainer_module

    entered = []

    @contextmanager
    def recording(model, skip_hooks):
        entered.append((model, skip_hooks))
        yield

    monkeypatch.setattr(trainer_module, "gathered_weights", recording)
    prompts = ["The cat sat", "on the mat"]
    for extra, fsdp, expected in [((), False, []), ((), True, [True]),
                                  (("--fsdp_skip_hooks_in_generation", "false"), True, [False]),
                                  (("--fsdp_gather_for_generation", "false"), True, [])]:
        entered.clear()
        trainer, _, _ = _trainer(tiny_model_dir, prepared, tmp_path / f"{fsdp}{'-'.join(extra)}", *extra)
        trainer.is_fsdp_enabled = fsdp
        completion_ids = trainer._generate(prompts)[1]
        assert len(completion_ids) == 2 and all(len(c) > 0 for c in completion_ids)
        assert entered == [(trainer.model_wrapped, skip) for skip in expected]
