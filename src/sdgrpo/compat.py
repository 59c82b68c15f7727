"""Make TRL 1.15's trainers run on CPU, with or without Triton installed.

TRL 1.15 computes per-token log-probs through a fused LM head whose kernel is written in Triton; when Triton cannot
be imported it leaves ``trl.trainer.utils._ChunkedLogProbFunction = None`` and training fails on the first forward.
The CPU wheels of torch ship without Triton, so on CPU we install a plain-PyTorch function with the same interface
and the same outputs, computed a bounded number of tokens at a time (``sdgrpo.chunked``): no ``[N, V]`` logits exist
in its forward or its backward. On GPUs, where Triton is present, nothing is changed.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

logger = logging.getLogger(__name__)


def _plain_chunked_logprob(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
                           logit_scale=1.0, outputs=("entropy",)):
    """Same contract as ``trl.kernels.ChunkedLogProbFunction.apply``, in ``sdgrpo.chunked.CHUNK_TOKENS`` tokens at a
    time, forward and backward (``chunk_size``, TRL's vocabulary tile, does not apply: a chunk takes the whole
    vocabulary)."""
    from sdgrpo.chunked import token_stats

    return token_stats(hidden, weight, bias, targets, temperature, logit_scale, final_logit_softcapping,
                       outputs)[:5]


class _PlainChunkedLogProb:
    apply = staticmethod(_plain_chunked_logprob)


class _DeviceDispatch:
    """TRL's Triton kernel for CUDA tensors, the plain version for any other device (a GPU machine's Triton cannot
    run on CPU tensors: training on the CPU of a machine with Triton installed failed with '0 active drivers')."""

    triton = None
    route = None  # a function that takes every call, on any device, while :func:`fused_head_route` is on

    @classmethod
    def apply(cls, hidden, *args, **kwargs):
        if cls.route is not None:
            return cls.route(hidden, *args, **kwargs)
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
        logger.debug("Triton is not available: TRL's fused log-prob kernel runs as plain PyTorch")
    return True


@contextmanager
def fused_head_route(fn):
    """For the duration, TRL's fused LM head (``model(..., labels=..., fused_lm_head=True)`` of a model patched by
    ``trl.trainer.utils.add_fused_lm_head``) hands its operands to ``fn`` instead of its kernel, on any device:
    ``fn(hidden [N, H] of the labelled positions, weight, bias, labels [N], temperature, chunk_size, softcap,
    logit_scale, outputs)`` returns TRL's five per-token outputs. The pass keeps going through the model's own
    forward (PEFT, DDP, FSDP and ZeRO-3 as TRL runs them) and ``fn`` can compute more from the same head (top-K
    log-probs, a teacher's divergence), chunk by chunk."""
    ensure_trl_runs_without_triton()
    if _DeviceDispatch.route is not None:
        raise RuntimeError("a fused-head route is already on")
    _DeviceDispatch.route = fn
    try:
        yield
    finally:
        _DeviceDispatch.route = None
