"""TRL's GRPOTrainer with the few hooks self-distillation needs.

- ``max_prompt_length`` (dropped by TRL 1.15) keeps the last N prompt tokens after the leading special tokens.
- Reward functions receive ``prompt_ids``: the prompt token ids exactly as the trainer tokenized them.
- With beta > 0 and temperature 1 they also receive ``ref_per_token_logps``: the reference (adapter-disabled) log-probs
  that TRL computes for the KL term before it calls the rewards, so the self-NLL reward costs no extra forward pass.
  Unsloth's left-packed ``(B, C + max_left_pad)`` tensors are first put back in TRL's ``(B, C)`` layout. A row is
  handed over only if that pass scored every one of its sampled tokens (not masked by ``mask_truncated_completions``),
  and only with dropout off (TRL runs the pass in train mode). At another temperature TRL's reference log-probs are of
  ``logits / T``, which is not the temperature-1 likelihood, so the reward runs its own pass instead.

The hand-off relies on TRL 1.15's order inside ``_generate_and_score_completions``: ``_generate`` (prompt ids), then
``_get_per_token_logps_and_entropies`` for the old policy (when steps are misaligned) and for the reference, then
``_calculate_rewards``; and on the ``(B, C)`` layout of those log-probs. tests/test_grpo_trainer.py fails if either
changes (the reward must be served from the KL pass, and must equal an independent forward pass).

Private TRL methods overridden here (pinned: trl 1.15.0; signatures checked by tests/test_private_api.py):
``_tokenize_prompts``, ``_generate``, ``_get_per_token_logps_and_entropies``, ``_generate_and_score_completions``,
``_calculate_rewards``; attributes read: ``_metrics``, ``eos_token_ids``, ``beta``, ``temperature``, ``ref_model``.
Checkpoint overrides are in ``checkpointing.py``, FSDP2 internals in ``fsdp.py``, the decoding engine that answers
TRL's ``unwrapped_model.generate`` call inside ``_generate`` (``--generation_engine``) in ``engine/decode.py``.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager, nullcontext

import torch
from trl import GRPOTrainer

from sdgrpo.checkpointing import CheckpointMixin
from sdgrpo.engine import MODES, DecodeEngine, serving
from sdgrpo.fsdp import gathered_weights
from sdgrpo.metrics import collapse_metrics
from sdgrpo.scoring import DROPOUT_ATTRIBUTES, active_dropout, truncate_prompt

logger = logging.getLogger(__name__)


def _lora_layers(model) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def disable_dropout(model) -> None:
    """Turn off every dropout of ``model`` (TRL's ``disable_dropout_in_model`` sets only ``nn.Dropout`` to 0 and
    misses the float rates that attention modules pass to the attention function)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for attr in DROPOUT_ATTRIBUTES:
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)


def completion_columns(logps: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       logits_to_keep: int, pad_token_id: int | None, left_packed: bool = False):
    """Per-token log-probs of the completion tokens in TRL's ``(B, C)`` layout (``C = logits_to_keep``), and which
    rows hold the log-probs of the sequence as sampled; ``(None, None)`` for a layout it does not know.

    TRL returns ``(B, C)`` already. Unsloth's patched trainer first moves every pad-id token of each row to its end
    ("left-packs" the rows) and returns the last ``C + max_left_pad`` positions, ``(B, C + max_left_pad)``: row ``i``
    (``pad_i`` pad tokens in its prompt part) has its completion at columns ``max_left_pad - pad_i`` onwards. A row
    in which a pad-id token sits between two other tokens (a pad token sampled inside a completion), or a real token
    (attention mask 1) has the pad id (an EOS that doubles as pad), was scored by Unsloth as a different sequence:
    it is marked False and must be scored by another pass. The first is decided from the ids alone, whatever the
    mask says: Unsloth's packing moves every pad-id token, and on the GPU (Qwen2.5-0.5B shape, random weights, which
    sample the pad id) such rows had passed a mask-only test and were read shifted by one column from the pad on.
    That refusal only works where the trainer class says the layout is left-packed (trainer_class; the CLI once got
    the hf class under Unsloth, and those rows were read shifted: docs/gpu.md).
    """
    rows = logps.size(0)
    if not left_packed:
        if logps.size(1) != logits_to_keep:
            return None, None
        return logps, torch.ones(rows, dtype=torch.bool)
    extra = logps.size(1) - logits_to_keep
    if extra < 0 or pad_token_id is None:
        return None, None
    pads = (input_ids[:, :-logits_to_keep] == pad_token_id).sum(dim=1)
    if int(pads.max()) != extra:
        return None, None
    is_pad = input_ids == pad_token_id
    real = ~is_pad
    # pad-id tokens after the row's first other token and before its last one: the packing closes that gap
    inside = (real.int().cumsum(dim=1) > 0) & (real.flip(1).int().cumsum(dim=1).flip(1) > 0)
    ok = ~((is_pad & inside) | (is_pad & attention_mask.bool())).any(dim=1)
    index = (extra - pads)[:, None] + torch.arange(logits_to_keep, device=pads.device)[None, :]
    return logps.gather(1, index.to(logps.device)), ok.cpu()


