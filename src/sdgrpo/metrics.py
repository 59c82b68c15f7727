"""Collapse metrics of sampled text: pure functions over token-id lists, no model.

- distinct-n: unique n-grams / n-grams, pooled over a set of completions (a group or a batch).
- seq-rep-4: per completion, 1 - unique 4-grams / 4-grams (Welleck et al. 2019); 0 for fewer than 4 tokens.
- compression ratio: UTF-8 bytes / gzip bytes of the decoded text (repetitive text compresses better).
"""

from __future__ import annotations

import gzip
import statistics
from collections.abc import Sequence


def ngrams(ids: Sequence[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]


def distinct_n(completions: Sequence[Sequence[int]], n: int) -> float | None:
    """Unique n-grams over all n-grams of ``completions`` pooled; None when there is no n-gram at all."""
    grams = [g for ids in completions for g in ngrams(ids, n)]
    return len(set(grams)) / len(grams) if grams else None


def seq_rep_n(ids: Sequence[int], n: int = 4) -> float:
    grams = ngrams(ids, n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def compression_ratio(text: str) -> float | None:
    raw = text.encode("utf-8")
    return len(raw) / len(gzip.compress(raw, mtime=0)) if raw else None


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def collapse_metrics(completion_ids: Sequence[Sequence[int]], texts: Sequence[str], eos_ids: set[int],
                     group_size: int | None = None) -> dict[str, float | None]:
    """The per-step collapse metrics of a batch of completions (in groups of ``group_size`` when given).

    ``completion_ids`` include the EOS token when one was sampled; it is not counted as text.
    """
    content = [[t for t in ids if t not in eos_ids] for ids in completion_ids]
    out = {
        "distinct_1": distinct_n(content, 1),
        "distinct_2": distinct_n(content, 2),
        "seq_rep_4": _mean(seq_rep_n(ids, 4) for ids in content),
        "compression_ratio": _mean(compression_ratio(t) for t in texts),
        "length": _mean(len(ids) for ids in completion_ids),
        "eos_rate": _mean(float(bool(ids) and ids[-1] in eos_ids) for ids in completion_ids),
    }
    if group_size:
        groups = [content[i : i + group_size] for i in range(0, len(content), group_size)]
        out["group_distinct_1"] = _mean(distinct_n(g, 1) for g in groups)
        out["group_distinct_2"] = _mean(distinct_n(g, 2) for g in groups)
    return out


def frac_equal_reward_groups(rewards: Sequence[float | None], group_size: int, tol: float = 1e-6) -> float | None:
    """Fraction of groups whose (non-missing) rewards are all equal: those groups carry no learning signal."""
    groups = [[r for r in rewards[i : i + group_size] if r is not None] for i in range(0, len(rewards), group_size)]
    groups = [g for g in groups if g]
    if not groups:
        return None
    return sum(max(g) - min(g) <= tol for g in groups) / len(groups)
