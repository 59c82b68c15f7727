"""Training callbacks (sdgrpo.callbacks): the metrics file and the held-out bits per byte."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import torch

from conftest import make_llama, reference_logps
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
