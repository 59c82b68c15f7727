"""Measuring a causal LM on plain text: held-out bits per byte over running text (:func:`evaluate_bpb`, with a
unigram baseline and the held-out slice of the shipped model's corpus, :func:`load_corpus`), and the in-context
copying probes: does a model use what it has just read?

- **Induction score** (nats/token): a passage of L tokens written twice in a row after BOS; the mean log-prob of the
  second copy minus that of the first. A model that copies scores the second copy near 0 nats/token, a gain of
  several nats; a model without induction heads gains nothing.
- **Context gain** (nats/token): a true continuation of C tokens scored after ``[continuation, blank line, prompt]``
  minus after ``[prompt]`` alone: how much the model gains from having read the text it must predict, which is what a
  teacher shown the true continuation (privileged context) relies on.

Both take token windows of plain text (held-out text the model never trained on) and run the model as it is.
"""

from __future__ import annotations

import math
import random
import statistics
from pathlib import Path

import torch

from sdgrpo.textio import read_text_file

CORPORA = ("tinyshakespeare", "gutenberg", "gutenberg-more")  # the shipped model's corpus folders


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


def _token_logps(model, rows: list[list[int]], device=None) -> list[torch.Tensor]:
    """log p(row[t] | row[:t]) for t >= 1 of each row (fp32, CPU): ``scoring.completion_logprobs`` of everything
    after the first token, so the LM head sees a bounded chunk of tokens at a time (no [rows, tokens, vocabulary]
    logits)."""
    from sdgrpo.scoring import completion_logprobs

    rows = [list(map(int, r)) for r in rows]
    return completion_logprobs(model, [r[:1] for r in rows], [r[1:] for r in rows], pad_token_id=0)


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


def split_text(text: str, heldout_fraction: float) -> tuple[str, str]:
    """Split ``text`` at the line break nearest to ``1 - heldout_fraction`` of its length."""
    cut = int(len(text) * (1 - heldout_fraction))
    nl = text.rfind("\n", 0, cut)
    cut = nl + 1 if nl > 0 else cut
    return text[:cut], text[cut:]


def load_corpus(data_dir: str | Path, heldout_fraction: float = 0.05) -> list[tuple[str, str, str]]:
    """Return ``(name, train_text, heldout_text)`` for every text, sorted by path: the books under the shipped
    model's corpus folders (``CORPORA``) where ``data_dir`` has them, else every ``.txt`` file under it."""
    from sdgrpo.errors import UserError

    if not data_dir:
        raise UserError("pretrain needs --data_dir: a folder of .txt files")
    root = Path(data_dir)
    if not root.is_dir():
        raise UserError(f"{root}: no such folder; pass --data_dir with .txt files")
    paths = [p for sub in CORPORA for p in sorted((root / sub).glob("*.txt"))]
    if not paths:
        paths = sorted(root.rglob("*.txt"))
    out = []
    for path in paths:
        if path.name == "SOURCE.txt":
            continue
        train, held = split_text(read_text_file(path), heldout_fraction)
        out.append((str(path.relative_to(root)), train, held))
    if not out:
        raise UserError(f"{root}: no .txt files to train on; pass --data_dir with text files")
    return out


def heldout_nll(model, ids: torch.Tensor, seq_len: int, device=None) -> float:
    """Summed NLL in nats of every token of ``ids`` after the first, each predicted exactly once (eval mode).

    Chunk ``i`` is ``ids[i*(T-1) : i*(T-1)+T]`` and scores its tokens 1..T-1, so the targets tile the stream.
    """
    model.eval()
    step = seq_len - 1
    rows = [ids[s : s + seq_len].tolist() for s in range(0, len(ids) - 1, step)]
    return -sum(lp.double().sum().item() for lp in _token_logps(model, rows))


def unigram_nll(train_ids: torch.Tensor, eval_ids: torch.Tensor, vocab_size: int) -> float:
    """Summed NLL in nats of ``eval_ids[1:]`` under add-one-smoothed unigram counts of ``train_ids``."""
    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1.0
    logp = torch.log(counts / counts.sum())
    return -logp[eval_ids[1:]].sum().item()


def evaluate_bpb(model, tokenizer, heldout: list[str], seq_len: int, device) -> tuple[float, int]:
    """Held-out bits per UTF-8 byte over ``heldout`` texts; returns ``(bpb, bytes)``."""
    nll, nbytes = 0.0, 0
    for text in heldout:
        ids = torch.tensor(tokenizer(text)["input_ids"])
        nll += heldout_nll(model, ids, seq_len, device)
        nbytes += len(text.encode("utf-8"))
    return nll / math.log(2) / nbytes, nbytes
