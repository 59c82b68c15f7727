"""Importance correction of rollouts that are not the policy bit for bit (``--rollout_correction``).

The decoding engine's rollouts (engine/: generation copies of the weights, int4 copies, unmerged LoRA rounding)
are corrected as TRL 1.15 corrects vLLM's: truncated (or masked) importance sampling, the ratio policy / sampler
multiplied into TRL's per-token loss. The pure functions (:func:`importance_weights`, :func:`ratio_stats`,
:func:`rollout_mismatch`) are TRL's formulas; benchmarks/bench_mismatch.py uses them too.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch

# The logger of the module these hooks came from: users' log filters and tests name "sdgrpo.grpo_trainer".
logger = logging.getLogger("sdgrpo.grpo_trainer")


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


class RolloutCorrectionMixin:
    """Shadows TRL 1.15's ``compute_loss`` (through :meth:`_compute_loss_corrected`, which ``SelfDistillMixin.
    compute_loss`` calls), ``_compute_loss`` (through :meth:`_policy_loss`) and the end of
    ``_generate_and_score_completions`` (:meth:`_correct_rollouts`, called by ``SelfDistillMixin``).

    Guarantees: where ``rollout_correction`` is on and a batch carries ``sampling_per_token_logps``, TRL's loss (or
    Unsloth's, under ``left_packed_logps``) multiplies its per-token loss by the importance ratio of
    :meth:`correction_mode`, taking TRL's vLLM branch (``use_vllm``, ``vllm_importance_sampling_*``) for that call
    only; the ratio's statistics and the sampler-policy mismatch are logged as ``sampling/*``; without the engine
    (or under vLLM, which TRL corrects itself) nothing changes. Reads ``engine`` and ``left_packed_logps`` and sets
    ``_ratio_for``, which ``SelfDistillMixin._get_per_token_logps_and_entropies`` consumes.
    """

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
