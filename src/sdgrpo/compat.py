"""Make TRL 1.15's trainers run on CPU, with or without Triton installed.

TRL 1.15 computes per-token log-probs through a fused LM head whose kernel is written in Triton; when Triton cannot
be imported it leaves ``trl.trainer.utils._ChunkedLogProbFunction = None`` and training fails on the first forward.
The CPU wheels of torch ship without Triton, so on CPU we install a plain-PyTorch function with the same interface
and the same outputs (exact, but it materializes the ``[N, V]`` logits of each call, which is fine at CPU scale).
On GPUs, where Triton is present, nothing is changed.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def _plain_chunked_logprob(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
                           logit_scale=1.0, outputs=("entropy",)):
    """Same contract as ``trl.kernels.ChunkedLogProbFunction.apply``; autograd does the backward."""
    logits = hidden @ weight.to(hidden.dtype).t()  # [N, V]
    if bias is not None:
        logits = logits + bias.to(hidden.dtype)
    logits = logits.float() * logit_scale
    if final_logit_softcapping is not None:
        logits = final_logit_softcapping * torch.tanh(logits / final_logit_softcapping)
    logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1)
    log_probs = logp.gather(-1, targets[:, None]).squeeze(-1)
    entropy = log_sum_sq = mean_logits = is_top1 = None
    if "entropy" in outputs:
        entropy = -(logp.exp() * logp).sum(-1)
    if "log_sum_sq_probs" in outputs:
        log_sum_sq = torch.logsumexp(2 * logp, dim=-1)
    if "mean_logits" in outputs:
        mean_logits = logits.mean(-1)
    if "is_top1" in outputs:
        is_top1 = (logits.argmax(-1) == targets).float()
    return log_probs, entropy, log_sum_sq, mean_logits, is_top1


class _PlainChunkedLogProb:
    apply = staticmethod(_plain_chunked_logprob)


class _DeviceDispatch:
    """TRL's Triton kernel for CUDA tensors, the plain version for any other device (a GPU machine's Triton cannot
    run on CPU tensors: training on the CPU of a machine with Triton installed failed with '0 active drivers')."""

    triton = None

    @classmethod
    def apply(cls, hidden, *args, **kwargs):
        if hidden.is_cuda and cls.triton is not None:
            return cls.triton.apply(hidden, *args, **kwargs)
        return _plain_chunked_logprob(hidden, *args, **kwargs)


def ensure_trl_runs_without_triton() -> bool:
    """Route TRL's fused log-prob function by device: Triton's where it exists and the tensors are on CUDA, the
    plain-PyTorch one otherwise. Returns True if it installed the router now (False if it was already there)."""
    import trl.trainer.utils as trl_utils

    current = getattr(trl_utils, "_ChunkedLogProbFunction", None)
    if current is _DeviceDispatch:
        return False
    _DeviceDispatch.triton = current if current is not _PlainChunkedLogProb else None
    trl_utils._ChunkedLogProbFunction = _DeviceDispatch
    if current is None:
        logger.info("Triton is not available: TRL's fused log-prob kernel runs as plain PyTorch")
    return True
