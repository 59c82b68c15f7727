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
