"""The transformers + PEFT backend: the base model as transformers loads it, and TRL's GRPOTrainer with sdgrpo's
hooks. ``load`` has the same face as ``backends/unsloth.py``'s."""

from __future__ import annotations


def load(train_cfg, model_cfg):
    """(model, tokenizer, peft_config, trainer class) for ``sdgrpo train``.

    The model is the plain base and TRL wraps it with a fresh adapter, so its reference pass disables the adapter
    instead of keeping a "ref" copy of an existing one. ``--load_in_4bit true``: the base quantised by bitsandbytes
    with the options TRL's ``get_quantization_config`` reads (``--bnb_4bit_quant_type``, NF4 by default,
    ``--use_bnb_nested_quant``) and QLoRA as TRL's GRPOTrainer makes it (adapters cast to bf16); the engine then
    decodes int4 copies of base + LoRA.
    """
    from trl import get_peft_config

    from sdgrpo.grpo_trainer import trainer_class
    from sdgrpo.modeling import load_model, load_tokenizer, resolve_dtype
    from sdgrpo.runs import training_device

    device = training_device(train_cfg)
    dtype = resolve_dtype(model_cfg.dtype, device)
    tokenizer = load_tokenizer(model_cfg.model_name_or_path, train_cfg.trust_remote_code)
    model = load_model(model_cfg.model_name_or_path, dtype, device, train_cfg.trust_remote_code,
                       model_cfg.attn_implementation, load_in_4bit=bool(model_cfg.load_in_4bit),
                       quant_type=model_cfg.bnb_4bit_quant_type, double_quant=bool(model_cfg.use_bnb_nested_quant))
    return model, tokenizer, get_peft_config(model_cfg), trainer_class()
