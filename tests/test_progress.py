"""The terminal of train, sft and demo (sdgrpo.progress): one compact line per logging step, the whole record with
--log_level debug."""

from __future__ import annotations

import pytest
from transformers import TrainingArguments
from transformers.trainer_callback import TrainerControl, TrainerState

from sdgrpo.progress import WIDTH, CompactProgress, compact_line

GRPO = {"loss": 1.7e-07, "grad_norm": 1.416, "reward": -3.3341, "reward_std": 0.4659, "kl": 9.684e-06,
        "entropy": 3.4461, "collapse/distinct_2": 0.99166, "completions/mean_length": 16.0, "epoch": 0.07}


def test_a_grpo_line_holds_what_a_run_is_watched_by():
    assert compact_line(GRPO, 2, 80, 7.0581) == \
        "step 2/80  reward -3.334  kl 9.68e-06  entropy 3.45  distinct-2 0.992  7.06 s/step"
    sft = {"loss": 4.6081, "entropy": 3.18, "heldout/bpb": 1.57094, "mean_token_accuracy": 0.2}
    assert compact_line(sft, 3, 3, None) == "step 3/3  loss 4.608  heldout/bpb 1.5709  entropy 3.18"


def test_a_line_keeps_to_the_width_dropping_the_optional_fields_from_the_end():
    logs = {**GRPO, **{f"domain_{i}/bpb": 1.0 + i / 10 for i in range(8)}}
    line = compact_line(logs, 123456, 123456, 12.3)
    untrimmed = 8 * len("  domain_0/bpb 1.0000") + len(compact_line(GRPO, 123456, 123456, 12.3))
    assert len(line) <= WIDTH < untrimmed
    assert line.startswith("step 123456/123456  reward -3.334  kl 9.68e-06  domain_0/bpb 1.0000")
    assert line.endswith("12.30 s/step") and "distinct-2" not in line


@pytest.mark.parametrize("level", ["passive", "debug"])
def test_debug_prints_the_whole_record_else_the_line(tmp_path, capsys, level):
    args = TrainingArguments(output_dir=str(tmp_path), log_level=level, disable_tqdm=True, report_to="none")
    state, control = TrainerState(max_steps=4), TrainerControl()
    progress = CompactProgress()
    progress.on_train_begin(args, state, control)
    state.global_step = 2
    progress.on_log(args, state, control, logs=dict(GRPO))
    out = capsys.readouterr().out
    if level == "debug":
        assert "'completions/mean_length': '16'" in out and "'reward_std': '0.4659'" in out
    else:
        assert out.startswith("step 2/4  reward -3.334  kl 9.68e-06  entropy 3.45  distinct-2 0.992  ")
        assert out.rstrip().endswith(" s/step") and out.count("\n") == 1
    progress.on_train_end(args, state, control)
