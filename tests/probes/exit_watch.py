"""How a process of a test's multi-process launch ends, for tests/e2e/test_multiprocess.py (imported by the probe
scripts beside it, which run as scripts with this folder on sys.path).

:func:`watch` makes the process write, into a probe folder, ``exit_{rank}.txt`` from an exit handler (the handlers
ran: the process got to its end), and ``teardown_{rank}.txt`` should the interpreter then tear itself down (CPython's
``cpython.PyInterpreterState_Clear`` audit event, late in that teardown, never reached under ``os._exit``). Each
holds the names of the threads alive at that moment (from /proc, one a line). gloo's threads, alive at the exit
handlers, met that teardown and aborted a process now and then ("terminate called without an active exception",
exit -6).
"""

from __future__ import annotations

import atexit
import os
import sys
from pathlib import Path


def _write_threads(path: str, listdir=os.listdir, open_fd=os.open, read=os.read, write=os.write, close=os.close,
                   reading=os.O_RDONLY, writing=os.O_WRONLY | os.O_CREAT | os.O_TRUNC, gone=OSError) -> None:
    """Thread names into ``path``. Everything it uses is bound now: the audit event comes after the modules' names
    are cleared. A thread that ends between the listing and the reading of its name is left out (opening its file
    raises FileNotFoundError, reading an open one ProcessLookupError)."""
    names = []
    for task in listdir("/proc/self/task"):
        try:
            fd = open_fd("/proc/self/task/" + task + "/comm", reading)
        except gone:
            continue
        try:
            names.append(read(fd, 64).strip())
        except gone:
            pass
        finally:
            close(fd)
    fd = open_fd(path, writing, 0o644)
    write(fd, b"\n".join(sorted(names)))
    close(fd)


def watch(folder: str | Path) -> None:
    folder, rank = Path(folder), os.environ.get("RANK", "0")
    atexit.register(_write_threads, str(folder / f"exit_{rank}.txt"))
    teardown = str(folder / f"teardown_{rank}.txt")

    def hook(event, args, write_threads=_write_threads):
        if event == "cpython.PyInterpreterState_Clear":
            write_threads(teardown)

    sys.addaudithook(hook)
