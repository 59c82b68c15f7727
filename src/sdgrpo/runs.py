"""What ``sdgrpo train`` and ``sdgrpo sft`` both do around their trainer: the run folder (sdgrpo's, locked, an earlier
run refused or set aside, the text kept outside it, the config checked against the run resumed), the device, which
process writes, the output folder at the start (metrics, the resolved config) and at the end (the trained weights
without the Trainer's pickle), and stopping on Ctrl-C or SIGTERM with everything saved.

A run folder (``--output_dir``) is written only where it is missing, empty, or sdgrpo's (``folders.MANIFEST``;
a folder holding an earlier sdgrpo run's ``resolved_config.yaml`` counts as one); one process writes it at a time
(``folders.LOCK``). A folder that holds an earlier run (a checkpoint, weights, metrics) is continued with
``--resume`` or, with ``--start_over``, what that run wrote (``RUN_WRITES``) is moved aside into ``previous-DATE/``
(never deleted); otherwise refused. A process of a multi-process launch ends by tearing the process group down, then
:func:`leave`.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from sdgrpo.checkpointing import (
    check_resume,
    checkpoints,
    copy_adapter,
    last_complete_checkpoint,
    truncate_metrics,
)
from sdgrpo.errors import UserError
from sdgrpo.folders import (
    MANIFEST,
    PREVIOUS,
    cannot_write,
    is_empty,
    is_replaceable,
    read_manifest,
    release_lock,
    set_aside,
    take_lock,
    write_manifest,
)

logger = logging.getLogger(__name__)

# What a run writes at the top of its folder (sdgrpo's files, and transformers', TRL's and PEFT's saves), and
# `sdgrpo eval --output RUN/eval` (the model card reads it): what --start_over moves aside. The prepared copy of raw
# text (data/) stays, reused while the text is unchanged, and so does anything else (the user's notes).
RUN_WRITES = ("checkpoint-*", "adapter_model.safetensors", "adapter_config.json", "model.safetensors",
              "model-*.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
              "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
              "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "README.md", "training_args.bin",
              "metrics.jsonl", "resolved_config.yaml", "runs", "heldout.json", "best_heldout", "collapsed",
              "collapse_guard.json", "eval")
# What shows that a run trained: a folder holding none of these is started again without asking.
PROGRESS = ("checkpoint-*", "adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")


def training_device(cfg) -> str:
    """``cuda`` where a GPU is there and the config does not ask for the CPU (``use_cpu``), else ``cpu``."""
    from sdgrpo.runtime import _has_cuda

    return "cpu" if cfg.use_cpu else ("cuda" if _has_cuda() else "cpu")


def is_writer() -> bool:
    """The one process that writes the run's files: rank 0 under accelerate / torchrun, the only one otherwise."""
    return int(os.environ.get("RANK", "0")) == 0


def earlier_run(out: Path) -> list[str]:
    """The entries of an earlier run in ``out`` (what --start_over moves aside), or [] where none trained."""
    metrics = out / "metrics.jsonl"
    trained = any(next(out.glob(p), None) for p in PROGRESS) or (metrics.is_file() and metrics.stat().st_size > 0)
    if not trained:
        return []
    # eval/ only where `sdgrpo eval` wrote it and nothing was added since: a user's own eval/ stays where it is
    return sorted(p.name for p in out.iterdir() if any(p.match(pattern) for pattern in RUN_WRITES)
                  and (p.name != "eval" or is_replaceable(p)))


def refuse_foreign(out: Path, option: str = "--output_dir") -> None:
    """A folder of the user's (not empty, no manifest, no run's config) refused, as :func:`run_folder` does."""
    if (out.is_dir() and not is_empty(out) and read_manifest(out) is None
            and not (out / "resolved_config.yaml").is_file()):
        held = sorted(p.name for p in out.iterdir())
        raise UserError(f"{option} {out}: this folder holds files sdgrpo did not write ({', '.join(held[:3])}"
                        f"{', ...' if len(held) > 3 else ''}); sdgrpo writes only into a new or empty folder, or its "
                        f"own: pass another {option}")


