"""Data preparation on real files from ../shared/data and on tricky inputs."""

from __future__ import annotations

import json

import pytest
from datasets import load_from_disk

from sdgrpo.data import PrepareConfig, cut_document, prepare
from sdgrpo.errors import UserError
from sdgrpo.sources import read_documents
from sdgrpo.textio import decode_text


def run(tmp_path, tok, inputs, **kw):
    cfg = PrepareConfig(inputs=[str(p) for p in inputs], output=str(tmp_path / "out"), **kw)
    return prepare(cfg, tok), load_from_disk(str(tmp_path / "out"))


def test_bom_crlf_gutenberg_books(tmp_path, tiny_tokenizer, corpus):
    book = corpus / "ruth.txt"
    raw = book.read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf") and b"\r\n" in raw  # the fixture really is BOM + CRLF
    summary, ds = run(tmp_path, tiny_tokenizer, [book])
    text = decode_text(raw, "alice")
    for row in ds["train"]:
        assert "\r" not in row["prompt"] + row["continuation"] and "\ufeff" not in row["prompt"]
        # prompt and continuation are adjacent exact substrings of the source
        assert row["prompt"] + row["continuation"] in text
    assert summary["documents"] == 1 and summary["prompts"] == summary["train"] + summary["test"]
    assert summary["test"] == round(summary["prompts"] * 0.05)


def test_every_shared_file_and_determinism(tmp_path, tiny_tokenizer, corpus):
    cfg = dict(max_prompts=None, seed=3)
    s1, d1 = run(tmp_path / "a", tiny_tokenizer, [corpus], **cfg)
    s2, d2 = run(tmp_path / "b", tiny_tokenizer, [corpus], **cfg)
    assert list(d1["train"]["prompt"]) == list(d2["train"]["prompt"])
    sources = {src.split("/")[-1] for src in list(d1["train"]["source"]) + list(d1["test"]["source"])}
    books = {p.name for p in corpus.rglob("*.txt") if p.name != "SOURCE.txt"}
    assert books <= sources
    lengths = [len(tiny_tokenizer(p, add_special_tokens=False)["input_ids"]) for p in list(d1["train"]["prompt"])[:300]]
    assert min(lengths) >= 12 and max(lengths) <= 72  # cut at 16..64 tokens; boundaries may merge a few
    assert s1["prompt_tokens"]["min"] >= 16 and s1["prompt_tokens"]["max"] <= 64


def test_prompts_do_not_end_inside_a_word(tmp_path, tiny_tokenizer, corpus):
    _, ds = run(tmp_path, tiny_tokenizer, [corpus / "genesis.txt"])
    mid_word = sum(r["prompt"][-1].isalnum() and r["continuation"][:1].isalnum() for r in ds["train"])
    assert mid_word <= 0.02 * len(ds["train"])


def test_duplicates_and_near_empty_dropped(tmp_path, tiny_tokenizer, corpus):
    para = (corpus / "genesis.txt").read_text()[:3000]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text(para)
    (tmp_path / "in" / "b.txt").write_text(para)  # same text twice
    (tmp_path / "in" / "c.txt").write_text("   \n\n\t\n")
    (tmp_path / "in" / "d.txt").write_text(" ".join(str(i) for i in range(1, 28)) * 5)
    summary, ds = run(tmp_path, tiny_tokenizer, [tmp_path / "in"])
    assert summary["dropped_duplicate"] == summary["prompts"]  # every prompt of b.txt duplicates one of a.txt
    assert summary["dropped_near_empty"] >= 1
    prompts = list(ds["train"]["prompt"]) + list(ds["test"]["prompt"])
    assert len(prompts) == len(set(prompts))


def test_cut_respects_token_counts(tiny_tokenizer, corpus):
    import random

    text = (corpus / "genesis.txt").read_text()[:20_000]
    cfg = PrepareConfig(min_prompt_tokens=10, max_prompt_tokens=10, continuation_tokens=20)
    pieces = cut_document(text, tiny_tokenizer, cfg, random.Random(0))
    assert len(pieces) > 10
    for p in pieces:
        assert p["prompt_tokens"] == 10
        n = len(tiny_tokenizer(p["continuation"], add_special_tokens=False)["input_ids"])
        assert 17 <= n <= 23


def test_bad_file_skipped_when_others_usable(tmp_path, tiny_tokenizer, corpus):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "bad.txt").write_bytes(b"\xff\xfeh\x00i\x00")
    (tmp_path / "in" / "good.txt").write_text((corpus / "genesis.txt").read_text()[:5000])
    summary, _ = run(tmp_path, tiny_tokenizer, [tmp_path / "in"])
    assert summary["files_read"] == 1 and "bad.txt" in summary["files_skipped"][0]


def test_empty_inputs_raise(tmp_path, tiny_tokenizer):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("  \n ")
    with pytest.raises(UserError, match="no usable text"):
        run(tmp_path, tiny_tokenizer, [tmp_path / "empty"])
    with pytest.raises(UserError, match="no such file"):
        run(tmp_path, tiny_tokenizer, [tmp_path / "missing"])
    (tmp_path / "r.jsonl").write_text('{"text": "a"}\nnot json\n')
    with pytest.raises(UserError, match=r"r.jsonl:2: not valid JSON"):
        run(tmp_path, tiny_tokenizer, [tmp_path / "r.jsonl"])
    (tmp_path / "s.jsonl").write_text('{"body": "a"}\n')
    with pytest.raises(UserError, match="no field 'text'"):
        run(tmp_path, tiny_tokenizer, [tmp_path / "s.jsonl"])