def importance_weights(policy: torch.Tensor, sampler: torch.Tensor, mask: torch.Tensor, mode: str,
                       clip_min: float | None, clip_max: float | None) -> torch.Tensor:
    """The importance-sampling ratio policy / sampler of TRL 1.15's vLLM correction (``GRPOTrainer.
    _generate_and_score_completions``), same modes and clipping: ``token_truncate`` (per token, clamped to
    [clip_min, clip_max]), ``token_mask`` (per token, 0 outside [clip_min or 0, clip_max or inf]), and their
    ``sequence_*`` forms on the summed log-ratio of each row ((B, 1)). Masked tokens have ratio 1 (log-ratio 0)."""
    diff = torch.nan_to_num((policy - sampler) * mask, nan=0.0)
    if mode in ("sequence_mask", "sequence_truncate"):
        diff = diff.sum(dim=-1, keepdim=True)
    elif mode not in ("token_mask", "token_truncate"):
        raise ValueError(f"unknown importance sampling mode {mode!r}")
    ratio = torch.exp(diff)
    if mode.endswith("_truncate"):
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    low = clip_min if clip_min is not None else 0.0
    high = clip_max if clip_max is not None else float("inf")
    return ratio.masked_fill((ratio < low) | (ratio > high), 0.0)


def ratio_stats(ratio: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The importance ratio's min, mean and max and the share it zeroes (the ``*_mask`` modes), as TRL 1.15 logs
    vLLM's: over the completion tokens for a per-token ratio ((B, T)), over the sequences for a per-sequence one
    ((B, 1): one value a row, not repeated over its tokens, so that long rows do not weigh more)."""
    if ratio.size(-1) == 1 and mask.size(-1) != 1:
        weights = ratio[:, 0][mask.bool().any(dim=-1)].float()
    else:
        weights = ratio.expand_as(mask)[mask.bool()].float()
    if not weights.numel():
        zero = torch.zeros((), device=ratio.device)
        return {f"importance_sampling_ratio/{k}": zero for k in ("min", "mean", "max", "zeroed")}
    return {"importance_sampling_ratio/min": weights.min(), "importance_sampling_ratio/mean": weights.mean(),
            "importance_sampling_ratio/max": weights.max(),
            "importance_sampling_ratio/zeroed": (weights == 0).float().mean()}


# Below this mean importance weight a generation's rollouts mostly do not count: warned once (docs/gpu.md).
LOW_WEIGHT = 0.8


def rollout_mismatch(policy: torch.Tensor, sampler: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sampler-policy mismatch over the completion tokens: mean and max |delta log p| (TRL's
    ``sampling_logp_difference``), and KL(sampler || policy) by the k3 estimator on the sampler's draws
    (``r - 1 - log r``, r = p_policy / p_sampler)."""
    keep = mask.bool()
    delta = (policy - sampler)[keep]
    if not delta.numel():
        zero = torch.zeros((), device=policy.device)
        return {"sampling_logp_difference/mean": zero, "sampling_logp_difference/max": zero, "kl": zero}
    return {"sampling_logp_difference/mean": delta.abs().mean(), "sampling_logp_difference/max": delta.abs().max(),
            "kl": (torch.expm1(delta) - delta).mean()}


class SelfDistillMixin(CheckpointMixin):
    """The overrides, as a mixin so they also apply on top of Unsloth's patched GRPOTrainer."""

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
                                    int4_kernel=getattr(self.args, "generation_int4_kernel", "auto"))
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

    def _corrects_rollouts(self) -> bool:
        """``--rollout_correction``: true, false, or auto (on where the engine decodes 16-bit weights, whose
        generation copies or unmerged rounding make the sampler differ from the trained policy, or may decode int4
        copies: a quantised base, or the engine's mode ``int4``)."""
        setting = getattr(self.args, "rollout_correction", "false")
        if self.engine is None or self.use_vllm or setting == "false":
            return False
        if setting == "true":
            return True
        model = self.accelerator.unwrap_model(self.model)
        if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
            return True
        dtype = next(model.parameters()).dtype
        return dtype in (torch.bfloat16, torch.float16)  # fp32: on from the first call that decodes int4 copies

    def longest_prompt(self, limit: int = 100_000, chunk: int = 1024) -> int:
        """Tokens in the longest of the first ``limit`` training prompts, tokenized as the trainer tokenizes them
        for generation (template and ``max_prompt_length`` included); 0 for a dataset that has no length."""
        data = self.train_dataset
        if (data is None or not hasattr(data, "__len__") or "prompt" not in (getattr(data, "column_names", None) or [])
                or getattr(self, "environment_factories", None) is not None):
            return 0
        longest = 0
        for start in range(0, min(len(data), limit), chunk):
            prompts = data[start:min(start + chunk, limit)]["prompt"]
            longest = max(longest, max(map(len, self._tokenize_prompts(prompts)[0]), default=0))
        return longest

    # --- prompts -------------------------------------------------------------------------------------------
    def _get_train_sampler(self, dataset=None):
        # --replay_share: TRL's repetition over an order that gives every generation batch its share of replay
        # prompts (sdgrpo.replay)
        from sdgrpo.replay import repeat_sampler

        return repeat_sampler(super()._get_train_sampler(dataset), self.train_dataset if dataset is None else dataset,
                              getattr(self.args, "replay_share", 0.0), self.args.seed)

    def _tokenize_prompts(self, prompts: list):
        prompt_ids, *rest = super()._tokenize_prompts(prompts)
        if self.max_prompt_length is not None:
            special = set(self.processing_class.all_special_ids)
            prompt_ids = [truncate_prompt(ids, self.max_prompt_length, special) for ids in prompt_ids]
        return (prompt_ids, *rest)

    def _generate(self, prompts: list):
        gather = (self.is_fsdp_enabled and getattr(self.args, "fsdp_gather_for_generation", False)
                  and not self.use_vllm)
        skip_hooks = getattr(self.args, "fsdp_skip_hooks_in_generation", True)
        engine = self.engine if (self.engine is not None and not self.use_vllm) else None
        if engine is not None:
            engine.record, engine.timings = [], []
        with (gathered_weights(self.model_wrapped, skip_hooks) if gather else nullcontext(),
              serving(self.accelerator.unwrap_model(self.model), engine) if engine else nullcontext()):
            out = super()._generate(prompts)
        self._prompt_ids = [list(ids) for ids in out[0]]
        if engine is not None:  # running totals: a capture or a new cache in a late step shows up here
            mode = "train" if self.model.training else "eval"
            for key in ("calls", "fallbacks", "setups", "captures"):
                self._metrics[mode][f"engine/{key}"].append(getattr(engine, key))
            self._metrics[mode]["engine/mode"].append(MODES.get(engine.mode, 0.0))
            if engine.timings:  # this generation's calls, by phase (bench_step reads them)
                for key in ("refresh_s", "prefill_s", "decode_s"):
                    self._metrics[mode][f"engine/{key}"].append(sum(t[key] for t in engine.timings))
                steps = sum(t["steps"] for t in engine.timings)
                self._metrics[mode]["engine/decode_ms_per_step"].append(
                    1000 * sum(t["decode_s"] for t in engine.timings) / max(steps, 1))
            setting = getattr(self.args, "rollout_correction", "false")
            if engine.mode == "int4" and not getattr(self, "_told_int4", False):
                self._told_int4 = True
                if not self.rollout_correction and setting == "auto":
                    self.rollout_correction = True
                if self.rollout_correction:
                    logger.info("rollouts from int4 copies corrected by importance sampling (%s, ratio clipped to "
                                "[%s, %s]; --rollout_correction_mode)", self.correction_mode(),
                                self.vllm_importance_sampling_clip_min or 0, self.vllm_importance_sampling_clip_max)
            decoded, engine.record = engine.record, None
            if self.rollout_correction and not out[4]:  # None from TRL; Unsloth's rewrite may give an empty list
                out = (*out[:4], self._sampling_logps(decoded, out[1]), *out[5:])
            self._sampling_rows = out[4] if self.rollout_correction else None
            if self.rollout_correction and not out[4] and not getattr(self, "_told_uncorrected", False):
                self._told_uncorrected = True
                logger.warning("rollout correction: no sampler log-probs for this generation (%d engine calls for "
                               "%d completions; %d went to generate); these rollouts are not corrected",
                               len(decoded or []), len(out[1]), engine.fallbacks)
        return out

    def _sampling_logps(self, decoded: list, completion_ids: list) -> list | None:
        """The engine's log-probs of each completion's tokens at the trainer's temperature, rows in TRL's order
        (the calls' rows, concatenated), as TRL's ``_generate`` returns vLLM's; None where the rows do not match
        (a call that went to generate)."""
        rows = [row for d in decoded for row in (d.logprobs if d.sampling_logprobs is None else d.sampling_logprobs)]
        if len(rows) != len(completion_ids) or any(len(c) > r.numel() for r, c in zip(rows, completion_ids)):
            return None
        return [r[: len(c)].tolist() for r, c in zip(rows, completion_ids)]

    # --- reference log-probs -------------------------------------------------------------------------------
    def _is_reference_pass(self, model) -> bool:
        if self.ref_model is not None:
            return model is self.ref_model
        return bool(self._lora) and all(layer.disable_adapters for layer in self._lora)

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        out = (self._logps_with_topk(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
               if self._student_topk is not None else
               self._logps_pass(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs))
        if self._ratio_for is not None and out[0] is not None:  # the loss's policy pass: the ratio from it
            batch, self._ratio_for = self._ratio_for, None
            self._set_importance_ratio(batch, out[0].detach())
        return out

    def _logps_pass(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        out = super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                         *args, **kwargs)
        if getattr(self, "_scoring", False) and out[0] is not None:  # passes between generation and the rewards
            is_reference = self._is_reference_pass(model)
            if is_reference and not self.reuse_reference_logprobs:
                return out
            if not is_reference and self.temperature != 1.0:
                return out
            logps, ok = completion_columns(out[0], input_ids, attention_mask, logits_to_keep,
                                           self.processing_class.pad_token_id, self.left_packed_logps)
            # Completion tokens the pass attended to: TRL's mask_truncated_completions zeroes the whole completion
            # mask of a truncated row, and the fused head then writes log-prob 0 at every masked label.
            covered = attention_mask[:, -logits_to_keep:].sum(dim=1).cpu()
            if logps is None:
                logger.warning("log-prob tensor of unknown layout %s; the reward runs its own pass",
                               tuple(out[0].shape))
            elif is_reference:
                self._ref_logps = (logps, ok, covered)
            else:
                # TRL's "old" policy log-probs (made when generation and optimisation steps are misaligned)
                self._policy_logps = (logps, ok, covered)
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

    # --- per-token advantages (--advantage token) ------------------------------------------------------------
    def _use_token_advantages(self, output: dict) -> None:
        """Replace TRL's (B,) advantages by (B, T): each completion token's teacher - policy log-prob, as the reward
        computed it for this process's rows (detached), plus ``sequence_advantage_weight`` times TRL's
        group-normalised sequence advantage; 0 past each completion. TRL 1.15's loss reads (B, T) advantages
        (``_compute_loss`` unsqueezes only a 1-D tensor; pinned in tests/test_private_api.py)."""
        terms = getattr(self.reward_funcs[0], "token_terms", None)
        mask = output["completion_mask"]
        if terms is None or len(terms) != mask.size(0):
            raise RuntimeError("--advantage token: the reward kept no per-token terms for this batch")
        advantages = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        for row, term in enumerate(terms):
            n = min(term.numel(), mask.size(1))
            advantages[row, :n] = term[:n].to(advantages.device, torch.float32)
        weight = float(getattr(self.args, "sequence_advantage_weight", 0.0))
        if weight:
            advantages = advantages + weight * output["advantages"].float().reshape(-1, 1)
        output["advantages"] = advantages * mask
        mode = "train" if self.model.training else "eval"
        count = mask.sum().clamp(min=1)
        self._metrics[mode]["advantage/token_mean"].append(
            self.accelerator.gather((advantages * mask).sum() / count).mean().item())

    # --- the teacher's top-K tokens (--distill_topk) ------------------------------------------------------------
    def _attach_teacher_topk(self, output: dict) -> None:
        """The teacher's top-K log-probs and ids at every completion position of this process's rows, as the
        reward's scoring pass kept them, into ``output`` as (B, T, K) tensors (``teacher_topk_logps``,
        ``teacher_topk_ids``; TRL splits and shuffles them with the batch); 0 past each completion."""
        tops = getattr(self.reward_funcs[0], "token_topk", None)
        mask = output["completion_mask"]
        if tops is None or len(tops) != mask.size(0):
            raise RuntimeError("--distill_topk: the reward kept no top-k teacher log-probs for this batch")
        k = max(v.size(1) for v, _ in tops)  # K, or the vocabulary where that is smaller
        logps = torch.zeros(*mask.shape, k, dtype=torch.float32, device=mask.device)
        ids = torch.zeros(*mask.shape, k, dtype=torch.long, device=mask.device)
        for row, (values, index) in enumerate(tops):
            n = min(values.size(0), mask.size(1))
            logps[row, :n] = values[:n].to(logps.device)
            ids[row, :n] = index[:n].to(ids.device)
        output["teacher_topk_logps"], output["teacher_topk_ids"] = logps, ids

    def _logps_with_topk(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, *args, **kwargs):
        """The loss's policy pass under --distill_topk: TRL 1.15's own ``_get_per_token_logps_and_entropies`` (its
        fused LM head: log-probs of the completion tokens and entropies at TRL's temperature, in chunks of
        ``batch_size`` rows), whose head operands are routed (``compat.fused_head_route``) to
        ``chunked.token_stats``, which also gives the policy's log-probs at temperature 1 at the teacher's top-K ids
        (``self._student_topk_logps``, (B, T, K); 0 where TRL's head scores no label: padding, masked rows). Token
        chunk by token chunk, forward and backward: no (rows, tokens, vocabulary) logits (TRL's kernel returns no
        logits, and liger-kernel's GRPO loss no per-token values: sdgrpo.chunked says why neither fits)."""
        from sdgrpo.chunked import token_stats
        from sdgrpo.compat import fused_head_route

        topk = self._student_topk  # (B, T, K)
        batch_size = batch_size or input_ids.size(0)
        # The labels TRL's pass builds (pinned in tests/test_private_api.py): completion tokens the mask attends.
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        labels[:, :-logits_to_keep] = -100
        calls = []  # per model call of TRL's loop: (labelled positions (b, T - 1), their labels, their top-K ids)
        for start in range(0, input_ids.size(0), batch_size):
            shifted = labels[start : start + batch_size, 1:]
            ids = topk.new_zeros(*shifted.shape, topk.size(-1))
            ids[:, -logits_to_keep:] = topk[start : start + batch_size]
            mask = shifted != -100
            calls.append((mask, shifted[mask], ids[mask]))
        pending, tops = iter(calls), []

        def head(hidden, weight, bias, targets, temperature, chunk_size, softcap=None, logit_scale=1.0,
                 outputs=("entropy",)):
            mask, expected, ids = next(pending, (None, None, None))
            if mask is None or not torch.equal(targets, expected.to(targets.device)):
                raise RuntimeError("--distill_topk: TRL's fused head scored other tokens than its labels of this "
                                   "pass (has TRL's _get_per_token_logps_and_entropies changed?)")
            *stats, at_ids = token_stats(hidden, weight, bias, targets, temperature, logit_scale, softcap, outputs,
                                         topk_ids=ids.to(targets.device))
            tops.append(at_ids.new_zeros(*mask.shape, ids.size(-1)).masked_scatter(mask[..., None].to(at_ids.device),
                                                                                   at_ids))
            return tuple(stats)

        with fused_head_route(head):
            out = super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                             batch_size, *args, **kwargs)
        if len(tops) != len(calls):
            raise RuntimeError("--distill_topk: TRL's pass made another number of fused-head calls than expected")
        self._student_topk_logps = torch.cat(tops)[:, -logits_to_keep:]
        return out

    def _topk_term(self, inputs) -> torch.Tensor:
        """KL(policy || teacher) on the teacher's top-K tokens plus one bucket for the rest of the vocabulary (TRL's
        ``add_tail_bucket`` and ``compute_divergence`` with alpha 1, as its SDPO distills a teacher server's top-K),
        summed over this micro-batch's completion tokens and divided as TRL 1.15's ``_compute_loss`` divides its
        dapo loss: by the completion tokens of one accumulation window on one process (``num_items_in_batch``, the
        generation batch's over all processes, / processes x accumulation steps / steps per generation; in eval the
        batch is not split). TRL's loss is already scaled for accumulation (``loss_is_scaled_for_ga``: the Trainer
        divides nothing), so a step's micro-batches add up to the mean over the step's tokens, whatever the
        accumulation; logged (``distill/topk_kl``) is the micro-batch's mean."""
        from trl.experimental.sdpo.loss_utils import add_tail_bucket, compute_divergence

        student = add_tail_bucket(self._student_topk_logps)
        teacher = add_tail_bucket(inputs["teacher_topk_logps"].to(student.dtype))
        kl = compute_divergence(student, teacher, 1.0)  # (B, T)
        mask = inputs["completion_mask"].to(kl.dtype)
        total = (kl * mask).sum()
        mode = "train" if self.model.training else "eval"
        mean = total.detach() / mask.sum().clamp(min=1)
        self._metrics[mode]["distill/topk_kl"].append(self.accelerator.gather(mean).mean().item())
        normaliser = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":
            normaliser = normaliser * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        return total / normaliser

    # --- rollouts that are not the policy bit for bit -------------------------------------------------------
    def _correct_rollouts(self, output: dict) -> None:
        """Truncated importance sampling for the engine's rollouts, as TRL corrects vLLM's: the policy's log-probs
        of the sampled tokens against the sampler's; the ratio (:func:`importance_weights`) goes into
        ``importance_sampling_ratio``, which TRL's loss multiplies in (:meth:`_compute_loss`); the mismatch is logged.

        The policy's log-probs: TRL's ``old_per_token_logps`` where it made them (the policy changes before this
        batch's loss: several iterations or optimizer steps per generation). Where it made none, the policy at the
        loss is the policy that sampled, so the loss's own pass gives them (detached: the values a no-grad pass
        would give) and the ratio is set from it there (:meth:`_get_per_token_logps_and_entropies`): no extra
        forward. TRL itself runs one more pass for vLLM's rollouts in that case."""
        old = output.get("old_per_token_logps")
        if old is None and not getattr(self, "use_liger_kernel", False) and not self.left_packed_logps:
            output.pop("importance_sampling_ratio", None)  # set by the loss's pass
            return
        if old is None:  # Liger's loss and Unsloth's run no pass of ours: one no-grad pass here
            from trl.models.utils import disable_gradient_checkpointing

            ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
            attention = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
            batch = (self.args.per_device_train_batch_size if self.model.training
                     else self.args.per_device_eval_batch_size)
            with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
                old, _, _ = self._get_per_token_logps_and_entropies(self.model, ids, attention,
                                                                    output["completion_ids"].size(1), batch_size=batch)
            output["old_per_token_logps"] = old
        if self.left_packed_logps:  # Unsloth's loss corrects and logs from old and sampling log-probs (compute_loss)
            return
        self._set_importance_ratio(output, old)

    def _set_importance_ratio(self, batch: dict, policy: torch.Tensor) -> None:
        mask = batch["completion_mask"]
        mode = "train" if self.model.training else "eval"
        sampling = batch["sampling_per_token_logps"].to(policy.device)
        ratio = importance_weights(policy, sampling, mask, self.correction_mode(),
                                   self.vllm_importance_sampling_clip_min, self.vllm_importance_sampling_clip_max)
        batch["importance_sampling_ratio"] = ratio
        for key, value in {**rollout_mismatch(policy, sampling, mask), **ratio_stats(ratio, mask)}.items():
            gathered = self.accelerator.gather(value)  # over processes: the largest max, the smallest min, as TRL's
            value = (gathered.max() if key.endswith("/max") else gathered.min() if key.endswith("/min")
                     else gathered.mean()).item()
            self._metrics[mode][f"sampling/{key}"].append(value)
            if key == "importance_sampling_ratio/mean" and value < LOW_WEIGHT and not getattr(self, "_told_low", 0):
                self._told_low = True
                mode_now = self.correction_mode()
                advice = ("--rollout_correction_mode token_truncate keeps a weight that does not shrink with "
                          "completion length" if mode_now != "token_truncate" else
                          "the sampler is far from the policy token by token (int4 copies of random or untrained "
                          "weights are); 16-bit copies or --generation_weights model decode closer")
                logger.warning("rollout correction: the mean importance weight of this batch is %.2f (%s): %.0f%% of "
                               "its policy gradient is discarded; %s", value, mode_now, 100 * (1 - value), advice)

    def correction_mode(self) -> str:
        """The importance-sampling mode for the engine's rollouts (``--rollout_correction_mode``): auto is
        token_truncate whatever the engine decodes (a per-token ratio keeps a weight that does not shrink with
        completion length; the mismatch per engine mode is in docs/gpu.md), trl is TRL's
        ``vllm_importance_sampling_mode``, and a mode by name is that mode."""
        setting = getattr(self.args, "rollout_correction_mode", "trl")
        if setting == "auto":
            return "token_truncate"
        return self.vllm_importance_sampling_mode if setting == "trl" else setting

    def compute_loss(self, model, inputs, *args, **kwargs):
        if self._offloaded is not None:
            self._offload_layer_inputs(model)
        return self._compute_loss_corrected(model, inputs, *args, **kwargs)

    def _offload_layer_inputs(self, model) -> None:
        """--offload_activations: the checkpointed layers' inputs of this pass kept in CPU memory (offload.py, installed
        on the first call, with one line); the GiB the last pass sent logged as memory/offloaded_gib."""
        from sdgrpo import offload

        if self._offloaded[0]:
            mode = "train" if self.model.training else "eval"
            self._metrics[mode]["memory/offloaded_gib"].append(self._offloaded[0] / 2**30)
        self._offloaded[0] = 0
        if not getattr(self, "_told_offload", False):  # once: the layers keep their wrappers
            self._told_offload = True
            layers = offload.install(model, self._offloaded)
            if layers:
                logger.info("activations offloaded: the inputs of %d checkpointed layers wait in CPU memory for the "
                            "backward (--offload_activations)", layers)
            else:
                logger.warning("--offload_activations: no layer is checkpointed (--gradient_checkpointing false?), "
                               "nothing is offloaded")

    def _compute_loss_corrected(self, model, inputs, *args, **kwargs):
        # Unsloth's compute_loss (unsloth_zoo's grpo_compute_loss; it never calls _compute_loss) applies TRL's
        # truncated importance sampling from old_per_token_logps and sampling_per_token_logps, with the trainer's
        # vllm_importance_sampling_* settings, and logs the mismatch, only under use_vllm and
        # vllm_importance_sampling_correction: for the engine's corrected rollouts those hold for the call.
        if self.left_packed_logps and self.rollout_correction and not self.use_vllm:
            if inputs.get("sampling_per_token_logps") is not None:
                if not getattr(self, "_told_unsloth_corrects", False):
                    self._told_unsloth_corrects = True
                    logger.info("Unsloth's loss corrects the engine's rollouts (importance sampling from their "
                                "log-probs, %s)", self.correction_mode())
                with self._as_vllm_rollouts():
                    return super().compute_loss(model, inputs, *args, **kwargs)
            if not getattr(self, "_told_unsloth_uncorrected", False):
                self._told_unsloth_uncorrected = True
                logger.warning("rollout correction: a batch reached Unsloth's loss without the rollouts' log-probs "
                               "(keys: %s); it is not corrected", ", ".join(sorted(inputs)))
        return super().compute_loss(model, inputs, *args, **kwargs)

    @contextmanager
    def _as_vllm_rollouts(self):
        """For the call: TRL's (and Unsloth's) vLLM correction flags on, and its mode the engine's
        (:meth:`correction_mode`), on the trainer and on its args: Unsloth's loss (unsloth_zoo 2026.10.9's
        grpo_accumulated_loss) computes the ratio itself and reads the mode from ``trainer.args``. Without that it
        took TRL's default sequence_mask there, and a 7B's 512-token rows under int4 copies were all masked (ratio
        0 logged: no policy gradient)."""
        mode = self.correction_mode()
        saved = (self.use_vllm, self.vllm_importance_sampling_correction, self.vllm_importance_sampling_mode,
                 self.args.vllm_importance_sampling_mode)
        self.use_vllm, self.vllm_importance_sampling_correction = True, True
        self.vllm_importance_sampling_mode = self.args.vllm_importance_sampling_mode = mode
        try:
            yield
        finally:
            (self.use_vllm, self.vllm_importance_sampling_correction, self.vllm_importance_sampling_mode,
             self.args.vllm_importance_sampling_mode) = saved

    def _compute_loss(self, model, inputs):
        if not self.distill_topk or "teacher_topk_ids" not in inputs:
            return self._policy_loss(model, inputs)
        self._student_topk = inputs["teacher_topk_ids"]
        try:
            loss = self._policy_loss(model, inputs)
        finally:
            self._student_topk = None
        return loss + float(getattr(self.args, "distill_topk_weight", 1.0)) * self._topk_term(inputs)

    def _policy_loss(self, model, inputs):
        # TRL 1.15 multiplies the per-token loss by inputs["importance_sampling_ratio"] only under
        # `self.use_vllm and self.vllm_importance_sampling_correction` (its one use of use_vllm in _compute_loss;
        # pinned in tests/test_private_api.py): for the engine's corrected rollouts, that branch is taken for the
        # duration of the call.
        if self.rollout_correction and "importance_sampling_ratio" not in inputs \
                and inputs.get("sampling_per_token_logps") is not None and not self.use_vllm:
            self._ratio_for = inputs  # the ratio comes from this call's policy pass, before TRL's loss reads it
        elif "importance_sampling_ratio" not in inputs or self.use_vllm:
            return super()._compute_loss(model, inputs)
        try:
            with self._as_vllm_rollouts():
                return super()._compute_loss(model, inputs)
        finally:
            self._ratio_for = None

    # --- rewards -------------------------------------------------------------------------------------------
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        extra: dict[str, list] = {}
        if self._prompt_ids is not None and len(self._prompt_ids) == len(inputs):
            extra["prompt_ids"] = self._prompt_ids
        self._scoring = False
        for key, captured in (("ref_per_token_logps", self._ref_logps), ("policy_per_token_logps", self._policy_logps)):
            if captured is not None and captured[0].size(0) == len(inputs):
                logps, ok, covered = captured
                # Rows that the pass did not score as sampled (a layout it cannot map, or completion tokens masked
                # out of attention) go as None: the reward scores those itself.
                usable = [good and int(n) >= len(ids)
                          for good, n, ids in zip(ok.tolist(), covered, completion_ids_list)]
                extra[key] = [row if good else None for row, good in zip(logps.detach(), usable)]
                if key == "ref_per_token_logps":
                    self.reference_reuses += 1
        if extra:
            inputs = [{**x, **{k: v[i] for k, v in extra.items()}} for i, x in enumerate(inputs)]
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._log_collapse_metrics(completions, completion_ids_list, rewards)
        if inputs and "replay" in inputs[0]:  # self-replay rows: their share and the policy's KL to the base there
            from sdgrpo.replay import grpo_metrics

            mode = "train" if self.model.training else "eval"
            terms = getattr(self.reward_funcs[0], "token_terms", None)
            for key, value in grpo_metrics(terms, [x["replay"] for x in inputs]).items():
                # NaN where no process had replay rows: TRL's log leaves NaN entries out of its mean
                gathered = self.accelerator.gather(torch.tensor([value], device=self.accelerator.device))
                self._metrics[mode][key].append(gathered.nanmean().item())
        return rewards

    def _log_collapse_metrics(self, completions, completion_ids_list, rewards: torch.Tensor) -> None:
        """Diversity, repetition, length and EOS rate of the whole generation batch, logged as ``collapse/*``.

        With several processes the completions of every process are gathered first, so the figures (and the
        guard's decisions, taken on every process) describe the whole batch, not one rank's share. ``rewards``
        is already gathered by TRL.
        """
        from accelerate.utils import gather_object

        mode = "train" if self.model.training else "eval"
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        ids = [list(map(int, c)) for c in completion_ids_list]
        if self.accelerator.num_processes > 1:
            ids, texts = gather_object(ids), gather_object(texts)
        metrics = collapse_metrics(ids, texts, set(self.eos_token_ids), self.num_generations)
        metrics["unscored_rate"] = (~torch.isfinite(rewards)).all(dim=1).float().mean().item()
        for key, value in metrics.items():
            if value is not None:
                self._metrics[mode][f"collapse/{key}"].append(value)


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
