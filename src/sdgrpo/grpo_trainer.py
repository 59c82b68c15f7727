"""TRL's GRPOTrainer with the few hooks self-distillation needs, one mixin per concern (``sdgrpo/grpo/``):

- ``grpo/rollouts.py`` (RolloutMixin): the sampler's order, ``max_prompt_length`` (dropped by TRL 1.15: the last N
  prompt tokens after the leading special tokens), generation through sdgrpo's decoding engine (engine/).
- ``grpo/reuse.py`` (RewardReuseMixin): rewards receive ``prompt_ids`` and, with beta > 0 and temperature 1, the
  log-probs of the KL term's reference pass, so the self-NLL reward costs no extra forward pass; collapse metrics.
- ``grpo/distill.py`` (TokenDistillMixin): per-token advantages and the top-K distillation term.
- ``grpo/correction.py`` (RolloutCorrectionMixin): importance correction of the engine's rollouts, as TRL's of vLLM's.
- ``checkpointing.py`` (CheckpointMixin): the checkpoint overrides.

This module keeps what joins them: ``__init__``, activation offloading, and the TRL methods in which several concerns
meet, which call the mixins' parts: ``_generate_and_score_completions``, ``_get_per_token_logps_and_entropies``,
``compute_loss`` and ``_compute_loss``. No two of these classes define the same method (tests/test_grpo_trainer.py
checks), so every ``super()`` call in them reaches TRL's implementation (or Unsloth's), whatever the mixins' order.

Private TRL methods overridden (pinned: trl 1.15.0; signatures checked by tests/test_private_api.py):
``_tokenize_prompts``, ``_generate``, ``_get_per_token_logps_and_entropies``, ``_generate_and_score_completions``,
``_calculate_rewards``; attributes read: ``_metrics``, ``eos_token_ids``, ``beta``, ``temperature``, ``ref_model``.
FSDP2 internals are in ``fsdp.py``; the decoding engine that answers TRL's ``unwrapped_model.generate`` call in
``_generate`` (``--generation_engine``) in ``engine/decode.py``.
"""

from __future__ import annotations

import logging

import torch
from trl import GRPOTrainer

from sdgrpo.checkpointing import CheckpointMixin
from sdgrpo.engine import DecodeEngine
from sdgrpo.grpo.correction import (
    LOW_WEIGHT,
    RolloutCorrectionMixin,
    importance_weights,
    ratio_stats,
    rollout_mismatch,
)
from sdgrpo.grpo.distill import TokenDistillMixin
from sdgrpo.grpo.reuse import RewardReuseMixin, _lora_layers, completion_columns, disable_dropout
from sdgrpo.grpo.rollouts import RolloutMixin
from sdgrpo.scoring import active_dropout

logger = logging.getLogger(__name__)

# Importable from here as before the split (tests, benchmarks/bench_mismatch.py, users' code).
__all__ = ["LOW_WEIGHT", "SelfDistillGRPOTrainer", "SelfDistillMixin", "completion_columns", "disable_dropout",
           "importance_weights", "ratio_stats", "rollout_mismatch", "trainer_class"]