def refuse_earlier(out: Path, resume: bool, start_over: bool, option: str = "--output_dir") -> list[str]:
    """An earlier run in ``out`` refused unless ``resume`` or ``start_over``; the entries --start_over moves aside."""
    earlier = [] if resume or not out.is_dir() else earlier_run(out)
    if earlier and option != "--output_dir":  # a verb without --resume / --start_over (demo)
        raise UserError(f"{option} {out} holds a run of sdgrpo train or sft ({', '.join(earlier[:4])}"
                        f"{', ...' if len(earlier) > 4 else ''}); pass another {option}")
    if earlier and not start_over:
        last = last_complete_checkpoint(out)
        cont = (f"continue it with --resume (from {last.name})" if last else
                "it has no complete checkpoint to continue from")
        raise UserError(f"--output_dir {out} holds an earlier run ({', '.join(earlier[:4])}"
                        f"{', ...' if len(earlier) > 4 else ''}): {cont}, or pass --start_over to move it aside "
                        f"into {out}/{PREVIOUS}DATE and start again")
    return earlier


@contextmanager
def run_folder(out: Path, verb: str, resume: bool, start_over: bool, option: str = "--output_dir") -> Iterator[None]:
    """``out`` made (or found) sdgrpo's and locked by this process for the block; an earlier run in it refused,
    unless ``resume`` (continued) or ``start_over`` (moved aside). A folder this refused is left as it was.
    ``option`` names the folder in what is refused."""
    if not is_writer():  # the main process checks and locks; the others write nothing here
        yield
        return
    existed = out.is_dir()
    refuse_foreign(out, option)
    was_empty = not existed or is_empty(out)
    made = out.absolute()  # the outermost folder this makes, removed again where the run is refused
    while not made.parent.exists():
        made = made.parent
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise cannot_write(out, err) from None
    take_lock(out, verb)
    try:
        if read_manifest(out) is None:
            write_manifest(out, verb)
        earlier = refuse_earlier(out, resume, start_over, option)
        if earlier:
            aside = set_aside(out, earlier)
            logger.warning("--start_over: the earlier run (%s) moved into %s", ", ".join(earlier), aside)
        yield
    except BaseException:
        release_lock(out)
        if was_empty and {p.name for p in out.iterdir()} <= {MANIFEST}:
            (out / MANIFEST).unlink(missing_ok=True)  # refused before writing anything: leave the folder as it was
            if not existed:
                for folder in [out.absolute(), *out.absolute().parents]:
                    folder.rmdir()
                    if folder == made:
                        break
        raise
    release_lock(out)


@contextmanager
def open_run(cfg, model_cfg, verb: str, resume: bool = False,
             start_over: bool = False) -> Iterator[tuple[Path, dict, Path | None]]:
    """The run's folder for the block (see :func:`run_folder`), its raw text prepared, and with ``resume`` the
    checkpoint to continue from, checked before the text is prepared: yields (folder, resolved config, checkpoint)."""
    from sdgrpo.config import config_to_dict
    from sdgrpo.data import check_text_outside, prepared_location, prepared_or_raw

    if resume and start_over:
        raise UserError("--resume continues the run in --output_dir and --start_over moves it aside: pass one")
    out = Path(cfg.output_dir)
    check_text_outside(cfg.dataset_path, cfg.output_dir)
    with run_folder(out, verb, resume, start_over):
        text = cfg.dataset_path
        cfg.dataset_path = prepared_location(text, cfg.output_dir)
        resolved = config_to_dict(cfg, model_cfg)
        checkpoint = check_resume(out, resolved) if resume else None
        cfg.dataset_path = prepared_or_raw(text, cfg.output_dir, model_cfg.model_name_or_path, cfg)
        yield out, resolved, checkpoint


