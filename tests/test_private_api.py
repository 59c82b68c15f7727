"""The private TRL, transformers and torch names sdgrpo overrides or calls, checked against the installed versions.

sdgrpo pins trl 1.15.0 and transformers <= 5.17.0 (Unsloth's range). An upgrade that renames, removes or re-orders
any of these fails here, in CI, instead of silently changing what a run computes. Where each is used:
``grpo_trainer.py`` and ``grpo/`` (GRPO hooks), ``checkpointing.py`` (checkpoint overrides), ``compat.py`` (the
Triton stand-in), ``callbacks.py`` (TRL's metric store), ``fsdp.py`` (FSDP2 internals), ``engine/`` (transformers'
generation config resolution, PEFT's per-layer adapter switch, transformers' SDPA attention and its head pairing,
inductor's cuBLAS workspace guard around a capture), ``sft.py`` (SFTTrainer's ``compute_loss_func`` hook),
``progress.py`` (transformers' progress callback), ``replay.py`` with ``sft.py`` and ``grpo/rollouts.py`` (the
samplers of self-replay, the column its collator keeps).
"""

from __future__ import annotations

import inspect

import pytest

# (module, class, method): the parameter names sdgrpo's override relies on, in order (a prefix where it passes the
# rest on with *args/**kwargs).
PINNED = {
    ("trl", "GRPOTrainer", "_tokenize_prompts"): ["self", "prompts"],
    ("trl", "GRPOTrainer", "_generate"): ["self", "prompts"],
    ("trl", "GRPOTrainer", "_get_per_token_logps_and_entropies"):
        ["self", "model", "input_ids", "attention_mask", "logits_to_keep", "batch_size", "compute_entropy",
         "compute_aux_loss"],
    ("trl", "GRPOTrainer", "_generate_and_score_completions"): ["self", "inputs"],
    ("trl", "GRPOTrainer", "_calculate_rewards"): ["self", "inputs", "prompts", "completions", "completion_ids_list"],
    ("trl", "GRPOTrainer", "_save_checkpoint"): ["self", "model", "trial"],
    ("trl", "GRPOTrainer", "_load_optimizer_and_scheduler"): ["self", "checkpoint"],
    ("trl", "SFTTrainer", "_save_checkpoint"): ["self", "model", "trial"],  # sft.py: CheckpointMixin over SFTTrainer
    ("transformers", "Trainer", "_save_checkpoint"): ["self", "model", "trial"],
    ("transformers", "Trainer", "_save_optimizer_and_scheduler"): ["self", "output_dir"],
    ("transformers", "Trainer", "_load_optimizer_and_scheduler"): ["self", "checkpoint"],
    ("transformers", "Trainer", "_save_rng_state"): ["self", "output_dir"],
    ("transformers", "Trainer", "_load_rng_state"): ["self", "checkpoint"],
    ("transformers", "Trainer", "_get_output_dir"): ["self", "trial"],
    # not overridden: callbacks.STORED_WEIGHTS keeps the best held-out adapter out of its adapter sub-folder scan
    ("transformers", "Trainer", "_load_from_checkpoint"): ["self", "resume_from_checkpoint", "model"],
    ("transformers", "Trainer", "_get_train_sampler"): ["self", "train_dataset"],
    ("trl", "GRPOTrainer", "_get_train_sampler"): ["self", "dataset"],
    ("trl", "SFTTrainer", "_set_signature_columns_if_needed"): ["self"],
    ("torch.distributed.fsdp", "FSDPModule", "set_reshard_after_forward"): ["self", "reshard_after_forward", "recurse"],
    ("torch.distributed.fsdp", "FSDPModule", "reshard"): ["self"],
    ("torch.distributed.fsdp", "FSDPModule", "_get_fsdp_state"): ["self"],
    ("torch.distributed.fsdp", "FSDPModule", "unshard"): ["self", "async_op"],
    ("torch.distributed.fsdp._fully_shard._fsdp_state", "FSDPState", "_lazy_init"): ["self"],
    ("transformers", "GenerationMixin", "_prepare_generation_config"): ["self", "generation_config"],
    ("transformers", "GenerationConfig", "_get_default_generation_params"): [],
}

