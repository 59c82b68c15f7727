"""Training callbacks (sdgrpo.callbacks): the metrics file and the held-out bits per byte."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from conftest import make_llama, reference_logps, with_lora
from sdgrpo.callbacks import MetricsFileCallback, continuation_bits_per_byte, read_metrics


def test_metrics_file_keeps_numbers_and_strings_and_nulls_what_is_not_finite(tmp_path):
    cb = MetricsFileCallback(tmp_path / "m" / "metrics.jsonl")
    state = SimpleNamespace(global_step=3, is_world_process_zero=True)
    cb.on_log(None, state, None, logs={"reward": -2.5, "kl": float("nan"), "note": "x", "skip": [1]})
    cb.on_log(None, SimpleNamespace(global_step=4, is_world_process_zero=False), None, logs={"reward": 1.0})
    cb.on_log(None, SimpleNamespace(global_step=4, is_world_process_zero=True), None, logs={"train_runtime": 9.0})
    lines = [json.loads(x) for x in (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 3, "reward": -2.5, "kl": None, "note": "x"}, {"step": 4, "train_runtime": 9.0}]
    assert read_metrics(tmp_path / "m" / "metrics.jsonl") == lines[:1]


def test_continuation_bits_per_byte_by_hand(tiny_tokenizer):
    model = make_llama(tiny_tokenizer, seed=4)
    prompts = [[tiny_tokenizer.bos_token_id, 40, 41, 42], [tiny_tokenizer.bos_token_id, 50]]
    conts = [[60, 61], [70, 71, 72]]
    nats = -sum(reference_logps(model, p, c).sum().item() for p, c in zip(prompts, conts))
    got = continuation_bits_per_byte(model, tiny_tokenizer, prompts, conts, nbytes=17)
    assert math.isclose(got, nats / math.log(2) / 17, rel_tol=1e-6)
    assert torch.is_grad_enabled()  # scoring does not leave gradients off


@pytest.mark.parametrize("layout", ["current", "earlier"])
def test_resume_loads_the_checkpoints_own_adapter_not_the_best_kept_beside_it(layout, tmp_path, tiny_tokenizer):
    """transformers' resume (``Trainer._load_from_checkpoint``, run here on a real checkpoint folder) loads every
    sub-folder holding ``adapter_model.safetensors`` as one more adapter, and then not the checkpoint's own. The
    best held-out adapter kept in each checkpoint is stored under another name; in a checkpoint of sdgrpo's earlier
    layout (PEFT's name) ``load_state``, which runs before the trainer resumes, renames it. Either way the trainer
    resumes with the checkpoint's adapter as its only one, and ``best_heldout/`` gets the best adapter back."""
    from datasets import Dataset
    from safetensors.torch import load_file
    from transformers import Trainer, TrainingArguments

    from sdgrpo.callbacks import BEST_DIR, STORED_WEIGHTS, HeldoutEval

    out, ckpt = tmp_path / "run", tmp_path / "run" / "checkpoint-4"
    trained, best = (with_lora(make_llama(tiny_tokenizer, seed=5), 0.3, seed=s) for s in (1, 2))
    trained.save_pretrained(ckpt)
    best.save_pretrained(out / BEST_DIR)
    rows = Dataset.from_dict({"prompt": ["In the beginning"], "continuation": [" God created"]})
    heldout = HeldoutEval(rows, tiny_tokenizer, 2, out, keep_best=True)
    heldout.history, heldout.best = [{"step": 0, "heldout_bpb": 3.5}], (0, 3.5)
    heldout.save_state(ckpt)
    if layout == "earlier":  # as sdgrpo wrote checkpoints before: PEFT's own file names
        (ckpt / BEST_DIR / STORED_WEIGHTS).rename(ckpt / BEST_DIR / "adapter_model.safetensors")
    want_best = (out / BEST_DIR / "adapter_model.safetensors").read_bytes()
    (out / BEST_DIR / "adapter_model.safetensors").unlink()  # written after the checkpoint: not the one to keep

    resumed = HeldoutEval(rows, tiny_tokenizer, 2, out, keep_best=True)
    assert resumed.load_state(ckpt) and resumed.best == (0, 3.5)
    assert (out / BEST_DIR / "adapter_model.safetensors").read_bytes() == want_best
    model = with_lora(make_llama(tiny_tokenizer, seed=5), 0.0, seed=3)
    model.train()
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path / "t"), use_cpu=True,
                                                          report_to=[]))
    trainer._load_from_checkpoint(str(ckpt))
    assert set(model.peft_config) == {"default"}
    saved = load_file(ckpt / "adapter_model.safetensors")
    state = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in saved)


def test_heldout_measures_every_nth_step_and_the_last_but_not_a_step_a_stop_ended_on(tmp_path, tiny_tokenizer):
    """Every N steps and at --max_steps; a run stopped before it (the collapse guard, a NaN, Ctrl-C) ends at a step
    that is not measured, so its last adapter (what the stop is about) never becomes the best."""
    from datasets import Dataset
    from transformers import TrainerControl

    from sdgrpo.callbacks import HeldoutEval

    rows = Dataset.from_dict({"prompt": ["In the beginning"], "continuation": [" God created"]})
    heldout = HeldoutEval(rows, tiny_tokenizer, 4, tmp_path, keep_best=True)
    model = with_lora(make_llama(tiny_tokenizer, seed=5), 0.3, seed=1)
    args = SimpleNamespace(should_save=False)
    for step in range(1, 11):
        heldout.on_step_end(args, SimpleNamespace(global_step=step, max_steps=10), TrainerControl(), model=model)
    assert [h["step"] for h in heldout.history] == [4, 8, 10]
    stopped = HeldoutEval(rows, tiny_tokenizer, 50, tmp_path, keep_best=True)
    for step in range(1, 8):  # stopped at step 7 of 10
        stopped.on_step_end(args, SimpleNamespace(global_step=step, max_steps=10), TrainerControl(), model=model)
    assert stopped.history == []
