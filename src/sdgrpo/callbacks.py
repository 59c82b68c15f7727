"""Trainer callbacks shared by ``train`` and ``sft``: stop requests (Ctrl-C, non-finite loss), the metrics file, and
the held-out evaluation during training and the two helpers that set it up and finish it (the collapse guard is in
``guard.py``).

``HeldoutEval`` scores the true continuations of the prepared ``test`` split under the policy (adapters on) every
N steps and reports bits per UTF-8 byte of continuation text as ``heldout/bpb`` (into TRL's metrics, so it reaches
metrics.jsonl and TensorBoard with the step's other figures). It also scores the model before the first step, and
can keep the adapter with the lowest figure (``best_heldout/``) for the run to end with.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
from pathlib import Path

from transformers import TrainerCallback

from sdgrpo.checkpointing import copy_adapter
from sdgrpo.errors import UserError
from sdgrpo.scoring import completion_logprobs, pad_id

logger = logging.getLogger(__name__)

BEST_DIR = "best_heldout"
STATE_FILE = "heldout_state.json"  # in each checkpoint folder
# The best adapter's weights as a checkpoint keeps them (in its BEST_DIR): not under PEFT's name, because
# transformers' resume (Trainer._load_from_checkpoint) loads every sub-folder holding an `adapter_model.safetensors`
# as one more adapter and then skips the checkpoint's own: the trained adapter would restart from its initial values.
STORED_WEIGHTS = "best_adapter.safetensors"


def continuation_bits_per_byte(model, tokenizer, prompt_ids: list[list[int]], cont_ids: list[list[int]],
                               nbytes: int) -> float:
    """Summed NLL (bits) of the continuation ids given their prompts, per UTF-8 byte of continuation text."""
    pad = pad_id(tokenizer)
    logps = completion_logprobs(model, prompt_ids, cont_ids, pad_token_id=pad)
    return -sum(lp.sum().item() for lp in logps) / math.log(2) / nbytes


class HeldoutEval(TrainerCallback):
    def __init__(self, dataset, tokenizer, every: int, output_dir: str | Path, keep_best: bool = False,
                 prompts: int = 64):
        rows = dataset.select(range(min(prompts, len(dataset))))
        self.tokenizer = tokenizer
        self.prompt_ids = tokenizer(list(rows["prompt"]))["input_ids"]
        # The continuation is tokenized on its own, after the prompt's ids (as `sdgrpo eval` scores it).
        self.cont_ids = tokenizer(list(rows["continuation"]), add_special_tokens=False)["input_ids"]
        self.nbytes = sum(len(c.encode("utf-8")) for c in rows["continuation"])
        self.every, self.keep_best = every, keep_best
        self.output_dir = Path(output_dir)
        self.trainer = None  # set once the trainer exists: metrics go into its TRL metric store
        self.history: list[dict] = []
        self.best: tuple[int, float] | None = None

    def evaluate(self, model) -> float:
        return continuation_bits_per_byte(model, self.tokenizer, self.prompt_ids, self.cont_ids, self.nbytes)

    def _record(self, args, state, model) -> float:
        value = self.evaluate(model)
        self.history.append({"step": state.global_step, "heldout_bpb": value})
        if self.keep_best and (self.best is None or value < self.best[1]):
            self.best = (state.global_step, value)
            if args.should_save:
                model.save_pretrained(self.output_dir / BEST_DIR)
        logger.debug("step %d: held-out %.4f bits per byte", state.global_step, value)  # the step line has it
        return value

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.every and not self.history:
            self._record(args, state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        # The run's last step (--max_steps) is measured too, whatever N is: else a run shorter than N steps, or the
        # steps after the last multiple of N, would never be a candidate for --keep_best_heldout. A run stopped
        # before it (the collapse guard, a NaN, Ctrl-C) is not: its last adapter is what the stop is about.
        last = state.max_steps > 0 and state.global_step >= state.max_steps
        if not self.every or (state.global_step % self.every and not last):
            return
        value = self._record(args, state, model)
        if self.trainer is not None:
            self.trainer._metrics["train"]["heldout/bpb"].append(value)
            control.should_log = True

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"history": self.history, "best": self.best, "prompts": len(self.prompt_ids),
                                          "continuation_bytes": self.nbytes}, indent=2))

    def save_state(self, folder: str | Path) -> None:
        """Into a checkpoint folder: the history so far, the best step, and (``keep_best``) a copy of the best
        adapter as it was at this checkpoint (its weights as ``STORED_WEIGHTS``), so that a resumed run continues
        the same record and ends with the same adapter (a best found after the last checkpoint belongs to steps that
        the resumed run makes again)."""
        folder = Path(folder)
        (folder / STATE_FILE).write_text(json.dumps({"history": self.history, "best": self.best}, indent=2))
        best = self.output_dir / BEST_DIR
        if self.keep_best and (best / "adapter_model.safetensors").is_file():
            (folder / BEST_DIR).mkdir(exist_ok=True)
            shutil.copy2(best / "adapter_model.safetensors", folder / BEST_DIR / STORED_WEIGHTS)
            shutil.copy2(best / "adapter_config.json", folder / BEST_DIR / "adapter_config.json")

    def load_state(self, folder: str | Path) -> bool:
        """Restore what :meth:`save_state` wrote (the best adapter back into ``output_dir``); False when the
        checkpoint holds none."""
        folder = Path(folder)
        path = folder / STATE_FILE
        if not path.is_file():
            return False
        data = json.loads(path.read_text())
        self.history = data["history"]
        self.best = tuple(data["best"]) if data["best"] is not None else None
        stored = folder / BEST_DIR
        if (stored / "adapter_model.safetensors").is_file():  # sdgrpo's own earlier layout, renamed (STORED_WEIGHTS)
            logger.info("%s: the best held-out adapter's weights renamed to %s, so that resuming loads the "
                        "checkpoint's own adapter", stored, STORED_WEIGHTS)
            with contextlib.suppress(FileNotFoundError):  # another process renamed it first
                os.replace(stored / "adapter_model.safetensors", stored / STORED_WEIGHTS)
        best = self.output_dir / BEST_DIR
        if (stored / STORED_WEIGHTS).is_file():
            best.mkdir(parents=True, exist_ok=True)
            shutil.copy2(stored / STORED_WEIGHTS, best / "adapter_model.safetensors")
            shutil.copy2(stored / "adapter_config.json", best / "adapter_config.json")
        elif best.is_dir():
            shutil.rmtree(best)  # written after the checkpoint, by steps the resumed run makes again
        return True


class StopRequest(TrainerCallback):
    """Stops training cleanly at the end of the current step, saving a checkpoint: for Ctrl-C, SIGTERM and NaN
    losses."""

    def __init__(self):
        self.reason: str | None = None
        self.exit_code: int | None = None  # a signal's: 128 + its number
        self.fatal = False  # the model itself is broken (non-finite): keep no checkpoint of it

    def request(self, reason: str, exit_code: int | None = None) -> None:
        if self.reason is None:
            self.reason, self.exit_code = reason, exit_code

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Trainer's logging_nan_inf_filter hides a NaN loss from the logs; the gradient norm still shows it.
        for name in ("loss", "grad_norm"):
            value = (logs or {}).get(name)
            if isinstance(value, float) and not math.isfinite(value):
                self.request(f"the loss became non-finite ({name} {value}) at step {state.global_step}")
                self.fatal = True
                break
        if self.fatal:
            control.should_training_stop = True
            control.should_save = False  # no checkpoint of a non-finite model

    def on_step_end(self, args, state, control, **kwargs):
        if self.reason and not self.fatal:
            control.should_save = True
            control.should_training_stop = True


class MetricsFileCallback(TrainerCallback):
    """Append every log record (with its step) to ``metrics.jsonl`` on the main process."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step}
        for key, value in logs.items():
            if isinstance(value, (int, float)):
                record[key] = value if math.isfinite(value) else None
            elif isinstance(value, str):
                record[key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    """The training-step records of a ``metrics.jsonl`` (records with a reward), in order."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in rows if "reward" in r]


def heldout_callback(cfg, tokenizer, out: Path):
    """The held-out evaluation callback (``--heldout_eval_steps``) on the prepared test split, or None."""
    if not cfg.heldout_eval_steps:
        if cfg.keep_best_heldout:
            raise UserError("--keep_best_heldout needs --heldout_eval_steps N")
        return None
    from sdgrpo.data import load_prompts

    test = load_prompts(cfg.dataset_path, "test")
    if "continuation" not in test.column_names:
        raise UserError(f"{cfg.dataset_path}: the held-out evaluation needs a 'continuation' column; make the data "
                        "with `sdgrpo prepare`")
    return HeldoutEval(test, tokenizer, cfg.heldout_eval_steps, out, cfg.keep_best_heldout, cfg.heldout_eval_prompts)


def keep_best_heldout(heldout, out: Path, trainer) -> None:
    """Write heldout.json; with --keep_best_heldout, make the best adapter by held-out bits per byte the final one."""
    if not trainer.args.should_save:
        return
    heldout.write(out / "heldout.json")
    if heldout.keep_best and heldout.best and (out / BEST_DIR / "adapter_model.safetensors").is_file():
        copy_adapter(out / BEST_DIR, out)
        step, value = heldout.best
        if step == 0 and len(heldout.history) > 1:
            logger.warning("final adapter: the one of step %d, as training began: no later step beat its held-out "
                           "%.4f bits per byte (last: %.4f at step %d), so the adapter saved is the untrained one, "
                           "which changes nothing; train longer or at a lower --learning_rate, or set "
                           "--keep_best_heldout false to keep the last adapter",
                           step, value, heldout.history[-1]["heldout_bpb"], heldout.history[-1]["step"])
        else:
            logger.info("final adapter: the one of step %d, lowest held-out bits per byte (%.4f)", step, value)
