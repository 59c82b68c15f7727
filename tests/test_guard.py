"""The collapse guard's decisions, its missing-metric handling and its state across a resume."""

from __future__ import annotations

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


def feed_logs(guard, rows, tmp_path, start: int = 1):
    """Feed log records (dicts of collapse metrics, without the prefix) as consecutive steps."""
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    state, control = TrainerState(), TrainerControl()
    for step, row in enumerate(rows, start):
        state.global_step = step
        guard.on_log(args, state, control, logs={f"collapse/{k}": v for k, v in row.items()})
        if control.should_training_stop:
            break
    return control


def test_guard_copes_with_missing_metrics_and_sees_a_collapse_to_eos_only(tmp_path):
    guard = CollapseGuard("stop", patience=2)
    # Step 1: no completion had two content tokens, so distinct-2 is missing; the baseline forms from what exists.
    rows = [{"seq_rep_4": 0.0, "length": 12.0}, {"seq_rep_4": 0.0, "distinct_2": 0.9, "length": 11.0},
            {"seq_rep_4": 0.0, "distinct_2": 0.88, "length": 2.5}, {"seq_rep_4": 0.0, "length": 1.0}]
    control = feed_logs(guard, rows, tmp_path)
    assert guard.state.baseline == {"seq_rep_4": 0.0, "length": 12.0, "distinct_2": 0.9}
    assert control.should_training_stop and guard.state.tripped_at == 4
    assert guard.state.reason == "mean completion length fell from 12.0 to 1.0 tokens (limit 25% of the start)"


def test_guard_state_survives_a_resume(tmp_path):
    drifting = [{"seq_rep_4": 0.0, "distinct_2": 0.9, "length": 10.0}, {"seq_rep_4": 0.05, "distinct_2": 0.8,
                "length": 10.0}, {"seq_rep_4": 0.12, "distinct_2": 0.7, "length": 10.0},
                {"seq_rep_4": 0.14, "distinct_2": 0.66, "length": 10.0}]
    first = CollapseGuard("restore", patience=2)
    feed_logs(first, drifting[:2], tmp_path)
    (tmp_path / "checkpoint-2").mkdir()
    first.save_state(tmp_path / "checkpoint-2")
    resumed, fresh = CollapseGuard("restore", patience=2), CollapseGuard("restore", patience=2)
    assert resumed.load_state(tmp_path / "checkpoint-2") and not fresh.load_state(tmp_path)
    assert feed_logs(resumed, drifting[2:], tmp_path, start=3).should_training_stop
    assert resumed.state.reason.startswith("seq_rep_4 rose from 0.000 to 0.140")
    # Without the saved state the resumed run would take the drifted step 3 as its baseline and never trip.
    assert not feed_logs(fresh, drifting[2:], tmp_path, start=3).should_training_stop
