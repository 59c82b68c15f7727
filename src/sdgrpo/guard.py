"""Collapse guard: a trainer callback that compares the collapse metrics with their values at the start of the run.

Trips when seq-rep-4 rises by more than ``max_seq_rep_increase`` (absolute) or distinct-2 falls by more than
``max_distinct2_drop`` (relative), ``patience`` logged steps in a row. Actions: ``warn``; ``stop``; ``restore`` (stop,
and the run's final adapter is the last checkpoint saved while the metrics were within limits).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transformers import TrainerCallback

logger = logging.getLogger(__name__)

ACTIONS = ("off", "warn", "stop", "restore")


@dataclass
class GuardState:
    baseline: dict = field(default_factory=dict)
    strikes: int = 0
    tripped_at: int | None = None
    reason: str | None = None
    good_checkpoints: list = field(default_factory=list)  # (step, path) saved while within limits
    last_good_step: int | None = None


class CollapseGuard(TrainerCallback):
    def __init__(self, action: str = "restore", max_seq_rep_increase: float = 0.1, max_distinct2_drop: float = 0.3,
                 patience: int = 2, baseline_steps: int = 1):
        if action not in ACTIONS:
            raise ValueError(f"collapse_guard must be one of {ACTIONS}, not {action!r}")
        self.action = action
        self.max_seq_rep_increase = max_seq_rep_increase
        self.max_distinct2_drop = max_distinct2_drop
        self.patience = patience
        self.baseline_steps = baseline_steps
        self.state = GuardState()
        self._seen: list[dict] = []

    def check(self, logs: dict) -> str | None:
        """The reason the metrics in ``logs`` are out of limits, or None."""
        rep, d2 = logs.get("collapse/seq_rep_4"), logs.get("collapse/distinct_2")
        base = self.state.baseline
        if rep is not None and "seq_rep_4" in base and rep - base["seq_rep_4"] > self.max_seq_rep_increase:
            return (f"seq_rep_4 rose from {base['seq_rep_4']:.3f} to {rep:.3f} "
                    f"(limit +{self.max_seq_rep_increase:g})")
        if d2 is not None and base.get("distinct_2") and d2 < base["distinct_2"] * (1 - self.max_distinct2_drop):
            return (f"distinct_2 fell from {base['distinct_2']:.3f} to {d2:.3f} "
                    f"(limit -{self.max_distinct2_drop:.0%})")
        return None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.action == "off" or not logs or "collapse/seq_rep_4" not in logs:
            return
        if len(self._seen) < self.baseline_steps:
            self._seen.append(logs)
            keys = ("seq_rep_4", "distinct_2")
            self.state.baseline = {k: sum(s[f"collapse/{k}"] for s in self._seen) / len(self._seen) for k in keys}
            self.state.last_good_step = state.global_step
            return
        reason = self.check(logs)
        if reason is None:
            self.state.strikes = 0
            self.state.last_good_step = state.global_step
            return
        self.state.strikes += 1
        logger.warning("collapse guard, step %d: %s", state.global_step, reason)
        if self.state.strikes >= self.patience and self.action in ("stop", "restore") and not self.state.tripped_at:
            self.state.tripped_at, self.state.reason = state.global_step, reason
            control.should_training_stop = True

    def on_save(self, args, state, control, **kwargs):
        if self.state.tripped_at is None and self.state.strikes == 0:
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            self.state.good_checkpoints.append((state.global_step, str(path)))

    def good_checkpoint(self) -> tuple[int, str] | None:
        existing = [(s, p) for s, p in self.state.good_checkpoints if Path(p).is_dir()]
        return existing[-1] if existing else None

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"action": self.action, **asdict(self.state)}, indent=2))