# Attributes that GRPOTrainer.__init__ / SFTTrainer.__init__ must still set, read by sdgrpo.
INIT_ATTRIBUTES = {
    ("trl", "GRPOTrainer"): ["self.eos_token_ids", "self._metrics", "self.beta", "self.temperature",
                             "self.ref_model", "self.mask_truncated_completions"],
    ("trl", "SFTTrainer"): ["self._metrics"],
    ("peft.tuners.lora", "LoraLayer"): ["self._disable_adapters", "self.lora_variant", "self.scaling"],
    ("transformers.trainer_callback", "ProgressCallback"): ["self.training_bar"],
    # replay.repeat_sampler reads TRL's GRPO sampler's repetition
    ("trl.trainer.utils", "RepeatSampler"): ["self.mini_repeat_count", "self.batch_size", "self.repeat_count"],
}


def parameter_names(module: str, cls: str, method: str) -> list[str]:
    import importlib

    return list(inspect.signature(getattr(getattr(importlib.import_module(module), cls), method)).parameters)


def mismatch(module: str, cls: str, method: str, expected: list[str]) -> str | None:
    """Why the installed method does not match the pinned names, or None."""
    try:
        names = parameter_names(module, cls, method)
    except AttributeError:
        return f"{module}.{cls}.{method} no longer exists"
    if names[: len(expected)] != expected:
        return f"{module}.{cls}.{method}{tuple(names)}: sdgrpo relies on {tuple(expected)}"
    return None


@pytest.mark.parametrize("key", list(PINNED), ids=[".".join(k[1:]) for k in PINNED])
def test_pinned_private_signatures(key):
    assert mismatch(*key, PINNED[key]) is None


@pytest.mark.parametrize("key", list(INIT_ATTRIBUTES), ids=[k[1] for k in INIT_ATTRIBUTES])
def test_attributes_set_in_init(key):
    import importlib

    source = inspect.getsource(getattr(importlib.import_module(key[0]), key[1]).__init__)
    assert [a for a in INIT_ATTRIBUTES[key] if f"{a} =" not in source and f"{a}:" not in source] == []


def test_trl_fused_logprob_hook_point_exists():
    """compat.py swaps this name when Triton is missing; a rename would leave CPU training broken."""
    import trl.trainer.utils as trl_utils

    assert hasattr(trl_utils, "_ChunkedLogProbFunction")
    assert "_ChunkedLogProbFunction.apply(" in inspect.getsource(trl_utils)


def test_the_check_catches_a_changed_signature(monkeypatch):
    """Edit a copy of a pinned method (an extra leading parameter, as an upgrade might add): the check fails."""
    import trl

    def changed(self, mode, inputs, prompts, completions, completion_ids_list):
        return None

    monkeypatch.setattr(trl.GRPOTrainer, "_calculate_rewards", changed)
    key = ("trl", "GRPOTrainer", "_calculate_rewards")
    assert "sdgrpo relies on ('self', 'inputs', 'prompts'" in mismatch(*key, PINNED[key])
    monkeypatch.delattr(trl.GRPOTrainer, "_calculate_rewards")
    assert "no longer exists" in mismatch(*key, PINNED[key])