class SelfDistillMixin(RolloutMixin, RewardReuseMixin, TokenDistillMixin, RolloutCorrectionMixin, CheckpointMixin):
    """The overrides, as a mixin so they also apply on top of Unsloth's patched GRPOTrainer: the mixins composed,
    and TRL 1.15's ``__init__``, ``_generate_and_score_completions``, ``_get_per_token_logps_and_entropies``,
    ``compute_loss`` and ``_compute_loss`` shadowed here, each calling the mixins' parts in one place."""

    left_packed_logps = False  # True on top of Unsloth's trainer: its log-prob tensors are of left-packed rows

    def __init__(self, *args, max_prompt_length: int | None = None, reuse_reference_logprobs: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_prompt_length = max_prompt_length
        if self.args.disable_dropout:
            disable_dropout(self.model)
        # TRL runs the reference pass in train mode: with dropout left on, its log-probs are noisy, not the base's.
        dropout = active_dropout(self.model)
        if reuse_reference_logprobs and dropout:
            logger.warning("dropout is on (%s, ...; --disable_dropout false): the reward runs its own pass in eval "
                           "mode instead of reusing the KL term's reference pass", dropout[0])
        self.reuse_reference_logprobs = (reuse_reference_logprobs and self.beta != 0.0 and self.temperature == 1.0
                                         and not dropout)
        self._lora = _lora_layers(self.accelerator.unwrap_model(self.model))
        self._prompt_ids: list[list[int]] | None = None
        self._sampling_rows: list | None = None  # the engine's log-probs of this generation's rollouts, per row
        self._ref_logps: tuple | None = None  # (log-probs, rows scored as sampled, completion tokens attended)
        self._policy_logps: tuple | None = None
        self._scoring = False
        self.reference_reuses = 0  # reward batches served from the KL pass
        if getattr(self.args, "generation_compile", False) and getattr(self, "generation_config", None) is not None:
            self.generation_config.disable_compile = False  # TRL sets it; transformers compiles static-cache decoding
        # Rollouts through sdgrpo's decoding engine (engine/): TRL's generate call is answered by it.
        self.engine = (DecodeEngine(compile=bool(getattr(self.args, "generation_compile", False)),
                                    memory_budget_gib=getattr(self.args, "generation_memory_gib", None),
                                    generation_weights=getattr(self.args, "generation_weights", "auto"),
                                    int4_kernel=getattr(self.args, "generation_int4_kernel", "auto"),
                                    hold_copies=bool(getattr(self.args, "hold_generation_copies", True)))
                       if getattr(self.args, "generation_engine", False) else None)
        # --offload_activations (true once the plan decided): checkpointed layer inputs in CPU memory (offload.py)
        # (checks.check_combinations refuses true with --backend unsloth or without gradient checkpointing)
        self._offloaded = [0] if getattr(self.args, "offload_activations", "false") == "true" else None
        # --tile_mlp (true once the plan decided): every pass's MLP over tiles of tokens (tiling.py); Unsloth's
        # backend tiles with its own (backends/unsloth.py asks from_pretrained for it)
        if getattr(self.args, "tile_mlp", "false") == "true" and getattr(self.args, "backend", "hf") == "hf":
            from sdgrpo import tiling

            tiled = tiling.install(self.model)
            logger.info("MLP tiled: the MLPs of %d layers run over tiles of %d tokens, keeping only their inputs for "
                        "the backward (--tile_mlp)", tiled, tiling.TILE_TOKENS)
        self.token_advantages = getattr(self.args, "advantage", "sequence") == "token"
        if self.token_advantages:
            for reward in self.reward_funcs:
                reward.token_level = True
        self.distill_topk = int(getattr(self.args, "distill_topk", 0) or 0)
        if self.distill_topk:
            for reward in self.reward_funcs:
                reward.topk = self.distill_topk
        self._student_topk = None  # the teacher's top-K ids (B, T, K) while _compute_loss runs its pass
        self._student_topk_logps = None  # the policy's log-probs at them, from that pass
        self._ratio_for: dict | None = None  # a batch whose importance ratio the loss's own pass will give
        self.rollout_correction = self._corrects_rollouts()
        if self.rollout_correction:
            logger.info("rollouts corrected by importance sampling (%s, ratio clipped to [%s, %s]): the engine's "
                        "decoding is not the policy bit for bit", self.correction_mode(),
                        self.vllm_importance_sampling_clip_min or 0, self.vllm_importance_sampling_clip_max)
        if self.engine is not None and self.engine.compile:
            # One cache length for the whole run: a compiled step is compiled again for each new one.
            self.engine.reserve = self.longest_prompt() + self.max_completion_length

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        out = (self._logps_with_topk(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
               if self._student_topk is not None else
               self._logps_pass(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs))
        if self._ratio_for is not None and out[0] is not None:  # the loss's policy pass: the ratio from it
            batch, self._ratio_for = self._ratio_for, None
            self._set_importance_ratio(batch, out[0].detach())
        return out

    def _generate_and_score_completions(self, inputs):
        self._ref_logps = self._policy_logps = None
        self._prompt_ids = self._sampling_rows = None
        self._scoring = True
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._scoring = False
        if self.rollout_correction and output.get("sampling_per_token_logps") is None and self._sampling_rows:
            # Unsloth's rewrite of TRL's _generate_and_score_completions keeps the rollouts' log-probs only under
            # use_vllm: padded here as TRL pads them (right, with 0)
            from trl.trainer.utils import pad

            device = output["completion_ids"].device
            output["sampling_per_token_logps"] = pad([torch.tensor(r, dtype=torch.float32, device=device)
                                                      for r in self._sampling_rows], padding_value=0.0,
                                                     padding_side="right")
        if self.token_advantages:
            self._use_token_advantages(output)
        if self.distill_topk:
            self._attach_teacher_topk(output)
        if self.rollout_correction and output.get("sampling_per_token_logps") is not None:
            self._correct_rollouts(output)
        return output

    def compute_loss(self, model, inputs, *args, **kwargs):
        if self._offloaded is None:
            return self._compute_loss_corrected(model, inputs, *args, **kwargs)
        self._offload_layer_inputs(model)
        out = self._compute_loss_corrected(model, inputs, *args, **kwargs)
        if self.model.training:  # what this pass sent (an eval pass checkpoints nothing)
            self._metrics["train"]["memory/offloaded_gib"].append(self._offloaded[0] / 2**30)
        return out

    def _offload_layer_inputs(self, model) -> None:
        """--offload_activations: the checkpointed layers' inputs of this pass kept in CPU memory (offload.py; one
        line the first time). Installed before every pass, not once: TRL's no-grad passes run inside
        ``trl.models.utils.disable_gradient_checkpointing``, whose ``gradient_checkpointing_enable`` sets every
        layer's checkpoint function anew (TRL 1.15, transformers 5; pinned in tests/test_private_api.py), which
        dropped the wrappers after the first generation (a 7B at 2,048 tokens kept its 3.4 GiB of layer inputs on
        the card from its second step on, one H100, 2026-12-08)."""
        from sdgrpo import offload

        self._offloaded[0] = 0
        layers = offload.install(model, self._offloaded)
        if not getattr(self, "_told_offload", False):
            self._told_offload = True
            if layers:
                logger.info("activations offloaded: the inputs of %d checkpointed layers wait in CPU memory for the "
                            "backward (--offload_activations)", layers)
            else:
                logger.warning("--offload_activations: no layer is checkpointed (--gradient_checkpointing false?), "
                               "nothing is offloaded")

    def _compute_loss(self, model, inputs):
        if not self.distill_topk or "teacher_topk_ids" not in inputs:
            return self._policy_loss(model, inputs)
        self._student_topk = inputs["teacher_topk_ids"]
        try:
            loss = self._policy_loss(model, inputs)
        finally:
            self._student_topk = None
        return loss + float(getattr(self.args, "distill_topk_weight", 1.0)) * self._topk_term(inputs)


class SelfDistillGRPOTrainer(SelfDistillMixin, GRPOTrainer):
    """TRL's GRPOTrainer with sdgrpo's hooks (transformers + PEFT backend)."""


def trainer_class(base: type | None = None, left_packed_logps: bool = False) -> type:
    """The self-distillation trainer on top of ``base`` (e.g. the GRPOTrainer that Unsloth patched on import).

    Where this module is first imported after Unsloth (``sdgrpo train --backend unsloth``), its ``GRPOTrainer`` is
    Unsloth's already, so ``base is GRPOTrainer`` does not tell the backends apart: ``left_packed_logps`` does."""
    if (base is None or base is GRPOTrainer) and not left_packed_logps:
        return SelfDistillGRPOTrainer
    base = base or GRPOTrainer
    return type(f"SelfDistill{base.__name__}", (SelfDistillMixin, base), {"left_packed_logps": left_packed_logps})
