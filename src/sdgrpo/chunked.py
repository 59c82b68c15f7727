"""Per-token quantities of an LM head's softmax, computed over bounded chunks of tokens.

Contract: no function here makes a tensor of more than ``CHUNK_TOKENS`` tokens x the vocabulary, in the forward or
in the backward. :func:`over_chunks` runs a per-token function on ``CHUNK_TOKENS`` hidden states at a time and, in
the backward, recomputes each chunk's logits instead of keeping them (as TRL's Triton ``ChunkedLogProbFunction``
does); :func:`token_stats` is the per-chunk work of TRL's fused LM head (log-probs of the targets, entropy, ...)
plus the log-probs at given ids (the teacher's top-K under ``--distill_topk``); :func:`kd_stats` is the per-chunk
work of ``sdgrpo sft``'s distillation (cross-entropy and KL(teacher || student) over the vocabulary).

Why not a library for these: TRL's ``ChunkedLogProbFunction`` is Triton (CUDA/XPU only) and returns no logits, so it
gives neither log-probs at other ids (top-K) nor a divergence to a teacher's head; TRL's ``ChunkedDivergenceFunction``
is Triton too and takes no ids. liger-kernel's fused linear losses (``LigerFusedLinearGRPOLoss``,
``LigerFusedLinearDistillationBase``) compute a whole loss in their forward (gradients included) and chunk by rows
of the batch (a row is tokens x vocabulary): they hand no per-token log-probs to a reward (the self-NLL reward is
read from the KL pass), take one advantage per sequence, and know no top-K term. So the chunking is done here, in
plain PyTorch, with the same formulas as the whole-logits code it replaces.
"""

from __future__ import annotations

import contextlib
import functools

import torch

# Tokens per chunk. At Qwen's 152k vocabulary one fp32 [256, V] tensor is 156 MB and a chunk's log-softmax with its
# backward holds about four of them (< 0.7 GB), whatever the batch; 256 rows still make the head's matmul a large
# GEMM (M = 256). The price is the backward's second matmul of each chunk's logits (as in TRL's kernel):
# benchmarks/bench_chunked_memory.py measures both.
CHUNK_TOKENS = 256


def head_transform(config) -> tuple[float, float | None]:
    """(logit scale, final soft cap) of a model's logits after its LM head's matmul, read from its (text) config as
    TRL 1.15's ``add_fused_lm_head`` reads them (``logit_scale``, ``output_multiplier``, ``lm_head_multiplier``,
    ``logits_scaling``; ``final_logit_softcapping``): mirrored here because TRL keeps it inside that function."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = getattr(text, "logit_scale", None)
    if scale is None:
        scale = getattr(text, "output_multiplier", None)
    if scale is None:
        scale = getattr(text, "lm_head_multiplier", None)
    if scale is None and getattr(text, "logits_scaling", None) is not None:
        scale = text.logits_scaling if getattr(text, "model_type", None) == "hyperclovax" else 1 / text.logits_scaling
    return (1.0 if scale is None else scale), getattr(text, "final_logit_softcapping", None)


def head_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, logit_scale: float = 1.0,
                softcap: float | None = None) -> torch.Tensor:
    """fp32 logits ``[n, V]`` of ``hidden`` ``[n, H]``: the matmul in the hidden states' dtype (the model's own
    head's), then scale and soft cap as TRL's fused head applies them."""
    logits = hidden @ weight.to(hidden.dtype).t()
    if bias is not None:
        logits = logits + bias.to(hidden.dtype)
    logits = logits.float() * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def _gather_lm_head(weight, bias):
    """TRL's ZeRO-3 gather of a partitioned LM head for direct access (a null context elsewhere)."""
    if weight.device.type == "cpu":
        return contextlib.nullcontext()
    from trl.trainer.utils import maybe_gather_lm_head_ctx

    return maybe_gather_lm_head_ctx(weight, bias)


class _OverChunks(torch.autograd.Function):
    """``fn`` applied to ``chunk`` rows at a time; the backward recomputes each chunk (its logits never kept)."""

    @staticmethod
    def forward(ctx, fn, chunk, constant, hidden, weight, bias, *rows):
        ctx.set_materialize_grads(False)  # outputs that no loss uses (an entropy for logging) get no gradient work
        parts = [fn(hidden[s : s + chunk], weight, bias, *(r[s : s + chunk] for r in rows))
                 for s in range(0, max(hidden.size(0), 1), chunk)]  # one call on an empty input keeps the shapes
        out = tuple(torch.cat(p) if p[0] is not None else None for p in zip(*parts))
        ctx.fn, ctx.chunk = fn, chunk
        device = hidden.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.save_for_backward(hidden, weight, bias, *rows)
        ctx.mark_non_differentiable(*(o for i, o in enumerate(out)
                                      if o is not None and (i in constant or not o.is_floating_point())))
        return out

    @staticmethod
    def backward(ctx, *grads):
        hidden, weight, bias, *rows = ctx.saved_tensors
        need = ctx.needs_input_grad[3:6]
        device, enabled, dtype = ctx.autocast
        grad_hidden = torch.zeros_like(hidden) if need[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need[1] else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need[2] else None
        with _gather_lm_head(weight, bias):
            for s in range(0, hidden.size(0), ctx.chunk):
                with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
                    inputs = [x.detach().requires_grad_(n) if x is not None else None
                              for x, n in zip((hidden[s : s + ctx.chunk], weight, bias), need)]
                    outs = ctx.fn(*inputs, *(r[s : s + ctx.chunk] for r in rows))
                pairs = [(o, g[s : s + ctx.chunk]) for o, g in zip(outs, grads)
                         if g is not None and o is not None and o.requires_grad]
                wanted = [x for x, n in zip(inputs, need) if n]
                if not pairs or not wanted:
                    continue
                got = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs],
                                               allow_unused=True))
                for i, n in enumerate(need):
                    if not n:
                        continue
                    g = next(got)
                    if g is None:
                        continue
                    if i == 0:
                        grad_hidden[s : s + ctx.chunk] = g
                    elif i == 1:
                        grad_weight += g
                    else:
                        grad_bias += g
        return (None, None, None, grad_hidden, grad_weight.to(weight.dtype) if grad_weight is not None else None,
                grad_bias.to(bias.dtype) if grad_bias is not None else None, *([None] * len(rows)))


