"""The decoding engine: sampling for GRPO rollouts, eval, demo and generate, with the model's weights read once per
token and nothing else in the way.

What it does, against ``transformers``' ``generate`` with the same settings:

- **Static KV cache**, sized to the batch and to the prompt + completion length rounded up to ``length_bucket`` (at
  least ``reserve``), kept between calls (reset, not reallocated) and grown only when a call does not fit, so that a
  training run whose prompts vary in length allocates it (and compiles the step for it) once, not once per length:
  the trainer reserves its longest prompt + the completion length.
- **One decoding step** (the forward of one token per row; temperature, top-k, top-p and min-p sampling as TRL's
  generation config asks; the minimum length; EOS handling; writing the token into the output and advancing the
  positions), compiled with ``torch.compile`` and captured as one CUDA graph on a GPU that reads and advances its
  own state in place, so each token costs one graph replay and no other host work; eager on CPU (the same code,
  step by step). The host synchronises only every ``check_every`` tokens, to see whether every row has finished.
- **LoRA folded**: for a PEFT model whose LoRA layers wrap 16-bit or fp32 ``nn.Linear`` weights, each such weight
  has a generation copy ``W + scale * B @ A``, refreshed at the start of every call and swapped in for the call's
  duration with the adapters switched off, so decoding runs no per-layer LoRA matmuls. The trained weights (W, A,
  B) are never written. The copies are what the engine holds beyond the model: one copy of the LoRA-wrapped
  weights, in their dtype.
- **A quantised base** (bitsandbytes 4/8-bit, whose own matmul dequantises every weight at every token) gets
  16-bit copies of its dequantised base + LoRA where they fit (:class:`Quantised` at 16 bits, mode
  ``dequantised``): the same matmuls as the 16-bit fold, for the memory of a 16-bit model beside the 4-bit one.
- **Or an int4 copy** (:class:`Quantised`), for a quantised base where 16-bit copies do not fit, or where asked:
  base + LoRA folded in fp32, quantised to 4-bit groups and read by PyTorch's int4 weight-only matmul, a quarter of
  the 16-bit bytes held and read per token. Neither sampler is the policy bit for bit; the trainer corrects their
  rollouts by importance sampling. With no copy that fits, the LoRA layers decode unmerged (PEFT's forward, in the
  same compiled step; sibling projections' A matrices stacked, :class:`StackedA`); DoRA and other variants always
  do.

Sampling ``exactly as asked`` means the same processing order and formulas as transformers' logits processors
(min-new-tokens, temperature, top-k, top-p, min-p) and a draw from the resulting distribution by an exponential race,
``argmax(p / E)`` with ``E ~ Exp(1)``: the way ``torch.multinomial`` draws one sample, so on CPU a seeded call draws
exactly the tokens of a seeded ``generate`` (tested); greedy decoding gives ``generate``'s tokens. Options the engine
does not implement (beam search, repetition penalty, ...) fall back to ``generate``.

Private couplings (pinned in tests/test_private_api.py): PEFT's ``LoraLayer._disable_adapters`` flag is set per layer
for the call (PEFT's own ``disable_adapter`` context would also flip ``requires_grad`` on the LoRA weights), and
:func:`serving` shadows ``model.generate`` on the instance for the duration of TRL's ``_generate`` (TRL 1.15 calls
``unwrapped_model.generate(**inputs, generation_config=...)`` there).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import logging
import re
import sys
import time
import weakref
from dataclasses import astuple, dataclass

import torch

from sdgrpo.scoring import active_dropout, eval_mode

logger = logging.getLogger(__name__)

# What the engine's ``generation_weights`` may be (see DecodeEngine) and the ``engine/mode`` metric's numbers.
WEIGHTS = ("auto", "model", "int4")
MODES = {"plain": 0.0, "unmerged": 0.0, "folded": 1.0, "int4": 2.0, "dequantised": 3.0}

# Settings that change what is sampled and that the engine does not implement: with any of them away from
# transformers' default, the call goes to generate.
UNSUPPORTED = ("num_beams", "num_return_sequences", "repetition_penalty", "no_repeat_ngram_size", "bad_words_ids",
               "suppress_tokens", "begin_suppress_tokens", "forced_bos_token_id", "forced_eos_token_id",
               "sequence_bias", "typical_p", "epsilon_cutoff", "eta_cutoff", "encoder_repetition_penalty",
               "exponential_decay_length_penalty", "renormalize_logits", "guidance_scale", "watermarking_config",
               "top_h", "stop_strings", "output_scores", "output_logits", "return_dict_in_generate", "min_length",
               "prompt_lookup_num_tokens", "remove_invalid_values", "low_memory", "penalty_alpha", "dola_layers")


@dataclass
class Sampling:
    """The settings of one call, as transformers' generation config spells them."""

    max_new_tokens: int
    do_sample: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    min_new_tokens: int = 0
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0


@dataclass
class Decoded:
    sequences: torch.Tensor  # [B, P + T]: the prompt, then the completion, pad after a row's EOS
    logprobs: torch.Tensor  # [B, T]: log p(token) under the model at temperature 1 (0 after a row's EOS)
    sampling_logprobs: torch.Tensor | None = None  # [B, T]: log p(token) at the call's temperature (as TRL scores
    # its policy: log_softmax(logits / T), before top-k / top-p); None where that is ``logprobs`` (temperature 1)


def sampling_from(model, generation_config=None, **kwargs) -> Sampling | None:
    """The call's settings resolved as ``generate`` resolves them (the given config, then the model's, then
    transformers' global defaults, then keyword arguments: its own ``_prepare_generation_config``), or ``None`` when
    they ask for something the engine does not do."""
    from transformers import GenerationConfig

    inner = _inner(model)
    config, model_kwargs = type(inner)._prepare_generation_config(inner, generation_config, **kwargs)
    if model_kwargs or config.max_new_tokens is None:
        return None
    defaults = GenerationConfig._get_default_generation_params()
    for key in UNSUPPORTED:
        if getattr(config, key, None) not in (None, defaults.get(key), False):
            return None
    eos = config.eos_token_id
    eos = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)
    return Sampling(max_new_tokens=int(config.max_new_tokens), do_sample=bool(config.do_sample),
                    temperature=float(config.temperature), top_k=int(config.top_k or 0),
                    top_p=float(config.top_p), min_p=float(config.min_p or 0.0),
                    min_new_tokens=int(config.min_new_tokens or 0), eos_token_ids=eos, pad_token_id=int(pad))


def unsupported(model) -> str | None:
    """Why the engine cannot decode ``model`` exactly (the call then goes to ``generate``), or None.

    Decided from what the model class declares, not from its name: its forward takes a ``Cache`` as
    ``past_key_values`` (Mamba and Mamba2 carry their state in ``cache_params`` instead), it declares static-cache
    and compile support (``_can_compile_fullgraph``: its state fits a fixed-size cache; recurrent layers declare
    themselves in ``config.layer_types`` and get the static cache's recurrent layers), and generate itself gives it
    transformers' standard cache (``_supports_default_dynamic_cache``)."""
    cls = type(_inner(model))
    if "past_key_values" not in inspect.signature(_original_forward(cls)).parameters:
        return f"{cls.__name__} takes no past_key_values cache"
    if not getattr(cls, "_can_compile_fullgraph", False):
        return f"{cls.__name__} does not declare static-cache support"
    supports = getattr(cls, "_supports_default_dynamic_cache", None)
    if callable(supports) and not supports():
        return f"{cls.__name__} uses a cache of its own"
    patched = _patched_forward(_inner(model))
    plan = _put_back_plan(_inner(model)) if patched is not None else None
    if isinstance(plan, str):
        return (f"{patched} runs a forward that {patched.split('.')[0]} put in its place (it reads the projections' "
                f"weights and LoRA itself, past the engine's generation copies, with a cache of its own), and "
                f"transformers' own was not recorded before it for {plan}")
    return None


