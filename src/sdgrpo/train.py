"""``sdgrpo train``: self-distillation GRPO of LoRA adapters on prompts from ``sdgrpo prepare``."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from sdgrpo import plan
from sdgrpo.callbacks import MetricsFileCallback, StopRequest, heldout_callback, keep_best_heldout
from sdgrpo.cards import write_card
from sdgrpo.checkpointing import copy_adapter, is_write_failure, write_failure_message
from sdgrpo.checks import check_machine
from sdgrpo.config import SDGRPOConfig, SDModelConfig
from sdgrpo.data import load_prompts
from sdgrpo.errors import UserError
from sdgrpo.guard import CollapseGuard
from sdgrpo.modeling import choose_attention_kernels
from sdgrpo.progress import quiet_terminal
from sdgrpo.replay import mix
from sdgrpo.rewards import build_reward
from sdgrpo.runs import (
    end_distributed,
    open_run,
    save_final,
    save_or_interrupt,
    start_output,
    stop_if_broken,
    train,
    training_device,
)
from sdgrpo.runtime import resolve_runtime

logger = logging.getLogger(__name__)


def load_backend(train_cfg: SDGRPOConfig, model_cfg: SDModelConfig):
    """(model, tokenizer, peft_config, trainer class) from ``backends/<backend>.py``; Unsloth is imported only when
    chosen."""
    if train_cfg.backend == "unsloth":
        from sdgrpo.backends import unsloth as backend
    else:
        from sdgrpo.backends import hf as backend
    return backend.load(train_cfg, model_cfg)


def load_teacher(train_cfg: SDGRPOConfig, model_path: str | None = None):
    """The frozen teacher and its tokenizer, or (None, None); its memory use is logged."""
    if not (train_cfg.teacher_model_name_or_path or train_cfg.teacher_adapter):
        if train_cfg.reward in ("teacher_nll", "distill"):
            raise UserError(f"reward {train_cfg.reward!r} needs --teacher_model_name_or_path or --teacher_adapter")
        return None, None
    from sdgrpo.modeling import load_model, load_tokenizer, resolve_dtype

    device = training_device(train_cfg)
    path = train_cfg.teacher_model_name_or_path or model_path
    tokenizer = load_tokenizer(path, train_cfg.trust_remote_code)
    teacher = load_model(path, resolve_dtype(None, device), device, train_cfg.trust_remote_code,
                         load_in_4bit=train_cfg.teacher_load_in_4bit and not train_cfg.teacher_adapter)
    if train_cfg.teacher_adapter:
        teacher = merge_adapter(teacher, train_cfg.teacher_adapter)
        path = f"{path} + adapter {train_cfg.teacher_adapter}"
    teacher.eval().requires_grad_(False)
    size = teacher.get_memory_footprint()
    logger.info("teacher %s: %s, %.1f MiB on %s", path, "4-bit NF4" if train_cfg.teacher_load_in_4bit else
                str(next(teacher.parameters()).dtype), size / 2**20, device)
    return teacher, tokenizer


def merge_adapter(model, adapter_dir: str):
    """``model`` with a saved LoRA adapter folded into its weights (a frozen teacher: base + what it learned)."""
    from peft import PeftModel

    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise UserError(f"{adapter_dir}: no adapter_config.json; pass a folder written by `sdgrpo train` or "
                        "`sdgrpo sft`")
    return PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()


def check_one_gpu_per_process() -> None:
    """Refuse one process with several GPUs: TRL's GRPOTrainer cannot run under the nn.DataParallel it would get."""
    import torch

    if not torch.cuda.is_available() or "WORLD_SIZE" in os.environ:
        return
    n = torch.cuda.device_count()
    if n > 1:
        raise UserError(f"{n} GPUs are visible to this one process; use them all with `accelerate launch "
                        "--config_file configs/accelerate/ddp.yaml --num_processes "
                        f"{n} -m sdgrpo.cli train ...`, or pick one with CUDA_VISIBLE_DEVICES=0")


