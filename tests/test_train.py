"""The training pipeline as `sdgrpo train` builds it: KL-pass reuse, temperature fallback, compiled generation,
FSDP gathering, teachers."""

from __future__ import annotations

import pytest
import torch

from conftest import make_llama, reference_logps
from sdgrpo.compat import ensure_trl_runs_without_triton
from sdgrpo.config import parse_train_args
from sdgrpo.errors import UserError
from sdgrpo.grpo_trainer import SelfDistillGRPOTrainer
from sdgrpo.rewards import DistillReward, SelfNLLReward
from sdgrpo.scoring import adapters_disabled, completion_logprobs


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


def test_rollouts_come_from_the_engine_and_the_reuse_stays_exact(tmp_path, prepared, tiny_model_dir):
    """With --generation_engine the trainer's one generate call is answered by the engine (LoRA folded), and the
    reward served from the KL pass still equals an independent pass over the sampled ids."""
    trainer, reward, tok = _trainer(tiny_model_dir, prepared, tmp_path, "--generation_engine", "true")
    assert trainer.engine is not None and trainer.reuse_reference_logprobs
    trainer.train()
    assert trainer.engine.calls == 1 and trainer.engine.fallbacks == 0 and trainer.reference_reuses == 1
    prompt_ids, completion_ids, _ = reward.calls[0]
    with adapters_disabled(trainer.model):
        own = completion_logprobs(trainer.model, prompt_ids, completion_ids, pad_token_id=tok.pad_token_id)
    assert reward.outputs[0] == pytest.approx([lp.mean().item() for lp in own], abs=1e-5)
    assert "generate" not in vars(trainer.model)  # the engine stepped aside after the rollouts


def test_compiled_engine_reserves_the_longest_prompt_plus_the_completion(tmp_path, prepared, tiny_model_dir):
    """With compiled decoding the trainer sizes the engine's cache once for the run: its longest training prompt as
    it tokenizes prompts (BOS and --max_prompt_length included), counted here independently, + 10 completion
    tokens. Uncompiled (CPU default) nothing is reserved: the cache follows each call."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = load_from_disk(str(prepared))["train"].select(range(8))["prompt"]
    lengths = [len(tok(p)["input_ids"]) for p in prompts]  # BOS + 16-24 tokens
    assert tok.bos_token_id is not None and min(lengths) < 22 < max(lengths)
    for limit, longest in [(22, 22), (40, max(lengths))]:
        trainer, _, _ = _trainer(tiny_model_dir, prepared, tmp_path / str(limit), "--generation_engine", "true",
                                 "--generation_compile", "true", "--max_prompt_length", str(limit))
        assert trainer.longest_prompt() == longest
    assert trainer.engine.compile and trainer.engine.reserve == longest + 10
    plain, _, _ = _trainer(tiny_model_dir, prepared, tmp_path / "plain", "--generation_engine", "true")
    assert not plain.engine.compile and plain.engine.reserve == 0


def test_temperature_not_one_falls_back_to_own_pass(tmp_path, prepared, tiny_model_dir):
    trainer, reward, tok = _trainer(tiny_model_dir, prepared, tmp_path, "--temperature", "0.7")
    assert not trainer.reuse_reference_logprobs
    trainer.train()
    assert reward.forward_passes == 1 and reward.calls[0][2] is None
    prompt_ids, completion_ids, _ = reward.calls[0]
    assert all(len(p) <= 12 for p in prompt_ids)


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

    import sdgrpo.grpo.rollouts as rollouts_module  # where _generate looks gathered_weights up

    entered = []

    @contextmanager
    def recording(model, skip_hooks):
        entered.append((model, skip_hooks))
        yield

    monkeypatch.setattr(rollouts_module, "gathered_weights", recording)
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


def test_distill_reuses_the_trainers_policy_pass(tmp_path, tiny_model_dir, tiny_tokenizer, corpus):
    """With steps_per_generation > gradient_accumulation_steps TRL computes the policy's log-probs before the
    rewards; distill takes them instead of running its own pass, and they equal that pass (LoRA dropout 0)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import get_peft_config

    from sdgrpo.compat import ensure_trl_runs_without_triton
    from sdgrpo.config import parse_train_args
    from sdgrpo.grpo_trainer import SelfDistillGRPOTrainer
    from sdgrpo.scoring import completion_logprobs

    ensure_trl_runs_without_triton()
    teacher = make_llama(tiny_tokenizer, seed=31, layers=3)
    train_cfg, model_cfg = parse_train_args([
        "--output_dir", str(tmp_path), "--max_steps", "1", "--per_device_train_batch_size", "4",
        "--num_generations", "4", "--steps_per_generation", "2", "--max_completion_length", "6",
        "--report_to", "none", "--save_strategy", "no", "--lora_dropout", "0", "--reward", "distill"])
    seen = []

    class Recording(DistillReward):
        def __call__(self, *a, **kw):
            out = super().__call__(*a, **kw)
            seen.append((kw["prompt_ids"], kw["completion_ids"], out, kw.get("policy_per_token_logps")))
            return out

    reward = Recording(teacher, tiny_tokenizer, policy=None)
    text = (corpus / "ruth.txt").read_text(encoding="utf-8-sig")[1000:3000]
    data = Dataset.from_dict({"prompt": [text[i : i + 60] for i in range(0, 1600, 200)]})
    trainer = SelfDistillGRPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                     reward_funcs=[reward], args=train_cfg, train_dataset=data,
                                     processing_class=tiny_tokenizer, peft_config=get_peft_config(model_cfg))
    reward.model = trainer.model
    policy_before = {k: v.clone() for k, v in trainer.model.state_dict().items() if "lora" in k}
    trainer.train()
    assert seen and seen[0][3] is not None and reward.policy_passes == 0
    prompt_ids, completion_ids, out, _ = seen[0]
    trainer.model.load_state_dict(policy_before, strict=False)  # the policy as it was when it sampled
    own_policy = completion_logprobs(trainer.model, prompt_ids, completion_ids, pad_token_id=1)
    own_teacher = completion_logprobs(teacher, prompt_ids, completion_ids, pad_token_id=1)
    assert out == pytest.approx([(q - p).mean().item() for q, p in zip(own_teacher, own_policy)], abs=1e-4)


