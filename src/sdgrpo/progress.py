"""The terminal of ``train``, ``sft`` and ``demo``: one progress bar per run and one compact line per logging step.

transformers' Trainer prints every log record whole, ~60 keys a step under GRPO (``ProgressCallback.on_log``, or
``PrinterCallback`` with ``--disable_tqdm``). :func:`quiet_terminal` puts :class:`CompactProgress` in their place: the
same tqdm bar, and at each logging step one line of at most :data:`WIDTH` columns with what a run is watched by
(:func:`compact_line`: step, reward and KL or the loss, any bits per byte measured, entropy, distinct-2, seconds per
step). The whole records still go to ``metrics.jsonl`` (:class:`sdgrpo.callbacks.MetricsFileCallback`) and TensorBoard.
``--log_level debug`` (or ``detail``) prints the whole records as transformers does. :func:`one_bar` turns off the
other libraries' bars (transformers' "Loading weights", datasets' map and save) so that the training bar is the one.
"""

from __future__ import annotations

import math
import time

from transformers.trainer_callback import PrinterCallback, ProgressCallback

WIDTH = 120  # columns a compact line may take
FULL = ("debug", "detail")  # --log_level values that print the whole records


def _num(value, fmt: str) -> str:
    return fmt.format(value) if isinstance(value, (int, float)) and math.isfinite(value) else str(value)


def compact_line(logs: dict, step: int, max_steps: int, seconds_per_step: float | None) -> str:
    """One line of a log record: ``step N/M``, then reward and KL (GRPO) or the loss (SFT), every ``.../bpb``
    figure measured at this step (held-out text, a domain), entropy, distinct-2, seconds per optimizer step; fields
    the record lacks are left out, and the optional ones from the end until the line fits :data:`WIDTH`."""
    parts = [f"step {step}/{max_steps}"]
    if "reward" in logs:
        parts.append(f"reward {_num(logs['reward'], '{:.4g}')}")
        if "kl" in logs:
            parts.append(f"kl {_num(logs['kl'], '{:.3g}')}")
    elif "loss" in logs:
        parts.append(f"loss {_num(logs['loss'], '{:.4g}')}")
    optional = [f"{key} {_num(value, '{:.4f}')}" for key, value in logs.items() if key.endswith("bpb")]
    if "entropy" in logs:
        optional.append(f"entropy {_num(logs['entropy'], '{:.3g}')}")
    if "collapse/distinct_2" in logs:
        optional.append(f"distinct-2 {_num(logs['collapse/distinct_2'], '{:.3f}')}")
    tail = [f"{seconds_per_step:.2f} s/step"] if seconds_per_step is not None else []
    while optional and len("  ".join(parts + optional + tail)) > WIDTH:
        optional.pop()
    return "  ".join(parts + optional + tail)


class CompactProgress(ProgressCallback):
    """transformers' ProgressCallback (the bar, on the main process) with a compact line per log record instead of
    the whole record (:func:`compact_line`); without a bar (``--disable_tqdm``) the line is printed alone.

    Reads and sets ProgressCallback's own attributes ``training_bar`` and ``current_step`` (pinned in
    tests/test_private_api.py)."""

    def __init__(self):
        super().__init__()
        self.last: tuple[int, float] | None = None  # (step, time) of the last line

    def on_train_begin(self, args, state, control, **kwargs):
        if not args.disable_tqdm:
            super().on_train_begin(args, state, control, **kwargs)
        self.current_step = state.global_step  # a resumed run's bar counts from its checkpoint
        if self.training_bar is not None:
            self.training_bar.update(state.global_step)
        self.last = (state.global_step, time.monotonic())

    def on_step_end(self, args, state, control, **kwargs):
        if self.training_bar is not None:
            super().on_step_end(args, state, control, **kwargs)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if args.log_level in FULL:
            if self.training_bar is not None:
                return super().on_log(args, state, control, logs=logs, **kwargs)
            return PrinterCallback().on_log(args, state, control, logs=dict(logs), **kwargs)
        if "train_runtime" in logs:  # the run's summary record
            line = f"trained to step {state.global_step}/{state.max_steps} in {logs['train_runtime']:.0f} s"
        else:
            now, per_step = time.monotonic(), None
            if self.last is not None and state.global_step > self.last[0]:
                per_step = (now - self.last[1]) / (state.global_step - self.last[0])
                self.last = (state.global_step, now)
            line = compact_line(logs, state.global_step, state.max_steps, per_step)
        if self.training_bar is not None:
            self.training_bar.write(line)
        else:
            print(line, flush=True)


    def on_train_end(self, args, state, control, **kwargs):
        if self.training_bar is not None:
            super().on_train_end(args, state, control, **kwargs)


def quiet_terminal(trainer) -> None:
    """Give ``trainer`` a :class:`CompactProgress` in place of transformers' progress or printer callback."""
    trainer.pop_callback(ProgressCallback)
    trainer.pop_callback(PrinterCallback)
    trainer.add_callback(CompactProgress())


def one_bar(log_level: str) -> None:
    """Turn off transformers' and datasets' own progress bars (weights loading, dataset map and save) for this
    process, so that the training bar is the run's one; kept with ``--log_level debug`` or ``detail``."""
    if log_level in FULL:
        return
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
