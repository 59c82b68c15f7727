"""The decoding engine: sampling for GRPO rollouts, eval, demo and generate, with the model's weights read once per
token and nothing else in the way. One concern a file, each opening with its contract:

- ``decode.py``: :class:`DecodeEngine` (static cache, the compiled step captured as a CUDA graph, ``decode`` and
  ``generate``) and :func:`serving` (``model.generate`` answered by an engine).
- ``sampling.py``: :class:`Sampling`, :class:`Decoded`; transformers' logits processors and the draw (``choose``).
- ``support.py``: what goes to ``generate`` instead: settings (``sampling_from``), models (``unsupported``), dropout.
- ``originals.py``: transformers' forwards recorded before a patching library (Unsloth), put back for a call.
- ``folded.py``: LoRA folded into generation copies (:class:`Folded`); unmerged, A stacked (:class:`StackedA`).
- ``int4.py``: the int4 kernels and layouts (:class:`Int4Linear`, :class:`GemliteLinear`) and the kernel choice.
- ``quantised.py``: int4 or 16-bit copies of base + LoRA, a quantised base's included (:class:`Quantised`).
- ``attention.py``: grouped-query attention without copying the keys and values (:func:`grouped_sdpa`).
- ``budget.py``: the memory generation may take, and the mode decided from it (``DecodeEngine._decide_mode``).

Every public name is re-exported here, with the one private name imported from outside (``_quantisable_lora_layers``).
These are other bindings of the same objects, which the engine's own code never reads: a test patches a name in each
module that looks it up at call time (``sdgrpo.engine.int4.GEMLITE_AUTO``; tests/test_engine.py's ``CALLERS``), not
here, where the private ones it patches are absent so that such a patch fails.
"""

from sdgrpo.engine.attention import GROUPED_SDPA, grouped_attention, grouped_sdpa
from sdgrpo.engine.budget import MODES, TRAINING_SHARE, WEIGHTS, cache_bytes, fold_bytes, generation_room
from sdgrpo.engine.decode import DecodeEngine, serving
from sdgrpo.engine.folded import SIBLINGS, Folded, StackedA
from sdgrpo.engine.int4 import (
    GEMLITE_AUTO,
    GEMLITE_GROUP,
    GEMLITE_SPLIT_K_MAX,
    INT4_FIRST,
    INT4_GROUPS,
    INT4_KERNELS,
    GemliteLinear,
    Int4Linear,
    auto_int4_kernel,
    choose_int4_kernel,
    gemlite_available,
    gemlite_layout,
    gemlite_meta_rows,
    int4_layout,
    pack_gemlite,
    pack_int4,
    quantise_affine,
    quantise_affine_words_,
    quantise_int4,
    unpack_gemlite,
)
from sdgrpo.engine.originals import PATCHING_LIBRARIES, originals_put_back, remember_originals
from sdgrpo.engine.quantised import INT4_CHUNK, Linear16, Quantised, _quantisable_lora_layers, dense_bytes, int4_bytes
from sdgrpo.engine.sampling import Decoded, Sampling, choose, process_logits, scaled
from sdgrpo.engine.support import UNSUPPORTED, dropout_in_rollouts, sampling_from, unsupported

__all__ = [
    "GROUPED_SDPA", "grouped_attention", "grouped_sdpa",
    "MODES", "TRAINING_SHARE", "WEIGHTS", "cache_bytes", "fold_bytes", "generation_room",
    "DecodeEngine", "serving",
    "SIBLINGS", "Folded", "StackedA",
    "GEMLITE_AUTO", "GEMLITE_GROUP", "GEMLITE_SPLIT_K_MAX", "INT4_FIRST", "INT4_GROUPS", "INT4_KERNELS",
    "GemliteLinear", "Int4Linear", "auto_int4_kernel", "choose_int4_kernel", "gemlite_available", "gemlite_layout",
    "gemlite_meta_rows", "int4_layout", "pack_gemlite", "pack_int4", "quantise_affine", "quantise_affine_words_",
    "quantise_int4", "unpack_gemlite",
    "PATCHING_LIBRARIES", "originals_put_back", "remember_originals",
    "INT4_CHUNK", "Linear16", "Quantised", "_quantisable_lora_layers", "dense_bytes", "int4_bytes",
    "Decoded", "Sampling", "choose", "process_logits", "scaled",
    "UNSUPPORTED", "dropout_in_rollouts", "sampling_from", "unsupported",
]
