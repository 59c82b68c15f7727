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
    (b"\xef\xbb\xbfcaf\xe9 au lait", "book.txt: not valid UTF-8 (byte 6); re-save it as UTF-8"),  # the file's byte
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


def test_a_utf8_character_cut_off_at_the_end_loses_only_itself(caplog):
    """An excerpt cut by bytes ends in part of a character: the text before it is read, with a warning naming the
    file and the bytes dropped (the whole file was skipped, 30 KB for 2 bytes). Where nothing before is beyond ASCII,
    the bytes may as well be Latin-1: refused as before. A bad byte before the end is refused too."""
    text = "Alice — «down the rabbit hole» and héllo"
    raw = (text + "ö").encode()[:-1]
    assert decode_text(raw, "alice.txt") == text
    assert "alice.txt: its last character is cut off (1 of its bytes, not whole UTF-8)" in caplog.text
    assert decode_text(b"\xef\xbb\xbf" + raw, "bom.txt") == text  # a BOM's 3 bytes do not shift the error's place
    for bad in (b"plain ascii then \xe2\x80", text.encode() + b"\xff" + b"tail"):
        with pytest.raises(TextDecodeError, match="not valid UTF-8"):
            decode_text(bad, "x.txt")
