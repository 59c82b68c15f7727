"""sdgrpo's GRPO hooks against independent computations: the reward read from TRL's reference pass, prompt
truncation, the stop set, checkpoint marking and the state that resuming restores."""

from __future__ import annotations

import json
import math

import pytest
import torch
from trl import GRPOTrainer

from conftest import boost, make_llama, reference_logps
from sdgrpo.checkpointing import COMPLETE_MARKER
from sdgrpo.compat import ensure_trl_runs_without_triton
from sdgrpo.config import parse_train_args
from sdgrpo.grpo_trainer import SelfDistillGRPOTrainer, active_dropout
from sdgrpo.guard import CollapseGuard
from sdgrpo.rewards import SelfNLLReward
from sdgrpo.scoring import truncate_prompt


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


def build_trainer(model, tokenizer, dataset, tmp_path, *options, lora_scale: float = 0.03,
                  trainer_cls=SelfDistillGRPOTrainer):
    from trl import get_peft_config

    ensure_trl_runs_without_triton()
    train_cfg, model_cfg = parse_train_args([
        "--output_dir", str(tmp_path), "--max_steps", "1", "--per_device_train_batch_size", "8",
        "--num_generations", "4", "--max_completion_length", "10", "--report_to", "none", "--save_strategy", "no",
        "--collapse_guard", "off", *options])
    reward = RecordingReward(None, tokenizer, max_prompt_length=train_cfg.max_prompt_length)
    trainer = trainer_cls(model=model, reward_funcs=[reward], args=train_cfg, train_dataset=dataset,
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
    marker = json.loads((folder / COMPLETE_MARKER).read_text())
    assert marker["step"] == 1 and "adapter_model.safetensors" in marker["files"]
    # every file of the checkpoint with its size as written (what resume checks before it trusts the checkpoint)
    assert marker["files"] == {f.name: f.stat().st_size for f in folder.iterdir()
                               if f.is_file() and f.name != COMPLETE_MARKER}
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


def test_importance_weights_follow_trls_modes():
    """Against a hand computation: per-token and per-sequence log-ratios, truncated or masked at the clip bounds,
    masked tokens neutral."""
    from sdgrpo.grpo_trainer import importance_weights

    policy = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -3.0, 0.0]])
    sampler = torch.tensor([[-1.5, -1.0, -0.5], [-0.2, -0.5, -9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    d = torch.tensor([[0.5, -1.0, 0.0], [0.0, -2.5, 0.0]])  # (policy - sampler) * mask
    assert torch.allclose(importance_weights(policy, sampler, mask, "token_truncate", None, 1.2),
                          torch.exp(d).clamp(max=1.2))
    masked = torch.exp(d).masked_fill((torch.exp(d) < 0.3) | (torch.exp(d) > 1.5), 0.0)
    assert torch.allclose(importance_weights(policy, sampler, mask, "token_mask", 0.3, 1.5), masked)
    rows = torch.exp(d.sum(-1, keepdim=True))  # e^-0.5, e^-2.5
    assert torch.allclose(importance_weights(policy, sampler, mask, "sequence_truncate", 0.1, 3.0), rows.clamp(0.1, 3))
    assert torch.allclose(importance_weights(policy, sampler, mask, "sequence_mask", 0.1, 3.0),
                          torch.tensor([[math.exp(-0.5)], [0.0]]))


def shift_the_sampler(trainer, seed: int) -> tuple[dict, list]:
    """Make the engine's recorded log-probs of each sampled token off by a known amount (the log-ratio policy -
    sampler, uniform in +-0.5 per token): returns {row: its shifts} and the shifted rows, filled by the next
    generation."""
    shift, rows_out = {}, []
    original = trainer._sampling_logps

    def shifted(decoded, completion_ids):
        rows = original(decoded, completion_ids)
        g = torch.Generator().manual_seed(seed)
        for i, row in enumerate(rows):
            shift[i] = (torch.rand(len(row), generator=g) - 0.5).tolist()
            rows[i] = [x - d for x, d in zip(row, shift[i])]
        rows_out[:] = rows
        return rows

    trainer._sampling_logps = shifted
    return shift, rows_out


def test_rollouts_with_a_mismatched_sampler_are_corrected_in_the_loss(tiny_model_dir, tiny_tokenizer, dataset,
                                                                      tmp_path):
    """An injected sampler mismatch (the engine's log-probs shifted by a known amount per token): the trainer logs
    it, hands TRL the truncated ratio, and the loss is TRL's GRPO loss with that ratio multiplied in, against an
    independent computation (beta 0, first iteration: the policy ratio is 1, so the loss is
    -mean_rows(sum_t A w_t / n))."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trainer, _ = build_trainer(model, tiny_tokenizer, dataset, tmp_path, "--generation_engine", "true",
                               "--rollout_correction", "true", "--beta",
                               "0", "--loss_type", "grpo", "--vllm_importance_sampling_mode", "token_truncate",
                               "--vllm_importance_sampling_clip_max", "1.5")
    assert trainer.rollout_correction and trainer.engine is not None
    shift, _ = shift_the_sampler(trainer, seed=3)
    trainer.model.train()
    passes = []
    real_pass = trainer._logps_pass
    trainer._logps_pass = lambda *a, **k: passes.append(a[0]) or real_pass(*a, **k)
    batch = trainer._generate_and_score_completions(next(iter(trainer.get_train_dataloader())))
    # beta 0, one optimizer step per generation: no pass of the policy before its loss (the ratio comes from it)
    assert passes == [] and "importance_sampling_ratio" not in batch
    # the engine's phases are logged: 10 tokens a row are the prefill's and 9 token steps (no early stop: the
    # engine checks for finished rows every 16 steps)
    timed = trainer._metrics["train"]
    assert trainer.engine.timing["steps"] == 9 and all(timed[f"engine/{k}"][-1] > 0 for k in ("refresh_s",
                                                                                              "prefill_s", "decode_s"))
    assert timed["engine/decode_ms_per_step"][-1] == pytest.approx(1000 * timed["engine/decode_s"][-1] / 9)
    trainer.current_gradient_accumulation_steps = 1  # set by the Trainer's loop, which this test does not run
    loss = trainer.compute_loss(trainer.model, batch)
    assert len(passes) == 1
    mask, ratio = batch["completion_mask"], batch["importance_sampling_ratio"]
    want = torch.zeros_like(ratio)
    for i, d in shift.items():
        want[i, : len(d)] = torch.tensor(d).exp().clamp(max=1.5)
    assert torch.allclose((ratio * mask), want, atol=1e-4)  # the policy's own pass equals the sampler's, but for d
    metrics = trainer._metrics["train"]
    flat = torch.tensor([x for d in shift.values() for x in d])
    assert metrics["sampling/sampling_logp_difference/mean"][-1] == pytest.approx(flat.abs().mean().item(), abs=1e-4)
    assert metrics["sampling/kl"][-1] == pytest.approx((torch.expm1(flat) - flat).mean().item(), abs=1e-4)
    adv = batch["advantages"]
    adv = adv[:, None] if adv.dim() == 1 else adv
    independent = -((adv * want * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    assert loss.item() == pytest.approx(independent.item(), abs=1e-5)
    assert not trainer.use_vllm  # the branch was taken for the call only


@pytest.mark.parametrize("setting", ["auto", "trl"])
def test_engine_rollouts_are_corrected_per_token_by_default_and_trls_sequence_ratio_is_logged_per_row(
        setting, tiny_model_dir, tiny_tokenizer, dataset, corpus, tmp_path, caplog):
    """--rollout_correction_mode auto corrects each token (token_truncate, whatever TRL's own default), so the weight
    a row keeps does not shrink with its length; ``trl`` takes TRL's vllm_importance_sampling_mode (sequence_mask,
    its default): one ratio a row, exp of the row's summed log-ratio, 0 outside [0, clip_max], and its statistics
    are over rows (TRL's logging), not repeated over each row's tokens. Against the injected shifts; a mean weight
    under 0.8 is warned about once."""
    import logging

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    boost(model, tiny_tokenizer.eos_token_id, 6.0, tiny_tokenizer, (corpus / "jonah.txt").read_text()[:2000])
    trainer, _ = build_trainer(model, tiny_tokenizer, dataset, tmp_path, "--generation_engine", "true",
                               "--rollout_correction", "true", "--beta", "0", "--rollout_correction_mode", setting)
    assert trainer.args.vllm_importance_sampling_mode == "sequence_mask"  # TRL's default, left as it is
    shift, _ = shift_the_sampler(trainer, seed=7)
    trainer.model.train()
    batch = trainer._generate_and_score_completions(next(iter(trainer.get_train_dataloader())))
    trainer.current_gradient_accumulation_steps = 1
    with caplog.at_level(logging.WARNING, logger="sdgrpo.grpo_trainer"):
        trainer.compute_loss(trainer.model, batch)
    ratio, mask = batch["importance_sampling_ratio"], batch["completion_mask"].bool()
    metrics = trainer._metrics["train"]
    assert len({len(d) for d in shift.values()}) > 1  # rows of different lengths: a per-token mean would differ
    if setting == "auto":
        assert ratio.shape == mask.shape
        want = torch.cat([torch.tensor(d).exp().clamp(max=3.0) for _, d in sorted(shift.items())])
        assert torch.allclose(ratio[mask], want, atol=1e-4)
    else:
        assert ratio.shape == (mask.size(0), 1)
        sums = torch.tensor([sum(d) for _, d in sorted(shift.items())])
        want = sums.exp().masked_fill(sums.exp() > 3.0, 0.0)
        assert torch.allclose(ratio[:, 0], want, atol=1e-4)
    assert metrics["sampling/importance_sampling_ratio/mean"][-1] == pytest.approx(want.mean().item(), abs=1e-4)
    assert metrics["sampling/importance_sampling_ratio/min"][-1] == pytest.approx(want.min().item(), abs=1e-4)
    assert metrics["sampling/importance_sampling_ratio/max"][-1] == pytest.approx(want.max().item(), abs=1e-4)
    assert metrics["sampling/importance_sampling_ratio/zeroed"][-1] == pytest.approx((want == 0).float().mean().item())
    assert ("the mean importance weight of this batch" in caplog.text) == (want.mean().item() < 0.8)
    if want.mean().item() < 0.8:  # the share discarded, and advice that is not the mode already in use
        assert f"{100 * (1 - want.mean().item()):.0f}% of its policy gradient is discarded" in caplog.text
        assert ("--rollout_correction_mode token_truncate keeps" in caplog.text) == (setting != "auto")


def test_several_steps_per_generation_keep_each_rows_sampler_log_probs_and_ratio(tiny_model_dir, tiny_tokenizer,
                                                                               dataset, tmp_path):
    """--steps_per_generation 2: one engine call serves two optimizer steps; TRL shuffles the generation batch and
    splits it, and every row of both halves keeps its own sampler log-probs (policy - sampler is exactly the shift
    injected for that completion) and its ratio exp(old - sampler), truncated at 3, with old the policy that sampled
    (an unpadded forward per sequence)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trainer, _ = build_trainer(model, tiny_tokenizer, dataset, tmp_path, "--generation_engine", "true",
                               "--rollout_correction", "true", "--beta", "0", "--steps_per_generation", "2",
                               "--per_device_train_batch_size", "4")
    shift, _ = shift_the_sampler(trainer, seed=11)
    trainer.model.train()
    generation = next(iter(trainer.get_train_dataloader()))
    assert len(generation) == 8  # 2 steps x 4 rows
    halves = []
    for step in range(2):
        trainer._step = step
        halves.append(trainer._prepare_inputs(generation))
    assert trainer.engine.calls == 1 and len(shift) == 8
    injected = [torch.tensor(d, dtype=torch.float64) for d in shift.values()]
    found = []
    for half in halves:
        mask = half["completion_mask"].bool()
        assert half["old_per_token_logps"] is not None and half["importance_sampling_ratio"].shape == mask.shape
        for i in range(mask.size(0)):
            prompt = half["prompt_ids"][i][half["prompt_mask"][i].bool()].tolist()
            completion = half["completion_ids"][i][mask[i]].tolist()
            policy = reference_logps(trainer.model, prompt, completion)
            sampler = half["sampling_per_token_logps"][i][mask[i]].double()
            found.append(policy - sampler)
            want = (policy - sampler).exp().clamp(max=3.0)
            assert half["importance_sampling_ratio"][i][mask[i]].double().tolist() == pytest.approx(want.tolist(),
                                                                                                   abs=1e-4)
    # each completion's delta is one injected shift, and each shift is one completion's: no row lost its own
    for delta in found:
        match = [j for j, d in enumerate(injected) if d.shape == delta.shape and (d - delta).abs().max() < 2e-4]
        assert len(match) == 1, delta
        injected.pop(match[0])
    assert not injected


def test_a_policy_that_changes_before_its_loss_is_corrected_from_trls_old_log_probs(tiny_model_dir, tiny_tokenizer,
                                                                                   dataset, tmp_path):
    """Two iterations per generation: the policy of the second loss is not the one that sampled, so the ratio is set
    at generation from TRL's old_per_token_logps (the sampling policy's), not from a later loss's pass; it equals
    exp(old - sampler) per token, truncated at the clip, against an unpadded forward per sequence."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trainer, _ = build_trainer(model, tiny_tokenizer, dataset, tmp_path, "--generation_engine", "true",
                               "--rollout_correction", "true", "--beta", "0", "--num_iterations", "2",
                               "--vllm_importance_sampling_mode", "token_truncate",
                               "--vllm_importance_sampling_clip_max", "1.5")
    _, recorded = shift_the_sampler(trainer, seed=5)
    trainer.model.train()
    batch = trainer._generate_and_score_completions(next(iter(trainer.get_train_dataloader())))
    assert batch["old_per_token_logps"] is not None and "importance_sampling_ratio" in batch
    assert (batch["importance_sampling_ratio"][batch["completion_mask"].bool()] - 1).abs().max() > 0.1
    mask = batch["completion_mask"].bool()
    for i, sampled in enumerate(recorded):
        prompt = batch["prompt_ids"][i][batch["prompt_mask"][i].bool()].tolist()
        completion = batch["completion_ids"][i][mask[i]].tolist()
        policy = reference_logps(trainer.model, prompt, completion)
        want = (policy - torch.tensor(sampled, dtype=torch.float64)).exp().clamp(max=1.5)
        assert batch["importance_sampling_ratio"][i][mask[i]].double().tolist() == pytest.approx(want.tolist(),
                                                                                                abs=1e-4)


class UnslothLikeTrainer(GRPOTrainer):
    """Stands in for Unsloth 2026.10.9's rewrite of TRL's trainer where the rollout correction relies on it
    (unsloth/models/rl_replacements.py): its ``_generate_and_score_completions`` keeps the rollouts' log-probs only
    under ``use_vllm``, and its ``compute_loss`` (unsloth_zoo's grpo_accumulated_loss) applies the importance ratio
    from ``old_per_token_logps`` and ``sampling_per_token_logps`` and logs the mismatch only under ``use_vllm`` and
    ``vllm_importance_sampling_correction``. Its loss here records what it was given."""

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        if not (self.use_vllm and self.vllm_importance_sampling_correction):
            out.pop("sampling_per_token_logps", None)
        return out

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.loss_saw = {"use_vllm": self.use_vllm, "correction": self.vllm_importance_sampling_correction,
                         # unsloth_zoo's grpo_accumulated_loss reads the mode from the trainer's args
                         "mode": self.args.vllm_importance_sampling_mode,
                         "inputs": dict(inputs)}
        return torch.zeros(())


def test_the_unsloth_trainer_reads_left_packed_log_probs_whatever_the_import_order(monkeypatch):
    """`sdgrpo train --backend unsloth` imports sdgrpo.grpo_trainer after Unsloth has replaced trl.GRPOTrainer, so
    the class the backend asks for is the module's own GRPOTrainer. It must still be the left-packed class: before,
    it was the hf backend's SelfDistillGRPOTrainer (left_packed_logps False), and on the GPU the engine's rollouts
    reached Unsloth's loss uncorrected (no sampling/* metric) while the reward misread the KL pass's columns."""
    import trl

    from sdgrpo.backends import unsloth as backend
    from sdgrpo.grpo_trainer import GRPOTrainer, SelfDistillGRPOTrainer, SelfDistillMixin

    monkeypatch.setattr(backend, "import_unsloth", lambda: None)  # no GPU here: trl.GRPOTrainer stands for Unsloth's
    monkeypatch.setattr(trl, "GRPOTrainer", GRPOTrainer)  # the module imported after the patch: the same class
    cls = backend.unsloth_trainer_class()
    assert cls.left_packed_logps is True and cls is not SelfDistillGRPOTrainer
    assert issubclass(cls, SelfDistillMixin) and issubclass(cls, GRPOTrainer)
    assert SelfDistillGRPOTrainer.left_packed_logps is False


def test_every_super_call_of_the_hooks_reaches_trl():
    """SelfDistillMixin composes one mixin per concern (sdgrpo/grpo/). No method is defined by two of sdgrpo's classes
    above TRL's, and none that a class calls through ``super()`` is defined by a class after it: every ``super()``
    call reaches TRL's GRPOTrainer (or Unsloth's), as before the split."""
    import inspect
    import re

    mro = SelfDistillGRPOTrainer.__mro__
    ours = mro[1 : mro.index(GRPOTrainer)]
    assert [c.__name__ for c in ours] == ["SelfDistillMixin", "RolloutMixin", "RewardReuseMixin", "TokenDistillMixin",
                                          "RolloutCorrectionMixin", "CheckpointMixin"]
    owners: dict[str, list[str]] = {}
    for cls in ours:
        for name, value in vars(cls).items():
            if callable(value):
                owners.setdefault(name, []).append(cls.__name__)
    assert {name: classes for name, classes in owners.items() if len(classes) > 1} == {}
    for i, cls in enumerate(ours):
        called = set(re.findall(r"super\(\)\.(\w+)\(", inspect.getsource(cls)))
        assert called and [(n, c.__name__) for n in sorted(called) for c in ours[i + 1 :] if n in vars(c)] == []


def test_unsloths_loss_gets_the_engines_rollout_log_probs_and_the_policys(tiny_model_dir, tiny_tokenizer, dataset,
                                                                          tmp_path):
    """On top of a trainer that drops the rollouts' log-probs outside vLLM (as Unsloth's does), the batch that
    reaches its loss still holds the engine's log-probs of the sampled tokens (the injected shift included) and the
    policy's own (one no-grad pass: Unsloth's loss runs none of sdgrpo's), the latter equal to an unpadded forward
    per sequence; the loss runs with TRL's vLLM correction flags set, and only for the call."""
    from transformers import AutoModelForCausalLM

    from sdgrpo.grpo_trainer import trainer_class

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    cls = trainer_class(UnslothLikeTrainer, left_packed_logps=True)
    trainer, _ = build_trainer(model, tiny_tokenizer, dataset, tmp_path, "--generation_engine", "true",
                               "--rollout_correction", "true", "--beta", "0", trainer_cls=cls)
    _, recorded = shift_the_sampler(trainer, seed=7)
    trainer.model.train()
    batch = trainer._generate_and_score_completions(next(iter(trainer.get_train_dataloader())))
    mask = batch["completion_mask"].bool()
    assert batch["sampling_per_token_logps"] is not None and batch["old_per_token_logps"] is not None
    for i, sampled in enumerate(recorded):
        assert batch["sampling_per_token_logps"][i][mask[i]].tolist() == pytest.approx(sampled, abs=1e-6)
        prompt = batch["prompt_ids"][i][batch["prompt_mask"][i].bool()].tolist()
        completion = batch["completion_ids"][i][mask[i]].tolist()
        policy = reference_logps(trainer.model, prompt, completion)
        assert batch["old_per_token_logps"][i][mask[i]].double().tolist() == pytest.approx(policy.tolist(), abs=1e-4)
    trainer.vllm_importance_sampling_correction = False  # TRL's default is True: off, to see it set for the call
    trainer.compute_loss(trainer.model, batch)
    assert trainer.loss_saw["use_vllm"] and trainer.loss_saw["correction"]
    # the engine's correction mode (auto: token_truncate), not TRL's default sequence_mask, for the call only
    assert trainer.loss_saw["mode"] == "token_truncate"
    assert trainer.args.vllm_importance_sampling_mode == "sequence_mask"
    assert trainer.loss_saw["inputs"]["sampling_per_token_logps"] is batch["sampling_per_token_logps"]
    assert not trainer.use_vllm and not trainer.vllm_importance_sampling_correction


def test_int4_rollouts_switch_the_correction_on_and_log_their_mismatch(tiny_model_dir, tiny_tokenizer, dataset,
                                                                        tmp_path):
    """``--generation_weights int4`` on an fp32 model under ``--rollout_correction auto``: correction starts with
    the first int4 call (``engine/mode`` 2), and the logged mismatch is the mean |policy - sampler| log-prob, the
    policy's from one unpadded forward per sequence, the sampler's from the engine's own record; the ratio is per
    token, truncated (not TRL's sequence mask), and its mean and zeroed share are logged."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trainer, _ = build_trainer(model, tiny_tokenizer, dataset, tmp_path, "--generation_engine", "true",
                               "--generation_weights", "int4", "--temperature", "1.0", lora_scale=0.3)
    assert not trainer.rollout_correction  # fp32: nothing to correct until the engine decodes int4 copies
    recorded = []
    real = trainer._sampling_logps
    trainer._sampling_logps = lambda decoded, ids: recorded.extend(decoded) or real(decoded, ids)
    trainer.model.train()
    batch = trainer._generate_and_score_completions(next(iter(trainer.get_train_dataloader())))
    assert trainer.engine.mode == "int4" and trainer.rollout_correction
    trainer.current_gradient_accumulation_steps = 1
    trainer.compute_loss(trainer.model, batch)  # the ratio comes from the loss's pass
    metrics = trainer._metrics["train"]
    assert metrics["engine/mode"][-1] == 2.0 and "importance_sampling_ratio" in batch
    sampler = torch.cat([d.logprobs for d in recorded])
    deltas = []
    for i in range(batch["completion_ids"].size(0)):
        prompt = batch["prompt_ids"][i][batch["prompt_mask"][i].bool()].tolist()
        completion = batch["completion_ids"][i][batch["completion_mask"][i].bool()].tolist()
        policy = reference_logps(trainer.model, prompt, completion)
        deltas.append(policy - sampler[i, : len(completion)].double())
    flat = torch.cat(deltas)
    assert flat.abs().mean() > 1e-3  # int4 copies are not the policy
    assert metrics["sampling/sampling_logp_difference/mean"][-1] == pytest.approx(flat.abs().mean().item(), abs=2e-4)
    # token-level truncation (--rollout_correction_mode auto): each token's ratio exp(delta) clipped at 3
    mask = batch["completion_mask"].bool()
    want = torch.zeros(mask.shape, dtype=torch.float64)
    want[mask] = flat.exp().clamp(max=3.0)
    ratio = batch["importance_sampling_ratio"]
    assert ratio.shape == mask.shape and torch.allclose(ratio[mask].double(), want[mask], atol=1e-3)
    assert metrics["sampling/importance_sampling_ratio/mean"][-1] == pytest.approx(want[mask].mean().item(), abs=1e-3)
    assert metrics["sampling/importance_sampling_ratio/zeroed"][-1] == 0.0


def teacher_trainer(model_dir, tokenizer, dataset, tmp_path, reward_name, teacher, *options):
    """A trainer of ``model_dir``'s model with one teacher-based reward (``teacher`` scores for distill and
    teacher_nll; context_distill's is the base), --advantage token, beta 0, TRL's grpo loss, non-zero adapters."""
    from transformers import AutoModelForCausalLM
    from trl import get_peft_config

    from sdgrpo.rewards import ContextDistillReward, DistillReward, TeacherNLLReward

    ensure_trl_runs_without_triton()
    train_cfg, model_cfg = parse_train_args([
        "--output_dir", str(tmp_path), "--max_steps", "1", "--per_device_train_batch_size", "8",
        "--num_generations", "4", "--max_completion_length", "10", "--report_to", "none", "--save_strategy", "no",
        "--collapse_guard", "off", "--reward", reward_name, "--advantage", "token", "--beta", "0",
        "--loss_type", "grpo", *options])
    reward = {"distill": lambda: DistillReward(teacher, tokenizer, policy=None),
              "teacher_nll": lambda: TeacherNLLReward(teacher, tokenizer),
              "context_distill": lambda: ContextDistillReward(None, tokenizer)}[reward_name]()
    trainer = SelfDistillGRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), reward_funcs=[reward],
                                     args=train_cfg, train_dataset=dataset, processing_class=tokenizer,
                                     peft_config=get_peft_config(model_cfg))
    reward.model = trainer.model
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    trainer.model.train()
    return trainer, reward


@pytest.mark.parametrize("reward_name, weight", [("distill", 0.0), ("teacher_nll", 0.0), ("distill", 0.5)])
def test_token_advantages_are_teacher_minus_policy_per_token(reward_name, weight, tiny_model_dir, tiny_tokenizer,
                                                             dataset, tmp_path):
    """--advantage token: each completion token's advantage is log q_teacher(y_t) - log p_policy(y_t) against one
    unpadded forward per sequence of each model (prompts of different lengths, truncated completions, padding), plus
    the weight times the group-normalised sequence advantage; 0 past the completion. TRL's loss then reads the
    (B, T) advantages: the loss equals -mean_rows(sum_t A_t / n) (beta 0, first iteration)."""
    teacher = make_llama(tiny_tokenizer, seed=44, layers=3)
    trainer, _ = teacher_trainer(tiny_model_dir, tiny_tokenizer, dataset, tmp_path, reward_name, teacher,
                                 "--sequence_advantage_weight", str(weight))
    batch = trainer._generate_and_score_completions(next(iter(trainer.get_train_dataloader())))
    adv, mask = batch["advantages"], batch["completion_mask"]
    assert adv.shape == mask.shape
    rows, terms = [], []
    for i in range(mask.size(0)):
        prompt = batch["prompt_ids"][i][batch["prompt_mask"][i].bool()].tolist()
        completion = batch["completion_ids"][i][mask[i].bool()].tolist()
        with torch.no_grad():
            term = reference_logps(teacher, prompt, completion) - reference_logps(trainer.model, prompt, completion)
        rows.append((len(prompt), len(completion)))
        terms.append(term)
    assert len({p for p, _ in rows}) > 1 and any(c == 10 for _, c in rows)  # prompt lengths differ; truncated rows
    means = torch.tensor([t.mean().item() for t in terms]).reshape(-1, 4)
    sequence = ((means - means.mean(1, keepdim=True)) / (means.std(1, keepdim=True) + 1e-4)).flatten()
    for i, term in enumerate(terms):
        n = term.numel()
        want = term + (weight * sequence[i] if reward_name == "distill" else 0.0)
        assert torch.allclose(adv[i, :n].double(), want.double(), atol=1e-4), i
        assert not adv[i, n:].any()
    trainer.current_gradient_accumulation_steps = 1
    loss = trainer.compute_loss(trainer.model, batch)
    independent = -((adv * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    assert loss.item() == pytest.approx(independent.item(), abs=1e-5)


def test_token_advantages_need_a_teacher_based_reward():
    from sdgrpo.errors import UserError

    with pytest.raises(UserError, match="--advantage token needs a teacher-based reward"):
        parse_train_args(["--advantage", "token"])
    with pytest.raises(UserError, match="drop --teacher_retokenize"):
        parse_train_args(["--advantage", "token", "--reward", "teacher_nll", "--teacher_retokenize", "true"])


def full_logps(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """log_softmax over the vocabulary at each completion position ([n, V], fp64), one unpadded eval-mode forward."""
    ids = torch.tensor([list(prompt) + list(completion)])
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    model.train(was_training)
    return torch.log_softmax(logits, dim=-1)[len(prompt) - 1: len(prompt) - 1 + len(completion)]


@pytest.mark.parametrize("reward_name", ["distill", "context_distill"])
def test_topk_term_is_the_reverse_kl_over_the_teachers_top_k(reward_name, tiny_model_dir, tiny_tokenizer, dataset,
                                                             tmp_path):
    """--distill_topk 5: the loss is TRL's GRPO loss plus 0.7 x the mean over completion tokens of KL(policy ||
    teacher) on the teacher's 5 most likely tokens and one bucket for the rest of the vocabulary, against one
    unpadded forward per sequence of each model over the whole vocabulary (prompts of different lengths, truncated
    rows, padding). For context_distill the teacher is the base shown the true continuation first."""
    from sdgrpo.scoring import adapters_disabled

    teacher = make_llama(tiny_tokenizer, seed=45, layers=3)
    trainer, reward = teacher_trainer(tiny_model_dir, tiny_tokenizer, dataset, tmp_path, reward_name, teacher,
                                      "--distill_topk", "5", "--distill_topk_weight", "0.7", "--lora_dropout", "0")
    inputs = next(iter(trainer.get_train_dataloader()))
    batch = trainer._generate_and_score_completions(inputs)
    mask = batch["completion_mask"]
    assert batch["teacher_topk_ids"].shape == (*mask.shape, 5)
    kls, lengths = [], set()
    for i in range(mask.size(0)):
        prompt = batch["prompt_ids"][i][batch["prompt_mask"][i].bool()].tolist()
        completion = batch["completion_ids"][i][mask[i].bool()].tolist()
        lengths.add(len(prompt))
        if reward_name == "distill":
            q = full_logps(teacher, prompt, completion)
        else:
            shown = reward.teacher_prompts([prompt], [inputs[i]["continuation"]])[0]
            with adapters_disabled(trainer.model):
                q = full_logps(trainer.model, shown, completion)
        p = full_logps(trainer.model, prompt, completion)
        top_q, ids = q.topk(5, dim=-1)
        n = len(completion)
        assert torch.equal(batch["teacher_topk_ids"][i, :n], ids)
        assert torch.allclose(batch["teacher_topk_logps"][i, :n].double(), top_q, atol=1e-4)
        top_p = p.gather(-1, ids)
        sp = torch.cat([top_p, torch.log1p(-top_p.exp().sum(-1, keepdim=True))], -1)
        sq = torch.cat([top_q, torch.log1p(-top_q.exp().sum(-1, keepdim=True))], -1)
        kls.append((sp.exp() * (sp - sq)).sum(-1))
    assert len(lengths) > 1
    term = torch.cat(kls).mean()
    assert term > 1e-4
    adv = batch["advantages"]
    trainer.current_gradient_accumulation_steps = 1
    loss = trainer.compute_loss(trainer.model, batch)
    policy = -((adv * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    assert loss.item() == pytest.approx(policy.item() + 0.7 * term.item(), abs=2e-6)
    assert trainer._metrics["train"]["distill/topk_kl"][-1] == pytest.approx(term.item(), abs=1e-6)
    loss.backward()  # the term reaches the adapters
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n_, p in trainer.model.named_parameters()
               if "lora_A" in n_)


class StepGradients:
    """A callback keeping the trainable parameters and their gradients at the first optimizer step (after the
    step's micro-batches, before the optimizer moves them)."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Keep(TrainerCallback):
            grads = params = None

            def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
                if self.grads is None:
                    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
                    self.grads = {n: p.grad.detach().clone() for n, p in trained}
                    self.params = {n: p.detach().clone() for n, p in trained}

        return _Keep()


@pytest.mark.parametrize("loss_type, accumulation", [("dapo", 1), ("dapo", 2), ("dapo", 4), ("grpo", 4)])
def test_topk_gradient_does_not_depend_on_accumulation(loss_type, accumulation, tiny_model_dir, tiny_tokenizer,
                                                       dataset, tmp_path):
    """--distill_topk 5, weight 0.7: the LoRA gradient of one optimizer step made of ``accumulation`` micro-batches
    (8 / accumulation rows each, one generation batch of 8) equals the gradient at accumulation 1 of the loss over
    the same 8 rows, computed here from one unpadded forward per row of the policy and of the teacher: TRL's policy
    term (dapo: -A log p summed over the completion tokens / their number; grpo: per row, then the mean of the rows)
    plus 0.7 x the top-K KL summed over the completion tokens / their number. The term was once added whole to each
    micro-batch's loss, which TRL had already divided by the accumulation: its weight became 0.7 x accumulation."""
    teacher = make_llama(tiny_tokenizer, seed=45, layers=3)
    trainer, _ = teacher_trainer(tiny_model_dir, tiny_tokenizer, dataset, tmp_path, "distill", teacher,
                                 "--distill_topk", "5", "--distill_topk_weight", "0.7", "--lora_dropout", "0",
                                 "--loss_type", loss_type, "--per_device_train_batch_size", str(8 // accumulation),
                                 "--gradient_accumulation_steps", str(accumulation), "--max_grad_norm", "0")
    # completions of different lengths: micro-batches of different token counts
    boost(trainer.model.get_base_model(), tiny_tokenizer.eos_token_id, 5.0, tiny_tokenizer, dataset[0]["prompt"])
    batches = []
    generate = trainer._generate_and_score_completions

    def recording(inputs):
        out = generate(inputs)
        batches.append({k: v.detach().clone() for k, v in out.items() if torch.is_tensor(v)})
        return out

    trainer._generate_and_score_completions = recording
    keep = StepGradients()
    trainer.add_callback(keep)
    trainer.train()
    assert len(batches) == 1 and batches[0]["completion_ids"].size(0) == 8
    model = trainer.model
    with torch.no_grad():  # back to the parameters the step's gradient was taken at
        for n, p in model.named_parameters():
            if n in keep.params:
                p.copy_(keep.params[n])
    model.zero_grad()
    model.train()
    batch = batches[0]
    mask, adv = batch["completion_mask"], batch["advantages"].double()
    total = mask.sum()
    policy, kl_sum, lengths = [], 0.0, set()
    for i in range(mask.size(0)):
        prompt = batch["prompt_ids"][i][batch["prompt_mask"][i].bool()].tolist()
        completion = batch["completion_ids"][i][mask[i].bool()].tolist()
        lengths.add(len(completion))
        n = len(completion)
        if not n:
            policy.append(torch.zeros((), dtype=torch.float64))
            continue
        logits = model(input_ids=torch.tensor([prompt + completion])).logits[0, len(prompt) - 1:-1].double()
        p = torch.log_softmax(logits / trainer.temperature, -1)
        taken = p.gather(-1, torch.tensor(completion)[:, None])[:, 0]
        a = adv[i, :n] if adv.dim() == 2 else adv[i].expand(n)
        policy.append(-(a * taken).sum() / (n if loss_type == "grpo" else 1))
        q = full_logps(teacher, prompt, completion)
        top_q, ids = q.topk(5, dim=-1)
        top_p = torch.log_softmax(logits, -1).gather(-1, ids)
        sp = torch.cat([top_p, torch.log1p(-top_p.exp().sum(-1, keepdim=True))], -1)
        sq = torch.cat([top_q, torch.log1p(-top_q.exp().sum(-1, keepdim=True))], -1)
        kl_sum = kl_sum + (sp.exp() * (sp - sq)).sum()
    assert len(lengths) > 2, lengths
    policy_loss = torch.stack(policy).sum() / (mask.size(0) if loss_type == "grpo" else total)
    (policy_loss + 0.7 * kl_sum / total).backward()
    worst = 0.0
    for n, p in model.named_parameters():
        if n in keep.grads:
            want, got = p.grad.float(), keep.grads[n]
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-6), (n, (got - want).abs().max().item())
            worst = max(worst, want.abs().max().item())
    assert worst > 1e-4  # the gradient is not vanishing


def test_topk_needs_a_teacher_based_reward():
    from sdgrpo.errors import UserError

    with pytest.raises(UserError, match="--distill_topk needs a teacher-based reward"):
        parse_train_args(["--distill_topk", "8"])
    with pytest.raises(UserError, match="--distill_topk must be 0 or more, not -1"):
        parse_train_args(["--distill_topk", "-1", "--reward", "distill"])


def test_generation_copies_not_held_leave_the_training_passes_their_memory(tiny_model_dir, tiny_tokenizer, dataset,
                                                                          tmp_path):
    """``--hold_generation_copies false`` reaches the engine: after a generation the int4 copies hold no weights
    while the loss's passes run, and the next generation makes them again."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trainer, _ = build_trainer(model, tiny_tokenizer, dataset, tmp_path, "--generation_engine", "true",
                               "--generation_weights", "int4", "--hold_generation_copies", "false", lora_scale=0.3)
    assert trainer.engine.quantised.hold is False and trainer.engine.dense.hold is False
    trainer.model.train()
    for _ in range(2):
        batch = trainer._generate_and_score_completions(next(iter(trainer.get_train_dataloader())))
        assert trainer.engine.mode == "int4" and trainer.engine.quantised.held() > 0
        copies = [c for known in trainer.engine.quantised.groups.values() for c, _ in known.values()]
        assert all(p.numel() == 0 for c in copies for p in c.parameters() if p.dim() > 1)
        trainer.current_gradient_accumulation_steps = 1
        trainer.compute_loss(trainer.model, batch)
