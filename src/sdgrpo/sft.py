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

With ``--replay_share S`` a share S of every batch's rows is text the base wrote before training (``sdgrpo.replay``),
trained by KL(base || student) over the vocabulary at every position instead of cross-entropy: the domain rows' loss
is unchanged, and the batch's sum is divided by the same token count.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from sdgrpo.checks import check_machine
from sdgrpo.config import SDModelConfig, SDSFTConfig
from sdgrpo.data import load_prompts
from sdgrpo.errors import UserError
from sdgrpo.replay import mix

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
    """(loss, cross-entropy, KL) from whole logits (``sdgrpo sft`` computes the same from hidden states, chunk by
    chunk: ``chunked.kd_stats``): position t's logits predict ``labels[t + 1]`` (labels -100 are not counted); sums
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


def _teacher_rows(teacher, inputs: dict, mask: torch.Tensor):
    """The teacher on the batch (no gradient), at the positions ``mask`` ``[B, T - 1]`` counts: its final hidden
    states ``[n, H]`` and a function turning a chunk of them into fp32 logits (its head, scaled and capped as its
    forward does), or, for a model without a separate head, its logits ``[n, V]`` there and ``float``."""
    from sdgrpo.scoring import _split_head

    keys = {k: inputs[k] for k in ("input_ids", "attention_mask", "position_ids") if k in inputs}
    split = _split_head(teacher)
    with torch.no_grad():
        if split is None:
            return teacher(**keys, use_cache=False).logits[:, :-1][mask], torch.Tensor.float
        backbone, head, scale, softcap = split
        hidden = backbone(**keys, use_cache=False).last_hidden_state[:, :-1][mask]

    def logits(rows):
        with torch.no_grad():
            out = head(rows).float() * scale
            return softcap * torch.tanh(out / softcap) if softcap is not None else out

    return hidden, logits


def _sft_trainer():
    """TRL's SFTTrainer with sdgrpo's checkpoints (pickle-free, marked complete with their files' sizes), so that
    ``--resume`` finds them as ``train``'s."""
    from trl import SFTTrainer

    from sdgrpo.checkpointing import CheckpointMixin

    class CheckpointedSFTTrainer(CheckpointMixin, SFTTrainer):
        pass

    return CheckpointedSFTTrainer


def _distilling_trainer(teacher, weight: float, base=None):
    """TRL's SFTTrainer whose loss is ``kd_loss``'s with ``teacher``, computed in TRL's own ``compute_loss`` (its fused
    LM head, its metrics) with the head's operands routed (``compat.fused_head_route``) to ``chunked.kd_stats``:
    token chunk by token chunk, forward and backward, so neither model's [rows, tokens, vocabulary] logits exist (TRL's
    ``compute_loss_func`` hook, used before, hands over the student's whole logits).

    With ``base`` (self-replay, ``--replay_share``: a frozen copy of the base, or ``"adapters"``: the trained model
    with its adapters off) the rows of the dataset's ``replay`` column are trained by KL(base || student) alone
    (``replay.mixed_kd``), and are drawn at their share of every batch (``replay.ReplaySampler``); ``teacher`` may
    then be None (the domain rows keep plain cross-entropy)."""

    class DistillingSFTTrainer(_sft_trainer()):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if self.args.loss_type != "nll" or self.args.label_smoothing_factor:  # (replay: refused by checks.py)
                raise UserError("distillation from a teacher computes its own loss: drop --loss_type "
                                f"{self.args.loss_type} and --label_smoothing_factor, or the teacher")
            if base is not None:
                from sdgrpo.replay import collate_flags

                self.data_collator = collate_flags(self.data_collator)

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            if base is not None and "replay" not in self._signature_columns:
                self._signature_columns = [*self._signature_columns, "replay"]  # kept for the collator

        def _get_train_sampler(self, train_dataset=None):
            dataset = self.train_dataset if train_dataset is None else train_dataset
            if base is None or "replay" not in dataset.column_names:
                return super()._get_train_sampler(train_dataset)
            from sdgrpo.replay import ReplaySampler

            return ReplaySampler(dataset["replay"], self.args.replay_share, self.args.data_seed or self.args.seed)

        def _parts(self, inputs: dict, mask: torch.Tensor, flags: torch.Tensor | None) -> dict[bool, tuple]:
            """``replay.mixed_kd``'s parts of the labelled positions, by whether they are replay rows: the domain
            rows' (the teacher's hidden rows and ``kd_weight``, or no teacher), the replay rows' (the base's, weight
            1); a part without rows in this batch left out."""
            from sdgrpo.replay import base_rows

            keys = {k: inputs[k] for k in ("input_ids", "attention_mask", "position_ids") if k in inputs}
            flags = torch.zeros(mask.size(0), dtype=torch.bool, device=mask.device) if flags is None else flags.bool()
            at = flags[:, None].expand_as(mask)[mask]  # [n]: each labelled position's row is a replay row
            parts = {}
            for replay_rows, model in ((False, teacher), (True, base)):
                rows = (flags == replay_rows).nonzero()[:, 0]
                positions = (at == replay_rows).nonzero()[:, 0]
                if not len(rows):
                    continue
                sub = {k: v.index_select(0, rows) for k, v in keys.items()}
                if model is None:
                    parts[replay_rows] = (positions, None, None, 0.0)
                elif isinstance(model, str):  # the trained model, its adapters off
                    parts[replay_rows] = (positions, *base_rows(self.accelerator.unwrap_model(self.model), sub,
                                                                mask.index_select(0, rows)), 1.0)
                else:
                    parts[replay_rows] = (positions, *_teacher_rows(model, sub, mask.index_select(0, rows)),
                                          1.0 if replay_rows else weight)
            return parts

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            from sdgrpo.compat import fused_head_route
            from sdgrpo.replay import mixed_kd

            if "shift_labels" in inputs or "labels" not in inputs:
                raise RuntimeError("distillation needs the batch's labels, unshifted (no context parallelism)")
            flags = inputs.pop("replay", None)
            shifted = inputs["labels"][:, 1:]
            mask = shifted != -100  # the positions TRL's fused head scores: position t predicts labels[t + 1]
            expected = shifted[mask]
            parts = self._parts(inputs, mask, flags)
            sums = []

            def head(hidden, w, bias, targets, temperature, chunk_size, softcap=None, logit_scale=1.0,
                     outputs=("entropy",)):
                if not torch.equal(targets, expected.to(targets.device)):
                    raise RuntimeError("distillation: TRL's fused head scored other tokens than the batch's labels")
                term, entropy, is_top1, part_sums = mixed_kd(hidden, w, bias, targets, list(parts.values()),
                                                             temperature, logit_scale, softcap, outputs)
                sums.append(part_sums)
                # TRL's loss is -sum(log_probs) / its token count: handed this mix, it is kd_loss's
                # (1 - w) * CE + w * KL with TRL's own normaliser and scaling across processes.
                return term, entropy, None, None, is_top1

            with fused_head_route(head):
                out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if len(sums) != 1:
                raise RuntimeError(f"distillation: TRL's loss made {len(sums)} fused-head calls, not one")
            count = mask.sum() if num_items_in_batch is None else num_items_in_batch
            n = torch.as_tensor(count).clamp(min=1).to(expected.device)
            mode = "train" if self.model.training else "eval"
            self._log_terms(mode, dict(zip(parts, sums[0])), flags, mask, n, num_items_in_batch)
            return out

        def _log_terms(self, mode, sums: dict, flags, mask, n, num_items_in_batch) -> None:
            """With a teacher ``kd/cross_entropy`` and ``kd/kl``: the domain rows' sums over TRL's token count. With
            ``base``: ``replay/loss`` (the replay rows' KL sum over that count, so that the loss is the domain rows'
            terms plus it), ``replay/kl`` (their mean KL per token, this micro-batch) and ``replay/share`` (of its
            rows)."""
            zero = n.new_zeros((), dtype=torch.float32)
            ce, kl = sums.get(False, (zero, zero))
            if teacher is not None:
                for name, term in (("kd/cross_entropy", ce / n), ("kd/kl", kl / n)):
                    self._metrics[mode][name].append(self._step_share(term, num_items_in_batch))
            if base is None:
                return
            flags = flags.bool() if flags is not None else torch.zeros(mask.size(0), dtype=torch.bool,
                                                                        device=mask.device)
            replay_kl = sums.get(True, (zero, zero))[1]
            self._metrics[mode]["replay/loss"].append(self._step_share(replay_kl / n, num_items_in_batch))
            tokens = (mask & flags[:, None]).sum()
            gathered = self.accelerator.gather_for_metrics(torch.stack([replay_kl.float(), tokens.float()])[None])
            if gathered[:, 1].sum() > 0:
                self._metrics[mode]["replay/kl"].append((gathered[:, 0].sum() / gathered[:, 1].sum()).item())
            self._metrics[mode]["replay/share"].append(
                self.accelerator.gather_for_metrics(flags.float().mean()[None]).mean().item())

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


def main(cfg: SDSFTConfig, model_cfg: SDModelConfig, callbacks: list | None = None, resume: bool = False,
         start_over: bool = False) -> Path:
    """Fine-tune a LoRA adapter on the prepared text; returns the output folder.

    The run folder, Ctrl-C / SIGTERM, ``resume`` and ``start_over`` behave as in ``sdgrpo train``
    (:mod:`sdgrpo.runs`)."""
    from sdgrpo.compat import ensure_trl_runs_without_triton
    from sdgrpo.modeling import choose_attention_kernels
    from sdgrpo.runs import open_run

    ensure_trl_runs_without_triton()
    choose_attention_kernels(model_cfg.cudnn_attention)
    if not cfg.dataset_path:
        raise UserError("no text: pass --dataset_path DIR (raw text, or a folder written by `sdgrpo prepare`)")
    check_machine([cfg, model_cfg])
    if not model_cfg.use_peft and cfg.keep_best_heldout:
        raise UserError("--keep_best_heldout keeps the best adapter; with --use_peft false there is none (use "
                        "--save_steps and the held-out figures in heldout.json to pick a checkpoint)")
    with open_run(cfg, model_cfg, "sft", resume, start_over) as (out, resolved, checkpoint):
        return _sft(cfg, model_cfg, out, resolved, checkpoint, callbacks)


def _sft(cfg: SDSFTConfig, model_cfg: SDModelConfig, out: Path, resolved: dict, checkpoint: Path | None,
         callbacks: list | None) -> Path:
    from trl import get_peft_config

    from sdgrpo.callbacks import MetricsFileCallback, StopRequest, heldout_callback, keep_best_heldout
    from sdgrpo.cards import write_card
    from sdgrpo.modeling import load_model, load_tokenizer, resolve_dtype
    from sdgrpo.progress import quiet_terminal
    from sdgrpo.runs import end_distributed, save_or_interrupt, start_output, stop_if_broken, train, training_device

    device = training_device(cfg)
    tokenizer = load_tokenizer(model_cfg.model_name_or_path, cfg.trust_remote_code)
    dataset = sft_dataset(cfg.dataset_path, cfg.max_train_prompts)
    full = not model_cfg.use_peft
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
    dataset = mix(cfg, dataset, model, tokenizer, model_cfg.model_name_or_path, prompts=False)  # --replay_share
    base = None
    if cfg.replay_share:  # the replay rows' teacher: the model with its adapters off, or a frozen copy of the base
        base = load_model(model_cfg.model_name_or_path, student_dtype, device, cfg.trust_remote_code).eval(
                          ).requires_grad_(False) if full else "adapters"
    heldout, stop = heldout_callback(cfg, tokenizer, out), StopRequest()
    if checkpoint is not None and heldout is not None and not heldout.load_state(checkpoint):
        logger.warning("%s holds no held-out history; the held-out record starts again at this step", checkpoint)
    start_output(out, resolved, checkpoint)
    trainer_class = (_sft_trainer() if teacher is None and base is None else
                     _distilling_trainer(teacher, cfg.kd_weight, base))
    trainer = trainer_class(model=model, args=cfg, train_dataset=dataset, processing_class=tokenizer,
                            peft_config=get_peft_config(model_cfg),
                            callbacks=[MetricsFileCallback(out / "metrics.jsonl"), *([heldout] if heldout else []),
                                       stop, *(callbacks or [])])
    if heldout:
        heldout.trainer = trainer
    quiet_terminal(trainer)
    try:
        train(trainer, stop, checkpoint)
        stop_if_broken(stop, out)
        save_or_interrupt(trainer, stop, out)
        if heldout:
            keep_best_heldout(heldout, out, trainer)
        write_card(trainer, out, model_cfg.model_name_or_path, "sft")
    finally:
        end_distributed()
    logger.info("%s saved to %s", "model (every weight trained)" if full else "adapter", out)
    return out
