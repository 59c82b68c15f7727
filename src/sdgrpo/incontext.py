"""In-context copying probes: does a model use what it has just read?

- **Induction score** (nats/token): a passage of L tokens written twice in a row after BOS; the mean log-prob of the
  second copy minus that of the first. A model that copies scores the second copy near 0 nats/token, a gain of
  several nats; a model without induction heads gains nothing.
- **Context gain** (nats/token): a true continuation of C tokens scored after ``[continuation, blank line, prompt]``
  minus after ``[prompt]`` alone: how much the model gains from having read the text it must predict, which is what a
  teacher shown the true continuation (privileged context) relies on.

Both take token windows of plain text (held-out text the model never trained on) and run the model as it is.
"""

from __future__ import annotations

import random
import statistics

import torch


def _windows(ids_per_text: list[list[int]], length: int, count: int, seed: int) -> list[list[int]]:
    """``count`` windows of ``length`` tokens, spread over the texts, drawn with a fixed seed."""
    rng = random.Random(seed)
    usable = [ids for ids in ids_per_text if len(ids) > length]
    if not usable:
        raise ValueError(f"no text has more than {length} tokens")
    out = []
    for i in range(count):
        ids = usable[i % len(usable)]
        start = rng.randrange(0, len(ids) - length)
        out.append(ids[start : start + length])
    return out


@torch.no_grad()
def _token_logps(model, rows: list[list[int]], device) -> list[torch.Tensor]:
    """log p(row[t] | row[:t]) for t >= 1 of equal-length rows, one forward per batch of 16."""
    out = []
    for b in range(0, len(rows), 16):
        x = torch.tensor(rows[b : b + 16], device=device)
        logits = model(input_ids=x).logits.float()
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, x[:, 1:, None]).squeeze(-1)
        out.extend(logp.cpu())
    return out


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def induction_score(model, tokenizer, texts: list[str], length: int = 60, count: int = 32, seed: int = 0) -> float:
    """Mean over ``count`` passages of [mean log-prob of the second copy - mean log-prob of the first], nats/token."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    rows = [bos + w + w for w in _windows(_encode(tokenizer, texts), length, count, seed)]
    gains = []
    for logp in _token_logps(model, rows, device):
        first = logp[len(bos) - 1 + (0 if bos else 1) : len(bos) - 1 + length]  # predictions of the first copy
        second = logp[len(bos) - 1 + length :]
        gains.append(second.mean().item() - first.mean().item())
    model.train(was_training)
    return statistics.fmean(gains)


def context_gain(model, tokenizer, texts: list[str], prompt_tokens: int = 32, continuation_tokens: int = 64,
                 count: int = 32, seed: int = 0) -> float:
    """Mean over ``count`` windows of [log p(cont | cont, blank line, prompt) - log p(cont | prompt)], nats/token."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    windows = _windows(_encode(tokenizer, texts), prompt_tokens + continuation_tokens, count, seed)
    plain = [bos + w for w in windows]
    shown = [bos + w[prompt_tokens:] + sep + w for w in windows]
    gains = []
    for a, b in zip(_token_logps(model, plain, device), _token_logps(model, shown, device)):
        gains.append(b[-continuation_tokens:].mean().item() - a[-continuation_tokens:].mean().item())
    model.train(was_training)
    return statistics.fmean(gains)


def probe(model, tokenizer, heldout: list[str], unseen: list[str], count: int = 32) -> dict:
    """The figures the model card reports: induction score at 30, 60 and 120 tokens, and the context gain."""
    return {
        "induction_score": {str(n): round(induction_score(model, tokenizer, heldout, n, count), 4)
                            for n in (30, 60, 120)},
        "context_gain": round(context_gain(model, tokenizer, unseen, count=count), 4),
        "probe_passages": count,
    }
