"""What ``sdgrpo train`` and ``sdgrpo sft`` both do around their trainer: the device a run trains on, which
process writes, the output folder at the start (metrics, the resolved config) and at the end (the trained weights
without the Trainer's pickle)."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from sdgrpo.checkpointing import truncate_metrics


def training_device(cfg) -> str:
    """``cuda`` where a GPU is there and the config does not ask for the CPU (``use_cpu``), else ``cpu``."""
    from sdgrpo.runtime import _has_cuda

    return "cpu" if cfg.use_cpu else ("cuda" if _has_cuda() else "cpu")


def is_writer() -> bool:
    """The one process that writes the run's files: rank 0 under accelerate / torchrun, the only one otherwise."""
    return int(os.environ.get("RANK", "0")) == 0


def start_output(out: Path, resolved: dict, checkpoint: Path | None = None) -> None:
    """One writer: metrics cut back to the checkpoint resumed from (or started afresh), the resolved config."""
    out.mkdir(parents=True, exist_ok=True)
    if not is_writer():
        return
    if checkpoint is not None:
        truncate_metrics(out / "metrics.jsonl", int(checkpoint.name.split("-")[-1]))
    else:
        (out / "metrics.jsonl").unlink(missing_ok=True)
    (out / "resolved_config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=True))


def save_final(trainer, out: Path) -> None:
    """The trained weights into ``out``, without ``training_args.bin`` (a pickle; resolved_config.yaml holds the
    same) there or in any checkpoint."""
    trainer.save_model(str(out))
    for folder in [out, *out.glob("checkpoint-*")]:
        (folder / "training_args.bin").unlink(missing_ok=True)