# Libraries that replace transformers' module forwards with their own (Unsloth: at import and at load, on the classes
# and on module instances), which the engine's swaps of projections and its static cache cannot be trusted through.
PATCHING_LIBRARIES = ("unsloth", "unsloth_zoo")


def _patching(package: str) -> bool:
    """Whether top-level ``package`` is a patching library's: one of :data:`PATCHING_LIBRARIES`, or a module that one
    generated (unsloth_zoo's compiler writes rewritten modeling code as ``unsloth_compiled_module_<model>`` modules in
    ``unsloth_compiled_cache``, imported under those names)."""
    return package in PATCHING_LIBRARIES or package.startswith(("unsloth_compiled_module", "unsloth_compiled_cache"))


def _patched_forward(model) -> str | None:
    """The qualified name of the first forward of ``model`` or its modules that a :data:`PATCHING_LIBRARIES`
    library defined (on the class or the instance), or None."""
    for module in model.modules():
        forward = module.__dict__.get("forward") or type(module).forward
        if _patching(_library(forward)):
            return f"{getattr(forward, '__func__', forward).__module__}.{getattr(forward, '__name__', 'forward')}"
    return None


def _library(fn) -> str:
    """The top-level package that defined function (or bound method) ``fn``."""
    return (getattr(getattr(fn, "__func__", fn), "__module__", "") or "").split(".")[0]


# transformers' own forwards and classes of its modeling modules, recorded before a patching library replaced them
# (backends/unsloth.py records the model's module before it imports Unsloth): the engine decodes a patched model with
# them put back for the call (:func:`originals_put_back`). Unsloth replaces, for a Llama-type model: the attention,
# decoder-layer, model and causal-LM classes' forwards, the MLP instances' forwards, and the rotary embedding class
# in the modeling module (so the model's instance is Unsloth's, with another call signature).
_ORIGINAL_FORWARDS: dict[type, object] = {}  # class -> its own forward, or _INHERITED where it had none
_ORIGINAL_CLASSES: dict[str, dict[str, type]] = {}  # modeling module -> {name: class as transformers defined it}
_INHERITED = object()


def remember_originals(*modules) -> None:
    """Record the forwards and classes of transformers modeling ``modules`` as they are now (before a patch)."""
    for module in modules:
        for name, obj in vars(module).items():
            if isinstance(obj, type) and issubclass(obj, torch.nn.Module) and obj.__module__ == module.__name__:
                _ORIGINAL_CLASSES.setdefault(module.__name__, {}).setdefault(name, obj)
                own = vars(obj).get("forward", _INHERITED)
                if own is _INHERITED or not _patching(_library(own)):
                    _ORIGINAL_FORWARDS.setdefault(obj, own)


def _put_back_plan(model) -> tuple[list, list, list] | str:
    """What :func:`originals_put_back` changes in ``model``: (class, forward) pairs, modules with a patched forward of
    their own, and (parent, name, patched module, transformers' class) for modules of a patching library's class;
    where something patched has no recorded original, what it is (a string)."""
    classes, instances, modules = {}, [], []
    home = sys.modules.get(type(model).__module__)
    recorded = _ORIGINAL_CLASSES.get(getattr(home, "__name__", ""), {})
    for parent in model.modules():
        # a module of a patching library's class (Unsloth's rotary embedding, whose forward is its mixin's) is
        # swapped whole for transformers' class below, from its parent: its own forwards are never called
        swapped = parent is not model and _patching(type(parent).__module__.split(".")[0])
        for cls in () if swapped else type(parent).__mro__:
            forward = vars(cls).get("forward")
            if forward is not None and _patching(_library(forward)):
                if cls not in _ORIGINAL_FORWARDS:
                    return f"{cls.__module__}.{cls.__qualname__}.forward"
                classes[cls] = _ORIGINAL_FORWARDS[cls]
        forward = parent.__dict__.get("forward")
        if forward is not None and _patching(_library(forward)) and not swapped:
            instances.append(parent)
        for name, child in parent.named_children():
            if not _patching(type(child).__module__.split(".")[0]):
                continue
            # the name under which the patch took the place of transformers' class in the modeling module
            names = [n for n, c in recorded.items() if getattr(home, n, None) is type(child) and c is not type(child)]
            if not names:
                return f"the module {name} ({type(child).__module__}.{type(child).__qualname__})"
            modules.append((parent, name, child, recorded[names[0]]))
    return list(classes.items()), instances, modules


def _original_forward(cls: type):
    """``cls``'s forward as transformers defined it, where a patch replaced it and the original was recorded."""
    for c in cls.__mro__:
        own = _ORIGINAL_FORWARDS.get(c, vars(c).get("forward", _INHERITED))
        if own is not _INHERITED:
            return own
    return cls.forward


_STAND_INS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # patched module -> transformers' instance


@contextlib.contextmanager
def originals_put_back(model):
    """For the duration, ``model`` runs transformers' own forwards and modules where a patching library replaced
    them (nothing changes in a model that was not patched). A replaced module (Unsloth's rotary embedding) gets an
    instance of transformers' class, made once per module and kept, so a captured graph's buffers stay where they
    were."""
    plan = _put_back_plan(model) if _patched_forward(model) is not None else ([], [], [])
    if isinstance(plan, str):
        raise ValueError(f"{plan}, replaced by a patching library, has no recorded original")
    classes, instances, modules = plan
    saved_classes = [(cls, vars(cls)["forward"]) for cls, _ in classes]
    saved_instances = [(m, m.__dict__["forward"]) for m in instances]
    try:
        for cls, forward in classes:
            if forward is _INHERITED:  # the patch gave the class a forward of its own; transformers' is its base's
                del cls.forward
            else:
                cls.forward = forward
        for m in instances:
            del m.forward
        for parent, name, child, cls in modules:
            if child not in _STAND_INS:
                # on its parent's device: Unsloth's rotary embedding may keep its inv_freq where it was built and
                # make cos/sin per device on the fly
                near = next(itertools.chain(parent.parameters(), child.buffers()), None)
                _STAND_INS[child] = cls(config=model.config).to(near.device if near is not None else "cpu")
            setattr(parent, name, _STAND_INS[child])
        yield
    finally:
        for parent, name, child, _ in modules:
            setattr(parent, name, child)
        for m, forward in saved_instances:
            m.forward = forward
        for cls, forward in saved_classes:
            cls.forward = forward


def dropout_in_rollouts(model) -> bool:
    """True when ``model`` is in train mode with a dropout rate above 0 (a LoRA layer's included): ``generate``
    would then sample under dropout, which the engine (decoding in eval mode) does not."""
    return bool(model.training and active_dropout(model, lora=True))


def process_logits(logits: torch.Tensor, s: Sampling, step: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    """transformers' processors in its order: min-new-tokens, then (sampling only) temperature, top-k, top-p, min-p."""
    scores = logits.float()
    if s.min_new_tokens and eos.numel():
        blocked = torch.zeros_like(scores, dtype=torch.bool)
        blocked[:, eos] = step < s.min_new_tokens
        scores = scores.masked_fill(blocked, -float("inf"))
    if not s.do_sample:
        return scores
    if s.temperature != 1.0:
        scores = scores / s.temperature
    if s.top_k:
        kth = torch.topk(scores, min(s.top_k, scores.size(-1)))[0][..., -1, None]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if s.top_p < 1.0:
        sorted_logits, sorted_indices = torch.sort(scores, descending=False)
        remove = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - s.top_p)
        remove[..., -1:] = False
        scores = scores.masked_fill(remove.scatter(1, sorted_indices, remove), -float("inf"))
    if s.min_p:
        probs = scores.softmax(dim=-1)
        remove = probs < s.min_p * probs.amax(dim=-1, keepdim=True)
        remove.scatter_(-1, probs.argmax(dim=-1, keepdim=True), False)
        scores = scores.masked_fill(remove, -float("inf"))
    return scores


