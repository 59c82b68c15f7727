"""Reading text files as users have them (UTF-8 with or without BOM, CRLF or CR line endings), and writing the
small files that other processes or a later run read as markers, atomically."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader (another process, a later run) sees the old file or the whole new
    one, never part of it: a temporary file beside it, flushed to disk, renamed over it, and the folder synced."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class TextDecodeError(ValueError):
    """A file is not UTF-8 text; the message says which file and why."""


def decode_text(raw: bytes, where: str) -> str:
    """Decode UTF-8 (BOM dropped) and normalise line endings to LF.

    UTF-16 (a BOM or NUL bytes between ASCII) and other non-UTF-8 bytes raise :class:`TextDecodeError`.
    """
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise TextDecodeError(f"{where}: looks like UTF-16 text; convert it to UTF-8 (e.g. iconv -f UTF-16 -t UTF-8)")
    if b"\x00" in raw[:4096]:
        raise TextDecodeError(f"{where}: contains NUL bytes, so it is binary or UTF-16, not UTF-8 text; leave it out "
                              "of the inputs, or convert UTF-16 to UTF-8 (e.g. iconv -f UTF-16 -t UTF-8)")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise TextDecodeError(
            f"{where}: not valid UTF-8 (byte {err.start}); re-save it as UTF-8"
        ) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_text_file(path: str | Path) -> str:
    """Read a whole text file as UTF-8 with LF line endings."""
    path = Path(path)
    return decode_text(path.read_bytes(), str(path))
