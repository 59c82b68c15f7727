"""Activations off the card: gradient checkpointing's saved layer inputs kept in CPU memory until the backward.

With gradient checkpointing (TRL's GRPOConfig turns it on), what a training pass keeps on the GPU per token is each
decoder layer's input (the layers' insides are recomputed in the backward) plus the LM head's share. For a 7B that is
28 x 3,584 x 2 bytes = 0.20 MB a token, 37% of what the pass grows by per completion token (docs/gpu.md). Here each
layer's checkpoint runs inside saved-tensor hooks that pack into CPU memory as ``torch.autograd.graph.save_on_cpu``
does: PyTorch's non-reentrant checkpoint saves its inputs before it enters its own hooks (torch 2.13: saved tensors
made by ``_CheckpointFrame.save_inputs``; earlier: ``NoopSaveInputs``; the reentrant one by
``ctx.save_for_backward``), so those inputs, and only those, are packed into (pinned) CPU memory and copied back when
the backward reaches the layer. Unsloth's
backend has its own offloaded checkpointing (``use_gradient_checkpointing="unsloth"``) and is left as it is.

Shadowed upstream behaviour (pinned in tests/test_private_api.py): transformers 5's ``GradientCheckpointingLayer``
calls ``self._gradient_checkpointing_func(partial(super().__call__, **kwargs), *args)``, the function that
``PreTrainedModel.gradient_checkpointing_enable`` set (``functools.partial(torch.utils.checkpoint.checkpoint,
**gradient_checkpointing_kwargs)``); :func:`install` wraps that attribute on every such layer.
"""

from __future__ import annotations

import torch


class OffloadedCheckpoint:
    """A layer's ``_gradient_checkpointing_func`` (``inner``) run inside ``save_on_cpu``; counts the bytes it sent to
    CPU memory (``offloaded``, reset by the caller)."""

    def __init__(self, inner, counter: list[int]):
        self.inner = inner
        self.counter = counter

    def __call__(self, fn, *args, **kwargs):
        counter = self.counter

        def pack(tensor):
            counter[0] += tensor.numel() * tensor.element_size()
            packed = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout,
                                 pin_memory=tensor.is_cuda and torch.cuda.is_available())
            packed.copy_(tensor, non_blocking=tensor.is_cuda)
            return tensor.device, packed

        def unpack(saved):
            device, tensor = saved
            return tensor.to(device, non_blocking=True)

        # torch.autograd.graph.save_on_cpu's pack and unpack (torch 2.13), with the bytes counted
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            return self.inner(fn, *args, **kwargs)


def checkpointed_layers(model) -> list:
    """The modules of ``model`` that transformers checkpoints (``GradientCheckpointingLayer`` with checkpointing
    on)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)
            and getattr(m, "gradient_checkpointing", False) and hasattr(m, "_gradient_checkpointing_func")]


def install(model, counter: list[int]) -> int:
    """Wrap every checkpointed layer's checkpoint function of ``model`` in :class:`OffloadedCheckpoint` (once; a
    layer already wrapped keeps its wrapper, re-pointed at ``counter``). Returns how many layers offload."""
    layers = checkpointed_layers(model)
    for layer in layers:
        func = layer._gradient_checkpointing_func
        if isinstance(func, OffloadedCheckpoint):
            func.counter = counter
        else:
            layer._gradient_checkpointing_func = OffloadedCheckpoint(func, counter)
    return len(layers)
