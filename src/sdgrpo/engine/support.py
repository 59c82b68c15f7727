"""What the engine decodes, and what goes to transformers' ``generate`` instead: the three checks of
``DecodeEngine.generate``, in its order.

- **Settings** the engine does not implement (:data:`UNSUPPORTED`: beam search, repetition penalty, ...):
  :func:`sampling_from` resolves a call's settings as ``generate`` resolves them (its own
  ``_prepare_generation_config``, pinned in tests/test_private_api.py) and gives None for those.
- **Models** it cannot decode exactly (:func:`unsupported`): decided from what the model class declares, and for a
  model that a patching library changed, from whether transformers' originals were recorded (originals.py).
- **Dropout** in train mode (:func:`dropout_in_rollouts`): ``generate`` would sample under it; the engine decodes in
  eval mode.

``_inner``: the module whose forward decodes (a PEFT model's base model, its LoRA layers in place).
"""

from __future__ import annotations

import inspect

from sdgrpo.engine.originals import _original_forward, _patched_forward, _put_back_plan
from sdgrpo.engine.sampling import Sampling
from sdgrpo.scoring import active_dropout

# Settings that change what is sampled and that the engine does not implement: with any of them away from
# transformers' default, the call goes to generate.
UNSUPPORTED = ("num_beams", "num_return_sequences", "repetition_penalty", "no_repeat_ngram_size", "bad_words_ids",
               "suppress_tokens", "begin_suppress_tokens", "forced_bos_token_id", "forced_eos_token_id",
               "sequence_bias", "typical_p", "epsilon_cutoff", "eta_cutoff", "encoder_repetition_penalty",
               "exponential_decay_length_penalty", "renormalize_logits", "guidance_scale", "watermarking_config",
               "top_h", "stop_strings", "output_scores", "output_logits", "return_dict_in_generate", "min_length",
               "prompt_lookup_num_tokens", "remove_invalid_values", "low_memory", "penalty_alpha", "dola_layers")


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


def dropout_in_rollouts(model) -> bool:
    """True when ``model`` is in train mode with a dropout rate above 0 (a LoRA layer's included): ``generate``
    would then sample under dropout, which the engine (decoding in eval mode) does not."""
    return bool(model.training and active_dropout(model, lora=True))


def _inner(model):
    """The module whose forward decodes: a PEFT model's base model (its LoRA layers still in place)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model
