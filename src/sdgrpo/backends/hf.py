"""The transformers + PEFT backend: the base model as transformers loads it, and TRL's GRPOTrainer with sdgrpo's
hooks. ``load`` has the same face as ``backends/unsloth.py``'s."""

from __future__ import annotations

from sdgrpo.errors import UserError


def load(train_cfg, model_cfg):
    """(model, tokenizer, peft_config, trainer class) for ``sdgrpo train``.

    The model is the plain base and TRL wraps it with a fresh adapter, so its reference pass disables the adapter
    instead of keeping a "ref" copy of an existing one.
    """
    from trl import get_peft_config

    from sdgrpo.grpo_trainer import trainer_class
    from sdgrpo.modeling import load_model, load_tokenizer, resolve_dtype
    from sdgrpo.runs import training_device

    if model_cfg.load_in_4bit or model_cfg.load_in_8bit:
        raise UserError("--backend hf loads the policy in 16 or 32 bits and does not quantise it; for a 4-bit base "
                        "(QLoRA) use --backend unsloth --load_in_4bit true on a GPU, or drop --load_in_4bit")
    device = training_device(train_cfg)
    dtype = resolve_dtype(model_cfg.dtype, device)
    tokenizer = load_tokenizer(model_cfg.model_name_or_path, train_cfg.trust_remote_code)
    model = load_model(model_cfg.model_name_or_path, dtype, device, train_cfg.trust_remote_code,
                       model_cfg.attn_implementation)
    return model, tokenizer, get_peft_config(model_cfg), trainer_class()
