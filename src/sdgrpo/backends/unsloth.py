"""The Unsloth backend: the only module that imports ``unsloth``, and only inside functions.

Unsloth refuses to import without a GPU and patches TRL's trainer classes on import, so nothing here runs unless
``--backend unsloth`` was asked for, and the trainer class is built after the import, on top of the patched one.
"""

from __future__ import annotations

import logging

from sdgrpo.errors import UserError

logger = logging.getLogger(__name__)


def require_gpu() -> None:
    import torch

    if not torch.cuda.is_available():
        raise UserError("--backend unsloth needs a CUDA GPU and none is visible; use --backend hf (the default) "
                        "on this machine")


def import_unsloth():
    require_gpu()
    try:
        import unsloth  # noqa: F401  (must come before trl is used: it patches TRL's classes)
        from unsloth import FastLanguageModel
    except ImportError as err:
        raise UserError(f"--backend unsloth: cannot import unsloth ({err}); pip install 'sdgrpo[unsloth]'") from None
    return FastLanguageModel


# Modules beyond the model's modeling module whose classes' forwards Unsloth replaces too (unsloth 2026.10.9:
# ``peft.tuners.lora.bnb.Linear4bit.forward = fast_lora_forward`` in unsloth/models/_utils.py,
# ``bitsandbytes.nn.Linear4bit.forward = _nf4_forward`` in unsloth/kernels/bnb_override.py); recorded with it where
# importable. On one H200 (2026-12-03) the engine handed every call of a patched Qwen2 model to generate because
# something patched had no original recorded, with only the modeling module recorded.
ALSO_PATCHED = ("peft.tuners.lora.layer", "peft.tuners.lora.bnb", "bitsandbytes.nn.modules")


def remember_transformers_forwards(model_path: str, trust_remote_code: bool) -> None:
    """Before Unsloth is imported: record transformers' own forwards of the model's modeling module (and PEFT's and
    bitsandbytes' of :data:`ALSO_PATCHED`), which Unsloth replaces on import and load, so that sdgrpo's decoding
    engine can decode with them (``--generation_engine true``; engine/originals.py). Where the module cannot
    be found the engine hands the calls to generate."""
    import importlib
    import sys

    from transformers import AutoConfig

    from sdgrpo.engine import remember_originals

    if "unsloth" in sys.modules:  # already patched in this process: nothing of transformers' own is left to record
        return
    try:
        kind = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code).model_type.replace("-", "_")
        module = importlib.import_module(f"transformers.models.{kind}.modeling_{kind}")
    except Exception as err:  # a model type without a transformers module of its own: generate serves it
        logger.info("transformers' forwards of %s not recorded (%s): Unsloth's generation serves it", model_path, err)
        return
    others = []
    for name in ALSO_PATCHED:
        try:
            others.append(importlib.import_module(name))
        except Exception:  # noqa: BLE001 - bitsandbytes absent (or unusable here): nothing of it to record
            pass
    remember_originals(module, *others)


def build_unsloth_policy(train_cfg, model_cfg):
    """Unsloth model with LoRA adapters (same options as the hf backend); returns (peft_model, tokenizer, None)."""
    from sdgrpo.modeling import check_model_path, resolve_dtype

    check_model_path(model_cfg.model_name_or_path)
    require_gpu()
    remember_transformers_forwards(model_cfg.model_name_or_path, train_cfg.trust_remote_code)
    FastLanguageModel = import_unsloth()
    load_in_4bit = bool(model_cfg.load_in_4bit)
    max_len = (train_cfg.max_prompt_length or 512) + (train_cfg.max_completion_length or 256)
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=model_cfg.model_name_or_path,
        max_seq_length=max_len,
        dtype=None if load_in_4bit else resolve_dtype(model_cfg.dtype, "cuda"),
        load_in_4bit=load_in_4bit,
        trust_remote_code=train_cfg.trust_remote_code,
        # --tile_mlp: Unsloth's own tiled MLP (unsloth_zoo.tiled_mlp, tiles of H tokens), patched in from_pretrained
        unsloth_tiled_mlp=getattr(train_cfg, "tile_mlp", "false") == "true",
    )
    targets = model_cfg.lora_target_modules
    if targets in ("all-linear", ["all-linear"], None):
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = FastLanguageModel.get_peft_model(
        model, r=model_cfg.lora_r, lora_alpha=model_cfg.lora_alpha, lora_dropout=model_cfg.lora_dropout,
        target_modules=targets, bias="none", use_gradient_checkpointing="unsloth", random_state=train_cfg.seed,
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, None


def adapt_config(train_cfg) -> None:
    """Give sdgrpo's config the extra fields of Unsloth's patched GRPOConfig, at their defaults.

    sdgrpo's config subclasses TRL's GRPOConfig as imported before Unsloth patched it; the patched trainer reads
    options (e.g. ``unsloth_grpo_mini_batch``) that only the patched config class declares.
    """
    import dataclasses

    import trl

    for f in dataclasses.fields(trl.GRPOConfig):
        if hasattr(train_cfg, f.name):
            continue
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            value = None
        setattr(train_cfg, f.name, value)


def unsloth_trainer_class():
    """sdgrpo's trainer mixin on top of the GRPOTrainer that Unsloth patched."""
    import_unsloth()
    import trl

    from sdgrpo.grpo_trainer import trainer_class

    return trainer_class(trl.GRPOTrainer, left_packed_logps=True)


def load(train_cfg, model_cfg):
    """(model, tokenizer, peft_config, trainer class) for ``sdgrpo train``, as ``backends/hf.py`` gives them: the
    model comes with its LoRA already added (peft_config None), the trainer class on top of Unsloth's patched one."""
    model, tokenizer, peft_config = build_unsloth_policy(train_cfg, model_cfg)
    trainer_cls = unsloth_trainer_class()
    adapt_config(train_cfg)
    return model, tokenizer, peft_config, trainer_cls
