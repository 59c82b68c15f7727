"""Finding and decoding raw files (sdgrpo.sources, sdgrpo.textio): formats, encodings, unreadable files."""

from __future__ import annotations

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset

from sdgrpo.errors import UserError
from sdgrpo.sources import read_documents
from test_data import run


def test_record_formats(tmp_path, tiny_tokenizer, corpus):
    paras = [p for p in (corpus / "genesis.txt").read_text()[:60_000].split("\n\n") if p]
    doc = "\n\n".join(paras[:40])
    (tmp_path / "in").mkdir()
    with open(tmp_path / "in" / "a.jsonl", "w") as fh:
        fh.write(json.dumps({"body": doc}) + "\n\n")
    (tmp_path / "in" / "b.json").write_text(json.dumps({"rows": [{"body": doc.upper()}]}))
    with open(tmp_path / "in" / "c.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "body"])
        w.writerow([1, doc.lower()])
    pq.write_table(pa.table({"body": [doc[::-1]]}), tmp_path / "in" / "d.parquet")
    Dataset.from_dict({"body": [doc.swapcase()]}).save_to_disk(str(tmp_path / "in" / "saved"))
    (tmp_path / "in" / "ignored.bin").write_bytes(b"\x00\x01")
    docs = read_documents([str(tmp_path / "in")], text_field="body")
    assert sorted(d.text for d in docs) == sorted([doc, doc.upper(), doc.lower(), doc[::-1], doc.swapcase()])
    summary, _ = run(tmp_path, tiny_tokenizer, [tmp_path / "in"], text_field="body")
    assert summary["documents"] == 5 and summary["prompts"] > 10


@pytest.mark.parametrize(
    "content, message",
    [
        ("\ufeffhi".encode("utf-16"), "UTF-16"),
        (b"caf\xe9 au lait, " * 20, "not valid UTF-8"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00", "NUL bytes"),
    ],
)
def test_bad_encodings_are_named(tmp_path, tiny_tokenizer, content, message):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    with pytest.raises(UserError, match=message) as err:
        run(tmp_path, tiny_tokenizer, [bad])
    assert "bad.txt" in str(err.value)


def test_unreadable_file_is_one_clear_error(tmp_path, tiny_tokenizer, monkeypatch):
    from pathlib import Path

    from sdgrpo.errors import UserError
    from sdgrpo.sources import read_documents

    (tmp_path / "a.txt").write_text("some text " * 50)

    def denied(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", denied)  # as root, chmod 000 would not stop the read
    with pytest.raises(UserError, match=r"a.txt: permission denied; make the file readable"):
        read_documents([str(tmp_path / "a.txt")])


def _book(corpus, name: str, chars: int = 6000) -> str:
    return (corpus / name).read_text(encoding="utf-8-sig")[:chars]  # ruth.txt opens with a BOM


def test_symlinked_folders_are_followed_once(tmp_path, corpus, caplog):
    """A symlinked subfolder is read (it used to be left out without a word); a link back to a folder already
    read (a loop) or a second link to one is skipped, all of them in one warning with their count."""
    import logging
    import os

    root, outside = tmp_path / "texts", tmp_path / "elsewhere"
    (root / "a").mkdir(parents=True)
    outside.mkdir()
    (root / "a" / "genesis.txt").write_text(_book(corpus, "genesis.txt"))
    (outside / "ruth.txt").write_text(_book(corpus, "ruth.txt"))
    os.symlink(outside, root / "b")  # a folder kept elsewhere, linked in
    os.symlink(root, root / "a" / "loop")  # a loop
    os.symlink(root / "a", root / "c")  # a second path to a folder read
    with caplog.at_level(logging.WARNING, logger="sdgrpo.sources"):
        docs = read_documents([str(root)])
    assert sorted(d.text for d in docs) == sorted([_book(corpus, "genesis.txt"), _book(corpus, "ruth.txt")])
    assert [d.source for d in docs] == [str(root / "a" / "genesis.txt"), str(root / "b" / "ruth.txt")]
    assert [r.getMessage() for r in caplog.records] == [
        "skipping 2 link(s) to a folder or file already read (a loop or a second path; each is read once): a/loop, c"]


def _without_root_privileges() -> list[str]:
    """A command prefix under which permissions hold: none for a user; for root, setpriv without the capabilities
    that let root read anything (root would otherwise read a chmod 000 file)."""
    import os
    import shutil

    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: permissions cannot be made to hold")
    return ["setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search"]


def test_unreadable_files_and_folders_are_one_warning_not_a_traceback(tmp_path, corpus):
    """`sdgrpo prepare` on a folder holding a file and a subfolder it may not read: both skipped in one warning with
    their count (the file used to stop the run; the subfolder was left out without a word), listed in prepare.json."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = tmp_path / "texts"
    (root / "locked").mkdir(parents=True)
    (root / "exodus.txt").write_text(_book(corpus, "exodus.txt", 40_000))
    (root / "locked" / "ruth.txt").write_text(_book(corpus, "ruth.txt"))
    (root / "secret.txt").write_text(_book(corpus, "genesis.txt"))
    os.chmod(root / "locked", 0)
    os.chmod(root / "secret.txt", 0)
    prefix = _without_root_privileges()
    try:
        probe = subprocess.run([*prefix, sys.executable, "-c", f"open({str(root / 'secret.txt')!r}).read()"],
                               capture_output=True, text=True)
        if "PermissionError" not in probe.stderr:
            pytest.skip(f"permissions do not hold here ({probe.stderr.strip()[-200:] or 'the file was read'})")
        src = str(Path(__file__).resolve().parents[1] / "src")
        r = subprocess.run([*prefix, sys.executable, "-m", "sdgrpo.cli", "prepare", str(root), "--output",
                            str(tmp_path / "out")], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": src})
    finally:
        os.chmod(root / "locked", 0o755)
        os.chmod(root / "secret.txt", 0o644)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    warnings = [line for line in r.stderr.splitlines() if line.startswith("WARNING")]
    assert warnings == [f"WARNING sdgrpo.sources: skipping 2 unreadable file(s) or folder(s): {root / 'locked'} "
                        f"(Permission denied), {root / 'secret.txt'} (Permission denied)"]
    summary = json.loads((tmp_path / "out" / "prepare.json").read_text())
    assert summary["files_read"] == 1 and summary["files_skipped"] == [
        f"{root / 'locked'} (Permission denied): unreadable", f"{root / 'secret.txt'} (Permission denied): unreadable"]


def test_a_long_file_without_newlines_shows_progress_while_it_is_read(tmp_path, tiny_tokenizer, corpus, capsys):
    """A document longer than one block (250,000 characters) gets a progress bar over its characters."""
    from sdgrpo.data import BLOCK_CHARS

    words = " ".join(_book(corpus, "genesis.txt", 200_000).split())
    text = (words + " ") * (2 * BLOCK_CHARS // len(words) + 1)
    (tmp_path / "one-line.txt").write_text(text)
    assert "\n" not in text and len(text) > 2 * BLOCK_CHARS
    summary, _ = run(tmp_path, tiny_tokenizer, [tmp_path / "one-line.txt"])
    err = capsys.readouterr().err
    total = f"{len(text) / 1000:.0f}k"
    assert f"reading {tmp_path / 'one-line.txt'}: 100%" in err and f"{total}/{total}" in err, err[-500:]
    assert summary["documents"] == 1 and summary["prompts"] > 100
