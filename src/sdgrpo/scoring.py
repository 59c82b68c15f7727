"""Exact per-token log-probabilities of given completion ids, batched under a token budget.

The scored tokens are exactly the sampled ``completion_ids`` (EOS included when it was sampled), conditioned on the
prompt ids exactly as the trainer tokenized them: no re-tokenization of text.
"""

from __future__ import annotations

import contextlib
import logging

import torch

logger = logging.getLogger(__name__)


def adapters_disabled(model):
    """Context in which a PEFT model runs as its base model; a plain model runs as is."""
    if hasattr(model, "disable_adapter") and getattr(model, "peft_config", None):
        return model.disable_adapter()
    return contextlib.nullcontext()


@contextlib.contextmanager
def eval_mode(model):
    """Eval mode (no dropout) for the duration, restoring the previous mode."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def micro_batches(lengths: list[int], token_budget: int) -> list[list[int]]:
    """Group indices, sorted by length, so each group's padded size (rows x longest) stays within the budget.

    A single sequence longer than the budget forms its own group.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    current: list[int] = []
    for i in order:
        if current and (len(current) + 1) * lengths[i] > token_budget:
            groups.append(current)
            current = []
        current.append(i)
    if current:
        groups.append(current)
    return groups


def _chunked_token_logps(logits: torch.Tensor, targets: torch.Tensor, chunk_rows: int) -> torch.Tensor:
    """log_softmax(logits)[target] in fp32, a few rows at a time so fp32 logits never span the whole batch."""
    out = torch.empty(targets.shape, dtype=torch.float32, device=logits.device)
    for start in range(0, logits.size(0), chunk_rows):
        chunk = logits[start : start + chunk_rows].float()  # [b, K, V]
        logz = torch.logsumexp(chunk, dim=-1)
        picked = chunk.gather(-1, targets[start : start + chunk_rows, :, None]).squeeze(-1)
        out[start : start + chunk_rows] = picked - logz
    return out


def _forward_group(model, prompts, completions, pad_id: int, device, chunk_rows: int) -> list[torch.Tensor]:
    """Right-padded forward of one micro-batch; returns each completion's token log-probs (CPU, fp32)."""
    seqs = [list(p) + list(c) for p, c in zip(prompts, completions)]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[r, : len(s)] = 1
    # Logits are needed from the position before the earliest completion start to the end.
    first = min(len(p) for p in prompts) - 1
    keep = width - first
    ids, mask = ids.to(device), mask.to(device)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=keep).logits  # [B, keep, V]
    logits = logits[:, :-1]  # the last position predicts past the end
    targets = ids[:, first + 1 :]  # [B, keep-1]
    logps = _chunked_token_logps(logits, targets, chunk_rows)
    out = []
    for r, (p, c) in enumerate(zip(prompts, completions)):
        start = len(p) - 1 - first  # logits index predicting completion token 0
        out.append(logps[r, start : start + len(c)].cpu())
    return out


def completion_logprobs(
    model,
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    *,
    pad_token_id: int,
    token_budget: int = 16384,
    chunk_rows: int = 4,
) -> list[torch.Tensor]:
    """Per-token log p(completion_ids[i][t] | prompt_ids[i], completion_ids[i][:t]) at temperature 1.

    Runs ``model`` as is (wrap it in :func:`adapters_disabled` to score with the base), in eval mode and inference
    mode, in micro-batches of at most ``token_budget`` padded tokens. On CUDA out-of-memory a micro-batch is halved
    and retried. Empty completions get an empty tensor. Returns fp32 CPU tensors.
    """
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(completion_ids)} completions")
    results: list[torch.Tensor | None] = [None] * len(prompt_ids)
    live = [i for i, c in enumerate(completion_ids) if len(c) > 0]
    for i, c in enumerate(completion_ids):
        if len(c) == 0:
            results[i] = torch.empty(0)
    for i in live:
        if len(prompt_ids[i]) == 0:
            raise ValueError("a prompt with no tokens cannot condition a completion; the tokenizer should add BOS")
    device = next(model.parameters()).device
    lengths = [len(prompt_ids[i]) + len(completion_ids[i]) for i in live]
    pending = [[live[j] for j in group] for group in micro_batches(lengths, token_budget)]
    with eval_mode(model), torch.inference_mode():
        while pending:
            group = pending.pop()
            try:
                scored = _forward_group(model, [prompt_ids[i] for i in group], [completion_ids[i] for i in group],
                                        pad_token_id, device, chunk_rows)
            except torch.cuda.OutOfMemoryError:
                if len(group) == 1:
                    raise
                torch.cuda.empty_cache()
                half = len(group) // 2
                logger.warning("CUDA out of memory scoring %d sequences; retrying in halves", len(group))
                pending.extend([group[:half], group[half:]])
                continue
            for i, lp in zip(group, scored):
                results[i] = lp
    return results  # type: ignore[return-value]