def scaled(s: Sampling) -> bool:
    """Whether the call samples at a temperature other than 1 (its sampling log-probs then differ from ``logprobs``)."""
    return s.do_sample and s.temperature != 1.0


def choose(logits: torch.Tensor, s: Sampling, step: torch.Tensor, eos: torch.Tensor, finished: torch.Tensor):
    """One token per row: (token, its log-prob at temperature 1, its log-prob at the call's temperature, finished
    after it). Finished rows get pad (and log-probs 0)."""
    scores = process_logits(logits, s, step, eos)
    if s.do_sample:
        race = torch.empty_like(scores).exponential_()
        token = (scores.softmax(dim=-1) / race).argmax(dim=-1)
    else:
        token = scores.argmax(dim=-1)
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, token[:, None])[:, 0]
    slogp = (torch.log_softmax(logits.float() / s.temperature, dim=-1).gather(-1, token[:, None])[:, 0]
             if scaled(s) else logp)
    token = torch.where(finished, torch.full_like(token, s.pad_token_id), token)
    logp, slogp = logp.masked_fill(finished, 0.0), slogp.masked_fill(finished, 0.0)
    if eos.numel():
        finished = finished | torch.isin(token, eos)
    return token, logp, slogp, finished


# --- LoRA folded into a generation copy ----------------------------------------------------------------------------
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
    for name in [] if layer._disable_adapters else layer.active_adapters:
        if name in layer.lora_A:
            term = (layer.lora_B[name].weight[rows].float() @ layer.lora_A[name].weight.float()) * layer.scaling[name]
            delta = term if delta is None else delta + term
    return delta


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


# --- a 4-bit generation copy: base + LoRA folded, then quantised ---------------------------------------------------
# The layout and kernels are PyTorch's own weight-only int4 matmul (tinygemm, the kernel torchao's int4 weight-only
# "tinygemm" layout runs on CUDA; a CPU kernel of the same contract): ``aten._convert_weight_to_int4pack`` (CUDA:
# two 4-bit values per byte in; CPU: ``..._for_cpu``, int32 values in) and ``aten._weight_int4pack_mm`` (CPU:
# ``..._for_cpu``) with bf16 activations and per-group (scale, zero) pairs, zero in the float domain:
# ``w = (q - 8) * scale + zero``. Private ATen ops, pinned in tests/test_private_api.py.
INT4_GROUPS = (128, 64, 32)


def int4_layout(out_features: int, in_features: int) -> tuple[int, int] | None:
    """(group size, inner k tiles) for a weight of this shape in the int4 kernels, or None where it has none (the CPU
    kernel packs rows by 16, the CUDA one by 8)."""
    if out_features % 16:
        return None
    group = next((g for g in INT4_GROUPS if in_features % g == 0), None)
    tiles = next((t for t in (8, 4, 2) if in_features % (t * 16) == 0), None)
    return None if group is None or tiles is None else (group, tiles)