def finish(trainer, guard: CollapseGuard, stop: StopRequest, out: Path) -> None:
    """Save the final adapter; after a guard stop or a NaN loss, the last adapter within limits where there is one."""
    stop_if_broken(stop, out)
    if guard.state.tripped_at is None:
        save_or_interrupt(trainer, stop, out)
        return
    save_final(trainer, out / "collapsed")
    good = guard.good_checkpoint() if guard.action == "restore" else None
    if good is not None:
        step, path = good
        copy_adapter(Path(path), out)
        where = f"the last adapter within limits (step {step}) is in {out}"
    else:
        save_final(trainer, out)
        where = f"no checkpoint within limits was saved, so {out} holds the adapter of step {guard.state.tripped_at}"
    guard.write(out / "collapse_guard.json")
    logger.warning("collapse guard stopped training at step %d: %s; %s (the collapsed one is in %s)",
                   guard.state.tripped_at, guard.state.reason, where, out / "collapsed")


def resolve(train_cfg: SDGRPOConfig, model_cfg: SDModelConfig) -> None:
    """Check the runtime and the options, before any work."""
    from sdgrpo.compat import ensure_trl_runs_without_triton

    ensure_trl_runs_without_triton()
    if not model_cfg.use_peft:
        raise UserError("--use_peft false: sdgrpo train trains LoRA adapters only (the base is the adapters-off "
                        "model its reward and KL term read); to train every weight use `sdgrpo sft --use_peft false`")
    check_machine([train_cfg, model_cfg])
    check_one_gpu_per_process()
    resolve_runtime(train_cfg)
    plan.apply_cap(train_cfg)
    plan.check(train_cfg, model_cfg, *plan.for_run(train_cfg, model_cfg))
    choose_attention_kernels(model_cfg.cudnn_attention)


def dry_run(train_cfg: SDGRPOConfig, model_cfg: SDModelConfig, resume: bool = False, start_over: bool = False) -> None:
    """``--dry_run``: the machine's checks, the output folder's and the run's memory plan, printed; nothing loaded,
    prepared or written. Raises :class:`UserError` where the run would be refused (a folder of the user's, an earlier
    run without --resume or --start_over, a plan that does not fit). With --gpu_memory_gib on a machine without a GPU
    it plans for a card of that size elsewhere, so this machine's own lacks are not refused."""
    import torch

    from sdgrpo.runs import refuse_earlier, refuse_foreign

    if train_cfg.gpu_memory_gib is None or torch.cuda.is_available():
        check_machine([train_cfg, model_cfg])
    refuse_foreign(Path(train_cfg.output_dir))
    refuse_earlier(Path(train_cfg.output_dir), resume, start_over)
    resolve_runtime(train_cfg)
    estimate, cap = plan.for_run(train_cfg, model_cfg)
    where = (f"{train_cfg.gpu_memory_gib:g} GiB (--gpu_memory_gib)" if train_cfg.gpu_memory_gib is not None
             else "this GPU" if cap is not None else "no GPU here: pass --gpu_memory_gib to plan for a card")
    print(f"memory plan of `sdgrpo train` for {model_cfg.model_name_or_path} on {where}:")
    print(estimate.table(cap) if estimate is not None else "  not estimated: the model's config.json could not be "
          "read here, or its family is not one the estimate knows")
    plan.check(train_cfg, model_cfg, estimate, cap)
    if cap is not None and estimate is not None:
        print(f"  fits, with {(cap - estimate.peak()) / 2**30:.2f} GiB to spare")


def load_data(train_cfg: SDGRPOConfig):
    dataset = load_prompts(train_cfg.dataset_path, "train", train_cfg.max_train_prompts)
    if train_cfg.reward == "context_distill" and "continuation" not in dataset.column_names:
        raise UserError(f"{train_cfg.dataset_path}: reward 'context_distill' needs a 'continuation' column (the true "
                        "text after each prompt); make the data with `sdgrpo prepare`")
    return dataset


def build_trainer(trainer_cls, train_cfg, model, tokenizer, peft_config, dataset, reward, callbacks: list):
    # auto: on for either backend. Under Unsloth the reward reads its left-packed KL pass (completion_columns sends
    # rows with a pad-id token sampled inside to the own pass); tests/gpu/test_gpu.py checks it against an
    # independent pass on tiny and Qwen2 models.
    wanted = train_cfg.reuse_reference_logprobs != "false"
    reuse = wanted and train_cfg.score_with == "base" and train_cfg.reward == "self_nll"
    try:
        trainer = trainer_cls(model=model, reward_funcs=[reward], args=train_cfg, train_dataset=dataset,
                              processing_class=tokenizer, peft_config=peft_config,
                              max_prompt_length=train_cfg.max_prompt_length, reuse_reference_logprobs=reuse,
                              callbacks=callbacks)
    except ValueError as err:
        if "target module" in str(err).lower():
            raise UserError(f"LoRA: {str(err).splitlines()[0]} (set --lora_target_modules to names of modules "
                            "that exist, or all-linear)") from None
        raise
    reward.model = trainer.model  # the reward scores with the trainer's PEFT model (adapters off for the base)
    quiet_terminal(trainer)
    for callback in callbacks:
        if hasattr(callback, "trainer"):
            callback.trainer = trainer
    return trainer


