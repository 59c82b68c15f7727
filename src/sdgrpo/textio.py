"""Reading text files as users have them (UTF-8 with or without BOM, CRLF or CR line endings), and writing the
small files that other processes or a later run read as markers, atomically."""

from __future__ import annotations

import codecs
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)


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
    bom = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    body = raw[bom:]  # decoded without the BOM, so that an error's offsets are the body's ("utf-8-sig" counts so too)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        # a UTF-8 character cut off at the very end (an excerpt cut by bytes): the text before it is whole. Only where
        # that text holds other UTF-8 characters: a Latin-1 "caf\xe9" also ends in what begins a UTF-8 character
        text = body[:err.start].decode("utf-8") if err.reason == "unexpected end of data" else ""
        if err.end != len(body) or text.isascii():
            raise TextDecodeError(f"{where}: not valid UTF-8 (byte {bom + err.start}); re-save it as UTF-8") from None
        logger.warning("%s: its last character is cut off (%d of its bytes, not whole UTF-8); read without it",
                       where, len(body) - err.start)
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_text_file(path: str | Path) -> str:
    """Read a whole text file as UTF-8 with LF line endings."""
    path = Path(path)
    return decode_text(path.read_bytes(), str(path))
