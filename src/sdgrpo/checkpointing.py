"""Checkpoints: safetensors + JSON state, the completion marker, resume checks, and the Trainer overrides.

transformers' Trainer saves optimizer, scheduler and RNG state with ``torch.save`` (``optimizer.pt``,
``scheduler.pt``, ``rng_state.pth``). sdgrpo writes ``optimizer.safetensors`` + ``optimizer.json``,
``scheduler.json`` and ``rng_state[_R].safetensors`` + ``rng_state[_R].json``, so no checkpoint that sdgrpo writes
holds a pickle, and marks a checkpoint folder complete only once every process has written its files. The marker
records every file's size: resuming trusts the newest checkpoint whose files still have them, and falls back past a
damaged one (a truncated adapter) with a warning.

:class:`CheckpointMixin` overrides private methods of transformers' ``Trainer`` (pinned: transformers 5.17) and of
TRL's ``GRPOTrainer`` (pinned: trl 1.15.0), whose signatures tests/test_private_api.py checks:
``_save_checkpoint(model, trial)``, ``_save_optimizer_and_scheduler(output_dir)``,
``_load_optimizer_and_scheduler(checkpoint)``, ``_save_rng_state(output_dir)``, ``_load_rng_state(checkpoint)``; it
calls ``_get_output_dir(trial=...)``. DeepSpeed and FSDP keep their own (pickled) formats.
"""

from __future__ import annotations

import json
import logging
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

logger = logging.getLogger(__name__)


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


def checkpoint_damage(folder: Path) -> str | None:
    """Why a checkpoint folder cannot be trusted, or None: no completion marker (never finished), or a file missing or
    of another size than the marker recorded at save (a truncated or lost file). Markers written before sizes were
    recorded are trusted as they are."""
    try:
        marker = json.loads((Path(folder) / COMPLETE_MARKER).read_text())
    except FileNotFoundError:
        return "never completed"
    except (OSError, ValueError):
        return "its completion marker is damaged"
    for name, size in marker.get("files", {}).items():
        try:
            found = (Path(folder) / name).stat().st_size
        except OSError:
            return f"{name} is missing"
        if found != size:
            return f"{name} holds {found} bytes where {size} were written"
    return None


def checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """The ``checkpoint-N`` folders of ``output_dir``, newest first."""
    found = [(int(p.name.split("-")[-1]), p) for p in Path(output_dir).glob("checkpoint-*")
             if p.name.split("-")[-1].isdigit()]
    return sorted(found, reverse=True)


def last_complete_checkpoint(output_dir: str | Path, warn: bool = False) -> Path | None:
    """The highest-step ``checkpoint-N`` folder that was fully written and is still whole (see
    :func:`checkpoint_damage`); with ``warn``, each newer one that was completed but is damaged is named."""
    for _, path in checkpoints(output_dir):
        damage = checkpoint_damage(path)
        if damage is None:
            return path
        if warn and damage != "never completed":
            logger.warning("%s is damaged (%s): falling back to the checkpoint before it", path, damage)
    return None


def write_marker(folder: Path, content: dict) -> None:
    """Write the completion marker durably (:func:`sdgrpo.textio.write_atomic`), so a crash leaves either no marker
    or a whole one over complete files. It records every file's size, which resuming checks."""
    folder = Path(folder)
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != COMPLETE_MARKER}
    write_atomic(folder / COMPLETE_MARKER, json.dumps({**content, "files": files}))


# Options that may differ between a run and its --resume: they do not change what is being trained.
RESUME_MAY_DIFFER = {"max_steps", "num_train_epochs", "resume_from_checkpoint", "logging_dir", "save_steps",
                     "logging_steps", "report_to", "save_total_limit", "dataloader_num_workers", "output_dir"}
_PATH_OPTION = re.compile(r"path|_dir$|adapter$")


def _place(value: str, run_folder: str | None) -> tuple[str, str]:
    """A path option as the place it names: inside the run folder, relative to that folder (which may have moved
    since, or be written ``run/`` one time and ``run`` the next); a model sdgrpo ships, by its name (the package may
    be installed elsewhere since: a new environment, another checkout); elsewhere, resolved."""
    path = os.path.normpath(os.path.expanduser(value))
    if Path(path).parts[-3:-1] == ("sdgrpo", "assets"):  # a model sdgrpo ships: the same wherever it is installed
        return "shipped", Path(path).name
    if run_folder:
        root = os.path.normpath(os.path.expanduser(run_folder))
        if path == root or path.startswith(root.rstrip(os.sep) + os.sep):
            return "run folder", os.path.relpath(path, root)
    return "path", str(Path(path).resolve())


def _same(key: str, saved, now, saved_run: str | None, run: str) -> bool:
    if saved == now:
        return True
    if isinstance(saved, str) and isinstance(now, str) and _PATH_OPTION.search(key):
        return _place(saved, saved_run) == _place(now, run)
    return False


def check_resume(out: Path, current: dict) -> Path:
    """The checkpoint to resume from (the newest whole one, a damaged newer one named in a warning), after refusing
    a config that differs from the interrupted run's. Paths are compared as places, not strings: a path inside the
    run folder relative to it, so that a moved run folder resumes."""
    saved_path = out / "resolved_config.yaml"
    checkpoint = last_complete_checkpoint(out, warn=True)
    if checkpoint is None or not saved_path.is_file():
        if not saved_path.is_file() and not checkpoints(out):
            raise UserError(f"{out}: no run there to resume; run without --resume to start one")
        raise UserError(f"{out}: no complete checkpoint to resume from (none was saved yet, or each is damaged); "
                        "pass --start_over instead of --resume to move this run aside and start again")
    saved = yaml.safe_load(saved_path.read_text()) or {}
    saved_run, run = saved.get("output_dir"), str(current.get("output_dir") or out)
    diffs = [f"{k}: {saved.get(k)!r} there, {current.get(k)!r} now" for k in sorted(set(saved) | set(current))
             if k not in RESUME_MAY_DIFFER and not _same(k, saved.get(k), current.get(k), saved_run, run)]
    if diffs:
        raise UserError(f"{out} was trained with other settings ({'; '.join(diffs[:3])}); resume with the settings "
                        f"in {saved_path}, or pass --start_over instead of --resume to move this run aside and start "
                        "again")
    return checkpoint


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric records past ``step``: a resumed run logs those steps again. A line that is not whole JSON (the
    last one, cut by a crash while it was written) is dropped with a warning."""
    if not path.is_file():
        return
    kept, torn = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            torn += 1
            continue
        if record.get("step", 0) <= step:
            kept.append(line)
    if torn:
        logger.warning("%s: %d line(s) cut short (a crash while writing) dropped", path, torn)
    path.write_text("".join(ln + "\n" for ln in kept))


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
             "no checkpoint was complete yet: run the same command with --start_over (this run is moved aside)")
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
