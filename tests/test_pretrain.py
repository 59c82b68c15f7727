"""The shipped tiny model loads offline through from_pretrained and keeps its model card's held-out figure."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import torch

from sdgrpo.config import TINY_MODEL, tiny_model_recipe
from sdgrpo.probes import evaluate_bpb, split_text, unigram_nll

PretrainConfig, main = tiny_model_recipe().PretrainConfig, tiny_model_recipe().main

CARD = Path(TINY_MODEL) / "README.md"


def card_figure(name: str) -> float:
    match = re.search(rf"\*\*{name}\*\* \| \*\*([0-9.]+)\*\*", CARD.read_text())
    assert match, name
    return float(match.group(1))


def test_shipped_files_are_safe_and_small():
    files = {p.name for p in Path(TINY_MODEL).iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    assert (Path(TINY_MODEL) / "model.safetensors").stat().st_size <= 12_000_000


def card_row(label: str) -> str:
    line = next(x for x in CARD.read_text().splitlines() if x.startswith(f"| {label}"))
    return line.split("|")[2]




def test_bits_per_byte_on_the_test_corpus_match_the_model_card(shipped, corpus):
    model, tok = shipped
    texts = [p.read_text(encoding="utf-8-sig") for p in sorted(corpus.glob("*.txt"))]
    bpb, nbytes = evaluate_bpb(model, tok, texts, 256, "cpu")
    assert nbytes == 480_166
    assert bpb == pytest.approx(float(re.search(r"[0-9.]+", card_row("bits per byte on `tests/data/kjv`"))[0]),
                                abs=5e-4)
    assert card_figure("held-out bits per byte") <= 1.4829  # not worse than the model it replaced (Gutenberg)






def test_split_and_unigram_by_hand():
    train, held = split_text("aaaa\nbbbb\ncccc\ndddd\n", 0.25)
    assert train == "aaaa\nbbbb\ncccc\n" and held == "dddd\n"
    counts = torch.tensor([0, 0, 1])  # token 0 twice, token 1 once; vocab 3 -> add-one: 3/6, 2/6, 1/6
    nll = unigram_nll(counts, torch.tensor([9, 1, 2]), 3)  # the first id (BOS) is not predicted
    assert nll == pytest.approx(-math.log(2 / 6) - math.log(1 / 6))


def test_pretrain_recipe_runs_and_saves_a_loadable_model(tmp_path, corpus):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = tmp_path / "data" / "tinyshakespeare"
    data.mkdir(parents=True)
    (data / "input.txt").write_text((corpus / "genesis.txt").read_text()[:100_000])
    cfg = PretrainConfig(data_dir=str(tmp_path / "data"), output_dir=str(tmp_path / "out"), vocab_size=300,
                         hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         seq_len=64, batch_size=8, max_steps=30, eval_every=15, hidden_dropout=0.1,
                         learning_rate=3e-3, warmup_steps=5)
    result = main(cfg)
    assert [h["step"] for h in result["history"]] == [15, 30]
    assert result["history"][-1]["heldout_bpb"] < result["history"][0]["heldout_bpb"]
    assert result["heldout_bytes"] == len(split_text(
        (data / "input.txt").read_text(), 0.05)[1].encode())
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok("hello")["input_ids"][0] == tok.bos_token_id == model.config.bos_token_id
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_given_tokenizer_and_time_budget(tmp_path, corpus):
    """A teacher reuses the shipped tokenizer (same ids as the student); a time budget stops it, still saved, with
    the learning rate paced to end decayed."""
    from transformers import AutoTokenizer

    _lr_at = tiny_model_recipe()._lr_at

    data = tmp_path / "data" / "tinyshakespeare"
    data.mkdir(parents=True)
    (data / "input.txt").write_text((corpus / "genesis.txt").read_text()[:50_000])
    cfg = PretrainConfig(data_dir=str(tmp_path / "data"), output_dir=str(tmp_path / "out"),
                         tokenizer_path=str(TINY_MODEL), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, seq_len=32, batch_size=4, max_steps=10**6, eval_every=10**6,
                         max_seconds=2.0, warmup_steps=5)
    result = main(cfg)
    last = result["history"][-1]
    assert last["stopped_by_time"] and 2.0 < last["elapsed_s"] < 10 and last["step"] < 10**6
    assert AutoTokenizer.from_pretrained(tmp_path / "out").get_vocab() == AutoTokenizer.from_pretrained(
        TINY_MODEL).get_vocab()
    # Paced by time: half the budget gone is half the cosine, whatever the step count says.
    lr = _lr_at(100, cfg, elapsed=1.0)
    assert lr == pytest.approx(cfg.learning_rate * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5))
    assert _lr_at(100, cfg, elapsed=2.0) == pytest.approx(cfg.learning_rate * cfg.min_lr_ratio)


def test_a_run_split_over_calls_equals_one_run(tmp_path, corpus):
    """--resume_dir: 6 steps, then the same run continued to 12, ends with the same weights (bit for bit, CPU) and
    held-out figure as 12 steps in one call; the state is safetensors + JSON; another model shape is refused."""
    from safetensors.torch import load_file

    from sdgrpo.errors import UserError

    data = tmp_path / "data" / "tinyshakespeare"
    data.mkdir(parents=True)
    (data / "input.txt").write_text((corpus / "genesis.txt").read_text()[:50_000])

    def cfg(name, steps, **kw):
        # min_lr_ratio 1: a constant rate after warm-up, so stopping at 6 of 12 leaves the schedule unchanged.
        return PretrainConfig(data_dir=str(tmp_path / "data"), output_dir=str(tmp_path / name),
                              tokenizer_path=str(TINY_MODEL), hidden_size=32, num_hidden_layers=1,
                              num_attention_heads=2, intermediate_size=64, seq_len=32, batch_size=4,
                              max_steps=steps, eval_every=4, warmup_steps=3, min_lr_ratio=1.0, hidden_dropout=0.1,
                              resume_dir=str(tmp_path / f"{name}-state"), **kw)

    whole = main(cfg("whole", 12))
    first = main(cfg("split", 6))
    assert first["steps"] == 6 and [h["step"] for h in first["history"]] == [4, 6]
    second = main(cfg("split", 12))
    assert second["steps"] == 12
    assert [h["step"] for h in second["history"]] == [4, 6, 8, 12]
    assert second["heldout_bpb"] == whole["heldout_bpb"]
    a = load_file(str(tmp_path / "whole-state" / "model.safetensors"))
    b = load_file(str(tmp_path / "split-state" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = tmp_path / "split-state"
    assert sorted(p.suffix for p in state.iterdir() if p.is_file()) == [".json"] * 3 + [".safetensors"] * 4
    assert json.loads((state / "train_state.json").read_text())["step"] == 12
    with pytest.raises(UserError, match="differs in hidden_size"):
        main(dataclasses.replace(cfg("split", 14), hidden_size=64))