def over_chunks(fn, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *rows: torch.Tensor,
                chunk: int | None = None, constant: tuple[int, ...] = ()) -> tuple:
    """``fn(hidden[c], weight, bias, *(r[c] for r in rows))`` for each chunk ``c`` of ``chunk`` (default
    ``CHUNK_TOKENS``) rows, its per-row outputs (a tuple of tensors or None) concatenated. Differentiable in
    ``hidden``, ``weight`` and ``bias``, except the outputs numbered in ``constant`` (and integer ones); ``rows``
    are constants (ids, a teacher's hidden states)."""
    return _OverChunks.apply(fn, chunk or CHUNK_TOKENS, constant, hidden, weight, bias, *rows)


def _token_stats_chunk(hidden, weight, bias, targets, topk_ids=None, *, temperature, logit_scale, softcap, outputs):
    logits = head_logits(hidden, weight, bias, logit_scale, softcap)  # [n, V]
    scaled = logits / temperature
    logp = torch.log_softmax(scaled, dim=-1)
    log_probs = logp.gather(-1, targets[:, None]).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1) if "entropy" in outputs else None
    log_sum_sq = torch.logsumexp(2 * logp, dim=-1).detach() if "log_sum_sq_probs" in outputs else None
    mean_logits = scaled.mean(-1).detach() if "mean_logits" in outputs else None
    is_top1 = (scaled.argmax(-1) == targets).float() if "is_top1" in outputs else None
    at_ids = None
    if topk_ids is not None:  # at temperature 1, whatever the sampling temperature
        at_ids = (logp if temperature == 1.0 else torch.log_softmax(logits, dim=-1)).gather(-1, topk_ids)
    return log_probs, entropy, log_sum_sq, mean_logits, is_top1, at_ids


def token_stats(hidden, weight, bias, targets, temperature: float = 1.0, logit_scale: float = 1.0,
                softcap: float | None = None, outputs=("entropy",), topk_ids: torch.Tensor | None = None,
                chunk: int | None = None):
    """TRL's fused-head outputs for ``hidden`` ``[N, H]`` and ``targets`` ``[N]``, chunk by chunk: (log-probs of the
    targets at ``temperature``, entropy, log(sum p^2), mean logit, is-argmax; None where not in ``outputs``), and
    with ``topk_ids`` ``[N, K]`` the log-probs at those ids at temperature 1 ``[N, K]`` (else None)."""
    fn = functools.partial(_token_stats_chunk, temperature=temperature, logit_scale=logit_scale, softcap=softcap,
                           outputs=tuple(outputs))
    rows = (targets,) if topk_ids is None else (targets, topk_ids)
    return over_chunks(fn, hidden, weight, bias, *rows, chunk=chunk, constant=(2, 3, 4))


def _kd_chunk(hidden, weight, bias, targets, teacher_rows, *, teacher_logits, temperature, logit_scale, softcap,
              outputs):
    logits = head_logits(hidden, weight, bias, logit_scale, softcap)  # [n, V]
    teacher = teacher_logits(teacher_rows)  # [n, V_teacher], fp32, no gradient
    width = min(logits.size(-1), teacher.size(-1))  # a vocabulary padded wider on one side is cut
    s_logp = torch.log_softmax(logits[:, :width], dim=-1)
    t_logp = torch.log_softmax(teacher[:, :width], dim=-1)
    log_probs = s_logp.gather(-1, targets[:, None]).squeeze(-1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    scaled = logits / temperature
    entropy = is_top1 = None
    if "entropy" in outputs:
        logp = torch.log_softmax(scaled, dim=-1)
        entropy = -(logp.exp() * logp).sum(-1)
    if "is_top1" in outputs:
        is_top1 = (scaled.argmax(-1) == targets).float()
    return log_probs, kl, entropy, is_top1


def kd_stats(hidden, weight, bias, targets, teacher_rows, teacher_logits, temperature: float = 1.0,
             logit_scale: float = 1.0, softcap: float | None = None, outputs=("entropy",), chunk: int | None = None):
    """Per token, chunk by chunk: the student's log-prob of ``targets`` and KL(teacher || student) over the
    vocabulary (both over the narrower of the two vocabularies, as ``sft.kd_loss``), and TRL's entropy and
    is-argmax of the student's whole head at ``temperature`` (None where not in ``outputs``). ``teacher_rows``
    ``[N, ...]`` go through ``teacher_logits`` (fp32 ``[n, V_teacher]``, a chunk at a time, no gradient)."""
    fn = functools.partial(_kd_chunk, teacher_logits=teacher_logits, temperature=temperature,
                           logit_scale=logit_scale, softcap=softcap, outputs=tuple(outputs))
    return over_chunks(fn, hidden, weight, bias, targets, teacher_rows, chunk=chunk, constant=(3,))
