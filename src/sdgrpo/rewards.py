"""Reward functions with TRL's signature, registered by name.

``self_nll``: the mean (or summed) natural-log probability of the sampled completion ids under the frozen base model
(the policy with its LoRA adapters disabled) at temperature 1. Higher is better; the maximum is 0.

An empty completion (no token ids at all, not even EOS) gets ``None``: TRL turns it into NaN and leaves it out of
the group baseline with zero advantage, so it can never be the best reward. A completion of just EOS is scored
like any other: log p(EOS | prompt).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable

import torch

from sdgrpo.scoring import adapters_disabled, completion_logprobs

logger = logging.getLogger(__name__)

AGGREGATIONS = ("mean", "sum")


def aggregate(token_logps: torch.Tensor, aggregation: str) -> float | None:
    """Mean or sum of one completion's token log-probs; ``None`` for an empty completion or a non-finite value."""
    if token_logps.numel() == 0:
        return None
    value = token_logps.sum().item() if aggregation == "sum" else token_logps.mean().item()
    return value if math.isfinite(value) else None


class SelfNLLReward:
    """TRL reward: likelihood of each sampled completion under the adapter-disabled model.

    Called by TRL as ``reward(prompts=..., completions=..., completion_ids=..., **kwargs)``. The prompt token ids
    come from the ``prompt_ids`` keyword when the trainer passes it (``sdgrpo``'s trainer does); otherwise the
    prompts are tokenized the way TRL tokenizes plain-text prompts. When the trainer also passes
    ``ref_per_token_logps`` (the reference pass of the KL term, computed at temperature 1), those are used and no
    forward pass runs.
    """

    __name__ = "self_nll"

    def __init__(self, model, tokenizer, aggregation: str = "mean", token_budget: int = 16384,
                 score_with: str = "base"):
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, not {aggregation!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.aggregation = aggregation
        self.token_budget = token_budget
        self.score_with = score_with  # "policy" keeps the adapters on: the self-rewarding failure mode
        self.forward_passes = 0  # own scoring passes run; stays 0 on the reuse path

    def _prompt_ids(self, prompts: list[str]) -> list[list[int]]:
        return self.tokenizer(text=prompts, add_special_tokens=True)["input_ids"]

    def token_logprobs(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[torch.Tensor]:
        self.forward_passes += 1
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        context = adapters_disabled(self.model) if self.score_with == "base" else contextlib.nullcontext()
        with context:
            return completion_logprobs(self.model, prompt_ids, completion_ids, pad_token_id=pad,
                                       token_budget=self.token_budget)

    def __call__(self, prompts, completions, completion_ids, prompt_ids=None, ref_per_token_logps=None, **kwargs):
        if ref_per_token_logps is not None and self.score_with == "base":
            token_logps = [ref_per_token_logps[i][: len(c)] for i, c in enumerate(completion_ids)]
        else:
            if prompt_ids is None:
                prompt_ids = self._prompt_ids(prompts)
            token_logps = self.token_logprobs(prompt_ids, completion_ids)
        return [aggregate(lp.float(), self.aggregation) for lp in token_logps]


REWARDS: dict[str, Callable[..., Callable]] = {
    "self_nll": SelfNLLReward,
}


def self_nll(model, tokenizer, **options) -> SelfNLLReward:
    """The self-NLL reward for ``model`` (PEFT or plain); options: ``aggregation``, ``token_budget``."""
    return SelfNLLReward(model, tokenizer, **options)


def build_reward(name: str, model, tokenizer, **options):
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; choose one of {sorted(REWARDS)}")
    return REWARDS[name](model, tokenizer, **options)
