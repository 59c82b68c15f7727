"""Checkpoints: safetensors + JSON state, the completion marker, resume checks, and the Trainer overrides.

transformers' Trainer saves optimizer, scheduler and RNG state with ``torch.save`` (``optimizer.pt``,
``scheduler.pt``, ``rng_state.pth``). sdgrpo writes ``optimizer.safetensors`` + ``optimizer.json``,
``scheduler.json`` and ``rng_state[_R].safetensors`` + ``rng_state[_R].json``, so no checkpoint that sdgrpo writes
holds a pickle, and marks a checkpoint folder complete only once every process has written its files.

:class:`CheckpointMixin` overrides private methods of transformers' ``Trainer`` (pinned: transformers 5.17) and of
TRL's ``GRPOTrainer`` (pinned: trl 1.15.0), whose signatures tests/test_private_api.py checks:
``_save_checkpoint(model, trial)``, ``_save_optimizer_and_scheduler(output_dir)``,
``_load_optimizer_and_scheduler(checkpoint)``, ``_save_rng_state(output_dir)``, ``_load_rng_state(checkpoint)``; it
calls ``_get_output_dir(trial=...)``. DeepSpeed and FSDP keep their own (pickled) formats.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from sdgrpo.errors import UserError
from sdgrpo.textio import write_atomic


def _jsonable(value):
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def save_optimizer(state_dict: dict, folder: str | Path) -> None:
    tensors, meta = {}, {"param_groups": _jsonable(state_dict["param_groups"]), "state": {}}
    for pid, entries in state_dict["state"].items():
        meta["state"][str(pid)] = {}
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}/{key}"] = value.detach().contiguous().cpu()
                meta["state"][str(pid)][key] = {"tensor": f"{pid}/{key}"}
            else:
                meta["state"][str(pid)][key] = {"value": _jsonable(value)}
    save_file(tensors, str(Path(folder) / "optimizer.safetensors"))
    (Path(folder) / "optimizer.json").write_text(json.dumps(meta))


def load_optimizer(folder: str | Path) -> dict:
    tensors = load_file(str(Path(folder) / "optimizer.safetensors"))
    meta = json.loads((Path(folder) / "optimizer.json").read_text())
    state = {int(pid): {k: tensors[v["tensor"]] if "tensor" in v else v["value"] for k, v in entries.items()}
             for pid, entries in meta["state"].items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def save_scheduler(state_dict: dict, folder: str | Path) -> None:
    (Path(folder) / "scheduler.json").write_text(json.dumps(_jsonable(state_dict)))


def load_scheduler(folder: str | Path) -> dict:
    return json.loads((Path(folder) / "scheduler.json").read_text())


def _rng_name(rank: int | None) -> str:
    return "rng_state" if rank is None else f"rng_state_{rank}"


def save_rng(folder: str | Path, rank: int | None = None) -> None:
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {"python": [version, list(internal), gauss], "numpy": [name, keys.tolist(), pos, has_gauss, cached]}
    tensors = {"cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.random.get_rng_state_all()):
            tensors[f"cuda/{i}"] = s
    save_file(tensors, str(Path(folder) / f"{_rng_name(rank)}.safetensors"))
    (Path(folder) / f"{_rng_name(rank)}.json").write_text(json.dumps(meta))


def load_rng(folder: str | Path, rank: int | None = None) -> bool:
    """Restore the RNG states saved by :func:`save_rng`; False when the files are not there."""
    path = Path(folder) / f"{_rng_name(rank)}.json"
    if not path.is_file():
        return False
    meta = json.loads(path.read_text())
    tensors = load_file(str(Path(folder) / f"{_rng_name(rank)}.safetensors"))
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.random.set_rng_state(tensors["cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda/")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.random.set_rng_state_all(cuda)
    return True


COMPLETE_MARKER = "sdgrpo_complete.json"


def last_complete_checkpoint(output_dir: str | Path) -> Path | None:
    """The highest-step ``checkpoint-N`` folder that was fully written (has sdgrpo's completion marker)."""
    found = []
    for path in Path(output_dir).glob("checkpoint-*"):
        step = path.name.split("-")[-1]
        if step.isdigit() and (path / COMPLETE_MARKER).is_file():
            found.append((int(step), path))
    return max(found)[1] if found else None


def write_marker(folder: Path, content: dict) -> None:
    """Write the completion marker durably (:func:`sdgrpo.textio.write_atomic`), so a crash leaves either no marker
    or a whole one over complete files."""
    write_atomic(Path(folder) / COMPLETE_MARKER, json.dumps(content))


# Options that may differ between a run and its --resume: they do not change what is being trained.
RESUME_MAY_DIFFER = {"max_steps", "num_train_epochs", "resume_from_checkpoint", "logging_dir", "save_steps",
                     "logging_steps", "report_to", "save_total_limit", "dataloader_num_workers"}


def check_resume(out: Path, current: dict) -> Path:
    """The checkpoint to resume from, after refusing a config that differs from the interrupted run's."""
    saved_path = out / "resolved_config.yaml"
    checkpoint = last_complete_checkpoint(out)
    if checkpoint is None or not saved_path.is_file():
        raise UserError(f"{out}: no complete checkpoint to resume from; run without --resume to start afresh")
    saved = yaml.safe_load(saved_path.read_text())
    diffs = [f"{k}: {saved.get(k)!r} there, {current.get(k)!r} now" for k in sorted(set(saved) | set(current))
             if k not in RESUME_MAY_DIFFER and saved.get(k) != current.get(k)]
    if diffs:
        raise UserError(f"{out} was trained with other settings ({'; '.join(diffs[:3])}); resume with the same "
                        "config, or give a new --output_dir")
    return checkpoint


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric records past ``step``: a resumed run logs those steps again."""
    if path.is_file():
        lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in lines))


def is_write_failure(err: BaseException) -> bool:
    """An error of writing a file: an ``OSError`` (a full disk, a file-size limit, a read-only filesystem), or
    safetensors' own error wrapping one (``SafetensorError: Error while serializing: I/O error: ... (os error 28)``)."""
    return isinstance(err, OSError) or (type(err).__name__ == "SafetensorError"
                                        and re.search(r"I/O error|IoError|os error \d+", str(err)) is not None)


def write_failure_message(what, err: BaseException, output_dir: Path) -> str:
    """One line: what failed to be written (a path or words), why, the last complete checkpoint of ``output_dir``,
    the command that continues."""
    import errno

    code = getattr(err, "errno", None)
    if code is None:  # safetensors: "... I/O error: No space left on device (os error 28)"
        found = re.search(r"os error (\d+)|code: (\d+)", str(err))
        code = int(found.group(1) or found.group(2)) if found else None
    reason = os.strerror(code) if code else str(err).splitlines()[0][:120]
    last = last_complete_checkpoint(output_dir)
    full = code == errno.ENOSPC or "No space left" in reason
    where = (f"the last complete checkpoint is {last}: {'free space, then ' if full else ''}run the same command "
             "with --resume to continue from it" if last else
             "no checkpoint was complete yet: run the same command again (without --resume)")
    return f"writing {what} failed ({reason}); nothing before it is lost: {where}"


def copy_adapter(src: Path, dst: Path) -> None:
    """Make the adapter saved in ``src`` (a checkpoint, or the best held-out one) the final one in ``dst``."""
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        shutil.copy2(Path(src) / name, Path(dst) / name)


class CheckpointMixin:
    """The Trainer's checkpoint methods, writing and reading sdgrpo's pickle-free state."""

    def _save_checkpoint(self, model, trial):
        """Save as TRL/transformers do, add the state of callbacks that keep one (the collapse guard), then, once
        every process has written its files, mark the folder complete (fsync, atomic rename): resume only trusts
        marked folders."""
        folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
        try:
            super()._save_checkpoint(model, trial)
            if self.args.should_save:
                (folder / "training_args.bin").unlink(missing_ok=True)  # a pickle that resuming does not read
                for callback in self.callback_handler.callbacks:
                    if hasattr(callback, "save_state"):
                        callback.save_state(folder)
        except Exception as err:  # noqa: BLE001 - only a failed write is turned into one line; the rest re-raised
            if not is_write_failure(err):
                raise
            # the half-written folder has no completion marker, so resuming skips it anyway; removing it frees space
            shutil.rmtree(folder, ignore_errors=True)
            raise UserError(write_failure_message(folder, err, folder.parent)) from None
        self.accelerator.wait_for_everyone()  # the other ranks' RNG and optimizer shards are on disk
        if self.args.should_save:
            write_marker(folder, {"step": self.state.global_step})

    # Optimizer, scheduler and RNG state as safetensors + JSON (transformers pickles them). DeepSpeed and FSDP keep
    # their own formats.
    def _plain_state(self) -> bool:
        return not (self.is_deepspeed_enabled or self.is_fsdp_enabled)

    def _save_optimizer_and_scheduler(self, output_dir):
        if not self._plain_state():
            return super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            save_optimizer(self.optimizer.state_dict(), output_dir)
            save_scheduler(self.lr_scheduler.state_dict(), output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint):
        # TRL's own loader runs first (it restores its adaptive-entropy state; transformers' part finds no pickled
        # optimizer in a plain checkpoint and loads nothing), then the safetensors state.
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and (Path(checkpoint) / "optimizer.safetensors").is_file():
            self.optimizer.load_state_dict(load_optimizer(checkpoint))
            self.lr_scheduler.load_state_dict(load_scheduler(checkpoint))

    def _save_rng_state(self, output_dir):
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        save_rng(output_dir, self.args.process_index if self.args.world_size > 1 else None)

    def _load_rng_state(self, checkpoint):
        rank = self.args.process_index if self.args.world_size > 1 else None
        if checkpoint is None or not load_rng(checkpoint, rank):
            return super()._load_rng_state(checkpoint)
