"""Generation copies of base + LoRA where the fold cannot serve: a quantised (bitsandbytes) base, or int4 as asked.

:class:`Quantised` holds one copy per LoRA layer or per sibling group (rows of one weight, one matmul), either int4
(base + LoRA folded in fp32, quantised to 4-bit groups and read by an int4.py kernel: a quarter of the 16-bit bytes
held and read per token; mode ``int4``) or, with ``bits`` 16, 16-bit copies of a quantised base's dequantised
weights + LoRA (:class:`Linear16`; mode ``dequantised``: the same matmuls as the 16-bit fold). They are refreshed at
the start of every call from the trained weights (never written) and swapped in for the call; a bitsandbytes weight
is dequantised as PEFT's own merge does it (``dequantize_bnb_weight``). Neither sampler is the policy bit for bit:
the trainer corrects their rollouts by importance sampling. :func:`int4_bytes`, :func:`dense_bytes`: what the copies
and a refresh's temporaries take (:data:`INT4_CHUNK` elements quantised at a time).
"""

from __future__ import annotations

import contextlib
import weakref

import torch

from sdgrpo.engine.folded import (
    Folded,
    _add_lora_delta_,
    _Fused,
    _lora_bias,
    _lora_delta,
    _Part,
    _PerModel,
    _sibling_groups,
    _swapping,
)
from sdgrpo.engine.int4 import GemliteLinear, Int4Linear, gemlite_layout, int4_layout


def _int4_layout_for(kernel: str, out_features: int, in_features: int):
    return gemlite_layout(out_features, in_features) if kernel == "gemlite" else int4_layout(out_features, in_features)


def _quantisable_lora_layers(model, bits: int = 4, kernel: str = "tinygemm") -> list | None:
    """The LoRA layers that a generation copy of ``bits`` (4: int4, 16: 16-bit) can serve: plain LoRA on a 16/32-bit
    ``nn.Linear`` or on a bitsandbytes 4/8-bit base, for int4 with a weight shape that ``kernel``'s layout takes. The
    others (DoRA and other variants, other shapes) decode unmerged beside them. None when no LoRA layer can be
    served; [] without LoRA."""
    try:
        from peft.tuners.lora import Linear as LoraLinear
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return []
    kinds = [LoraLinear]
    try:
        from peft.tuners.lora import bnb as lora_bnb

        kinds += [getattr(lora_bnb, n) for n in ("Linear4bit", "Linear8bitLt") if hasattr(lora_bnb, n)]
    except ImportError:
        pass
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    served = [layer for layer in layers
              if type(layer) in kinds and not layer.lora_variant and not layer.fan_in_fan_out and not layer.merged
              and (bits == 16 or _int4_layout_for(kernel, layer.out_features, layer.in_features) is not None)]
    return served if served or not layers else None


def _quantised_base(layers: list) -> bool:
    """Whether any of ``layers`` wraps a quantised (bitsandbytes) weight."""
    return any(layer.base_layer.weight.dtype not in (torch.float32, torch.bfloat16, torch.float16) for layer in layers)


def _base_weight(layer) -> torch.Tensor:
    """The layer's base weight as a float tensor ([out, in]): a bitsandbytes 4/8-bit weight dequantised (PEFT's
    ``dequantize_bnb_weight``, as its own merge does)."""
    weight = layer.base_layer.weight
    if weight.dtype in (torch.float32, torch.bfloat16, torch.float16):
        return weight
    from peft.utils.integrations import dequantize_bnb_weight

    return dequantize_bnb_weight(weight, state=getattr(layer.base_layer, "state", None))


def _base_weight_into(layer, out: torch.Tensor) -> None:
    """:func:`_base_weight` written into ``out`` (a 16-bit [out, in] tensor): a bitsandbytes NF4/FP4 weight
    dequantised straight into it (``bitsandbytes.functional.dequantize_4bit``'s ``out``, the call PEFT's
    ``dequantize_bnb_weight`` makes), other weights through a temporary. ``out + delta`` in place then rounds once,
    as ``round(float(base) + delta)`` does, without the fp32 copy of the base."""
    weight = layer.base_layer.weight
    state = getattr(weight, "quant_state", None)
    if (weight.__class__.__name__ == "Params4bit" and state is not None and state.dtype == out.dtype
            and tuple(state.shape) == tuple(out.shape) and out.is_contiguous()):
        import bitsandbytes.functional as bnbf

        bnbf.dequantize_4bit(weight.data, state, out=out)
    else:
        out.copy_(_base_weight(layer))