def test_teacher_adapter_is_merged_into_a_frozen_copy(tmp_path, tiny_model_dir, tiny_tokenizer, teacher_student_batch):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from sdgrpo.config import parse_train_args
    from sdgrpo.train import load_teacher

    _, _, prompts, comps = teacher_student_batch
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                          LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    peft.save_pretrained(tmp_path / "adapter")
    cfg, _ = parse_train_args(["--reward", "distill", "--teacher_adapter", str(tmp_path / "adapter")])
    teacher, _ = load_teacher(cfg, str(tiny_model_dir))
    assert not any(p.requires_grad for p in teacher.parameters()) and not hasattr(teacher, "peft_config")
    for p, c in zip(prompts, comps):  # the merged teacher scores as base + adapter does
        torch.testing.assert_close(reference_logps(teacher, p, c), reference_logps(peft, p, c), atol=1e-5, rtol=0)
    cfg, _ = parse_train_args(["--reward", "distill", "--teacher_adapter", str(tmp_path)])
    with pytest.raises(UserError, match="no adapter_config.json"):
        load_teacher(cfg, str(tiny_model_dir))


def test_several_gpus_in_one_process_is_one_clear_line(monkeypatch):
    """Trainer would wrap the model in nn.DataParallel, which TRL refuses with a traceback: say what to do instead."""
    from sdgrpo.errors import UserError
    from sdgrpo.train import check_one_gpu_per_process

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(UserError, match="2 GPUs are visible to this one process; use them all with `accelerate launch"):
        check_one_gpu_per_process()
    monkeypatch.setenv("WORLD_SIZE", "2")  # under accelerate/torchrun each process has its own GPU
    check_one_gpu_per_process()
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    check_one_gpu_per_process()


@pytest.mark.parametrize("extra, want", [((), True), (("--backend", "unsloth"), True),
                                         (("--backend", "unsloth", "--reuse_reference_logprobs", "false"), False),
                                         (("--reuse_reference_logprobs", "false"), False)])
def test_reference_reuse_is_auto_on_for_either_backend(tmp_path, prepared, tiny_model_dir, extra, want, caplog):
    """auto: reuse on either backend (under Unsloth from its left-packed KL pass, which the GPU test
    test_unsloth_reward_reuses_the_left_packed_reference_pass checks against an independent pass), without a
    warning; false turns it off. The trainer is built as `sdgrpo train` builds it."""
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import get_peft_config

    from sdgrpo.train import build_trainer

    ensure_trl_runs_without_triton()
    train_cfg, model_cfg = parse_train_args(["--output_dir", str(tmp_path), "--max_steps", "1", "--report_to", "none",
                                             "--per_device_train_batch_size", "4", "--num_generations", "4", *extra])
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with caplog.at_level("WARNING", logger="sdgrpo.train"):
        trainer = build_trainer(SelfDistillGRPOTrainer, train_cfg, model, tok, get_peft_config(model_cfg),
                                load_from_disk(str(prepared))["train"].select(range(4)), SelfNLLReward(None, tok), [])
    assert trainer.reuse_reference_logprobs is want
    assert "reuse" not in caplog.text, caplog.text


def test_reference_reuse_option_refuses_other_words(tmp_path):
    with pytest.raises(UserError, match="--reuse_reference_logprobs must be one of auto, true, false, not 'maybe'"):
        parse_train_args(["--output_dir", str(tmp_path), "--reuse_reference_logprobs", "maybe"])


