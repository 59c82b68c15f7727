"""sdgrpo's GRPO hooks against independent computations: the reward read from TRL's reference pass, prompt
truncation, the stop set, checkpoint marking and the state that resuming restores."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import boost, make_llama, reference_logps
from sdgrpo.checkpointing import COMPLETE_MARKER
from sdgrpo.compat import ensure_trl_runs_without_triton
from sdgrpo.config import parse_train_args
from sdgrpo.guard import CollapseGuard
from sdgrpo.rewards import SelfNLLReward
from sdgrpo.scoring import truncate_prompt
from sdgrpo.trainer import SelfDistillGRPOTrainer, active_dropout


class RecordingReward(SelfNLLReward):
    """The self-NLL reward, recording what TRL passed it and what it returned."""

    def __call__(self, prompts, completions, completion_ids, **kwargs):
        self.calls = getattr(self, "calls", []) + [dict(prompts=prompts, completion_ids=completion_ids, **kwargs)]
        self.rows_rescored = getattr(self, "rows_rescored", 0)
        out = super().__call__(prompts, completions, completion_ids, **kwargs)
        self.outputs = getattr(self, "outputs", []) + [out]
        return out

    def token_logprobs(self, prompt_ids, completion_ids):
        self.rows_rescored = getattr(self, "rows_rescored", 0) + len(completion_ids)
        return super().token_logprobs(prompt_ids, completion_ids)


def build_trainer(model, tokenizer, dataset, tmp_path, *options, lora_scale: float = 0.03):
    from trl import get_peft_config

    ensure_trl_runs_without_triton()
    train_cfg, model_cfg = parse_train_args([
        "--output_dir", str(tmp_path), "--max_steps", "1", "--per_device_train_batch_size", "8",
        "--num_generations", "4", "--max_completion_length", "10", "--report_to", "none", "--save_strategy", "no",
        "--collapse_guard", "off", *options])
    reward = RecordingReward(None, tokenizer, max_prompt_length=train_cfg.max_prompt_length)
    trainer = SelfDistillGRPOTrainer(model=model, reward_funcs=[reward], args=train_cfg, train_dataset=dataset,
                                     processing_class=tokenizer, peft_config=get_peft_config(model_cfg),
                                     max_prompt_length=train_cfg.max_prompt_length)
    reward.model = trainer.model
    torch.manual_seed(0)
    with torch.no_grad():  # non-zero adapters: the policy differs from the base from the first step
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, lora_scale)
    return trainer, reward


@pytest.fixture
def dataset(prepared):
    from datasets import load_from_disk

    return load_from_disk(str(prepared))["train"].select(range(16))


@pytest.fixture
def dropout_model(tiny_tokenizer, corpus):
    """A 2-layer Llama with attention dropout 0.1 (as GPT-2/OPT checkpoints ship) and a likely EOS."""
    model = make_llama(tiny_tokenizer, seed=7, attention_dropout=0.1)
    boost(model, tiny_tokenizer.eos_token_id, 6.0, tiny_tokenizer, (corpus / "jonah.txt").read_text()[:2000])
    return model


def independent_rewards(trainer, call) -> list[float | None]:
    """Mean log-prob of each completion under the base (adapters off), one unpadded eval-mode forward each."""
    out = []
    with trainer.model.disable_adapter():
        for p, c in zip(call["prompt_ids"], call["completion_ids"]):
            out.append(reference_logps(trainer.model, p, c).mean().item() if c else None)
    return out


def test_reuse_is_exact_with_padding_bos_eos_truncation_masked_completions_and_dropout(
        tmp_path, tiny_tokenizer, dataset, dropout_model):
    trainer, reward = build_trainer(dropout_model, tiny_tokenizer, dataset, tmp_path,
                                    "--mask_truncated_completions", "true")
    assert trainer.reuse_reference_logprobs and not active_dropout(trainer.model)  # disable_dropout is on
    trainer.train()
    call = reward.calls[0]
    eos = tiny_tokenizer.eos_token_id
    ended = [bool(c) and c[-1] == eos for c in call["completion_ids"]]
    lengths = {len(p) for p in call["prompt_ids"]}
    # The batch really has what the reuse must survive: left padding, BOS, EOS-ended and truncated completions.
    assert len(lengths) > 1 and all(p[0] == tiny_tokenizer.bos_token_id for p in call["prompt_ids"])
    assert 2 <= sum(ended) <= len(ended) - 2, ended
    for text, ids in zip(call["prompts"], call["prompt_ids"]):
        assert ids == tiny_tokenizer(text)["input_ids"]
    # The KL pass served every completion that ended; the truncated ones (masked out of that pass, where TRL's
    # head writes log-prob 0) were scored by the reward's own pass.
    assert trainer.reference_reuses == 1
    assert reward.rows_rescored == len(ended) - sum(ended)
    got, want = reward.outputs[0], independent_rewards(trainer, call)
    assert got == pytest.approx(want, abs=2e-5)
    assert max(got) < 0  # no completion got the best-possible 0.0


def test_dropout_left_on_turns_the_reuse_off_and_stays_exact(tmp_path, tiny_tokenizer, dataset, dropout_model):
    trainer, reward = build_trainer(dropout_model, tiny_tokenizer, dataset, tmp_path, "--disable_dropout", "false")
    assert active_dropout(trainer.model) and not trainer.reuse_reference_logprobs
    trainer.train()
    call = reward.calls[0]
    assert reward.rows_rescored == len(call["completion_ids"])
    assert reward.outputs[0] == pytest.approx(independent_rewards(trainer, call), abs=2e-5)


def test_min_completion_length_rules_out_short_completions(tmp_path, tiny_tokenizer, dataset, corpus):
    eos = tiny_tokenizer.eos_token_id
    lengths = {}
    for n in (0, 6):
        model = make_llama(tiny_tokenizer, seed=7)
        boost(model, eos, 7.0, tiny_tokenizer, (corpus / "jonah.txt").read_text()[:2000])
        trainer, reward = build_trainer(model, tiny_tokenizer, dataset, tmp_path / str(n),
                                        "--min_completion_length", str(n))
        trainer.train()
        lengths[n] = [len(c) for c in reward.calls[0]["completion_ids"]]
        assert all(c[-1] == eos or len(c) == 10 for c in reward.calls[0]["completion_ids"])
    assert min(lengths[0]) < 6 <= min(lengths[6]), lengths


def test_truncated_prompts_keep_bos_in_the_trainer_and_the_reward_fallback(tmp_path, tiny_tokenizer, dataset):
    bos = tiny_tokenizer.bos_token_id
    assert truncate_prompt([bos, 5, 6, 7, 8], 3, {bos}) == [bos, 7, 8]
    assert truncate_prompt([bos, 5], 3, {bos}) == [bos, 5]
    assert truncate_prompt([bos, bos, 9], 1, {bos}) == [bos]
    trainer, reward = build_trainer(make_llama(tiny_tokenizer, seed=1), tiny_tokenizer, dataset, tmp_path,
                                    "--max_prompt_length", "8")
    trainer.train()
    call = reward.calls[0]
    for text, ids in zip(call["prompts"], call["prompt_ids"]):
        full = tiny_tokenizer(text)["input_ids"]
        assert len(full) > 8 and ids == [bos] + full[-7:]
    # Without the trainer's prompt_ids the reward tokenizes and truncates the same way, scoring the same ids.
    fallback = reward._prompt_ids(call["prompts"])
    assert fallback == call["prompt_ids"]
    with pytest.raises(ValueError, match="chat-format prompts"):
        reward._prompt_ids([[{"role": "user", "content": "hi"}]])


def test_checkpoint_marker_written_after_every_rank_and_fsynced(tmp_path, tiny_tokenizer, dataset, monkeypatch):
    import os

    import sdgrpo.checkpointing as trainer_module

    trainer, _ = build_trainer(make_llama(tiny_tokenizer, seed=1), tiny_tokenizer, dataset, tmp_path,
                               "--save_strategy", "steps", "--save_steps", "1")
    guard = CollapseGuard("restore")
    trainer.add_callback(guard)
    events = []
    folder = tmp_path / "checkpoint-1"
    real_wait, real_fsync = trainer.accelerator.wait_for_everyone, os.fsync
    monkeypatch.setattr(trainer.accelerator, "wait_for_everyone",
                        lambda: events.append(("barrier", (folder / COMPLETE_MARKER).exists())) or real_wait())
    monkeypatch.setattr(trainer_module.os, "fsync", lambda fd: events.append(("fsync", None)) or real_fsync(fd))
    trainer.train()
    assert json.loads((folder / COMPLETE_MARKER).read_text()) == {"step": 1}
    barrier = events.index(("barrier", False))  # the barrier ran before the marker existed
    assert ("fsync", None) in events[barrier:]
    assert not (folder / (COMPLETE_MARKER + ".tmp")).exists()
    assert json.loads((folder / "guard_state.json").read_text())["baseline_counts"]["length"] == 1


def test_resume_runs_trls_loader_and_restores_the_optimizer(tmp_path, tiny_tokenizer, dataset, monkeypatch):
    from trl import GRPOTrainer

    trainer, _ = build_trainer(make_llama(tiny_tokenizer, seed=1), tiny_tokenizer, dataset, tmp_path,
                               "--save_strategy", "steps", "--save_steps", "1")
    trainer.train()
    checkpoint = tmp_path / "checkpoint-1"
    assert (checkpoint / "optimizer.safetensors").is_file() and not (checkpoint / "optimizer.pt").exists()
    saved = {k: v.clone() for k, v in trainer.optimizer.state_dict()["state"][0].items() if torch.is_tensor(v)}
    seen = []
    real = GRPOTrainer._load_optimizer_and_scheduler
    monkeypatch.setattr(GRPOTrainer, "_load_optimizer_and_scheduler",
                        lambda self, ckpt: seen.append(ckpt) or real(self, ckpt))
    for group in trainer.optimizer.state_dict()["state"].values():
        for value in group.values():
            if torch.is_tensor(value):
                value.zero_()
    trainer._load_optimizer_and_scheduler(str(checkpoint))
    assert seen == [str(checkpoint)]  # TRL's own loader (adaptive-entropy state) still runs
    restored = trainer.optimizer.state_dict()["state"][0]
    for key, value in saved.items():
        assert torch.equal(restored[key], value)
        assert key != "exp_avg" or value.abs().sum() > 0
    assert math.isfinite(float(restored["step"]))