def test_the_grouped_attention_couplings():
    """engine.attention.grouped_sdpa stands in for transformers' SDPA function (same arguments; it calls it back),
    reads the query heads in repeat_kv's pairing, and is chosen through the config's ``_attn_implementation``, which
    the attention layers read at every forward."""
    import torch
    from transformers.integrations import sdpa_attention
    from transformers.masking_utils import sdpa_mask  # noqa: F401  (registered for the grouped name)
    from transformers.models.llama import modeling_llama

    names = list(inspect.signature(sdpa_attention.sdpa_attention_forward).parameters)
    assert names[:8] == ["module", "query", "key", "value", "attention_mask", "dropout", "scaling", "is_causal"]
    x = torch.arange(2 * 3 * 5 * 4, dtype=torch.float32).reshape(2, 3, 5, 4)
    repeated = sdpa_attention.repeat_kv(x, 4)
    assert all(torch.equal(repeated[:, j * 4 + g], x[:, j]) for j in range(3) for g in range(4))
    source = inspect.getsource(modeling_llama.LlamaAttention.forward)
    assert "get_interface(" in source and "config._attn_implementation" in source


def test_sft_trainer_hands_its_logits_to_compute_loss_func():
    """sft.py's distillation loss is TRL's compute_loss_func hook: called with the model's outputs (logits), the
    labels and num_items_in_batch."""
    from trl import SFTTrainer

    source = " ".join(inspect.getsource(SFTTrainer.compute_loss).split())
    assert ('self.compute_loss_func( model(**logits_inputs), inputs.get("labels"), '
            'num_items_in_batch=num_items_in_batch )') in source


def test_the_class_declarations_the_engine_decides_support_from():
    """engine.support.unsupported and engine.attention._attention_through_registry read what transformers' model
    classes declare: these names must still exist on PreTrainedModel, with Llama declaring them and Mamba not taking
    a Cache."""
    import transformers
    from transformers import PreTrainedModel
    from transformers.generation.utils import GenerationMixin

    for name in ("_can_compile_fullgraph", "_supports_attention_backend"):
        assert hasattr(PreTrainedModel, name), name
    assert hasattr(GenerationMixin, "_supports_default_dynamic_cache")
    llama = transformers.LlamaForCausalLM
    assert llama._can_compile_fullgraph and llama._supports_attention_backend
    assert "past_key_values" in inspect.signature(llama.forward).parameters
    assert "past_key_values" not in inspect.signature(transformers.MambaForCausalLM.forward).parameters


def test_peft_lora_bias_is_a_per_adapter_flag_on_lora_b():
    """engine.folded.Folded folds ``lora_bias`` as PEFT's merge does: ``bias + scaling * lora_B.bias``."""
    from peft.tuners.lora import Linear

    merge = inspect.getsource(Linear.merge)
    assert "self.lora_bias[active_adapter]" in merge and "self.lora_B[active_adapter].bias" in merge


def test_trls_loss_applies_the_importance_ratio_under_its_vllm_branch_only():
    """trainer._compute_loss takes TRL's vLLM branch for the engine's corrected rollouts: that branch must still be
    the only use of ``use_vllm`` in the loss, and multiply the per-token loss by ``importance_sampling_ratio``; the
    ratio's modes (grpo.correction.importance_weights) are TRL's."""
    from trl import GRPOConfig, GRPOTrainer

    source = inspect.getsource(GRPOTrainer._compute_loss)
    assert source.count("self.use_vllm") == 1
    assert ('if self.use_vllm and self.vllm_importance_sampling_correction and self.loss_type != "vespo":\n'
            '            per_token_loss = per_token_loss * inputs["importance_sampling_ratio"]') in source
    prepare = inspect.getsource(GRPOTrainer._generate_and_score_completions)
    for mode in ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask"):
        assert f'"{mode}"' in prepare
    assert 'output["sampling_per_token_logps"] = sampling_per_token_logps' in prepare
    # The ratio is set by the loss's own policy pass (trainer._set_importance_ratio from
    # _get_per_token_logps_and_entropies) where TRL made no old log-probs: TRL must read it after that pass, and
    # then take the pass's detached log-probs as the old ones.
    assert (source.index("self._get_per_token_logps_and_entropies(") < source.index("importance_sampling_ratio")
            < source.index('inputs["importance_sampling_ratio"]'))
    assert "old_per_token_logps = per_token_logps.detach() if old_per_token_logps is None" in source
    assert "self.args.gradient_accumulation_steps % generate_every != 0" in prepare  # when TRL makes them
    fields = GRPOConfig.__dataclass_fields__
    assert {"vllm_importance_sampling_mode", "vllm_importance_sampling_clip_max",
            "vllm_importance_sampling_clip_min"} <= set(fields)


