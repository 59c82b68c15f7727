"""The lock on a folder being written: who holds it, and when a holder is gone (the e2e tests run two real runs)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from sdgrpo.errors import UserError
from sdgrpo.folders import LOCK, lock_holder, release_lock, take_lock


def write_lock(folder, **holder):
    (folder / LOCK).write_text(json.dumps({"host": socket.gethostname(), "verb": "train", **holder}))


def test_a_lock_is_refused_while_its_process_runs_and_taken_over_after(tmp_path, caplog):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        write_lock(tmp_path, pid=sleeper.pid)
        with pytest.raises(UserError, match=f"sdgrpo train \\(pid {sleeper.pid} on "):
            take_lock(tmp_path, "sft")
    finally:
        sleeper.kill()
        sleeper.wait()
    take_lock(tmp_path, "sft")
    assert "no longer runs" in caplog.text
    assert lock_holder(tmp_path / LOCK)["pid"] == os.getpid()
    release_lock(tmp_path)
    assert not (tmp_path / LOCK).exists()


def test_a_reused_pid_is_not_a_live_holder_but_another_hosts_lock_is_kept(tmp_path):
    """The lock records its process's start time: the same pid started later (here, this very process) is another
    process. A lock from another host cannot be checked, so it is refused and left in place."""
    write_lock(tmp_path, pid=os.getpid(), start="1")
    take_lock(tmp_path, "train")
    assert lock_holder(tmp_path / LOCK)["start"] != "1"
    release_lock(tmp_path)
    (tmp_path / LOCK).write_text(json.dumps({"pid": os.getpid(), "host": "elsewhere", "verb": "train"}))
    with pytest.raises(UserError, match="on elsewhere"):
        take_lock(tmp_path, "train")
    release_lock(tmp_path)  # not this process's: kept
    assert lock_holder(tmp_path / LOCK)["host"] == "elsewhere"
