"""Make TRL 1.15's GRPOTrainer run where Triton is missing (CPU builds of torch).

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


def ensure_trl_runs_without_triton() -> bool:
    """Install the plain-PyTorch log-prob function if TRL's Triton one is unavailable; returns True if installed."""
    import trl.trainer.utils as trl_utils

    if getattr(trl_utils, "_ChunkedLogProbFunction", None) is not None:
        return False
    trl_utils._ChunkedLogProbFunction = _PlainChunkedLogProb
    logger.info("Triton is not available: TRL's fused log-prob kernel replaced by a plain PyTorch version")
    return True