def test_trls_loss_reads_per_token_advantages():
    """--advantage token hands TRL (B, T) advantages: its loss must keep unsqueezing only a 1-D tensor."""
    from trl import GRPOTrainer

    source = inspect.getsource(GRPOTrainer._compute_loss)
    assert 'advantages = inputs["advantages"]' in source
    assert "if advantages.dim() == 1:\n            advantages = advantages.unsqueeze(1)" in source


def test_what_leave_runs_before_os_exit():
    """runs.leave runs the exit handlers itself (CPython's ``atexit._run_exitfuncs``) before ``os._exit``."""
    import atexit

    assert callable(atexit._run_exitfuncs)


def test_what_the_topk_term_shadows_and_reuses():
    """--distill_topk: the loss's pass is TRL's own ``_get_per_token_logps_and_entropies`` with its fused head's
    operands routed to sdgrpo (``compat.fused_head_route``): TRL's loop over ``batch_size`` rows builds the labels
    sdgrpo rebuilds to align the teacher's top-K ids, and its patched forward calls the module-level
    ``_ChunkedLogProbFunction.apply`` with the labelled positions' hidden states (log-probs at ``self.temperature``);
    the divergence is TRL's SDPO ``add_tail_bucket`` and ``compute_divergence`` (alpha 1: KL(student || teacher)),
    checked here in numbers."""
    import torch
    import trl.trainer.utils as trl_utils
    from trl import GRPOTrainer
    from trl.experimental.sdpo.loss_utils import add_tail_bucket, compute_divergence

    source = inspect.getsource(GRPOTrainer._get_per_token_logps_and_entropies)
    assert "fused_lm_head=True" in source and "outputs.log_probs[:, -logits_to_keep:]" in source
    assert "for start in range(0, input_ids.size(0), batch_size):" in source
    assert "labels = input_ids_batch.masked_fill(attention_mask_batch == 0, -100)" in source
    assert "labels[:, :-logits_to_keep] = -100" in source
    assert "temperature=self.temperature" in inspect.getsource(GRPOTrainer.__init__)
    head = inspect.getsource(trl_utils.add_fused_lm_head)
    assert "_ChunkedLogProbFunction.apply(\n                hidden_states[mask]," in head
    s = torch.log_softmax(torch.tensor([[2.0, 1.0, 0.0, -1.0]]), -1)[:, :2]
    t = torch.log_softmax(torch.tensor([[0.0, 1.5, 0.5, 0.0]]), -1)[:, :2]
    bs, bt = add_tail_bucket(s), add_tail_bucket(t)
    assert torch.allclose(bs.exp().sum(-1), torch.ones(1)) and torch.allclose(bt.exp().sum(-1), torch.ones(1))
    assert torch.allclose(compute_divergence(bs, bt, 1.0), (bs.exp() * (bs - bt)).sum(-1), atol=1e-6)
    # The term is divided for gradient accumulation as TRL divides its dapo loss; the Trainer divides nothing more.
    assert GRPOTrainer.loss_is_scaled_for_ga is True
    loss = inspect.getsource(GRPOTrainer._compute_loss)
    assert ('normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes' in loss
            and "normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation" in loss)


