"""Sampling K continuations per prompt and scoring them, for the demo and the evaluation."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdgrpo.engine import DecodeEngine
from sdgrpo.scoring import adapters_disabled, aggregate, completion_logprobs


@dataclass
class Samples:
    prompts: list[str]
    prompt_ids: list[list[int]]  # one per completion (repeated K times)
    completion_ids: list[list[int]]  # EOS included when sampled, nothing after it
    texts: list[str]
    k: int
    eos_ids: set[int]  # the stop set the samples were drawn with


def stop_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and the generation config's (an instruct model's
    end-of-turn token), the same set TRL stops training rollouts on."""
    declared = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    declared = [] if declared is None else [declared] if isinstance(declared, int) else list(declared)
    first = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return list(dict.fromkeys(first + declared))


def trim_after_eos(ids: list[int], eos_ids: set[int], pad_id: int | None) -> list[int]:
    out = []
    for t in ids:
        out.append(t)
        if t in eos_ids:
            break
    while out and pad_id is not None and out[-1] == pad_id and pad_id not in eos_ids:
        out.pop()
    return out


ENGINE = DecodeEngine()  # one per process: its cache (and, on a GPU, its compiled step) serve every call


@torch.inference_mode()
def sample(model, tokenizer, prompts: list[str], k: int, max_new_tokens: int, temperature: float = 1.0,
           seed: int = 0, batch_size: int = 32, top_p: float = 1.0) -> Samples:
    """K samples per prompt with ancestral sampling (top-k off; top-p off unless given, as in TRL's defaults), drawn
    by the decoding engine (sdgrpo.engine)."""
    device = next(model.parameters()).device
    stop = stop_token_ids(model, tokenizer)
    eos_ids = set(stop)
    torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    all_prompt_ids, all_completions = [], []
    expanded = [p for p in prompts for _ in range(k)]
    for start in range(0, len(expanded), batch_size):
        chunk = expanded[start : start + batch_size]
        enc = tokenizer(chunk, return_tensors="pt", padding=True, padding_side="left").to(device)
        out = ENGINE.generate(model, **enc, do_sample=True, temperature=temperature, top_k=0, top_p=top_p,
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=stop or None)
        width = enc["input_ids"].size(1)
        for row, mask in zip(out, enc["attention_mask"]):
            all_prompt_ids.append(row[:width][mask.bool()].tolist())
            all_completions.append(trim_after_eos(row[width:].tolist(), eos_ids, tokenizer.pad_token_id))
    model.train(was_training)
    texts = tokenizer.batch_decode(all_completions, skip_special_tokens=True)
    return Samples(prompts, all_prompt_ids, all_completions, texts, k, eos_ids)


def base_rewards(model, tokenizer, samples: Samples, token_budget: int = 16384) -> list[float | None]:
    """The self-NLL reward of each sample: mean log-prob under the adapter-disabled model."""
    with adapters_disabled(model):
        logps = completion_logprobs(model, samples.prompt_ids, samples.completion_ids,
                                    pad_token_id=tokenizer.pad_token_id, token_budget=token_budget)
    return [aggregate(lp, "mean") for lp in logps]
