"""Reading text as users have it (sdgrpo.textio): BOM, CRLF and CR, UTF-16 and other bytes refused by name."""

from __future__ import annotations

import pytest

from sdgrpo.textio import TextDecodeError, decode_text, read_text_file


def test_bom_and_every_line_ending_become_plain_utf8_lf(tmp_path):
    raw = "\ufeffCHAPTER I.\r\nIn the beginning\rGod created — «the heaven»\n".encode()
    assert decode_text(raw, "x") == "CHAPTER I.\nIn the beginning\nGod created — «the heaven»\n"
    (tmp_path / "book.txt").write_bytes(raw)
    assert read_text_file(tmp_path / "book.txt") == decode_text(raw, "x")


@pytest.mark.parametrize("raw, message", [
    ("hello".encode("utf-16"), "book.txt: looks like UTF-16 text; convert it to UTF-8"),
    (b"ab\x00cd", "book.txt: contains NUL bytes, so it is binary or UTF-16, not UTF-8 text; leave it out of the "
                  "inputs"),
    (b"caf\xe9", "book.txt: not valid UTF-8 (byte 3); re-save it as UTF-8"),
])
def test_what_is_not_utf8_is_named_with_the_file_and_the_fix(raw, message):
    with pytest.raises(TextDecodeError) as err:
        decode_text(raw, "book.txt")
    assert str(err.value).startswith(message)


def test_an_interrupted_atomic_write_leaves_the_old_file_whole(tmp_path, monkeypatch):
    import os

    from sdgrpo.textio import write_atomic

    path = tmp_path / "marker.json"
    write_atomic(path, '{"step": 1}')
    assert path.read_text() == '{"step": 1}'

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError):
        write_atomic(path, '{"step": 2, "and much more": true}')
    assert path.read_text() == '{"step": 1}' and [p.name for p in tmp_path.iterdir()] == ["marker.json"]
