"""The collapse guard's decisions, and `sdgrpo eval` end to end on the shipped tiny model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from transformers import TrainerControl, TrainerState, TrainingArguments

from sdgrpo.guard import CollapseGuard


def feed(guard, rows, tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    state, control = TrainerState(), TrainerControl()
    for step, (rep, d2) in enumerate(rows, 1):
        state.global_step = step
        guard.on_log(args, state, control, logs={"collapse/seq_rep_4": rep, "collapse/distinct_2": d2})
        (tmp_path / f"checkpoint-{step}").mkdir(parents=True, exist_ok=True)
        guard.on_save(args, state, control)
        if control.should_training_stop:
            break
    return control


def test_guard_trips_on_repetition_after_patience(tmp_path):
    guard = CollapseGuard("restore", max_seq_rep_increase=0.1, max_distinct2_drop=0.3, patience=2)
    control = feed(guard, [(0.01, 0.9), (0.05, 0.88), (0.2, 0.85), (0.03, 0.85), (0.15, 0.8), (0.3, 0.7)], tmp_path)
    assert control.should_training_stop
    assert guard.state.tripped_at == 6 and guard.state.reason.startswith("seq_rep_4 rose from 0.010 to 0.300")
    assert guard.good_checkpoint()[0] == 4  # steps 3 and 5 were out of limits, 6 tripped


def test_guard_trips_on_diversity_and_warn_only_warns(tmp_path):
    rows = [(0.0, 0.9), (0.0, 0.6), (0.0, 0.5)]
    guard = CollapseGuard("stop", patience=2)
    assert feed(guard, rows, tmp_path / "a").should_training_stop
    assert "distinct_2 fell from 0.900 to 0.500 (limit -30%)" == guard.state.reason
    warn = CollapseGuard("warn", patience=1)
    assert not feed(warn, rows, tmp_path / "b").should_training_stop and warn.state.tripped_at is None


@pytest.fixture
def prepared_demo(tmp_path):
    from sdgrpo.demo import DEMO_TEXT

    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "sdgrpo.cli", "prepare", DEMO_TEXT, "--output", out,
                        "--min_prompt_tokens", "8", "--max_prompt_tokens", "20", "--continuation_tokens", "16",
                        "--test_size", "0.2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return out


def test_eval_base_only_writes_report(tmp_path, prepared_demo):
    r = subprocess.run([sys.executable, "-m", "sdgrpo.cli", "eval", "--data", prepared_demo, "--output",
                        tmp_path / "e", "--samples", "2", "--max_new_tokens", "8", "--temperatures", "1.0,0.5"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "e" / "eval.json").read_text())
    temps = result["base"]["temperatures"]
    assert set(temps) == {"1.0", "0.5"}
    assert temps["0.5"]["reward_mean"] > temps["1.0"]["reward_mean"]  # colder sampling: more likely text
    ppl = result["base"]["continuation_nll"]
    assert ppl["perplexity"] == pytest.approx(2.718281828 ** ppl["nll_per_token"])
    assert (tmp_path / "e" / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    assert "| base, T=0.5 |" in (tmp_path / "e" / "report.md").read_text()
