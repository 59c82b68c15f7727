"""Reading text files as users have them: UTF-8 with or without BOM, CRLF or CR line endings."""

from __future__ import annotations

from pathlib import Path


class TextDecodeError(ValueError):
    """A file is not UTF-8 text; the message says which file and why."""


def decode_text(raw: bytes, where: str) -> str:
    """Decode UTF-8 (BOM dropped) and normalise line endings to LF.

    UTF-16 (a BOM or NUL bytes between ASCII) and other non-UTF-8 bytes raise :class:`TextDecodeError`.
    """
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise TextDecodeError(f"{where}: looks like UTF-16 text; convert it to UTF-8 (e.g. iconv -f UTF-16 -t UTF-8)")
    if b"\x00" in raw[:4096]:
        raise TextDecodeError(f"{where}: contains NUL bytes, so it is binary or UTF-16, not UTF-8 text")
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