# Elements of fp32 weight quantised at a time (rows of a weight, a multiple of 8): what a refresh takes beyond the
# copies themselves is a few such temporaries (about 0.2-0.4 GiB), for tinygemm the widest group's values before
# packing (1.5 bytes an element; gemlite packs rows as they are loaded), and a dequantised weight for a quantised
# base.
INT4_CHUNK = 1 << 24


def int4_bytes(layers: list, kernel: str = "tinygemm") -> int:
    """Bytes that int4 generation copies of ``layers`` (read by ``kernel``) hold, plus the temporaries of a refresh
    (a few fp32 chunks of :data:`INT4_CHUNK` elements, and a 16-bit dequantised weight where the base is
    quantised)."""
    if kernel == "gemlite":
        held = sum(GemliteLinear.nbytes(layer.out_features, layer.in_features,
                                        gemlite_layout(layer.out_features, layer.in_features)) for layer in layers)
    else:
        held = sum(Int4Linear.nbytes(layer.out_features, layer.in_features,
                                     int4_layout(layer.out_features, layer.in_features)[0]) for layer in layers)
    widest = max((layer.out_features * layer.in_features for layer in layers), default=0)
    if kernel == "gemlite":  # a chunk's fp32 rows (the LoRA delta added by addmm), its values and words
        temporaries = 2 * 4 * min(widest, INT4_CHUNK)
    else:  # quantise_int4's fp32 temporaries, then the whole group's values and pack_int4's
        temporaries = 6 * 4 * min(widest, INT4_CHUNK) + 3 * widest * 3 // 2
    return held + temporaries + (2 * widest if _quantised_base(layers) else 0)


def dense_bytes(layers: list) -> int:
    """Bytes that 16-bit generation copies of ``layers`` hold (weights and biases), plus the temporaries of a refresh
    (a few fp32 chunks of :data:`INT4_CHUNK` elements, and a 16-bit dequantised weight where the base is
    quantised)."""
    held = sum(2 * layer.out_features * (layer.in_features + 1) for layer in layers)
    widest = max((layer.out_features * layer.in_features for layer in layers), default=0)
    return held + 4 * 4 * min(widest, INT4_CHUNK) + (2 * widest if _quantised_base(layers) else 0)


class Linear16(torch.nn.Module):
    """``y = x @ W^T + b`` with W a 16-bit generation copy, loaded rows at a time as :class:`Int4Linear`'s are (the
    same ``load``/``pack`` calls; nothing to pack). Its tensors keep their addresses when refreshed."""

    def __init__(self, out_features: int, in_features: int, dtype, device, bias: bool):
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.weight = torch.nn.Parameter(torch.empty(0, dtype=dtype, device=device), requires_grad=False)
        self.reacquire(device)
        self.bias = (torch.nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)

    packs_rows = True  # nothing to pack

    def release(self) -> None:
        self.weight.data = self.weight.data.new_empty(0)

    def reacquire(self, device) -> None:
        """The weight allocated where it is not: at construction, and after :meth:`release`."""
        if self.weight.numel() == 0:
            self.weight.data = self.weight.data.new_empty(self.out_features, self.in_features)

    @torch.no_grad()
    def load(self, values, start: int, weight: torch.Tensor, owned: bool = False) -> None:
        self.weight[start:start + weight.size(0)] = weight

    def pack(self, values) -> None:
        pass

    def forward(self, x):
        return torch.nn.functional.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


