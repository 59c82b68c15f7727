"""LoRA folded into generation copies (:class:`Folded`), and unmerged LoRA with sibling projections' A matrices
stacked (:class:`StackedA`).

- **Folded**: for a PEFT model whose LoRA layers wrap 16-bit or fp32 ``nn.Linear`` weights, each such weight has a
  generation copy ``W + scale * B @ A``, refreshed at the start of every call and swapped in for the call's duration
  with the adapters switched off, so decoding runs no per-layer LoRA matmuls. The trained weights (W, A, B) are never
  written. The copies are what it holds: one copy of the LoRA-wrapped weights, in their dtype.
- **Unmerged**: with no copy that fits, the LoRA layers decode through PEFT's own forward (sibling projections' A
  matrices stacked); DoRA and other variants always do.

Shadows PEFT's merge (``get_delta_weight``, ``lora_bias``) without writing the model. Private coupling (pinned in
tests/test_private_api.py): PEFT's ``LoraLayer._disable_adapters`` flag is set per layer for the call (PEFT's own
``disable_adapter`` context would also flip ``requires_grad`` on the LoRA weights). The sibling-group stand-ins
(:class:`_Fused`, :class:`_Part`) and the per-model holder (:class:`_PerModel`) serve quantised.py's copies too.
"""

from __future__ import annotations

import contextlib
import logging
import weakref

import torch

logger = logging.getLogger("sdgrpo.engine")  # the package's logger: its lines read as before the engine was split


def _foldable_lora_layers(model) -> list | None:
    """The LoRA layers to fold, or None when the model cannot be folded exactly (quantised or non-Linear bases,
    DoRA or other variants, fan-in-fan-out weights); [] when it has no LoRA."""
    try:
        from peft.tuners.lora import Linear as LoraLinear
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return []
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    for layer in layers:
        if type(layer) is not LoraLinear or not isinstance(layer.base_layer, torch.nn.Linear):
            return None
        if layer.lora_variant or layer.fan_in_fan_out or layer.merged:
            return None
        if layer.base_layer.weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return None
    return layers


# Projections that transformers' Llama-family attention and MLP modules apply to one input, in this order.
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class _Fused(torch.nn.Module):
    """Stands in for the first projection of a sibling group while decoding: one matmul over the group's stacked
    weights (one kernel where there were several small ones, each reading the input again), its own part returned
    and the others' parts handed to their :class:`_Part` stand-ins."""

    def __init__(self, weight: torch.nn.Parameter | None, bias: torch.nn.Parameter | None, sizes: list[int],
                 parts: list, linear: torch.nn.Module | None = None):
        super().__init__()
        self.weight, self.bias, self.sizes, self.linear = weight, bias, sizes, linear
        self.__dict__["parts"] = parts  # registered in their parent already

    def forward(self, x):
        out = (self.linear(x) if self.linear is not None else
               torch.nn.functional.linear(x, self.weight, self.bias)).split(self.sizes, dim=-1)
        for part, value in zip(self.parts, out[1:]):
            part.source, part.value = x, value
        return out[0]


class _Part(torch.nn.Module):
    """Stands in for a later projection of a sibling group: returns the part that :class:`_Fused` computed for the
    same input, or (another input, or none computed) runs the projection it replaced."""

    def __init__(self, projection: torch.nn.Module):
        super().__init__()
        self.projection = projection
        self.source = self.value = None

    def forward(self, x):
        if self.value is not None and self.source is x:
            value, self.source, self.value = self.value, None, None
            return value
        return self.projection(x)


def _lora_delta(layer, rows: slice = slice(None)) -> torch.Tensor | None:
    """``sum(scale * B @ A)`` over the layer's active adapters (its output ``rows``), in fp32 (PEFT's
    ``get_delta_weight`` without its cast to the weight's dtype); None with the adapters off or none active."""
    delta = None
    for name in _active_lora(layer):
        term = (layer.lora_B[name].weight[rows].float() @ layer.lora_A[name].weight.float()) * layer.scaling[name]
        delta = term if delta is None else delta + term
    return delta


