"""Rewards served from what the trainer computed: prompt ids and the KL term's reference pass.

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
"""

from __future__ import annotations

import logging

import torch

from sdgrpo.metrics import collapse_metrics
from sdgrpo.scoring import DROPOUT_ATTRIBUTES

# The logger of the module these hooks came from: users' log filters and tests name "sdgrpo.grpo_trainer".
logger = logging.getLogger("sdgrpo.grpo_trainer")


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


class RewardReuseMixin:
    """Shadows TRL 1.15's ``_calculate_rewards`` and, through :meth:`_logps_pass` (which ``SelfDistillMixin.
    _get_per_token_logps_and_entropies`` calls), ``_get_per_token_logps_and_entropies``.

    Guarantees: every pass's output is returned unchanged; of the passes between generation and the rewards
    (``_scoring``), the reference pass's log-probs (and TRL's old policy log-probs, at temperature 1) of every row
    scored as sampled reach the rewards as ``ref_per_token_logps`` (``policy_per_token_logps``), other rows as None
    (the reward scores those itself); every reward batch
    logs the ``collapse/*`` metrics of the whole generation batch (and the self-replay metrics where it has replay
    rows). Reads ``_prompt_ids`` (set by ``_generate``), ``_lora``, ``reuse_reference_logprobs`` and
    ``left_packed_logps`` (set by ``SelfDistillMixin``).
    """

    def _is_reference_pass(self, model) -> bool:
        if self.ref_model is not None:
            return model is self.ref_model
        return bool(self._lora) and all(layer.disable_adapters for layer in self._lora)

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

