"""``sdgrpo sft``: plain LoRA fine-tuning on the prepared text, the control every GRPO recipe must beat.

TRL's ``SFTTrainer`` on the ``train`` split of ``sdgrpo prepare`` (each example's prompt followed by its true
continuation, one sequence, loss on every token), with the same model loading and LoRA options as ``sdgrpo train``
and the same output layout: the adapter, ``resolved_config.yaml``, ``metrics.jsonl``, TensorBoard logs, and with
``--heldout_eval_steps`` the held-out bits per byte during training (``heldout.json``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import yaml

from sdgrpo.config import SDModelConfig, SDSFTConfig, _has_cuda, config_to_dict
from sdgrpo.data import load_prompts, prepared_or_raw
from sdgrpo.errors import UserError

logger = logging.getLogger(__name__)


def sft_dataset(path: str, limit: int | None):
    """The prepared train split as one ``text`` per example: prompt + continuation (SFTTrainer appends the EOS)."""
    ds = load_prompts(path, "train", limit)
    if "continuation" not in ds.column_names:
        raise UserError(f"{path}: no 'continuation' column; make the data with `sdgrpo prepare`")
    return ds.map(lambda ex: {"text": ex["prompt"] + ex["continuation"]}, remove_columns=ds.column_names)


def main(cfg: SDSFTConfig, model_cfg: SDModelConfig, callbacks: list | None = None) -> Path:
    """Fine-tune a LoRA adapter on the prepared text; returns the output folder."""
    from trl import SFTTrainer, get_peft_config

    from sdgrpo.callbacks import MetricsFileCallback, heldout_callback, keep_best_heldout
    from sdgrpo.cards import write_card
    from sdgrpo.compat import ensure_trl_runs_without_triton
    from sdgrpo.modeling import load_model, load_tokenizer, resolve_dtype

    ensure_trl_runs_without_triton()
    if not cfg.dataset_path:
        raise UserError("no text: pass --dataset_path DIR (raw text, or a folder written by `sdgrpo prepare`)")
    cfg.dataset_path = prepared_or_raw(cfg.dataset_path, cfg.output_dir, model_cfg.model_name_or_path)
    out = Path(cfg.output_dir)
    device = "cpu" if cfg.use_cpu else ("cuda" if _has_cuda() else "cpu")
    tokenizer = load_tokenizer(model_cfg.model_name_or_path, cfg.trust_remote_code)
    dataset = sft_dataset(cfg.dataset_path, cfg.max_train_prompts)
    model = load_model(model_cfg.model_name_or_path, resolve_dtype(model_cfg.dtype, device), device,
                       cfg.trust_remote_code, model_cfg.attn_implementation)
    heldout = heldout_callback(cfg, tokenizer, out)
    out.mkdir(parents=True, exist_ok=True)
    if int(os.environ.get("RANK", "0")) == 0:
        (out / "metrics.jsonl").unlink(missing_ok=True)
        (out / "resolved_config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg, model_cfg), sort_keys=True))
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=get_peft_config(model_cfg),
                         callbacks=[MetricsFileCallback(out / "metrics.jsonl"), *([heldout] if heldout else []),
                                    *(callbacks or [])])
    if heldout:
        heldout.trainer = trainer
    trainer.train()
    trainer.save_model(str(out))
    (out / "training_args.bin").unlink(missing_ok=True)  # a pickle; resolved_config.yaml holds the same
    for ckpt in out.glob("checkpoint-*"):
        (ckpt / "training_args.bin").unlink(missing_ok=True)
    if heldout:
        keep_best_heldout(heldout, out, trainer)
    write_card(trainer, out, model_cfg.model_name_or_path, "sft")
    logger.info("adapter saved to %s", out)
    return out
