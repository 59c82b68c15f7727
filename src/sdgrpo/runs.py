"""What ``sdgrpo train`` and ``sdgrpo sft`` both do around their trainer: the device a run trains on, which
process writes, the output folder at the start (metrics, the resolved config) and at the end (the trained weights
without the Trainer's pickle), and how a process of a multi-process launch ends (the process group torn down, then
:func:`leave`)."""

from __future__ import annotations

import os
import sys
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


def end_distributed() -> None:
    """Tear the process group down once every process got here (a barrier, then ``destroy_process_group``)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def leave(code: int) -> int:
    """``code`` for ``sys.exit``; in a process of a multi-process launch (``WORLD_SIZE`` > 1) the process ends here
    instead: its exit handlers run (``atexit``: logging, report_to integrations), its streams are flushed, then
    ``os._exit(code)`` skips the interpreter's teardown of its objects. ``destroy_process_group`` does not stop gloo's
    threads (two run loops, the TCP loop): they live as long as the group object, which the DDP-wrapped model and
    the accelerator still hold, so they met that teardown, and now and then a process aborted there after all its
    work ("terminate called without an active exception", exit -6, and torchrun failed the launch)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return code
    import atexit
    import logging

    atexit._run_exitfuncs()  # the handlers os._exit would skip (CPython's own runner; there is no public one)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)
