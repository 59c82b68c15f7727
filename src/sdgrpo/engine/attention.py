"""Grouped-query attention for one decoded token, without copying the keys and values.

:func:`grouped_sdpa` stands in for transformers' SDPA attention function (``sdpa_attention_forward``: same arguments,
and it calls it back for anything but one query token under grouped-query attention with a mask), pairing query and
key/value heads as transformers' ``repeat_kv`` does (pinned in tests/test_private_api.py). :func:`grouped_attention`
registers it under its own name in transformers' attention registry for the duration of a call, for a model whose
attention goes through that registry and whose code never tests the implementation's name; any other model keeps
its own attention. Exact: the same result as SDPA.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import re
import sys

import torch

GROUPED_SDPA = "sdgrpo_grouped_sdpa"


def grouped_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' SDPA attention, except for one query token under grouped-query attention with a mask: there
    transformers copies every key/value head once per query head of its group (``repeat_kv``; PyTorch's SDPA takes no
    mask with ``enable_gqa``), which for one decoded token moves more bytes than the attention itself. Here the
    group's query heads become rows of one matrix per key/value head (query head ``j * G + g`` is row ``g`` of
    key/value head ``j``, as ``repeat_kv`` pairs them), and the one-row mask broadcasts over them: the scores are one
    batched matmul written in fp32 (as SDPA's kernels keep them), the masked softmax in fp32, then one matmul with
    the values. Same result, no copies, and on one H200 (8 rows, 640 cache positions, inside a CUDA graph) 11.3 us a
    layer against 18.1 for SDPA's memory-efficient kernel on the grouped layout, 104 with the copies (Qwen2.5-7B's
    28 over 4 heads; 1.5B's 12 over 2: 8.0 against 17.7; benchmarks/results/bench_attention_h200_2026-12-03.json)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, q_len, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[-2]
    if (q_len != 1 or heads == kv_heads or attention_mask is None or attention_mask.ndim != 4 or dropout
            or kwargs.get("position_bias") is not None or kwargs.get("output_attentions")
            or key.shape[-1] != value.shape[-1] or kwargs.get("s_aux") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    mask = attention_mask[:, :, :, :length]
    grouped = query.reshape(batch * kv_heads, heads // kv_heads, dim)
    keys = key.reshape(batch * kv_heads, length, dim).transpose(1, 2)
    if query.is_cuda and query.dtype in (torch.bfloat16, torch.float16):
        scores = torch.bmm(grouped, keys, out_dtype=torch.float32)
    else:
        scores = torch.bmm(grouped.float(), keys.float())
    scores = scores.view(batch, kv_heads, heads // kv_heads, length) * (dim**-0.5 if scaling is None else scaling)
    scores = scores.masked_fill(~mask, -float("inf")) if mask.dtype == torch.bool else scores + mask.float()
    out = torch.matmul(scores.softmax(-1).to(value.dtype), value)
    return out.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None


# A test of the attention implementation by its name in a model's code: renamed, such a model takes another path.
_NAMED_IMPLEMENTATION = re.compile(r"_attn_implementation\s*(?:[!=]=|(?:not\s+)?in\b)|"
                                   r"[\"']sdpa[\"']\s*(?:not\s+)?in\s+[\w.]*_attn_implementation")


@functools.cache
def _attention_through_registry(cls: type) -> bool:
    """True when ``cls`` (a transformers model class) declares that its attention goes through transformers'
    attention-function registry (``_supports_attention_backend``) and its module's code never tests the
    implementation's name (Falcon, GLM-5 and a few others branch on ``== "sdpa"`` and would take their eager path,
    with SDPA's boolean mask, under another name)."""
    if not getattr(cls, "_supports_attention_backend", False):
        return False
    try:
        source = inspect.getsource(sys.modules[cls.__module__])
    except (OSError, TypeError, KeyError):
        return False
    return not _NAMED_IMPLEMENTATION.search(source)


@contextlib.contextmanager
def grouped_attention(model, on: bool = True):
    """For the duration, a model that uses transformers' SDPA attention through its attention registry uses
    :func:`grouped_sdpa` (and SDPA's masks); any other model keeps its own attention."""
    config = model.config
    if (not on or getattr(config, "_attn_implementation", None) != "sdpa"
            or not _attention_through_registry(type(model))):
        yield
        return
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(GROUPED_SDPA, grouped_sdpa)
    AttentionMaskInterface.register(GROUPED_SDPA, sdpa_mask)
    config._attn_implementation = GROUPED_SDPA
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"