def quantise_int4(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric round-to-nearest 4-bit quantisation of a [N, K] weight in groups of ``group`` along K, as torchao
    makes tinygemm's (``_get_qparams_tinygemm``: scale = (max - min) / 15 and zero = min + 8 * scale, both rounded
    to bf16 first): (values in 0..15 as int32 [N, K], bf16 scales and zeros [K / group, N, 2])."""
    n, k = weight.shape
    w = weight.float().reshape(n, k // group, group)
    low, high = w.amin(-1), w.amax(-1)
    scale = ((high - low).clamp(min=1e-6) / 15).to(torch.bfloat16)
    zero = (low + scale.float() * 8).to(torch.bfloat16)
    low = zero.float() - 8 * scale.float()
    q = ((w - low[..., None]) / scale.float()[..., None]).round().clamp(0, 15).to(torch.int32).reshape(n, k)
    return q, torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()


def pack_int4(q: torch.Tensor, tiles: int) -> torch.Tensor:
    """``q`` (values 0..15, [N, K]) in the int4 kernel's layout for q's device."""
    if q.device.type == "cpu":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), tiles)
    q = q.to(torch.uint8)
    return torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), tiles)


class Int4Linear(torch.nn.Module):
    """``y = x @ W^T + b`` with W held as 4-bit groups (:func:`quantise_int4`) and read by the int4 kernel; the input is
    taken to bf16 (the kernel's one activation dtype) and the output back to the input's dtype. Its tensors keep their
    addresses when refreshed (:meth:`load`): a captured CUDA graph reads them."""

    def __init__(self, out_features: int, in_features: int, group: int, tiles: int, device, bias: bool):
        super().__init__()
        self.out_features, self.in_features, self.group, self.tiles = out_features, in_features, group, tiles
        empty = pack_int4(torch.zeros(out_features, in_features, dtype=torch.int32, device=device), tiles)
        self.packed = torch.nn.Parameter(empty, requires_grad=False)
        self.scales_zeros = torch.nn.Parameter(torch.zeros(in_features // group, out_features, 2,
                                                           dtype=torch.bfloat16, device=device), requires_grad=False)
        self.bias = (torch.nn.Parameter(torch.zeros(out_features, dtype=torch.bfloat16, device=device),
                                        requires_grad=False) if bias else None)

    @staticmethod
    def nbytes(out_features: int, in_features: int, group: int) -> int:
        return out_features * in_features // 2 + (in_features // group) * out_features * 4 + out_features * 2

    @torch.no_grad()
    def load(self, values: torch.Tensor, start: int, weight: torch.Tensor) -> None:
        """Rows ``start:start + len(weight)`` of a float weight quantised: their values into ``values`` (uint8
        [N, K], packed by :meth:`pack` once every row is in; the kernel's layout does not keep rows apart), their
        scales and zeros into the copy."""
        q, scales_zeros = quantise_int4(weight, self.group)
        values[start:start + weight.size(0)] = q
        self.scales_zeros[:, start:start + weight.size(0)] = scales_zeros

    @torch.no_grad()
    def pack(self, values: torch.Tensor) -> None:
        self.packed.copy_(pack_int4(values, self.tiles))

    def forward(self, x):
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        mm = (torch.ops.aten._weight_int4pack_mm_for_cpu if flat.device.type == "cpu"
              else torch.ops.aten._weight_int4pack_mm)
        out = mm(flat, self.packed, self.group, self.scales_zeros)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


# --- the same copies read by gemlite's Triton kernels ----------------------------------------------------------------
# gemlite (mobiusml/gemlite, pure Triton; what torchao and SGLang use for 4-bit weight-only matmuls) reads hqq's
# affine layout, ``w = q * scale + zero`` per group of ``group`` input columns (its ``W_group_mode`` 4, "fma"), with
# q packed eight to an int32 along K and the whole thing transposed ([K / 8, N]; scales and zeros [K / group, N]).
# Groups of 64 line the copy's groups up with bitsandbytes' NF4 blocks (64 weights a block), so a group of the copy
# re-quantises exactly one block of the base.
GEMLITE_GROUP = 64
# How far past the last group gemlite 0.6's kernels read the scales and zeros. Its split-K loops (GEMM_SPLITK, the
# GEMV split-K kernels) load one row of scales and zeros per block of BLOCK_SIZE_K (at most the group) input columns
# with no mask, for every one of cdiv(K, BLOCK_SIZE_K x SPLIT_K) x SPLIT_K blocks; so where K is not a multiple of
# BLOCK_SIZE_K x SPLIT_K (896, the Qwen2.5-0.5B width, against 512) they read rows past K / group. The activations
# there are masked to 0, but 0 x NaN is NaN: whatever lies past the end poisoned every column (the 0.5B shape decoded
# to NaN log-probs on an H100, 2026-12-07). Its configs go up to SPLIT_K 16 with BLOCK_SIZE_K at most the group, so
# the rows are held to a multiple of 16 groups, plus one row for the unmasked read past N in the last row, all zeros
# (a finite 0 x 0 + 0). tests/gpu/test_gpu.py fills that padding with NaN to show it is read.
GEMLITE_SPLIT_K_MAX = 16


def gemlite_meta_rows(in_features: int, group: int) -> int:
    """Rows of scales (and of zeros) a :class:`GemliteLinear` holds: K / group used, the rest zeros that gemlite's
    split-K kernels read past the end (:data:`GEMLITE_SPLIT_K_MAX`)."""
    reach = GEMLITE_SPLIT_K_MAX * group
    return -(-in_features // reach) * reach // group + 1


def gemlite_layout(out_features: int, in_features: int) -> int | None:
    """The group size for a weight of this shape in gemlite's A16W4 kernels (input width a multiple of 32 and of
    the group), or None where it has none."""
    if in_features % 32 or out_features % 16:
        return None
    return next((g for g in (GEMLITE_GROUP, 32) if in_features % g == 0), None)


def quantise_affine(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric round-to-nearest 4-bit quantisation of a [N, K] weight in groups of ``group`` along K, in the form
    ``w = q * scale + low``: (q in 0..15 as uint8 [N, K], bf16 scales and lows [N, K / group]). The scale and low
    are rounded to bf16 first and q is chosen against the rounded pair, as the kernel will read them."""
    n, k = weight.shape
    w = weight.float().reshape(n, k // group, group)
    lo, hi = w.amin(-1), w.amax(-1)
    scale = ((hi - lo).clamp(min=1e-6) / 15).to(torch.bfloat16)
    low = lo.to(torch.bfloat16)
    q = ((w - low.float()[..., None]) / scale.float()[..., None]).round().clamp(0, 15).to(torch.uint8)
    return q.reshape(n, k), scale, low


def pack_gemlite(q: torch.Tensor, out: torch.Tensor | None = None, rows: int = 4096) -> torch.Tensor:
    """``q`` (values 0..15, [N, K]) packed as gemlite packs 4-bit weights with 32-bit words
    (``pack_weights_over_cols(..., W_nbits=4, packing_bitwidth=32, transpose=True)``, then made contiguous): column
    ``j`` of a row in bits ``4 * (j % 8)`` of word ``j // 8``; int32 [K / 8, N], into ``out`` where given. ``rows``
    rows at a time, in int32 (the top nibble wraps into the sign bit, as gemlite's words hold it), so a refresh's
    temporaries stay near ``rows x K x 4`` bytes: packing the 7B's gate/up stack whole in int64 took 1.1 GiB and ran
    a 12 GiB run out of memory (one H100, 2026-12-07)."""
    n, k = q.shape
    if out is None:
        out = torch.empty(k // 8, n, dtype=torch.int32, device=q.device)
    for first in range(0, n, rows):
        nibbles = q[first:first + rows].reshape(-1, k // 8, 8).to(torch.int32)
        words = nibbles[..., 0].clone()
        for j in range(1, 8):
            words |= nibbles[..., j] << (4 * j)
        out[:, first:first + rows] = words.t()
    return out


def unpack_gemlite(words: torch.Tensor) -> torch.Tensor:
    """:func:`pack_gemlite` undone: int32 [K / 8, N] to uint8 values [N, K]."""
    shifts = torch.arange(0, 32, 4, device=words.device, dtype=torch.int32)
    q = (words.t()[..., None] >> shifts) & 15
    return q.reshape(words.size(1), -1).to(torch.uint8)


def gemlite_available() -> str | None:
    """Why gemlite's kernels cannot run here (None when they can): not installed, no CUDA GPU, or a GPU older than
    Ampere (its Triton kernels and tuned configurations start at sm 8.0)."""
    import importlib.util

    if importlib.util.find_spec("gemlite") is None:
        return "gemlite is not installed (pip install gemlite)"
    if not torch.cuda.is_available():
        return "gemlite needs a CUDA GPU"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 0):
        return f"gemlite needs an Ampere or newer GPU (this one is sm {major}.{minor})"
    return None


class GemliteLinear(torch.nn.Module):
    """``y = x @ W^T + b`` with W held as 4-bit affine groups (:func:`quantise_affine`) in gemlite's layout and read
    by gemlite's A16W4 kernel (bf16 activations, its own choice of GEMV / split-K GEMM by rows) on CUDA. On other
    devices the same tensors are dequantised and multiplied by ``F.linear``: the reference the GPU test checks the
    kernel against (gemlite is Triton, CUDA only). Same ``load``/``pack`` calls as :class:`Int4Linear`; its tensors
    keep their addresses when refreshed (a captured CUDA graph reads them)."""

    def __init__(self, out_features: int, in_features: int, group: int, device, bias: bool):
        super().__init__()
        self.out_features, self.in_features, self.group = out_features, in_features, group
        self.W_q = torch.nn.Parameter(torch.zeros(in_features // 8, out_features, dtype=torch.int32, device=device),
                                      requires_grad=False)
        # K / group rows used, held in zeros to gemlite_meta_rows: the kernels read past the end (GEMLITE_SPLIT_K_MAX)
        groups, rows = in_features // group, gemlite_meta_rows(in_features, group)
        self._meta_store = [torch.zeros(rows, out_features, dtype=torch.bfloat16, device=device) for _ in range(2)]
        self.scales = torch.nn.Parameter(self._meta_store[0][:groups], requires_grad=False)
        self.zeros = torch.nn.Parameter(self._meta_store[1][:groups], requires_grad=False)
        self.bias = (torch.nn.Parameter(torch.zeros(out_features, dtype=torch.bfloat16, device=device),
                                        requires_grad=False) if bias else None)
        self._meta_args = self._tensor_extra = None
        self.matmul_type = -1  # gemlite's own choice by rows; an index of its GEMLITE_MATMUL_TYPES forces one
        if torch.device(device).type == "cuda":
            self._meta_args, self._tensor_extra = self._gemlite_args(device)

    def _gemlite_args(self, device):
        """gemlite's metadata for this shape (its ``get_meta_args``: W_group_mode 4, 8 values a word, bf16 in and
        out, ...) and its extra tensor argument, from a module of gemlite's own packed once with zeros."""
        import gemlite
        from gemlite import DType, GemLiteLinear

        # split-K partial sums added into an fp32 output (converted to bf16 once), not bf16 atomics, which gemlite
        # uses by default on sm90 and which round every partial sum: 3% off at 1 row on the 7B shape's gate/up stack
        gemlite.set_native_atomic_bfp16(False)
        probe = GemLiteLinear(4, group_size=self.group, in_features=self.in_features, out_features=self.out_features,
                              input_dtype=DType.BF16, output_dtype=DType.BF16)
        zeros = torch.zeros(self.out_features, self.in_features // self.group, dtype=torch.bfloat16, device=device)
        probe.pack(torch.zeros(self.out_features, self.in_features, dtype=torch.uint8, device=device), zeros + 1,
                   zeros, bias=None, fma_mode=True, packing_bitwidth=32)
        if (tuple(probe.W_q.shape), probe.W_q.dtype) != (tuple(self.W_q.shape), self.W_q.dtype):
            raise RuntimeError(f"gemlite packed a {tuple(probe.W_q.shape)} {probe.W_q.dtype} weight where "
                               f"{tuple(self.W_q.shape)} int32 was expected: a gemlite version with another layout")
        return probe.get_meta_args(), probe.get_tensor_args()[3:]

    @staticmethod
    def nbytes(out_features: int, in_features: int, group: int) -> int:
        meta = gemlite_meta_rows(in_features, group) * out_features * 4  # scales and zeros, bf16, padded
        return out_features * in_features // 2 + meta + out_features * 2

    @torch.no_grad()
    def load(self, values: torch.Tensor, start: int, weight: torch.Tensor) -> None:
        """Rows ``start:start + len(weight)`` of a float weight quantised: their values into ``values`` (uint8
        [N, K], packed by :meth:`pack` once every row is in), their scales and lows into the copy."""
        q, scale, low = quantise_affine(weight, self.group)
        rows = slice(start, start + weight.size(0))
        values[rows] = q
        self.scales[:, rows] = scale.t()
        self.zeros[:, rows] = low.t()

    @torch.no_grad()
    def pack(self, values: torch.Tensor) -> None:
        pack_gemlite(values, out=self.W_q.data)

    def dequantised(self) -> torch.Tensor:
        """W as the kernel reads it, bf16 [N, K]."""
        q = unpack_gemlite(self.W_q).float().view(self.out_features, -1, self.group)
        w = q * self.scales.t().float()[..., None] + self.zeros.t().float()[..., None]
        return w.reshape(self.out_features, self.in_features).to(torch.bfloat16)

    def forward(self, x):
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if self._meta_args is None:
            out = torch.nn.functional.linear(flat, self.dequantised(), self.bias)
        else:
            from gemlite import forward_functional

            out = forward_functional(flat, self.bias, [self.W_q, self.scales, self.zeros, *self._tensor_extra],
                                     self._meta_args, self.matmul_type)
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


# Which kernel reads int4 generation copies. Measured on one H100 (benchmarks/results/bench_int4_qwen2.5-7b_h100_
# 2026-12-06.json: the 7B shape's 28 x 4 projection groups in one CUDA graph, ms per token step; their bf16 bytes need
# 4.34 ms at the copy bandwidth, int4's about 1.2): bf16 5.0 at 1-32 rows; gemlite (groups of 64) 2.4 / 4.1 / 5.1 /
# 4.9 at 1 / 8 / 16 / 32 rows; tinygemm 2.1 / 4.7 / 7.9 / 14.7; bitsandbytes NF4 (the base as it is) 3.6 / 9.7 / 9.6
# / 9.4. So on an H100 gemlite reads a quarter of the bytes at least as fast as bf16 at every row count a generation
# decodes, tinygemm only below 16 rows. ``auto`` is still tinygemm everywhere (GEMLITE_AUTO empty): on 2026-12-07 the
# engine's gemlite path decoded the Qwen2.5-0.5B shape (4 layers, NF4 base) to NaN log-probs on an H100
# (tests/gpu/test_gpu.py::test_a_4bit_base_decodes_through_gemlite_int4_copies), while the shipped model (widths 256)
# decodes as the reference does; suspected: gemlite's split-K kernels with K (896 there) not a multiple of
# BLOCK_SIZE_K x SPLIT_K read group scales past the end (docs/gpu.md). It is there to be asked for
# (``--generation_int4_kernel gemlite``).
INT4_KERNELS = ("auto", "gemlite", "tinygemm")
# The kernels that decode int4 copies at least as fast as 16-bit copies are read (above): with ``generation_weights``
# auto, a quantised base then gets int4 copies first (a quarter of the memory), not 16-bit ones.
INT4_FIRST = ("gemlite",)
# Where auto picks gemlite: the architectures (compute capability) where it was measured to read int4 copies faster
# than tinygemm at the engine's row counts and decodes as the reference does. An H100 (sm 9.0) is measured faster (7B
# layers, ms per token step at 1 / 8 / 16 / 32 rows: gemlite g64 2.39 / 4.13 / 5.08 / 4.89, tinygemm 2.12 / 4.72 /
# 7.89 / 14.7) but is not listed until the GPU test above passes there; nothing was measured on other architectures.
GEMLITE_AUTO: tuple[tuple[int, int], ...] = ()


def auto_int4_kernel(device=None) -> tuple[str, str]:
    """(kernel, why) that ``--generation_int4_kernel auto`` reads int4 copies with on ``device`` (the current CUDA
    device when None): gemlite on the architectures of :data:`GEMLITE_AUTO` where it is installed, else tinygemm."""
    if not torch.cuda.is_available() or (device is not None and torch.device(device).type != "cuda"):
        return "tinygemm", "auto"
    capability = torch.cuda.get_device_capability(device)
    if capability not in GEMLITE_AUTO:
        return "tinygemm", f"auto: gemlite not chosen on sm {capability[0]}.{capability[1]} (engine.GEMLITE_AUTO)"
    reason = gemlite_available()
    if reason is not None:
        return "tinygemm", f"auto: {reason}"
    return "gemlite", f"auto: the fastest measured on sm {capability[0]}.{capability[1]}"


def choose_int4_kernel(asked: str, device) -> tuple[str, str]:
    """(kernel, why) for int4 copies on ``device``: ``asked`` where it can run; auto: :func:`auto_int4_kernel`.
    Raises :class:`UserError` when gemlite is asked for on a GPU where it cannot run (:func:`gemlite_available`);
    off CUDA it is its reference matmul (tests)."""
    if asked not in INT4_KERNELS:
        raise ValueError(f"int4 kernel {asked!r} is not one of {list(INT4_KERNELS)}")
    if asked == "auto":
        return auto_int4_kernel(device)
    if asked == "tinygemm":
        return "tinygemm", "as asked"
    if torch.device(device).type != "cuda":
        return "gemlite", "as asked (off CUDA: its reference matmul)"
    reason = gemlite_available()
    if reason is not None:
        from sdgrpo.errors import UserError

        raise UserError(f"--generation_int4_kernel gemlite: {reason}; install it or use tinygemm")
    return "gemlite", "as asked"


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
# copies themselves is a few such temporaries (about 0.4 GiB), the widest group's values before packing (1.5 bytes
# an element), and a dequantised weight for a quantised base.
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
    return (held + 6 * 4 * min(widest, INT4_CHUNK) + 3 * widest * 3 // 2
            + (2 * widest if _quantised_base(layers) else 0))


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
        self.weight = torch.nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device),
                                         requires_grad=False)
        self.bias = (torch.nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)

    @torch.no_grad()
    def load(self, values, start: int, weight: torch.Tensor) -> None:
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
    (bitsandbytes) base, its dequantised weights + LoRA, read by the same matmuls as the 16-bit fold."""

    def __init__(self, fuse: bool = True, bits: int = 4, kernel: str = "tinygemm"):
        super().__init__()
        self.fuse, self.bits, self.kernel = fuse, bits, kernel
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
                    start, biases = 0, []
                    values = (None if self.bits == 16 else
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
                                delta = _lora_delta(m, chunk)
                                part = base[chunk].to(torch.float32, copy=True)  # never the weight itself
                                copy.load(values, start + first, part if delta is None else part.add_(delta))
                        start += m.out_features
                        bias = Folded._folded_bias(m)
                        bias = bias if bias is not None else m.base_layer.bias
                        biases.append(torch.zeros(m.out_features, device=device) if bias is None else bias.float())
                    copy.pack(values)
                    del values
                    if copy.bias is not None:
                        copy.bias.copy_(torch.cat(biases))
                    swap(parent, names, stand_ins)
            yield


# --- grouped-query attention without copying the keys and values ---------------------------------------------------
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


# --- how much memory generation may take ---------------------------------------------------------------------------
def fold_bytes(model, layers: list | None = None) -> int:
    """Bytes the fold's generation copies of ``model`` take (one copy of every foldable LoRA-wrapped weight, and of
    the biases that an adapter's own bias changes); 0 when nothing is folded. ``layers``: its foldable LoRA layers,
    where the caller has them."""
    total = 0
    for layer in (_foldable_lora_layers(model) if layers is None else layers) or []:
        base = layer.base_layer
        total += base.weight.numel() * base.weight.element_size()
        if _lora_bias(layer):
            total += base.out_features * base.weight.element_size()
    return total


def cache_bytes(model, batch: int, length: int) -> int:
    """Bytes of the static cache for ``batch`` rows of ``length`` positions (keys and values of every layer)."""
    config = model.config.get_text_config(decoder=True)
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dtype = next(model.parameters()).dtype
    width = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 2
    return 2 * config.num_hidden_layers * batch * heads * dim * length * width


# The share of the memory cap kept for training's own passes when the engine decides its mode before any of them
# has run (its first call). Measured: the Qwen2.5-7B shape (152k vocabulary), 8 x 640 tokens, LoRA r 16, took
# 2.5 GiB beyond its resident memory in training (one H200 capped at 24 GiB, 2026-12-03): 0.15 of 24 GiB is 3.6.
TRAINING_SHARE = 0.15


def generation_room(device) -> tuple[float, str]:
    """Bytes that generation may take on ``device`` beyond what is allocated now, and how that was found: what is
    free under the process's cap (``torch.cuda.set_per_process_memory_fraction``; the caching allocator's unused
    blocks count as free), less a reserve for training's own passes (the larger of what they took beyond the
    resident memory so far, and :data:`TRAINING_SHARE` of the cap). Unbounded off CUDA."""
    if torch.device(device).type != "cuda":
        return float("inf"), "not a CUDA device"
    free, total = torch.cuda.mem_get_info(device)
    cap = torch.cuda.get_per_process_memory_fraction(device) * total
    allocated, reserved = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
    room = min(free + reserved - allocated, cap - allocated)
    reserve = max(torch.cuda.max_memory_allocated(device) - allocated, TRAINING_SHARE * cap)
    return room - reserve, (f"{room / 2**30:.1f} GiB free under a {cap / 2**30:.1f} GiB cap, less "
                            f"{reserve / 2**30:.1f} GiB kept for training")


# --- the engine -----------------------------------------------------------------------------------------------------
def _inner(model):
    """The module whose forward decodes: a PEFT model's base model (its LoRA layers still in place)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


class _State:
    """What one decoding step reads and advances in place, at fixed addresses (a captured CUDA graph replays on
    them): the attention mask over the cache, the last token, positions, the step counter, the finished flags, the
    completion's tokens and log-probs so far, and the EOS ids."""

    def __init__(self, batch: int, length: int, new: int, device, mask_dtype, eos: tuple[int, ...], pad: int):
        def zeros(*shape, dtype=torch.long):
            return torch.zeros(*shape, dtype=dtype, device=device)

        self.mask, self.token, self.position = zeros(batch, length, dtype=mask_dtype), zeros(batch), zeros(batch)
        self.cache_position, self.step, self.finished = zeros(1), zeros(()), zeros(batch, dtype=torch.bool)
        self.tokens, self.logps = torch.full((batch, new), pad, dtype=torch.long, device=device), \
            zeros(batch, new, dtype=torch.float32)
        self.slogps = zeros(batch, new, dtype=torch.float32)  # at the call's temperature
        self.eos = torch.tensor(eos, dtype=torch.long, device=device)


class _Clock:
    """Wall-clock laps, each ended by a device synchronisation on a GPU (one per phase of a call, not per token)."""

    def __init__(self, device):
        self.device, self.last = device, time.perf_counter()

    def lap(self) -> float:
        if self.device is not None:
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        lap, self.last = now - self.last, now
        return lap


class DecodeEngine:
    """Batched decoding with a static cache and one (compiled) step function; see the module docstring.

    ``compile``: compile the step and capture it as a CUDA graph (default: on a GPU).
    ``check_every``: tokens between checks that every row has finished (the only host synchronisation).
    ``compile_mode``: torch.compile's mode for the step (``max-autotune-no-cudagraphs`` also tunes the matrix
    kernels for the decoding batch, at a longer first call; the engine captures the CUDA graph itself).
    ``grouped_attention``: decode with :func:`grouped_sdpa` (exact; on one H100, 1.5B shape, 8 x 512 tokens: 1.49 s
    against 1.66 s with transformers' copies, same run). Off: transformers' SDPA function as the model has it.
    ``reserve``: cache positions (prompt + completion) to allocate at the least. A compiled step is compiled again
    for each new cache length (on one H100, 1.5B shape: ~30 s), so a caller that knows its longest call reserves it.
    ``fuse_projections``: decode each sibling group of LoRA-wrapped projections (q, k, v; gate, up) with one matmul
    over stacked generation copies (see :class:`Folded`, :class:`Quantised`), or, decoding unmerged, with their A
    matrices stacked (:class:`StackedA`).
    ``memory_budget_gib``: what generation may take beyond the memory already allocated (the fold's copies and the
    cache); default: decided from the device (:func:`generation_room`). LoRA is folded only where its copies fit the
    budget; otherwise the LoRA layers decode unmerged (PEFT's own forward, inside the same step and graph), which
    costs no memory. Decided once per model (``mode``: ``folded``, ``dequantised``, ``int4``, ``unmerged``, or
    ``plain`` with nothing to fold), logged in one line.
    ``generation_weights``: ``model`` decodes the model's own weights (LoRA folded in their dtype, or unmerged);
    ``int4`` decodes int4 copies of base + LoRA (:class:`Quantised`; mode ``int4``) wherever the layers allow;
    ``auto`` folds in the model's dtype where that fits the budget; a quantised (bitsandbytes) base gets 16-bit
    copies of its dequantised weights + LoRA where they fit (mode ``dequantised``), else int4 copies where those
    fit; anything else decodes unmerged. (A 16-bit base is not given int4 copies by ``auto``: on one
    H200, Qwen2.5-7B shape, 8 rows, PyTorch's int4 kernel decoded at 7.79 ms a token against 7.88 ms unmerged and
    5.36 ms folded, for a sampler 30x further from the policy; ``benchmarks/results/bench_generate_qwen2.5-7b_h200_
    2026-12-03_int4.json``.)
    """

    def __init__(self, compile: bool | None = None, check_every: int = 16, length_bucket: int = 64,
                 compile_mode: str = "default", grouped_attention: bool = True, reserve: int = 0,
                 fuse_projections: bool = True, memory_budget_gib: float | None = None,
                 generation_weights: str = "auto", int4_kernel: str = "auto"):
        if generation_weights not in WEIGHTS:
            raise ValueError(f"generation_weights {generation_weights!r} is not one of {list(WEIGHTS)}")
        if int4_kernel not in INT4_KERNELS:
            raise ValueError(f"int4_kernel {int4_kernel!r} is not one of {list(INT4_KERNELS)}")
        self.compile = compile
        self.memory_budget_gib = memory_budget_gib
        self.generation_weights = generation_weights
        self.int4_kernel = int4_kernel  # as asked; the kernel in use is self.quantised.kernel once a mode is decided
        self.quantised = Quantised(fuse=fuse_projections)
        self.dense = Quantised(fuse=fuse_projections, bits=16)  # 16-bit copies of a dequantised quantised base
        self.stacked = StackedA()
        self.fuse_projections = fuse_projections
        self.mode: str | None = None
        self._mode_for = None  # weakref to the model the mode was decided for
        self._decided: tuple[int, int] | None = None  # (cache bytes, copies bytes) the mode was decided with
        self.record: list[Decoded] | None = None  # set to a list to collect every call's Decoded
        self.reserve = reserve
        self.grouped_attention = grouped_attention
        self.compile_mode = compile_mode
        self.check_every = check_every
        self.length_bucket = length_bucket
        self.fold = Folded(fuse=fuse_projections)
        self.calls = 0  # decoding calls served (a fallback to generate is not counted)
        self.fallbacks = 0
        self.setups = 0  # static caches made (a new batch size, length bucket, model or dtype)
        self.captures = 0  # CUDA graphs captured
        self._told: set[str] = set()  # fallback reasons already logged
        self._key = None
        self._model = None  # weakref to the model the cache and step were made for
        self._length = 0
        self._cache = None
        self._step = None
        self._state: tuple | None = None  # (key, _State)
        self._graph: tuple | None = None  # (key, torch.cuda.CUDAGraph or None where capture failed)
        # the last call's wall time by phase (device-synchronised): the generation copies' refresh, the cache set-up
        # and prefill (with a compile and capture where one happened), and the token steps, with their number
        self.timing: dict[str, float] = {}
        self.timings: list[dict] | None = None  # set to a list to collect every call's timing

    # the whole decoding step: forward of one token per row, then the choice
    def _decode_step(self, model, cache, mask, token, position, cache_position, step, finished, s, eos):
        logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=position[:, None],
                       past_key_values=cache, cache_position=cache_position, use_cache=True).logits[:, -1]
        return choose(logits, s, step, eos, finished)

    def _advance(self, model, st: _State, s: Sampling) -> None:
        """One step on the state, in place: the next token of every row, written at column ``st.step``."""
        token, logp, slogp, finished = self._step(model, self._cache, st.mask, st.token, st.position,
                                                  st.cache_position, st.step, st.finished, s, st.eos)
        column = st.step.view(1)
        st.tokens.index_copy_(1, column, token[:, None])
        st.logps.index_copy_(1, column, logp[:, None])
        if scaled(s):  # otherwise ``logprobs`` are the sampling log-probs, and slogps is not read
            st.slogps.index_copy_(1, column, slogp[:, None])
        st.token.copy_(token)
        st.finished.copy_(finished)
        st.position.add_(1)
        st.cache_position.add_(1)
        st.step.add_(1)

    def _setup(self, model, batch: int, length: int, device, on_gpu: bool) -> int:
        """Reset the static cache, or make one (and a step function) if none fits; returns the cache's length.

        The cache only grows: a call that fits the current one reuses it (the unused tail is masked off by the
        cache positions), so prompts of varying lengths do not recompile the step, which a new length would."""
        from transformers import StaticCache

        key = (batch, str(device), next(model.parameters()).dtype)
        same_model = self._model is not None and self._model() is model
        if not same_model or key != self._key or length > self._length:
            self._key, self._length, self._model = key, length, weakref.ref(model)
            self._graph = None
            self.setups += 1
            self._cache = StaticCache(config=model.config, max_cache_len=length)
            step = self._decode_step
            if self.compile if self.compile is not None else on_gpu:
                step = torch.compile(step, mode=self.compile_mode, fullgraph=False, dynamic=False)
            self._step = step
        else:
            self._cache.reset()
        return self._length

    def _prefill(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, st: _State, s: Sampling):
        """The prompts' forward into the cache, the first token, and the state set for step 1."""
        prompt_len = input_ids.size(1)
        st.mask.fill_(1)
        st.mask[:, :prompt_len] = attention_mask
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=input_ids, attention_mask=st.mask, position_ids=positions, past_key_values=self._cache,
                    cache_position=torch.arange(prompt_len, device=input_ids.device), use_cache=True,
                    logits_to_keep=1)
        st.step.zero_()
        st.finished.zero_()
        token, logp, slogp, finished = choose(out.logits[:, -1], s, st.step, st.eos, st.finished)
        st.tokens.fill_(s.pad_token_id)
        st.logps.zero_()
        st.slogps.zero_()
        st.tokens[:, 0], st.logps[:, 0], st.slogps[:, 0] = token, logp, slogp
        st.token.copy_(token)
        st.finished.copy_(finished)
        st.position.copy_(positions[:, -1] + 1)
        st.cache_position.fill_(prompt_len)
        st.step.fill_(1)

    def _capture(self, model, st: _State, s: Sampling):
        """The step as a CUDA graph (after warm-up runs that compile it), or None if it cannot be captured."""
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    self._advance(model, st, s)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._advance(model, st, s)
            self.captures += 1
            return graph
        except Exception as e:  # noqa: BLE001 - a model whose step cannot be captured still decodes, step by step
            logger.warning("decoding step not captured as a CUDA graph (%s: %s); decoding step by step",
                           type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            return None

    @torch.no_grad()
    def decode(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, s: Sampling) -> Decoded:
        """Sample (or choose greedily) up to ``s.max_new_tokens`` tokens after each left-padded prompt row."""
        self.calls += 1
        device = input_ids.device
        batch, prompt_len = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        length = -(-max(prompt_len + s.max_new_tokens, self.reserve) // self.length_bucket) * self.length_bucket
        inner = _inner(model)
        on_gpu = torch.device(device).type == "cuda"
        if not self._fits_again(model, batch, length, device):
            self._release_copies()
        mode = self._decide_mode(model, batch, length, device)
        clock = _Clock(device if on_gpu else None)
        copies = (self.fold(model) if mode == "folded" else
                  self.quantised(model, _quantisable_lora_layers(model, 4, self.quantised.kernel))
                  if mode == "int4" else self.dense(model, _quantisable_lora_layers(model, 16))
                  if mode == "dequantised" else self.stacked(model) if mode == "unmerged" and self.fuse_projections
                  else contextlib.nullcontext())
        # Eval mode: in train mode with gradient checkpointing on (TRL's default, and the Trainer's mode while it
        # generates), transformers' layers drop the KV cache, which one-token steps cannot do without.
        with copies, originals_put_back(inner), eval_mode(inner), \
                grouped_attention(inner, self.grouped_attention):
            refresh_s = clock.lap()
            length = self._setup(inner, batch, length, device, on_gpu)
            key = (batch, length, s.max_new_tokens, str(device), attention_mask.dtype, s.eos_token_ids, s.pad_token_id)
            if self._state is None or self._state[0] != key:
                self._state = (key, _State(batch, length, s.max_new_tokens, device, attention_mask.dtype,
                                           s.eos_token_ids, s.pad_token_id))
            st = self._state[1]
            rng = torch.cuda.get_rng_state(device) if on_gpu else None
            self._prefill(inner, input_ids, attention_mask, st, s)
            graph = None
            if on_gpu and self._step is not self._decode_step and s.max_new_tokens > 4:
                # the graph replays on fixed addresses: the cache (made anew only with a new _key or length), the
                # state (made anew only with a new key) and the weights (folded copies included)
                graph_key = (self._key, key, astuple(s), tuple(p.data_ptr() for p in inner.parameters()))
                if self._graph is None or self._graph[0] != graph_key:
                    self._graph = (graph_key, self._capture(inner, st, s))
                    # the warm-up steps wrote into the cache and the state and drew random numbers: start again
                    self._cache.reset()
                    torch.cuda.set_rng_state(rng, device)
                    self._prefill(inner, input_ids, attention_mask, st, s)
                graph = self._graph[1]
            prefill_s = clock.lap()
            ran = s.max_new_tokens
            for t in range(1, s.max_new_tokens):
                if t % self.check_every == 0 and bool(st.finished.all()):
                    ran = t
                    break
                if graph is not None:
                    graph.replay()
                else:
                    self._advance(inner, st, s)
            self.timing = {"refresh_s": refresh_s, "prefill_s": prefill_s, "decode_s": clock.lap(), "steps": ran - 1}
            if self.timings is not None:
                self.timings.append(self.timing)
            tokens, logps = st.tokens[:, :ran], st.logps[:, :ran]
            # generate stops at the step where the last row ends: keep the columns up to there
            if st.eos.numel():
                ends = torch.isin(tokens, st.eos)
                never = torch.full(ends.shape[:1], ran, dtype=torch.long, device=device)
                last = torch.where(ends.any(1), ends.int().argmax(1) + 1, never)
                ran = int(last.max())
            out = Decoded(torch.cat([input_ids, tokens[:, :ran]], dim=1), logps[:, :ran].clone(),
                          st.slogps[:, :ran].clone() if scaled(s) else None)
            if self.record is not None:
                self.record.append(out)
            return out

    def _fits_again(self, model, batch: int, length: int, device) -> bool:
        """Whether the mode decided for ``model`` holds for this call: a call with more rows or positions than the one
        it was decided for needs a bigger cache, which must fit the budget beside the copies held (the user's
        budget), or in what the device has free (the copies are allocated already). True where nothing is decided
        yet or the cache is no bigger."""
        if self.mode is None or self._mode_for is None or self._mode_for() is not model or self._decided is None:
            return True
        cache = cache_bytes(_inner(model), batch, length)
        decided_cache, copies = self._decided
        if cache <= decided_cache:
            return True
        if self.memory_budget_gib is not None:
            fits = copies + cache <= self.memory_budget_gib * 2**30
        else:
            fits = cache <= generation_room(device)[0]
        if not fits:
            logger.warning("decoding engine: %d rows of %d positions need a %.2f GiB cache, which does not fit beside "
                           "the %s mode's %.2f GiB of copies; deciding the mode again", batch, length, cache / 2**30,
                           self.mode, copies / 2**30)
        return fits

    def _release_copies(self) -> None:
        """Forget the mode and drop every generation copy and the captured step that reads them."""
        for holder in (self.fold, self.quantised, self.dense, self.stacked):
            holder.release()
        self.mode, self._mode_for, self._decided, self._graph = None, None, None, None

    def _decide_mode(self, model, batch: int, length: int, device) -> str:
        """``int4`` where asked (``generation_weights`` int4); else ``folded`` where the fold's copies fit the
        budget; else (auto, a quantised base) ``dequantised`` where 16-bit copies of it fit, ``int4`` where int4
        copies do; else ``unmerged`` (also for LoRA that none can serve: DoRA, shapes without an int4 layout);
        ``plain`` without LoRA. Raises :class:`UserError` when a budget the user set is below what decoding needs
        even unmerged."""
        if self._mode_for is not None and self._mode_for() is model and self.mode is not None:
            return self.mode
        layers = _foldable_lora_layers(model)  # [] without LoRA, None where it cannot be folded
        kernel, kernel_why = choose_int4_kernel(self.int4_kernel, device)
        self.quantised.kernel = kernel
        served4 = _quantisable_lora_layers(model, 4, kernel)
        quantisable = served4 if self.generation_weights != "model" else None
        need = fold_bytes(model, layers)
        need4 = int4_bytes(quantisable, kernel) if quantisable else 0
        dense = _quantisable_lora_layers(model, 16) if quantisable and _quantised_base(quantisable) else None
        need16 = dense_bytes(dense) if dense else 0
        cache = cache_bytes(_inner(model), batch, length)
        if self.memory_budget_gib is not None:
            budget, why = self.memory_budget_gib * 2**30, f"--generation_memory_gib {self.memory_budget_gib:g}"
            if budget < cache:
                from sdgrpo.errors import UserError

                raise UserError(f"--generation_memory_gib {self.memory_budget_gib:g}: decoding {batch} rows of "
                                f"{length} positions needs {cache / 2**30:.2f} GiB for its cache alone (unmerged); "
                                f"give at least that, or leave it unset to decide from the device")
        else:
            budget, why = generation_room(device)
        sizes = (f"{max(need, need16) / 2**30:.2f} GiB 16-bit, {need4 / 2**30:.2f} GiB int4 ({kernel}, "
                 f"{kernel_why}), + {cache / 2**30:.2f} GiB cache; {why}")
        quantised_base = bool(quantisable) and _quantised_base(quantisable)
        if layers == [] and not quantisable:
            self.mode, line = "plain", None
        elif self.generation_weights == "int4" and quantisable:
            self.mode, line = "int4", f"LoRA folded into int4 generation copies, as asked ({sizes})"
        elif layers and need + cache <= budget:
            self.mode, line = "folded", f"LoRA folded into generation copies ({sizes})"
        elif (self.generation_weights == "auto" and quantised_base and kernel in INT4_FIRST
              and need4 + cache <= budget):
            # memory first: where the int4 kernel decodes as fast as 16-bit copies (INT4_FIRST), a quarter of
            # their memory is left to training (more rows a step, longer completions)
            self.mode, line = "int4", (f"LoRA folded into int4 generation copies of the quantised base, read by "
                                       f"{kernel} ({sizes}; a quarter of 16-bit copies' memory)")
        elif dense and self.generation_weights == "auto" and need16 + cache <= budget:
            self.mode, line = "dequantised", (f"LoRA folded into 16-bit generation copies of the dequantised base "
                                              f"({sizes}; --generation_weights int4 takes a quarter of that)")
        elif quantised_base and need4 + cache <= budget:
            self.mode, line = "int4", (f"LoRA folded into int4 generation copies of the quantised base ({sizes}; "
                                       f"--generation_weights model decodes it unmerged)")
        elif layers is None and self.generation_weights == "model" and served4 and _quantised_base(served4):
            self.mode, line = "unmerged", ("LoRA decoded unmerged over the quantised base, as asked "
                                           "(--generation_weights model)")
        elif not layers and not quantisable:
            self.mode, line = "unmerged", ("LoRA decoded unmerged: no generation copy serves these layers (an adapter "
                                           "variant such as DoRA, or weights without an int4 layout)")
        else:
            self.mode, line = "unmerged", (f"LoRA decoded unmerged: no generation copy fits the budget ({sizes}; "
                                           f"--generation_memory_gib sets the budget)")
        if self.mode in ("int4", "dequantised"):
            served = quantisable if self.mode == "int4" else dense
            total = sum(1 for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer"))
            if len(served) < total:
                line += (f"; {total - len(served)} of {total} LoRA layers (no int4 layout, or an adapter "
                         f"variant) decode unmerged beside them")
        if line:
            logger.log(logging.WARNING if self.mode == "unmerged" else logging.INFO, "decoding engine: %s", line)
        self._mode_for = weakref.ref(model)
        self._decided = (cache, {"folded": need, "int4": need4, "dequantised": need16}.get(self.mode, 0))
        return self.mode

    def generate(self, model, input_ids=None, attention_mask=None, generation_config=None, **kwargs):
        """``model.generate``'s contract (prompt + completion ids, pad after EOS) through the engine, or through
        ``generate`` itself for what the engine does not do."""
        s = sampling_from(model, generation_config, **kwargs)
        reason = ("settings the engine does not implement" if s is None or input_ids is None else unsupported(model)
                  or ("dropout in train mode" if dropout_in_rollouts(model) else None))
        if reason is not None:
            self.fallbacks += 1
            if reason not in self._told:
                self._told.add(reason)
                logger.info("decoding engine: %s; this call goes to transformers' generate", reason)
            return type(model).generate(model, input_ids=input_ids, attention_mask=attention_mask,
                                        generation_config=generation_config, **kwargs)
        return self.decode(model, input_ids, attention_mask, s).sequences


@contextlib.contextmanager
def serving(model, engine: DecodeEngine):
    """``model.generate`` answered by ``engine`` for the duration (an instance attribute over the class method, or
    over the instance's own: Unsloth sets one, which is put back as it was)."""
    had_own, own = "generate" in vars(model), vars(model).get("generate")
    model.generate = lambda *args, **kwargs: engine.generate(model, *args, **kwargs)
    try:
        yield engine
    finally:
        del model.generate
        if had_own:
            model.generate = own