class Quantised(_PerModel):
    """Int4 generation copies of base + LoRA (:class:`Int4Linear`), one per LoRA layer or one per sibling group
    (:data:`SIBLINGS`, rows of one weight, served by one kernel as :class:`Folded` serves them), refreshed at the start
    of every call from the trained weights (never written) and swapped in for the LoRA layers for the call. The
    copies are what it holds: about a quarter of the 16-bit weights. The sampler is then not the policy bit for bit:
    the trainer corrects its rollouts (``--rollout_correction``). Held for one model at a time, by weak
    references.

    ``kernel`` (4 bits): ``tinygemm`` (:class:`Int4Linear`) or ``gemlite`` (:class:`GemliteLinear`), which reads the
    copies (:func:`choose_int4_kernel`).

    ``bits`` 16: the copies are 16-bit (:class:`Linear16`, in the dtype of the model's embeddings): for a quantised
    (bitsandbytes) base, its dequantised weights + LoRA, read by the same matmuls as the 16-bit fold.

    ``hold`` false: the copies' weights are freed when a call ends and allocated again by the next refresh (each
    copy's ``release`` / ``reacquire``; the modules and their metadata stay), so that the training passes between
    generations have that memory; a captured CUDA graph that read them is captured again (the engine keys its graph
    on the weights' addresses)."""

    def __init__(self, fuse: bool = True, bits: int = 4, kernel: str = "tinygemm", hold: bool = True):
        super().__init__()
        self.fuse, self.bits, self.kernel, self.hold = fuse, bits, kernel, hold
        self.groups: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # parent -> {names: (copy, stand-ins)}
        self._tables = (self.groups,)

    def _plan(self, model, layers: list) -> list[tuple]:
        """(parent, names, LoRA layers) for every group served by one copy: sibling groups of one input width and
        bias kind without an adapter's own bias, then every other layer alone."""
        wrapped = {id(layer) for layer in layers}
        planned, seen = [], set()
        for parent, names, members in _sibling_groups(model) if self.fuse else ():
            if (all(id(m) in wrapped and not _lora_bias(m) for m in members)
                    and len({(m.in_features, m.base_layer.bias is None) for m in members}) == 1):
                planned.append((parent, names, members))
                seen.update(id(m) for m in members)
        for parent in model.modules():
            for name, child in parent.named_children():
                if id(child) in wrapped and id(child) not in seen:
                    planned.append((parent, (name,), [child]))
                    seen.add(id(child))
        return planned

    def _module(self, parent, names: tuple, members: list, device, dtype):
        known = self.groups.setdefault(parent, {})
        kind = Linear16 if self.bits == 16 else GemliteLinear if self.kernel == "gemlite" else Int4Linear
        if (names not in known or next(known[names][0].parameters()).device != torch.device(device)
                or type(known[names][0]) is not kind
                or (self.bits == 16 and known[names][0].weight.dtype != dtype)):
            sizes = [m.out_features for m in members]
            bias = members[0].base_layer.bias is not None or any(_lora_bias(m) for m in members)
            if self.bits == 16:
                copy = Linear16(sum(sizes), members[0].in_features, dtype, device, bias)
            elif kind is GemliteLinear:
                group = gemlite_layout(sum(sizes), members[0].in_features)
                copy = GemliteLinear(sum(sizes), members[0].in_features, group, device, bias)
            else:
                group, tiles = int4_layout(sum(sizes), members[0].in_features)
                copy = Int4Linear(sum(sizes), members[0].in_features, group, tiles, device, bias)
            if len(members) == 1:
                known[names] = (copy, [copy])
            else:
                parts = [_Part(m) for m in members[1:]]
                known[names] = (copy, [_Fused(None, None, sizes, parts, linear=copy), *parts])
        return known[names]

    @contextlib.contextmanager
    def __call__(self, model, layers: list):
        self._own(model)
        embeddings = model.get_input_embeddings()
        dtype = embeddings.weight.dtype if embeddings is not None else torch.bfloat16
        with _swapping() as swap:
            with torch.no_grad():
                for parent, names, members in self._plan(model, layers):
                    device = next(members[0].parameters()).device
                    copy, stand_ins = self._module(parent, names, members, device, dtype)
                    copy.reacquire(device)
                    start, biases = 0, []
                    values = (None if self.bits == 16 or copy.packs_rows else
                              torch.empty(copy.out_features, copy.in_features, dtype=torch.uint8, device=device))
                    for m in members:
                        step = max(8, INT4_CHUNK // m.in_features // 8 * 8)
                        if self.bits == 16:  # the base into the copy's rows, then the fp32 delta added in place
                            rows = copy.weight[start:start + m.out_features]
                            _base_weight_into(m, rows)
                            for first in range(0, m.out_features, step):
                                delta = _lora_delta(m, slice(first, first + step))
                                if delta is not None:
                                    rows[first:first + step].add_(delta)
                        else:
                            base = _base_weight(m)
                            for first in range(0, m.out_features, step):
                                chunk = slice(first, min(first + step, m.out_features))
                                part = base[chunk].to(torch.float32, copy=True)  # never the weight itself
                                copy.load(values, start + first, _add_lora_delta_(m, part, chunk), owned=True)
                        start += m.out_features
                        bias = Folded._folded_bias(m)
                        bias = bias if bias is not None else m.base_layer.bias
                        biases.append(torch.zeros(m.out_features, device=device) if bias is None else bias.float())
                    copy.pack(values)
                    del values
                    if copy.bias is not None:
                        copy.bias.copy_(torch.cat(biases))
                    swap(parent, names, stand_ins)
            try:
                yield
            finally:
                if not self.hold:  # the copies' memory to the training passes until the next call
                    for known in self.groups.values():
                        for copy, _ in known.values():
                            copy.release()