def _add_lora_delta_(layer, out: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
    """``out += sum(scale * B @ A)`` over the layer's active adapters (its output ``rows``), ``out`` fp32: one
    ``addmm_`` an adapter, with no fp32 delta beside ``out`` (:func:`_lora_delta` makes one, then adds it)."""
    for name in _active_lora(layer):
        out.addmm_(layer.lora_B[name].weight[rows].float(), layer.lora_A[name].weight.float(),
                   alpha=layer.scaling[name])
    return out


def _active_lora(layer) -> list[str]:
    """The layer's active LoRA adapters (none while its adapters are disabled)."""
    return [] if layer._disable_adapters else [n for n in layer.active_adapters if n in layer.lora_A]


def _lora_bias(layer) -> list[str]:
    """The active adapters of ``layer`` that train a bias of their own (PEFT's ``lora_bias``: ``lora_B`` has one)."""
    return [n for n in layer.active_adapters if getattr(layer, "lora_bias", {}).get(n) and n in layer.lora_B]


def _sibling_groups(model):
    """(parent, names, members) for every sibling group (:data:`SIBLINGS`) whose projections a module of ``model``
    all has. The modules are listed first, so a caller may swap children while it goes."""
    for parent in list(model.modules()):
        for names in SIBLINGS:
            members = [getattr(parent, n, None) for n in names]
            if all(m is not None for m in members):
                yield parent, names, members


@contextlib.contextmanager
def _swapping():
    """A ``swap(parent, names, modules)`` that puts ``modules`` in place of ``parent``'s children of those names;
    every child swapped is put back on leaving, errors included."""
    replaced = []

    def swap(parent, names, modules):
        replaced.append((parent, names, [getattr(parent, n) for n in names]))
        for name, module in zip(names, modules):
            setattr(parent, name, module)

    try:
        yield swap
    finally:
        for parent, names, originals in reversed(replaced):
            for name, module in zip(names, originals):
                setattr(parent, name, module)


class _PerModel:
    """What a holder of generation-time copies keeps (its ``_tables``) belongs to one model at a time, held by weak
    references to that model and its modules (never by ``id()``, which a later object can reuse once the first is
    freed): a call on another model drops it first."""

    _tables: tuple = ()

    def __init__(self):
        self._owner = None  # weakref to the model the copies belong to

    def _own(self, model) -> None:
        if self._owner is None or self._owner() is not model:
            for table in self._tables:
                table.clear()
            self._owner = weakref.ref(model)

    def release(self) -> None:
        """Drop what it holds (its copies go with the last reference)."""
        for table in self._tables:
            table.clear()
        self._owner = None

    def held(self) -> int:
        """Layers served from what it holds: each of its groups' members once (``groups``: parent -> {names: ...})."""
        return sum(len(names) for known in self.groups.values() for names in known)


class Folded(_PerModel):
    """Generation copies of the LoRA-wrapped weights (allocated once per model, refreshed per call).

    Each copy is ``W + scale * B @ A`` (summed over the active adapters), and where an adapter trains a bias
    (``lora_bias``) the layer's bias is swapped too, for ``b + scale * b_B`` (PEFT's merge). With ``fuse``, the copies
    of sibling projections (:data:`SIBLINGS`: q, k, v; gate, up) are rows of one stacked weight, and for the call the
    group is served by one matmul (:class:`_Fused`, :class:`_Part`). Same memory.

    The copies belong to one model at a time, held by weak references to that model and its modules (never by
    ``id()``, which a later object can reuse once the first is freed): a call on another model drops them first,
    so what the fold holds is bounded by one model's LoRA-wrapped weights and cannot be served to the wrong one."""

    def __init__(self, fuse: bool = True):
        super().__init__()
        self.fuse = fuse
        self.copies: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # LoRA layer -> copy of its weight
        self.groups: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # parent -> {names: stand-ins}
        self._tables = (self.copies, self.groups)

    def held(self) -> int:
        """Weights held: one per folded layer (a stacked group's rows count once each)."""
        return len(self.copies)

    def _stack(self, model, layers: list) -> list[tuple]:
        """For every sibling group of foldable LoRA layers with one input width, dtype and bias kind (and no bias
        of an adapter's own): its parent, names and stand-ins, with the layers' copies made rows of one stacked
        weight. Made once per model."""
        wrapped = {id(layer) for layer in layers}
        found = []
        for parent, names, members in _sibling_groups(model):
            if not all(id(m) in wrapped and not _lora_bias(m) for m in members):
                continue
            bases = [m.base_layer for m in members]
            if (len({(b.in_features, b.weight.dtype, b.weight.device, b.bias is None) for b in bases}) != 1):
                continue
            known = self.groups.setdefault(parent, {})
            if names not in known or known[names][2].device != bases[0].weight.device:
                sizes = [b.out_features for b in bases]
                stacked = torch.nn.Parameter(torch.empty(sum(sizes), bases[0].in_features,
                                                         dtype=bases[0].weight.dtype,
                                                         device=bases[0].weight.device), requires_grad=False)
                bias = (None if bases[0].bias is None else
                        torch.nn.Parameter(torch.empty(sum(sizes), dtype=bases[0].bias.dtype,
                                                       device=bases[0].bias.device), requires_grad=False))
                rows = stacked.data.split(sizes)
                for member, view in zip(members, rows):
                    self.copies[member] = torch.nn.Parameter(view, requires_grad=False)
                parts = [_Part(m) for m in members[1:]]
                known[names] = (_Fused(stacked, bias, sizes, parts), parts, stacked, bias)
            fused, parts, _, bias = known[names]
            if bias is not None:
                with torch.no_grad():
                    torch.cat([b.bias for b in bases], out=bias.data)
            found.append((parent, names, fused, parts))
        return found

    @staticmethod
    def _folded_bias(layer):
        """The layer's bias with its adapters' own biases added (PEFT's merge of ``lora_bias``), or None to keep
        the bias as it is."""
        names = [] if layer._disable_adapters else _lora_bias(layer)
        if not names:
            return None
        base = layer.base_layer
        bias = base.bias.float() if base.bias is not None else 0.0
        for name in names:
            bias = bias + layer.lora_B[name].bias.float() * layer.scaling[name]
        dtype = base.bias.dtype if base.bias is not None else base.weight.dtype
        return torch.nn.Parameter(bias.to(dtype), requires_grad=False)

    @contextlib.contextmanager
    def __call__(self, model):
        layers = _foldable_lora_layers(model)
        if not layers:
            if layers is None:
                logger.debug("LoRA not foldable here (quantised base or an adapter variant): decoding unmerged")
            yield
            return
        self._own(model)
        swapped = []
        try:
            groups = self._stack(model, layers) if self.fuse else []
            with torch.no_grad():
                for layer in layers:
                    base = layer.base_layer
                    copy = self.copies.get(layer)
                    if copy is None or copy.shape != base.weight.shape or copy.device != base.weight.device:
                        copy = torch.nn.Parameter(torch.empty_like(base.weight), requires_grad=False)
                        self.copies[layer] = copy
                    disabled = layer._disable_adapters
                    delta = _lora_delta(layer)
                    copy.copy_(base.weight if delta is None else (base.weight.float() + delta).to(base.weight.dtype))
                    bias = self._folded_bias(layer)
                    swapped.append((layer, base.weight, base.bias, disabled))
                    base.weight = copy
                    if bias is not None:
                        base.bias = bias
                    layer._disable_adapters = True
            with _swapping() as swap:
                for parent, names, fused, parts in groups:
                    swap(parent, names, [fused, *parts])
                yield
        finally:
            for layer, weight, bias, disabled in swapped:
                layer.base_layer.weight = weight
                layer.base_layer.bias = bias
                layer._disable_adapters = disabled


# --- unmerged LoRA with sibling projections' A matrices stacked ----------------------------------------------------
class _StackedLoRA(torch.nn.Module):
    """Stands in for the first LoRA layer of a sibling group decoding unmerged: the group's A matrices as rows of one
    weight, so the group's down-projections are one small matmul instead of one per projection; each member's base
    layer and B as PEFT's forward runs them (``base(x) + B(A x) * scale``, in eval mode, the input cast to A's
    dtype). Its own output returned, the others' handed to their :class:`_Part` stand-ins."""

    def __init__(self, members: list, names: list[str], stacked: torch.nn.Parameter, parts: list):
        super().__init__()
        self.members, self.stacked = torch.nn.ModuleList(members), stacked
        self.names, self.ranks = names, [m.lora_A[n].weight.size(0) for m, n in zip(members, names)]
        self.__dict__["parts"] = parts

    def forward(self, x):
        low = torch.nn.functional.linear(x if x.dtype == self.stacked.dtype else x.to(self.stacked.dtype),
                                         self.stacked).split(self.ranks, dim=-1)
        outs = []
        for member, name, a in zip(self.members, self.names, low):
            base = member.base_layer(x)
            outs.append((base + member.lora_B[name](a) * member.scaling[name]).to(base.dtype))
        for part, value in zip(self.parts, outs[1:]):
            part.source, part.value = x, value
        return outs[0]


class StackedA(_PerModel):
    """For unmerged decoding: every sibling group (:data:`SIBLINGS`) of plain LoRA layers with one active adapter
    each, A matrices of one dtype and input width, served by :class:`_StackedLoRA` for the call; the stacked A is
    refreshed from the trained A at every call (never written back) and is all it holds (rank x width per layer).
    Held for one model at a time, by weak references."""

    def __init__(self):
        super().__init__()
        self.groups: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # parent -> {names: (module, parts)}
        self._tables = (self.groups,)


    @staticmethod
    def _adapter(layer) -> str | None:
        """The one active adapter of a plain LoRA layer whose unmerged forward stacking reproduces, else None."""
        from peft.tuners.lora import LoraLayer

        if not isinstance(layer, LoraLayer) or layer._disable_adapters or layer.merged or layer.lora_variant:
            return None
        active = [n for n in layer.active_adapters if n in layer.lora_A]
        if len(active) != 1 or not getattr(layer, "cast_input_dtype_enabled", True):
            return None
        return active[0]

    @contextlib.contextmanager
    def __call__(self, model):
        self._own(model)
        with _swapping() as swap:
            for parent, names, members in _sibling_groups(model):
                adapters = [self._adapter(m) for m in members]
                if None in adapters:
                    continue
                weights = [m.lora_A[a].weight for m, a in zip(members, adapters)]
                if len({(w.shape[1], w.dtype, w.device) for w in weights}) != 1:
                    continue
                known = self.groups.setdefault(parent, {})
                rows = sum(w.size(0) for w in weights)
                if names not in known or known[names][0].stacked.shape[0] != rows:
                    stacked = torch.nn.Parameter(torch.empty(rows, weights[0].size(1), dtype=weights[0].dtype,
                                                             device=weights[0].device), requires_grad=False)
                    parts = [_Part(m) for m in members[1:]]
                    known[names] = (_StackedLoRA(members, adapters, stacked, parts), parts)
                module, parts = known[names]
                with torch.no_grad():
                    torch.cat([w.detach() for w in weights], out=module.stacked.data)
                swap(parent, names, [module, *parts])
            yield
