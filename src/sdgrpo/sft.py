"""``sdgrpo sft``: plain LoRA fine-tuning on the prepared text, the control every GRPO recipe must beat.

TRL's ``SFTTrainer`` on the ``train`` split of ``sdgrpo prepare`` (each example's prompt followed by its true
continuation, one sequence, loss on every token), with the same model loading and LoRA options as ``sdgrpo train``
and the same output layout: the adapter, ``resolved_config.yaml``, ``metrics.jsonl``, TensorBoard logs, and with
``--heldout_eval_steps`` the held-out bits per byte during training (``heldout.json``). With ``--use_peft false``
every weight is trained (in fp32 unless ``--dtype`` says otherwise) and the folder holds the whole model: for a small
student being distilled, where an adapter is too small to learn from the teacher.

With ``--teacher_model_name_or_path`` it distils a frozen teacher on the same text (knowledge distillation on the
true text, off-policy): the loss per token is ``(1 - kd_weight) * CE + kd_weight * KL(teacher || student)``, the KL
over the whole vocabulary at every position the cross-entropy counts, both normalised like TRL's loss (by the
batch's label tokens). Its fixed point is the teacher's next-token distribution on the user's text; ``distill`` (the
GRPO reward) asks the same of the student's own samples, one scalar per completion.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from sdgrpo.checks import check_machine
from sdgrpo.config import SDModelConfig, SDSFTConfig, config_to_dict
from sdgrpo.data import load_prompts, prepared_or_raw
from sdgrpo.errors import UserError

logger = logging.getLogger(__name__)


def sft_dataset(path: str, limit: int | None):
    """The prepared train split as one ``text`` per example: prompt + continuation (SFTTrainer appends the EOS)."""
    ds = load_prompts(path, "train", limit)
    if "continuation" not in ds.column_names:
        raise UserError(f"{path}: no 'continuation' column; make the data with `sdgrpo prepare`")
    return ds.map(lambda ex: {"text": ex["prompt"] + ex["continuation"]}, remove_columns=ds.column_names)


def _kd_sums(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor):
    """Summed cross-entropy of ``target`` and KL(teacher || student) over the positions whose target is counted,
    for one chunk of rows (logits ``[rows, T, V]``, already cut to one width and aligned with ``target``)."""
    counted = target != -100
    s_logp = torch.log_softmax(student_logits.float(), dim=-1)[counted]
    t_logp = torch.log_softmax(teacher_logits.float(), dim=-1)[counted]
    ce = -s_logp.gather(-1, target[counted][:, None])[:, 0]
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    return ce.sum(), kl.sum()


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, weight: float,
            num_items_in_batch=None, logits_bytes: int = 256 * 2**20) -> tuple[torch.Tensor, torch.Tensor,
                                                                                  torch.Tensor]:
    """(loss, cross-entropy, KL): position t's logits predict ``labels[t + 1]`` (labels -100 are not counted); sums
    over the counted tokens divided by ``num_items_in_batch`` (what the Trainer counted) or by their number. Logits
    wider than the tokenizer's padded vocabulary are cut to the narrower of the two before the softmax.

    Computed in chunks of rows with at most ``logits_bytes`` of fp32 logits per chunk, each chunk checkpointed
    (``torch.utils.checkpoint``: its fp32 log-softmaxes are recomputed in the backward pass instead of held), so
    no fp32 tensor of the whole batch's ``[rows, tokens, vocab]`` exists: at Qwen's 152k vocabulary one of
    16 x 512 tokens would be ~5 GB, and the plain form held several."""
    from torch.utils.checkpoint import checkpoint

    width = min(student_logits.size(-1), teacher_logits.size(-1))
    target = labels[:, 1:]
    rows, tokens = target.shape
    chunk = max(1, logits_bytes // max(1, tokens * width * 4))
    ce = kl = student_logits.new_zeros((), dtype=torch.float32)
    for start in range(0, rows, chunk):
        part = slice(start, start + chunk)
        args = (student_logits[part, :-1, :width], teacher_logits[part, :-1, :width], target[part])
        if torch.is_grad_enabled() and student_logits.requires_grad:
            c, k = checkpoint(_kd_sums, *args, use_reentrant=False)
        else:
            c, k = _kd_sums(*args)
        ce, kl = ce + c, kl + k
    counted = (target != -100).sum()
    n = torch.as_tensor(counted if num_items_in_batch is None else num_items_in_batch).clamp(min=1).to(ce.device)
    ce, kl = ce / n, kl / n
    return (1 - weight) * ce + weight * kl, ce.detach(), kl.detach()


def _distilling_trainer(teacher, weight: float):
    """TRL's SFTTrainer whose loss is :func:`kd_loss` with ``teacher`` (through TRL's ``compute_loss_func`` hook,
    which hands it the student's logits; the batch's inputs, for the teacher's pass, are kept from compute_loss)."""
    from trl import SFTTrainer

    class DistillingSFTTrainer(SFTTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.compute_loss_func = self._kd

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            self._kd_inputs = inputs
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        def _kd(self, outputs, labels, num_items_in_batch=None):
            inputs = self._kd_inputs
            keys = ("input_ids", "attention_mask", "position_ids")
            with torch.no_grad():
                teacher_logits = teacher(**{k: inputs[k] for k in keys if k in inputs}, use_cache=False).logits
            loss, ce, kl = kd_loss(outputs.logits, teacher_logits, labels, weight, num_items_in_batch)
            mode = "train" if self.model.training else "eval"
            for name, term in (("kd/cross_entropy", ce), ("kd/kl", kl)):
                self._metrics[mode][name].append(self._step_share(term, num_items_in_batch))
            return loss

        def _step_share(self, term: torch.Tensor, num_items_in_batch) -> float:
            """What to log for one micro-batch's term so that TRL's mean over the step's entries is the term's
            per-token mean over the whole step, as the logged loss is. With the Trainer's token count
            (``num_items_in_batch``: every micro-batch of the step, and every process's under
            ``average_tokens_across_devices``) each process's term is a share of that whole: the shares are summed
            over processes, and scaled by the micro-batches per step, over which TRL takes the mean."""
            gathered = self.accelerator.gather_for_metrics(term.reshape(1))
            if num_items_in_batch is None:
                return gathered.mean().item()
            across = gathered.sum() if self.args.average_tokens_across_devices else gathered.mean()
            return (across * getattr(self, "current_gradient_accumulation_steps", 1)).item()

    return DistillingSFTTrainer


def load_sft_teacher(cfg: SDSFTConfig, tokenizer, dtype, device: str):
    """The frozen teacher of ``--teacher_model_name_or_path`` (its tokenizer must be the student's), or None."""
    from sdgrpo.modeling import load_model, load_tokenizer

    if not cfg.teacher_model_name_or_path:
        return None
    if load_tokenizer(cfg.teacher_model_name_or_path, cfg.trust_remote_code).get_vocab() != tokenizer.get_vocab():
        raise UserError(f"{cfg.teacher_model_name_or_path}: the teacher's tokenizer differs from the student's; "
                        "distillation on the text needs the same tokenizer")
    teacher = load_model(cfg.teacher_model_name_or_path, dtype, device, cfg.trust_remote_code).eval()
    teacher.requires_grad_(False)
    return teacher


def main(cfg: SDSFTConfig, model_cfg: SDModelConfig, callbacks: list | None = None) -> Path:
    """Fine-tune a LoRA adapter on the prepared text; returns the output folder."""
    from trl import SFTTrainer, get_peft_config

    from sdgrpo.callbacks import MetricsFileCallback, heldout_callback, keep_best_heldout
    from sdgrpo.cards import write_card
    from sdgrpo.compat import ensure_trl_runs_without_triton
    from sdgrpo.modeling import choose_attention_kernels, load_model, load_tokenizer, resolve_dtype
    from sdgrpo.runs import end_distributed, save_final, start_output, training_device

    ensure_trl_runs_without_triton()
    choose_attention_kernels(model_cfg.cudnn_attention)
    if not cfg.dataset_path:
        raise UserError("no text: pass --dataset_path DIR (raw text, or a folder written by `sdgrpo prepare`)")
    check_machine([cfg, model_cfg])
    cfg.dataset_path = prepared_or_raw(cfg.dataset_path, cfg.output_dir,
                                       model_cfg.model_name_or_path, cfg)
    out = Path(cfg.output_dir)
    device = training_device(cfg)
    tokenizer = load_tokenizer(model_cfg.model_name_or_path, cfg.trust_remote_code)
    dataset = sft_dataset(cfg.dataset_path, cfg.max_train_prompts)
    full = not model_cfg.use_peft
    if full and cfg.keep_best_heldout:
        raise UserError("--keep_best_heldout keeps the best adapter; with --use_peft false there is none (use "
                        "--save_steps and the held-out figures in heldout.json to pick a checkpoint)")
    dtype = resolve_dtype(model_cfg.dtype, device)
    # trained weights stay fp32 (16-bit weights lose small updates); autocast still runs; the frozen teacher keeps dtype
    student_dtype = torch.float32 if full and model_cfg.dtype in (None, "auto") else dtype
    model = load_model(model_cfg.model_name_or_path, student_dtype, device, cfg.trust_remote_code,
                       model_cfg.attn_implementation, load_in_4bit=bool(model_cfg.load_in_4bit),
                       quant_type=model_cfg.bnb_4bit_quant_type, double_quant=bool(model_cfg.use_bnb_nested_quant))
    weights = f"4-bit {model_cfg.bnb_4bit_quant_type.upper()} (QLoRA)" if model_cfg.load_in_4bit else str(student_dtype)
    logger.info("base %s: %s, %.1f MiB on %s", model_cfg.model_name_or_path, weights,
                model.get_memory_footprint() / 2**20, device)
    teacher = load_sft_teacher(cfg, tokenizer, dtype, device)
    heldout = heldout_callback(cfg, tokenizer, out)
    start_output(out, config_to_dict(cfg, model_cfg))
    trainer_class = SFTTrainer if teacher is None else _distilling_trainer(teacher, cfg.kd_weight)
    trainer = trainer_class(model=model, args=cfg, train_dataset=dataset, processing_class=tokenizer,
                            peft_config=get_peft_config(model_cfg),
                            callbacks=[MetricsFileCallback(out / "metrics.jsonl"), *([heldout] if heldout else []),
                                       *(callbacks or [])])
    if heldout:
        heldout.trainer = trainer
    trainer.train()
    try:
        save_final(trainer, out)
        if heldout:
            keep_best_heldout(heldout, out, trainer)
        write_card(trainer, out, model_cfg.model_name_or_path, "sft")
    finally:
        end_distributed()
    logger.info("%s saved to %s", "model (every weight trained)" if full else "adapter", out)
    return out
