"""What sdgrpo may write, and the proof that it wrote it: the manifest, the lock, the staging folder, setting aside.

The contract (docs/usage.md, "What sdgrpo promises about your files"):

- A folder is sdgrpo's when it holds ``sdgrpo_manifest.json``, written when sdgrpo created the folder (or found it
  empty). A folder without it is the user's: sdgrpo refuses, in one line, to write into it, replace it, move it or
  delete it.
- Whole results (``prepare``'s dataset, ``export``'s model) are written into ``NAME.partial`` and renamed to
  ``NAME`` once complete, with a manifest that lists every file; they replace an older ``NAME`` only where its
  manifest lists every file in it (a run folder is never replaced).
- One process writes a folder at a time: ``sdgrpo.lock`` holds the writer's pid, host and start. A lock whose
  process is gone (same host) is stale: taken over with a warning. One held by a live process, or on another host,
  is refused, naming the holder.
- Nothing sdgrpo wrote is deleted to start again: it is moved aside into a dated ``previous-...`` folder.
- A folder that cannot be written is one line before any work (creating the folder and the lock is the test).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sdgrpo.errors import UserError

logger = logging.getLogger(__name__)

MANIFEST = "sdgrpo_manifest.json"
LOCK = "sdgrpo.lock"
PREVIOUS = "previous-"  # folders of set-aside runs: previous-YYYYmmdd-HHMMSS
# A saved DatasetDict plus prepare.json: a dataset folder written by sdgrpo before it wrote manifests.
_DATASET_FILES = ("dataset_dict.json", "prepare.json", "*/dataset_info.json", "*/state.json", "*/data-*.arrow")


def overlaps(a: str | Path, b: str | Path) -> bool:
    """Whether two paths are the same place or one is inside the other (after resolving ``..`` and links)."""
    a, b = Path(a).expanduser().resolve(), Path(b).expanduser().resolve()
    return a == b or a in b.parents or b in a.parents


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.is_symlink())


def read_manifest(folder: Path) -> dict | None:
    try:
        data = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_manifest(folder: Path, verb: str, list_files: bool = False) -> None:
    """Mark ``folder`` as written by ``sdgrpo VERB``; with ``list_files``, name every file in it (and its size): a
    finished result, which any file added later makes the user's again."""
    from sdgrpo import __version__
    from sdgrpo.textio import write_atomic

    folder = Path(folder)
    data = {"written_by": f"sdgrpo {verb}", "version": __version__, "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    if list_files:
        data["files"] = {name: (folder / name).stat().st_size for name in _files(folder) if name != MANIFEST}
    write_atomic(folder / MANIFEST, json.dumps(data, indent=2))


def is_replaceable(folder: Path) -> bool:
    """Whether sdgrpo may replace ``folder`` by a new whole result: its manifest names every file in it, or it is a
    dataset folder written before manifests (a saved dataset and prepare.json, only). A run folder (its manifest
    names no files: it holds checkpoints, and perhaps the user's notes) is never replaced."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    present = [f for f in _files(folder) if f not in (MANIFEST, LOCK)]
    if manifest is not None:
        return "files" in manifest and set(present) <= set(manifest["files"])
    return (folder / "prepare.json").is_file() and all(any(Path(f).match(g) for g in _DATASET_FILES) for f in present)


def is_empty(folder: Path) -> bool:
    return not any(Path(folder).iterdir())


def cannot_write(path: Path, err: OSError) -> UserError:
    reason = os.strerror(err.errno) if err.errno else str(err)
    return UserError(f"{path}: cannot write there ({reason}); pass a folder you can write to (nothing was done)")


# -- locks ----------------------------------------------------------------------------------------------------------

def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks (Linux), so that a pid reused by another process is told apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def lock_holder(path: Path) -> dict | None:
    """The holder recorded in a lock file, or None where it cannot be read (being written, or not a lock)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "pid" in data else None


def _alive(holder: dict) -> bool:
    """Whether the lock's process still runs; a lock taken on another host is taken to be live (it cannot be seen)."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    start = _process_start(int(holder["pid"]))
    return holder.get("start") is None or start is None or start == holder["start"]


def _held_by(path: Path, holder: dict | None) -> str:
    if holder is None:
        return f"{path} is being written or is not an sdgrpo lock"
    return (f"sdgrpo {holder.get('verb', '')} (pid {holder['pid']} on {holder.get('host')}, since "
            f"{holder.get('started')}) holds {path}")


def take_lock(folder: Path, verb: str) -> Path:
    """Create ``folder/sdgrpo.lock`` for this process, taking over a stale one; refuse a live one."""
    path = Path(folder) / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname(), "verb": verb, "start": _process_start(os.getpid()),
          "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = lock_holder(path)
            age = time.time() - path.stat().st_mtime if path.exists() else 0
            if holder is None and age < 10:  # being written this very moment
                raise UserError(f"{_held_by(path, None)}; another sdgrpo run writes {folder}") from None
            if holder is not None and _alive(holder):
                raise UserError(f"{_held_by(path, holder)}: one run at a time writes a folder; wait for it, or pass "
                                "another output folder (if no such process runs, delete the lock file)") from None
            logger.warning("%s was left by a process that no longer runs (%s); taking it over", path,
                           f"pid {holder['pid']}" if holder else "unreadable")
            path.unlink(missing_ok=True)
            continue
        except OSError as err:
            raise cannot_write(Path(folder), err) from None
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(me))
            fh.flush()
            os.fsync(fh.fileno())
        return path
    raise UserError(f"{path}: another process keeps taking this lock; one run at a time writes {folder}")


def release_lock(folder: Path) -> None:
    """Remove the lock if this process holds it."""
    path = Path(folder) / LOCK
    holder = lock_holder(path)
    if holder is not None and holder["pid"] == os.getpid() and holder.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)


# -- whole results: written aside, renamed into place ---------------------------------------------------------------

def check_replaceable(target: Path, option: str) -> None:
    """Refuse a ``target`` that exists, is not empty, and may not be replaced (see :func:`is_replaceable`)."""
    target = Path(target)
    if not target.is_dir() or is_empty(target) or is_replaceable(target):
        return
    manifest = read_manifest(target)
    if manifest is not None and "files" not in manifest:
        raise UserError(f"{option} {target}: the folder of a run of {manifest.get('written_by', 'sdgrpo')}; pass a "
                        "new or empty folder")
    listed = (manifest or {}).get("files", {})
    held = [f for f in _files(target) if f not in (MANIFEST, LOCK) and f not in listed][:3]
    raise UserError(f"{option} {target}: this folder holds files sdgrpo did not write ({', '.join(held)}); sdgrpo "
                    "never replaces them: pass a new or empty folder")


@contextmanager
def staged(target: str | Path, verb: str, option: str = "--output") -> Iterator[Path]:
    """A folder to write a whole result into, renamed to ``target`` when the block ends without error (an older
    ``target`` of sdgrpo's is replaced then), removed when it fails. Entered before any work: it checks that
    ``target`` may be replaced, that its parent can be written, and that no other process writes ``target``."""
    target = Path(target)
    check_replaceable(target, option)
    staging = target.with_name(target.name + ".partial")
    try:
        staging.mkdir(parents=True)
    except FileExistsError:
        if not (staging / LOCK).is_file():
            raise UserError(f"{staging} exists and was not made by sdgrpo; move it away (nothing was done)") from None
        take_lock(staging, verb)  # refuses a live writer; a stale one's half-written result is sdgrpo's to remove
        shutil.rmtree(staging)
        staging.mkdir()
    except OSError as err:
        raise cannot_write(target.parent, err) from None
    take_lock(staging, verb)
    try:
        yield staging
        (staging / LOCK).unlink()
        write_manifest(staging, verb, list_files=True)
        check_replaceable(target, option)  # again: a file may have been put there meanwhile
        old = None
        if target.exists():
            old = target.with_name(f"{target.name}.replaced-{os.getpid()}")
            target.rename(old)
        staging.rename(target)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# -- run folders ----------------------------------------------------------------------------------------------------

def set_aside(folder: Path, names: list[str]) -> Path:
    """Move the entries ``names`` of ``folder`` into a new ``folder/previous-YYYYmmdd-HHMMSS`` and return it."""
    folder = Path(folder)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside, n = folder / f"{PREVIOUS}{stamp}", 1
    while aside.exists():
        n += 1
        aside = folder / f"{PREVIOUS}{stamp}-{n}"
    aside.mkdir()
    for name in names:
        (folder / name).rename(aside / name)
    return aside
