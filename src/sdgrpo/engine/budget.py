"""How much memory generation may take, and the mode the engine decides from it, once per model.

The budget is ``--generation_memory_gib``, or what the device has free under the process's cap less a reserve for
training's own passes (:func:`generation_room`, :data:`TRAINING_SHARE`). Against it: the fold's copies
(:func:`fold_bytes`), 16-bit or int4 copies of a quantised base (quantised.py's ``dense_bytes``, ``int4_bytes``) and
the static cache (:func:`cache_bytes`). :class:`_ModeChoice`, part of ``DecodeEngine``, decides the mode (``folded``,
``dequantised``, ``int4``, ``unmerged``, or ``plain``; :data:`MODES`: the ``engine/mode`` metric's numbers), and
decides it again when a call needs a bigger cache than fits beside the copies. sdgrpo/plan.py predicts the same
choice before a run.
"""

from __future__ import annotations

import logging
import weakref

import torch

from sdgrpo.engine.folded import _foldable_lora_layers, _lora_bias
from sdgrpo.engine.int4 import INT4_FIRST, choose_int4_kernel
from sdgrpo.engine.quantised import _quantisable_lora_layers, _quantised_base, dense_bytes, int4_bytes
from sdgrpo.engine.support import _inner

logger = logging.getLogger("sdgrpo.engine")  # the package's logger: its lines read as before the engine was split


# What the engine's ``generation_weights`` may be (see DecodeEngine) and the ``engine/mode`` metric's numbers.
WEIGHTS = ("auto", "model", "int4")
MODES = {"plain": 0.0, "unmerged": 0.0, "folded": 1.0, "int4": 2.0, "dequantised": 3.0}


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


class _ModeChoice:
    """The part of :class:`DecodeEngine` that decides its mode under the budget (a base class of it, for the file's
    length; nothing else derives from it). It reads the engine's ``memory_budget_gib``, ``generation_weights`` and
    ``int4_kernel``, sets ``mode``, ``_mode_for``, ``_decided`` and ``quantised.kernel``, and releases the copies of
    ``fold``, ``quantised``, ``dense`` and ``stacked`` (and the captured ``_graph`` that reads them)."""

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