def start_output(out: Path, resolved: dict, checkpoint: Path | None = None) -> None:
    """One writer: metrics cut back to the checkpoint resumed from (or started afresh), checkpoints newer than it (a
    damaged one, or one never completed) moved aside, the resolved config."""
    out.mkdir(parents=True, exist_ok=True)
    if not is_writer():
        return
    if checkpoint is not None:
        step = int(checkpoint.name.split("-")[-1])
        truncate_metrics(out / "metrics.jsonl", step)
        later = [path.name for n, path in checkpoints(out) if n > step]
        if later:
            logger.warning("%s moved into %s: newer than %s, which the run continues from", ", ".join(later),
                           set_aside(out, later), checkpoint.name)
    else:
        (out / "metrics.jsonl").unlink(missing_ok=True)
    (out / "resolved_config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=True))


def save_final(trainer, out: Path) -> None:
    """The trained weights into ``out``, without ``training_args.bin`` (a pickle; resolved_config.yaml holds the
    same) there or in any checkpoint."""
    trainer.save_model(str(out))
    for folder in [out, *out.glob("checkpoint-*")]:
        (folder / "training_args.bin").unlink(missing_ok=True)


class Interrupted(Exception):
    """Training stopped on Ctrl-C or SIGTERM after saving; the message says where and how to continue, ``code`` is
    the exit status (128 + the signal)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


STOP_SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


def train(trainer, stop, checkpoint: Path | None) -> None:
    """Train (from ``checkpoint`` where given); the first Ctrl-C or SIGTERM (what a scheduler or ``timeout`` sends)
    finishes the step and saves, a second one stops at once."""

    def on_signal(signum, frame):
        if stop.reason:
            raise KeyboardInterrupt
        logger.warning("%s: finishing this step, then saving (send it again to stop at once)", STOP_SIGNALS[signum])
        stop.request(f"interrupted by {STOP_SIGNALS[signum]}", exit_code=128 + signum)

    from tqdm.contrib.logging import logging_redirect_tqdm

    if checkpoint is not None and finished(trainer, checkpoint):
        return
    previous = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS}
    try:
        with logging_redirect_tqdm():  # log lines above the progress bar, not glued to it
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def finished(trainer, checkpoint: Path) -> bool:
    """Whether ``checkpoint`` is at the run's ``--max_steps`` (a run killed after its last checkpoint, or resumed once
    it had ended); if so its weights and state are loaded for the run's end to save, and nothing is trained:
    transformers' Trainer, resumed there, trains one step past ``max_steps`` (and one more at every resume).
    Shadows ``Trainer._load_from_checkpoint`` (pinned in tests/test_private_api.py)."""
    from transformers import TrainerState

    state_file = checkpoint / "trainer_state.json"
    limit = trainer.args.max_steps
    if limit is None or limit <= 0 or not state_file.is_file():
        return False
    state = TrainerState.load_from_json(str(state_file))
    if state.global_step < limit:
        return False
    logger.info("%s is the run's last step (--max_steps %d): its weights are the final ones, nothing is trained; "
                "pass a larger --max_steps to train on", checkpoint.name, limit)
    trainer._load_from_checkpoint(str(checkpoint))
    trainer.state = state
    return True


def stop_if_broken(stop, out: Path) -> None:
    """After a non-finite loss: the last good checkpoint's adapter becomes the final one, and one line says so."""
    if not stop.fatal:
        return
    good = last_complete_checkpoint(out)
    if good is None:
        where = "no checkpoint was saved"
    elif (good / "adapter_model.safetensors").is_file():
        copy_adapter(good, out)
        where = f"the last good adapter ({good.name}) is in {out}"
    else:  # every weight trained: the checkpoint is the model
        where = f"the last good model is {good}"
    raise UserError(f"training stopped: {stop.reason}; {where}; lower --learning_rate or check the data")


def save_or_interrupt(trainer, stop, out: Path) -> None:
    """The final weights into ``out``; after Ctrl-C or SIGTERM, :class:`Interrupted` once they are saved."""
    save_final(trainer, out)
    if stop.reason:
        raise Interrupted(f"{stop.reason} at step {trainer.state.global_step}: weights and trainer state saved in "
                          f"{out}; continue with the same command and --resume", stop.exit_code or 130)

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
