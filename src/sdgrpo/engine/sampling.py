"""Logits processing and the choice of one token per row, as transformers' ``generate`` makes them.

Sampling ``exactly as asked`` means the same processing order and formulas as transformers' logits processors
(min-new-tokens, temperature, top-k, top-p, min-p) and a draw from the resulting distribution by an exponential race,
``argmax(p / E)`` with ``E ~ Exp(1)``: the way ``torch.multinomial`` draws one sample, so on CPU a seeded call draws
exactly the tokens of a seeded ``generate`` (tested); greedy decoding gives ``generate``'s tokens. Pure tensor code,
no model and no state: :class:`Sampling` holds one call's settings, :class:`Decoded` one call's result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Sampling:
    """The settings of one call, as transformers' generation config spells them."""

    max_new_tokens: int
    do_sample: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    min_new_tokens: int = 0
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0


@dataclass
class Decoded:
    sequences: torch.Tensor  # [B, P + T]: the prompt, then the completion, pad after a row's EOS
    logprobs: torch.Tensor  # [B, T]: log p(token) under the model at temperature 1 (0 after a row's EOS)
    sampling_logprobs: torch.Tensor | None = None  # [B, T]: log p(token) at the call's temperature (as TRL scores
    # its policy: log_softmax(logits / T), before top-k / top-p); None where that is ``logprobs`` (temperature 1)


def process_logits(logits: torch.Tensor, s: Sampling, step: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    """transformers' processors in its order: min-new-tokens, then (sampling only) temperature, top-k, top-p, min-p."""
    scores = logits.float()
    if s.min_new_tokens and eos.numel():
        blocked = torch.zeros_like(scores, dtype=torch.bool)
        blocked[:, eos] = step < s.min_new_tokens
        scores = scores.masked_fill(blocked, -float("inf"))
    if not s.do_sample:
        return scores
    if s.temperature != 1.0:
        scores = scores / s.temperature
    if s.top_k:
        kth = torch.topk(scores, min(s.top_k, scores.size(-1)))[0][..., -1, None]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if s.top_p < 1.0:
        sorted_logits, sorted_indices = torch.sort(scores, descending=False)
        remove = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - s.top_p)
        remove[..., -1:] = False
        scores = scores.masked_fill(remove.scatter(1, sorted_indices, remove), -float("inf"))
    if s.min_p:
        probs = scores.softmax(dim=-1)
        remove = probs < s.min_p * probs.amax(dim=-1, keepdim=True)
        remove.scatter_(-1, probs.argmax(dim=-1, keepdim=True), False)
        scores = scores.masked_fill(remove, -float("inf"))
    return scores


def scaled(s: Sampling) -> bool:
    """Whether the call samples at a temperature other than 1 (its sampling log-probs then differ from ``logprobs``)."""
    return s.do_sample and s.temperature != 1.0


def choose(logits: torch.Tensor, s: Sampling, step: torch.Tensor, eos: torch.Tensor, finished: torch.Tensor):
    """One token per row: (token, its log-prob at temperature 1, its log-prob at the call's temperature, finished
    after it). Finished rows get pad (and log-probs 0)."""
    scores = process_logits(logits, s, step, eos)
    if s.do_sample:
        race = torch.empty_like(scores).exponential_()
        token = (scores.softmax(dim=-1) / race).argmax(dim=-1)
    else:
        token = scores.argmax(dim=-1)
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, token[:, None])[:, 0]
    slogp = (torch.log_softmax(logits.float() / s.temperature, dim=-1).gather(-1, token[:, None])[:, 0]
             if scaled(s) else logp)
    token = torch.where(finished, torch.full_like(token, s.pad_token_id), token)
    logp, slogp = logp.masked_fill(finished, 0.0), slogp.masked_fill(finished, 0.0)
    if eos.numel():
        finished = finished | torch.isin(token, eos)
    return token, logp, slogp, finished