def main(train_cfg: SDGRPOConfig, model_cfg: SDModelConfig, resume: bool = False,
         callbacks: list | None = None, start_over: bool = False) -> Path:
    """Train and save adapters, resolved config and metrics under ``output_dir``; returns that folder.

    Ctrl-C or SIGTERM finishes the current step, saves a checkpoint and the adapter, and raises
    :class:`sdgrpo.runs.Interrupted`. With ``resume``, training continues from the last whole checkpoint of
    ``output_dir``; an earlier run there is otherwise refused, or moved aside with ``start_over``
    (:func:`sdgrpo.runs.open_run`).
    """
    if train_cfg.dry_run:
        return dry_run(train_cfg, model_cfg, resume, start_over)
    resolve(train_cfg, model_cfg)
    with open_run(train_cfg, model_cfg, "train", resume, start_over) as (out, resolved, checkpoint):
        return _train(train_cfg, model_cfg, out, resolved, checkpoint, callbacks)


def _train(train_cfg: SDGRPOConfig, model_cfg: SDModelConfig, out: Path, resolved: dict, checkpoint: Path | None,
           callbacks: list | None) -> Path:
    dataset = load_data(train_cfg)
    model, tokenizer, peft_config, trainer_cls = load_backend(train_cfg, model_cfg)
    dataset = mix(train_cfg, dataset, model, tokenizer, model_cfg.model_name_or_path, prompts=True)  # --replay_share
    teacher, teacher_tokenizer = load_teacher(train_cfg, model_cfg.model_name_or_path)
    reward = build_reward(train_cfg.reward, None, tokenizer, teacher=teacher, teacher_tokenizer=teacher_tokenizer,
                          aggregation=train_cfg.reward_aggregation, token_budget=train_cfg.reward_token_budget,
                          score_with=train_cfg.score_with, retokenize=train_cfg.teacher_retokenize,
                          max_prompt_length=train_cfg.max_prompt_length)
    guard = CollapseGuard(train_cfg.collapse_guard, train_cfg.guard_max_seq_rep_increase,
                          train_cfg.guard_max_distinct2_drop, train_cfg.guard_patience,
                          min_length_fraction=train_cfg.guard_min_length_fraction,
                          max_heldout_increase=train_cfg.guard_max_heldout_increase)
    if checkpoint is not None and not guard.load_state(checkpoint):
        logger.warning("%s holds no collapse-guard state; the guard takes a new baseline", checkpoint)
    heldout, stop = heldout_callback(train_cfg, tokenizer, out), StopRequest()
    if checkpoint is not None and heldout is not None and not heldout.load_state(checkpoint):
        logger.warning("%s holds no held-out history; the held-out record starts again at this step", checkpoint)
    start_output(out, resolved, checkpoint)
    trainer = build_trainer(trainer_cls, train_cfg, model, tokenizer, peft_config, dataset, reward,
                            [MetricsFileCallback(out / "metrics.jsonl"), *([heldout] if heldout else []), guard, stop,
                             *(callbacks or [])])
    train(trainer, stop, checkpoint)
    try:
        finish(trainer, guard, stop, out)
        if heldout:
            keep_best_heldout(heldout, out, trainer)
        write_card(trainer, out, model_cfg.model_name_or_path, "train")
    except Exception as err:  # noqa: BLE001 - only a failed write is turned into one line; the rest re-raised
        if not is_write_failure(err):
            raise
        raise UserError(write_failure_message(f"the final adapter into {out}", err, out)) from None
    finally:
        end_distributed()
    logger.info("adapter saved to %s (reward reused from the KL pass in %d of the reward calls)",
                out, trainer.reference_reuses)
    return out