def test_the_int4_weight_only_kernels_the_engine_calls():
    """engine.int4.Int4Linear: ATen's int4 weight-only ops (CPU names here; CUDA's ``_convert_weight_to_int4pack`` takes
    two values a byte, ``_weight_int4pack_mm`` the same scales) keep their arguments, and the CPU pair computes
    ``x @ ((q - 8) * scale + zero)^T`` with bf16 (scale, zero) pairs laid out [K / group, N, 2]."""
    import torch

    for name, args in (("_convert_weight_to_int4pack", ["self", "innerKTiles"]),
                       ("_convert_weight_to_int4pack_for_cpu", ["self", "innerKTiles"]),
                       ("_weight_int4pack_mm", ["self", "mat2", "qGroupSize", "qScaleAndZeros"]),
                       ("_weight_int4pack_mm_for_cpu", ["self", "mat2", "qGroupSize", "qScaleAndZeros"])):
        schema = getattr(torch.ops.aten, name).default._schema
        assert [a.name for a in schema.arguments] == args, (name, schema)
    torch.manual_seed(0)
    n, k, group = 32, 128, 64
    q = torch.randint(0, 16, (n, k), dtype=torch.int32)
    scale, zero = torch.rand(k // group, n) / 10, torch.randn(k // group, n)
    scales_zeros = torch.stack([scale, zero], -1).to(torch.bfloat16)
    x = torch.randn(3, k).to(torch.bfloat16)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 4)
    got = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, scales_zeros).float()
    s, z = scales_zeros[..., 0].t().float(), scales_zeros[..., 1].t().float()
    w = ((q.reshape(n, k // group, group).float() - 8) * s[..., None] + z[..., None]).reshape(n, k)
    assert torch.allclose(got, x.float() @ w.to(torch.bfloat16).float().t(), rtol=2e-2, atol=2e-2)


def test_the_logit_scale_and_cap_are_read_as_trls_fused_head_reads_them():
    """``chunked.head_transform`` mirrors what TRL 1.15's ``add_fused_lm_head`` reads from a config: on a soft-capped
    Gemma-2, a Cohere (``logit_scale``) and a Granite (``logits_scaling``), the scale and cap TRL's patched forward
    passes to its kernel are the ones sdgrpo reads."""
    import torch
    from transformers import (
        CohereConfig,
        CohereForCausalLM,
        Gemma2Config,
        Gemma2ForCausalLM,
        GraniteConfig,
        GraniteForCausalLM,
    )
    from trl.trainer.utils import add_fused_lm_head

    from sdgrpo.chunked import head_transform
    from sdgrpo.compat import fused_head_route

    small = dict(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                 intermediate_size=32, pad_token_id=0)
    models = [Gemma2ForCausalLM(Gemma2Config(**small, head_dim=8, final_logit_softcapping=3.0)),
              CohereForCausalLM(CohereConfig(**small, logit_scale=0.25)),
              GraniteForCausalLM(GraniteConfig(**small, logits_scaling=4.0))]
    for model in models:
        add_fused_lm_head(model)
        seen = []

        def head(hidden, weight, bias, targets, temperature, chunk_size, softcap=None, scale=1.0, outputs=(),
                 seen=seen):
            seen.append((scale, softcap))
            return torch.zeros(len(targets)), None, None, None, None

        ids = torch.tensor([[1, 2, 3]])
        with fused_head_route(head), torch.no_grad():
            model(input_ids=ids, labels=ids, fused_lm_head=True)
        assert seen == [head_transform(model.config)], type(model).__name__
    assert [head_transform(m.config) for m in models] == [(1.0, 3.0), (0.25, None), (0.25, None)]


def test_the_progress_callback_that_sdgrpo_replaces():
    """progress.CompactProgress subclasses transformers' ProgressCallback, keeping its bar (``training_bar``, made in
    on_train_begin, advanced by ``global_step - current_step``), and quiet_terminal takes out the progress or printer
    callback that the Trainer adds by class."""
    from transformers import Trainer
    from transformers.trainer_callback import ProgressCallback

    begin = inspect.getsource(ProgressCallback.on_train_begin)
    assert "self.training_bar = tqdm(" in begin and "self.current_step = 0" in begin
    assert "state.global_step - self.current_step" in inspect.getsource(ProgressCallback.on_step_end)
    assert "self.training_bar.write(" in inspect.getsource(ProgressCallback.on_log)
    assert ("PrinterCallback if self.args.disable_tqdm else DEFAULT_PROGRESS_CALLBACK"
            in inspect.getsource(Trainer.__init__))


def test_the_checkpoint_function_that_offload_wraps():
    """offload.install wraps the ``_gradient_checkpointing_func`` that transformers' GradientCheckpointingLayer calls
    (set by PreTrainedModel._set_gradient_checkpointing on every module with a ``gradient_checkpointing`` flag), and
    relies on torch's non-reentrant checkpoint saving its inputs before it enters its own saved-tensor hooks
    (torch 2.13: ``new_frame.save_inputs(*args)``, saved tensors; earlier: ``NoopSaveInputs.apply``), so that the
    hooks around it (save_on_cpu's) pack them; tests/test_offload.py counts them."""
    import torch.utils.checkpoint as checkpoint
    from transformers import PreTrainedModel
    from transformers.modeling_layers import GradientCheckpointingLayer

    assert ("self._gradient_checkpointing_func(partial(super().__call__, **kwargs), *args)"
            in inspect.getsource(GradientCheckpointingLayer.__call__))
    assert ('setattr(module, "_gradient_checkpointing_func", gradient_checkpointing_func)'
            in inspect.getsource(PreTrainedModel._set_gradient_checkpointing))
    source = inspect.getsource(checkpoint._checkpoint_without_reentrant_generator)
    saver = next(k for k in ("new_frame.save_inputs(", "NoopSaveInputs.apply(") if k in source)
    assert source.index(saver) < source.index("with _checkpoint_hook(")


def test_trls_no_grad_passes_set_the_checkpoint_function_anew(tiny_model_dir):
    """TRL 1.15 runs its reference and old-policy passes inside ``disable_gradient_checkpointing``, which turns
    checkpointing back on with ``gradient_checkpointing_enable``: every layer's ``_gradient_checkpointing_func`` is
    then a new one, so a wrapper set on it before is gone. This is why the GRPO trainer installs offload's wrappers
    before every pass (grpo_trainer._offload_layer_inputs), not once."""
    from transformers import AutoModelForCausalLM
    from trl.models.utils import disable_gradient_checkpointing

    from sdgrpo import offload

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert offload.install(model, [0]) == model.config.num_hidden_layers
    with disable_gradient_checkpointing(model, {"use_reentrant": False}):
        pass
    layers = offload.checkpointed_layers(model)
    assert layers and not any(isinstance(m._gradient_checkpointing_func, offload.OffloadedCheckpoint) for m in layers)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_the_mlp_call_that_tiling_wraps(family):
    """tiling.install replaces the ``forward`` of each decoder layer's ``mlp`` on the instance: the decoder layers of
    these families call it with the hidden states alone and take one tensor back; a layer is a
    GradientCheckpointingLayer (what tiling.mlp_modules looks for)."""
    import importlib

    from transformers.modeling_layers import GradientCheckpointingLayer

    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    layer = getattr(module, f"{family.capitalize()}DecoderLayer")
    assert issubclass(layer, GradientCheckpointingLayer)
    assert "hidden_states = self.mlp(hidden_states)" in inspect.getsource(layer.forward)


def test_the_cublas_workspace_guard_the_engines_capture_uses():
    """engine/decode.py captures its step inside inductor's ``clear_cublas_manager``: a context manager that clears
    PyTorch's per-(handle, stream) cuBLAS workspaces on entry and on exit, through ``_cuda_clearCublasWorkspaces``."""
    from torch._inductor import cudagraph_trees

    manager = cudagraph_trees.clear_cublas_manager
    assert inspect.isfunction(inspect.unwrap(manager))
    source = inspect.getsource(inspect.unwrap(manager))
    assert source.count("clear_cublass_cache()") == 2
    assert "torch._C._cuda_clearCublasWorkspaces()" in inspect.getsource(cudagraph_trees.clear_cublass_cache)