def test_no_test_split_still_loads(tmp_path, tiny_tokenizer, corpus):
    """--test_size 0 writes only a train split, and the folder loads back for training."""
    from sdgrpo.data import load_prompts

    out = tmp_path / "p"
    summary = prepare(PrepareConfig(inputs=[str(corpus / "ruth.txt")], output=str(out),
                                    test_size=0.0, max_prompts=30), tiny_tokenizer)
    assert summary["train"] == 30 and summary["test"] == 0
    assert len(load_prompts(str(out), "train")) == 30
    with pytest.raises(UserError, match="has no 'test' split"):
        load_prompts(str(out), "test")


def test_output_is_unchanged_on_the_test_corpus(tmp_path):
    """Streaming and block-wise tokenization left the cut of ordinary files as it was: the same windows in the same
    order as before the change (hash recorded from the earlier, whole-document implementation)."""
    import hashlib

    from conftest import CORPUS
    from sdgrpo.config import TINY_MODEL
    from sdgrpo.modeling import load_tokenizer

    summary, ds = run(tmp_path, load_tokenizer(TINY_MODEL, False), [CORPUS])
    digest = hashlib.sha256()
    for split in ("train", "test"):
        for row in ds[split]:
            digest.update(json.dumps([split, row["prompt"], row["continuation"], row["prompt_tokens"],
                                      row["source"].rsplit("/", 1)[-1]]).encode())
    assert (summary["train"], summary["test"]) == (681, 36)
    assert digest.hexdigest() == "802b924d94cdea440c4229ac3bd6f96ba1494d68ce5e05f88a9afa1a1f82a361"


def test_a_huge_document_is_tokenized_in_bounded_blocks(tmp_path, tiny_tokenizer, corpus, monkeypatch):
    import sdgrpo.data as data

    text = (corpus / "exodus.txt").read_text()
    pieces = list(data.blocks(text, 20_000))
    assert "".join(pieces) == text and len(pieces) >= 8
    assert all(len(p) <= 20_000 for p in pieces)
    assert all(p.startswith("CHAPTER") or p[0].isupper() for p in pieces)  # cut at paragraph starts
    assert list(data.blocks(text, len(text))) == [text]  # a document that fits is one block, itself

    lengths = []

    class Spy:
        def __getattr__(self, name):
            return getattr(tiny_tokenizer, name)

        def __call__(self, text, **kw):
            lengths.append(len(text))
            return tiny_tokenizer(text, **kw)

    monkeypatch.setattr(data, "BLOCK_CHARS", 20_000)
    monkeypatch.setattr(data.blocks, "__defaults__", (20_000,))
    (tmp_path / "big.txt").write_text(text)
    cfg = PrepareConfig(inputs=[str(tmp_path / "big.txt")], output=str(tmp_path / "out"))
    examples, counts = data.build_examples(read_documents(cfg.inputs), Spy(), cfg)
    assert max(lengths) <= 20_000 and len(lengths) == len(pieces)
    assert counts["documents"] == 1 and len(examples) > 100
    for ex in examples:  # windows never cross a block boundary
        assert any(ex["prompt"] + ex["continuation"] in p for p in pieces)


def test_a_half_written_prepare_json_means_prepare_again(tmp_path, tiny_model_dir, corpus):
    """A prepare.json cut short (a crash, or a reader racing a writer) is not a prepared folder: the data is made
    again, with a whole marker, instead of a JSON traceback."""
    from sdgrpo.data import prepared_or_raw

    (tmp_path / "run" / "data").mkdir(parents=True)
    (tmp_path / "run" / "data" / "prepare.json").write_text('{"fingerprint": "ab')
    got = prepared_or_raw(str(corpus / "ruth.txt"), str(tmp_path / "run"), str(tiny_model_dir))
    assert got == str(tmp_path / "run" / "data")
    summary = json.loads((tmp_path / "run" / "data" / "prepare.json").read_text())
    assert summary["prompts"] > 0 and summary["fingerprint"]
    assert not list((tmp_path / "run" / "data").glob("*.tmp"))


def test_the_prepared_copy_is_rebuilt_only_where_sdgrpo_wrote_every_file(tmp_path, tiny_model_dir, corpus):
    """Other text makes ``output_dir/data`` stale; it is rebuilt while it holds only what sdgrpo wrote, and refused
    (the file kept) once something else is in it."""
    from sdgrpo.data import prepared_or_raw

    run, data = tmp_path / "run", tmp_path / "run" / "data"
    prepared_or_raw(str(corpus / "ruth.txt"), str(run), str(tiny_model_dir))
    prepared_or_raw(str(corpus / "jonah.txt"), str(run), str(tiny_model_dir))
    assert json.loads((data / "prepare.json").read_text())["config"]["inputs"] == [str(corpus / "jonah.txt")]
    (data / "notes.txt").write_text("mine\n")
    with pytest.raises(UserError, match=r"holds files sdgrpo did not write \(notes.txt\)"):
        prepared_or_raw(str(corpus / "ruth.txt"), str(run), str(tiny_model_dir))
    assert (data / "notes.txt").read_text() == "mine\n"
    assert json.loads((data / "prepare.json").read_text())["config"]["inputs"] == [str(corpus / "jonah.txt")]
