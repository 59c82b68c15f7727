"""Exact per-token log-probabilities of given completion ids, batched under a token budget.

The scored tokens are exactly the sampled ``completion_ids`` (EOS included when it was sampled), conditioned on the
prompt ids exactly as the trainer tokenized them: no re-tokenization of text.
"""

from __future__ import annotations

import contextlib
import logging
import math

import torch

logger = logging.getLogger(__name__)


def adapters_disabled(model):
    """Context in which a PEFT model runs as its base model; a plain model runs as is."""
    if hasattr(model, "disable_adapter") and getattr(model, "peft_config", None):
        return model.disable_adapter()
    return contextlib.nullcontext()


def aggregate(token_logps: torch.Tensor, aggregation: str) -> float | None:
    """Mean or sum of one completion's token log-probs; ``None`` for an empty completion or a non-finite value."""
    if token_logps.numel() == 0:
        return None
    value = token_logps.sum().item() if aggregation == "sum" else token_logps.mean().item()
    return value if math.isfinite(value) else None


def pad_id(tokenizer) -> int:
    """The id that pads a batch for ``tokenizer``: its pad token, else 0 (padding is masked out of every pass, so any
    id serves a tokenizer that has none)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


DROPOUT_ATTRIBUTES = ("attention_dropout", "attn_dropout", "dropout", "dropout_p", "hidden_dropout")


def active_dropout(model, lora: bool = False) -> list[str]:
    """Names of the modules of ``model`` that drop out in train mode: ``nn.Dropout`` with p > 0 (the LoRA layers'
    own only with ``lora``), and attention modules that pass a float rate to the attention function (Llama's
    ``attention_dropout``)."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout) and module.p > 0:
            if lora or "lora_dropout" not in name:
                found.append(name)
        elif any(isinstance(getattr(module, a, None), float) and getattr(module, a) > 0 for a in DROPOUT_ATTRIBUTES):
            found.append(name)
    return found


@contextlib.contextmanager
def eval_mode(model):
    """Eval mode (no dropout) for the duration, restoring the previous mode."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def leading_special(ids: list[int], special_ids: set[int]) -> int:
    """How many of the first ids are special tokens (BOS, a chat template's start)."""
    lead = 0
    while lead < len(ids) and ids[lead] in special_ids:
        lead += 1
    return lead


def truncate_prompt(ids: list[int], max_tokens: int, special_ids: set[int]) -> list[int]:
    """The last ``max_tokens`` ids of a prompt, keeping its leading special tokens (BOS, a chat template's start).

    The kept special tokens count towards ``max_tokens``; if they alone reach it, only they are kept.
    """
    ids = list(ids)
    if len(ids) <= max_tokens:
        return ids
    lead = min(leading_special(ids, special_ids), max_tokens)
    rest = max_tokens - lead
    return ids[:lead] + (ids[len(ids) - rest :] if rest else [])


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


def _split_head(model):
    """(backbone, lm_head, logit scale, soft cap) when logits are ``lm_head(hidden)`` then scaled and soft-capped as
    TRL's fused head reads the config (``chunked.head_transform``), else None (no separate head, or a DeepSpeed
    ZeRO-3 partition of it)."""
    from sdgrpo.chunked import head_transform

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    try:
        backbone, head = base.get_decoder(), base.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if backbone is None or head is None or backbone is base or config is None:
        return None
    if head.weight.numel() == 0 or hasattr(head.weight, "ds_id"):
        return None  # a DeepSpeed ZeRO-3 partition: only the module's own forward gathers it
    return (backbone, head, *head_transform(config))


def _pick(logits: torch.Tensor, targets: torch.Tensor, topk: int):
    """log_softmax(logits)[target] ([n]) in fp32, and with ``topk``, the k largest log-probs and their ids
    ([n, k] each)."""
    logits = logits.float()
    norm = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(-1, targets[:, None]).squeeze(-1) - norm
    if not topk:
        return picked, None
    values, ids = torch.topk(logits, min(topk, logits.size(-1)), dim=-1)
    return picked, (values - norm[:, None], ids)


def _token_logps_from_hidden(hidden: torch.Tensor, head, targets: torch.Tensor, chunk_tokens: int, topk: int = 0,
                             logit_scale: float = 1.0, softcap: float | None = None):
    """log_softmax(head(hidden))[target] for rows of ``hidden`` [N, H], ``chunk_tokens`` rows at a time in fp32
    (the head's logits scaled and soft-capped as the model does); with ``topk``, also the top-k log-probs and ids of
    every row ([N, k] each)."""
    out = torch.empty(targets.shape, dtype=torch.float32, device=hidden.device)
    top = []
    for start in range(0, hidden.size(0), chunk_tokens):
        logits = head(hidden[start : start + chunk_tokens]).float() * logit_scale  # [chunk, V]
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        picked, best = _pick(logits, targets[start : start + chunk_tokens], topk)
        out[start : start + chunk_tokens] = picked
        if best is not None:
            top.append(best)
    if not topk:
        return out
    return out, (torch.cat([v for v, _ in top]), torch.cat([i for _, i in top]))


def _forward_group(model, prompts, completions, pad_id: int, device, chunk_tokens: int, topk: int = 0):
    """Right-padded forward of one micro-batch; returns each completion's token log-probs (CPU, fp32), and with
    ``topk`` each completion's top-k log-probs and ids at every position ([n, k] each).

    Only the hidden states of completion positions go through the LM head, ``chunk_tokens`` tokens at a time, so
    no logits of more than ``chunk_tokens`` x vocabulary exist at once (a model without a separate head is scored
    from its own logits of the completion positions).
    """
    seqs = [list(p) + list(c) for p, c in zip(prompts, completions)]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[r, : len(s)] = 1
    ids, mask = ids.to(device), mask.to(device)
    # Row r predicts completion token t at position len(prompt_r) - 1 + t.
    rows = torch.cat([torch.full((len(c),), r, dtype=torch.long) for r, c in enumerate(completions)])
    cols = torch.cat([torch.arange(len(p) - 1, len(p) - 1 + len(c)) for p, c in zip(prompts, completions)])
    rows, cols = rows.to(device), cols.to(device)
    targets = ids[rows, cols + 1]
    split = _split_head(model)
    if split is not None:
        backbone, head, scale, softcap = split
        hidden = backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state  # [B, T, H]
        scored = _token_logps_from_hidden(hidden[rows, cols], head, targets, chunk_tokens, topk, scale, softcap)
        logps, top = scored if topk else (scored, None)
    else:
        first = min(len(p) for p in prompts) - 1
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=width - first).logits
        logps = torch.empty(targets.shape, dtype=torch.float32, device=device)
        tops = []
        for start in range(0, len(targets), chunk_tokens):
            sl = slice(start, start + chunk_tokens)
            logps[sl], best = _pick(logits[rows[sl], cols[sl] - first], targets[sl], topk)  # [n, V] at a time
            tops.append(best)
        top = (torch.cat([v for v, _ in tops]), torch.cat([i for _, i in tops])) if topk else None
    sizes = [len(c) for c in completions]
    logps = list(torch.split(logps.cpu(), sizes))
    if not topk:
        return logps
    return logps, list(zip(torch.split(top[0].cpu(), sizes), torch.split(top[1].cpu(), sizes)))


