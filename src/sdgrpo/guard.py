"""Collapse guard: a trainer callback that compares the collapse metrics with their values at the start of the run.

Trips when seq-rep-4 rises by more than ``max_seq_rep_increase`` (absolute), distinct-2 falls by more than
``max_distinct2_drop`` (relative), or the mean completion length falls below ``min_length_fraction`` of its start value
(a collapse to empty or EOS-only completions, which the text metrics cannot see), or, with ``max_heldout_increase``,
the held-out bits per byte (``heldout/bpb``) rise by more than that fraction of their first value, ``patience`` logged
steps in a row.
A metric missing from a step (e.g. distinct-2 when no completion has two content tokens) is not judged that step.
Actions: ``warn``; ``stop``; ``restore`` (stop, and the run's final adapter is the last checkpoint saved while the
metrics were within limits). Its state is saved in every checkpoint (``guard_state.json``) and reloaded on resume.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transformers import TrainerCallback

logger = logging.getLogger(__name__)

STATE_FILE = "guard_state.json"
METRICS = ("seq_rep_4", "distinct_2", "length")

ACTIONS = ("off", "warn", "stop", "restore")


@dataclass
class GuardState:
    baseline: dict = field(default_factory=dict)  # metric -> mean over the first baseline_steps steps that had it
    baseline_counts: dict = field(default_factory=dict)  # metric -> steps averaged into baseline
    strikes: int = 0
    tripped_at: int | None = None
    reason: str | None = None
    good_checkpoints: list = field(default_factory=list)  # (step, path) saved while within limits
    last_good_step: int | None = None


class CollapseGuard(TrainerCallback):
    def __init__(self, action: str = "restore", max_seq_rep_increase: float = 0.1, max_distinct2_drop: float = 0.3,
                 patience: int = 2, baseline_steps: int = 1, min_length_fraction: float = 0.25,
                 max_heldout_increase: float = 0.0):
        if action not in ACTIONS:
            raise ValueError(f"collapse_guard must be one of {ACTIONS}, not {action!r}")
        self.action = action
        self.max_seq_rep_increase = max_seq_rep_increase
        self.max_distinct2_drop = max_distinct2_drop
        self.min_length_fraction = min_length_fraction
        self.max_heldout_increase = max_heldout_increase
        self.patience = patience
        self.baseline_steps = baseline_steps
        self.state = GuardState()

    def check(self, logs: dict) -> str | None:
        """The reason the metrics in ``logs`` are out of limits, or None (metrics missing from either side pass)."""
        rep, d2, length = (logs.get(f"collapse/{k}") for k in METRICS)
        base = self.state.baseline
        if rep is not None and "seq_rep_4" in base and rep - base["seq_rep_4"] > self.max_seq_rep_increase:
            return (f"seq_rep_4 rose from {base['seq_rep_4']:.3f} to {rep:.3f} "
                    f"(limit +{self.max_seq_rep_increase:g})")
        if d2 is not None and base.get("distinct_2") and d2 < base["distinct_2"] * (1 - self.max_distinct2_drop):
            return (f"distinct_2 fell from {base['distinct_2']:.3f} to {d2:.3f} "
                    f"(limit -{self.max_distinct2_drop:.0%})")
        if length is not None and base.get("length") and length < base["length"] * self.min_length_fraction:
            return (f"mean completion length fell from {base['length']:.1f} to {length:.1f} tokens "
                    f"(limit {self.min_length_fraction:.0%} of the start)")
        held = logs.get("heldout/bpb")
        if (self.max_heldout_increase and held is not None and "heldout_bpb" in base
                and held > base["heldout_bpb"] * (1 + self.max_heldout_increase)):
            return (f"held-out bits per byte rose from {base['heldout_bpb']:.4f} to {held:.4f} "
                    f"(limit +{self.max_heldout_increase:.0%})")
        return None

    def _add_to_baseline(self, logs: dict) -> bool:
        """Average this step into the baseline of each metric that has fewer than ``baseline_steps`` values;
        True while any metric's baseline is still being formed from this step."""
        used = False
        for key in (*METRICS, "heldout_bpb"):
            name = "heldout/bpb" if key == "heldout_bpb" else f"collapse/{key}"
            value, n = logs.get(name), self.state.baseline_counts.get(key, 0)
            if value is None or n >= self.baseline_steps:
                continue
            self.state.baseline[key] = (self.state.baseline.get(key, 0.0) * n + value) / (n + 1)
            self.state.baseline_counts[key] = n + 1
            used = True
        return used

    def on_log(self, args, state, control, logs=None, **kwargs):
        watched = [f"collapse/{k}" for k in METRICS] + ["heldout/bpb"]
        if self.action == "off" or not logs or not any(k in logs for k in watched):
            return
        if self._add_to_baseline(logs) and self.check(logs) is None:
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

    def save_state(self, folder: str | Path) -> None:
        """Write the guard's state into a checkpoint folder (plain JSON)."""
        (Path(folder) / STATE_FILE).write_text(json.dumps(asdict(self.state), indent=2))

    def load_state(self, folder: str | Path) -> bool:
        """Restore the state saved in a checkpoint folder; False when it holds none (a checkpoint of an older run)."""
        path = Path(folder) / STATE_FILE
        if not path.is_file():
            return False
        data = json.loads(path.read_text())
        # by name in this checkpoint's run folder: the folder may have moved since they were saved
        data["good_checkpoints"] = [(step, str(Path(folder).parent / Path(path).name))
                                    for step, path in data.get("good_checkpoints", [])]
        self.state = GuardState(**data)
        return True

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"action": self.action, **asdict(self.state)}, indent=2))