def test_cudnn_attention_is_off_unless_asked_for(tmp_path, prepared):
    """`sdgrpo train` and `sdgrpo sft` take cuDNN out of SDPA's kernels for the process (its per-shape plans cost
    ~0.5 s per new batch shape on H100); --cudnn_attention true leaves it in."""
    from sdgrpo.train import resolve

    was = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        for extra, expected in [([], False), (["--cudnn_attention", "true"], True), ([], False)]:
            torch.backends.cuda.enable_cudnn_sdp(not expected)
            train_cfg, model_cfg = parse_train_args(["--output_dir", str(tmp_path), "--dataset_path", str(prepared),
                                                     *extra])
            resolve(train_cfg, model_cfg)
            assert torch.backends.cuda.cudnn_sdp_enabled() is expected, extra
    finally:
        torch.backends.cuda.enable_cudnn_sdp(was)


def test_a_tiled_mlp_trains_the_same_weights(tmp_path, prepared, tiny_model_dir, caplog, monkeypatch):
    """--tile_mlp true (tiles of 8 tokens here, so every pass of 4 rows x 22 tokens runs tiled): one GRPO step gives
    LoRA weights equal to the same step without it, to float32 rounding; every decoder layer's MLP is wrapped and ran
    tiled; one line logged; false wraps nothing."""
    import logging

    from sdgrpo import tiling

    monkeypatch.setattr(tiling, "TILE_TOKENS", 8)
    weights = {}
    for setting in ("false", "true"):
        torch.manual_seed(0)
        with caplog.at_level(logging.INFO, logger="sdgrpo.grpo_trainer"):
            trainer, _, _ = _trainer(tiny_model_dir, prepared, tmp_path / setting, "--tile_mlp", setting)
            initial = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
            trainer.train()
        weights[setting] = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
        wrappers = [m.__dict__.get("forward") for m in tiling.mlp_modules(trainer.model)]
        assert len(wrappers) == trainer.model.config.num_hidden_layers
        if setting == "true":
            assert all(isinstance(w, tiling.TiledForward) and w.tiled_calls >= 3 for w in wrappers)
        else:
            assert all(w is None for w in wrappers)
    assert any(not torch.equal(weights["true"][n], initial[n]) for n in initial)  # the step moved the adapters
    assert all(torch.allclose(weights["false"][n], weights["true"][n], rtol=1e-5, atol=1e-7) for n in weights["false"])
    assert "MLP tiled: the MLPs of 2 layers run over tiles of 8 tokens" in caplog.text


def test_offloaded_activations_train_the_same_weights_and_log_what_went_to_cpu_memory(tmp_path, prepared,
                                                                                      tiny_model_dir, caplog):
    """--offload_activations true: three GRPO steps give LoRA weights equal bit for bit to the same steps without it;
    every step's pass sends its checkpointed layers' inputs to CPU memory, logged for that step as
    memory/offloaded_gib = layers x rows x tokens x hidden x 4 bytes (fp32) of the pass's own batch; one line
    logged; false installs nothing. (TRL's reference pass turns checkpointing off and on again, which sets every
    layer's checkpoint function anew: offloading stopped after the first step, and the peak of a 7B at 2,048 tokens
    kept its 3.4 GiB of layer inputs, one H100, 2026-12-08.)"""
    import logging

    from sdgrpo import offload

    weights, passes = {}, []
    for setting in ("false", "true"):
        torch.manual_seed(0)
        trainer, _, _ = _trainer(tiny_model_dir, prepared, tmp_path / setting, "--offload_activations", setting,
                                 "--logging_steps", "1", "--max_steps", "3")
        inner = trainer._compute_loss_corrected

        def recorded(model, inputs, *args, _inner=inner, **kwargs):
            passes.append(inputs["prompt_ids"].size(0) * (inputs["prompt_ids"].size(1)
                                                         + inputs["completion_ids"].size(1)))
            return _inner(model, inputs, *args, **kwargs)

        trainer._compute_loss_corrected = recorded
        passes.clear()
        with caplog.at_level(logging.INFO, logger="sdgrpo.grpo_trainer"):
            trainer.train()
        weights[setting] = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
        wrapped = [isinstance(m._gradient_checkpointing_func, offload.OffloadedCheckpoint)
                   for m in offload.checkpointed_layers(trainer.model)]
        assert wrapped and all(wrapped) == (setting == "true") and any(wrapped) == (setting == "true")
    assert all(torch.equal(weights["false"][n], weights["true"][n]) for n in weights["false"])
    config = trainer.model.config
    assert caplog.text.count(f"activations offloaded: the inputs of {config.num_hidden_layers} checkpointed") == 1
    logged = [row["memory/offloaded_gib"] for row in trainer.state.log_history if "memory/offloaded_gib" in row]
    assert len(passes) == 3 and len(logged) == 3
    for tokens, gib in zip(passes, logged):
        assert gib == pytest.approx(config.num_hidden_layers * tokens * config.hidden_size * 4 / 2**30, rel=1e-6)