def completion_logprobs(
    model,
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    *,
    pad_token_id: int,
    token_budget: int = 16384,
    chunk_tokens: int | None = None,
    topk: int = 0,
):
    """Per-token log p(completion_ids[i][t] | prompt_ids[i], completion_ids[i][:t]) at temperature 1.

    With ``topk`` > 0, returns ``(logps, tops)``: ``tops[i]`` is (the k largest log-probs, their token ids), each
    [len(completion_ids[i]), k], at every position of completion i (what the sampled token was chosen from).

    Runs ``model`` as is (wrap it in :func:`adapters_disabled` to score with the base), in eval mode without
    gradients, in micro-batches of at most ``token_budget`` padded tokens, the LM head run on ``chunk_tokens`` tokens
    at a time (default ``sdgrpo.chunked.CHUNK_TOKENS``). On CUDA out-of-memory a micro-batch is halved and retried.
    Empty completions get an empty tensor. Returns fp32 CPU tensors.
    """
    from sdgrpo.chunked import CHUNK_TOKENS

    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(completion_ids)} completions")
    results: list[torch.Tensor | None] = [None] * len(prompt_ids)
    tops: list[tuple | None] = [None] * len(prompt_ids)
    live = [i for i, c in enumerate(completion_ids) if len(c) > 0]
    for i, c in enumerate(completion_ids):
        if len(c) == 0:
            results[i] = torch.empty(0)
            tops[i] = (torch.empty(0, topk), torch.empty(0, topk, dtype=torch.long))
    for i in live:
        if len(prompt_ids[i]) == 0:
            raise ValueError("a prompt with no tokens cannot condition a completion; the tokenizer should add BOS")
    device = next(model.parameters()).device
    lengths = [len(prompt_ids[i]) + len(completion_ids[i]) for i in live]
    pending = [[live[j] for j in group] for group in micro_batches(lengths, token_budget)]
    # no_grad, not inference_mode: under DeepSpeed ZeRO-3 the parameters gathered for this pass would become inference
    # tensors, which the next training step cannot save for backward.
    with eval_mode(model), torch.no_grad():
        while pending:
            group = pending.pop()
            try:
                scored = _forward_group(model, [prompt_ids[i] for i in group], [completion_ids[i] for i in group],
                                        pad_token_id, device, chunk_tokens or CHUNK_TOKENS, topk)
            except torch.cuda.OutOfMemoryError:
                if len(group) == 1:
                    raise
                torch.cuda.empty_cache()
                half = len(group) // 2
                logger.warning("CUDA out of memory scoring %d sequences; retrying in halves", len(group))
                pending.extend([group[:half], group[half:]])
                continue
            scored, best = scored if topk else (scored, [None] * len(group))
            for i, lp, top in zip(group, scored, best):
                results[i], tops[i] = lp, top
    return (results, tops) if topk else results  # type: ignore[return-value]
