"""Use what you trained: raw text to an adapter in one command, model cards, export with a parity check, generate."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run_cli


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, corpus):
    """`sdgrpo train` straight from a raw text folder (3 steps), then `sdgrpo eval` beside it."""
    root = tmp_path_factory.mktemp("trained")
    raw = root / "raw"
    raw.mkdir()
    (raw / "jonah.txt").write_text((corpus / "jonah.txt").read_text())
    (raw / "esther.txt").write_text((corpus / "esther.txt").read_text())
    (raw / "cover.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    out = root / "run"
    args = ["train", "--model_name_or_path", tiny_model_dir, "--dataset_path", raw, "--output_dir", out,
            "--max_steps", 3, "--per_device_train_batch_size", 4, "--num_generations", 4, "--max_completion_length",
            8, "--learning_rate", "5e-3", "--report_to", "none", "--save_steps", 3]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    again = run_cli(*args[:-2], "--save_steps", 3, "--max_steps", 4, "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    return root, raw, out, first, again


def test_raw_folder_trains_in_one_command(trained):
    root, raw, out, first, again = trained
    assert (out / "data" / "prepare.json").is_file() and (out / "adapter_model.safetensors").is_file()
    said = [line for line in first.stderr.splitlines() if "prepared with the default options" in line]
    assert len(said) == 1 and str(raw) in said[0] and said[0].startswith("INFO sdgrpo.data: raw text")
    skipped = [line for line in first.stderr.splitlines() if "skipping 1 file(s) of a type" in line]
    assert len(skipped) == 1 and "cover.png" in skipped[0]
    assert "using the prepared data" in again.stderr and "prepared with the default options" not in again.stderr
    summary = json.loads((out / "data" / "prepare.json").read_text())
    assert summary["files_read"] == 2 and summary["prompts"] == summary["train"] + summary["test"]


def test_adapter_card_names_base_reward_and_steps(trained, tiny_model_dir):
    _, _, out, _, _ = trained
    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model: " + str(tiny_model_dir))
    assert "GRPO with the `self_nll` reward" in card and "for 4 steps" in card
    assert "- files read: 2" in card
    assert "Jonah" not in card  # the card summarises the text, never quotes it
    assert "- `learning_rate`: 0.005" in card and "trl " in card


def independent_logits(model_dir, adapter_dir, ids):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                      str(adapter_dir)).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def test_export_reproduces_base_plus_adapter(trained, tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    root, _, out, _, _ = trained
    merged = root / "merged"
    r = run_cli("export", "--adapter", out, "--output", merged)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "max |delta logit|" in r.stdout
    parity = json.loads((merged / "parity.json").read_text())
    assert parity["passed"] and parity["max_abs_logit_delta"] <= 1e-4 and parity["greedy_token_agreement"] == 1.0
    assert str(out / "data") in parity["prompts_from"]  # the adapter's own held-out prompts
    assert not any(p.name.startswith("adapter_") for p in merged.iterdir())  # a plain model folder
    plain = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    ids = tiny_tokenizer("And the word of the LORD came unto Jonah")["input_ids"]
    with torch.no_grad():
        got = plain(input_ids=torch.tensor([ids])).logits[0]
    want = independent_logits(tiny_model_dir, out, ids)
    assert (got - want).abs().max().item() <= 1e-4
    with torch.no_grad():  # the adapter matters, so a merge that dropped it would fail above
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)(input_ids=torch.tensor([ids]))
    assert (base.logits[0] - want).abs().max().item() > 1e-3
    card = (merged / "README.md").read_text()
    assert card.startswith("---\nbase_model: " + str(tiny_model_dir)) and "library_name: transformers" in card
    assert "## Merge check" in card and "GRPO with the `self_nll` reward" in card and "for 4 steps" in card


def test_export_bf16_within_its_stated_tolerance(trained, tmp_path):
    import shutil

    _, _, out, _, _ = trained
    adapter = tmp_path / "adapter"  # as if trained on a 4-bit base (--load_in_4bit true)
    shutil.copytree(out, adapter, ignore=shutil.ignore_patterns("checkpoint-*", "data"))
    resolved = adapter / "resolved_config.yaml"
    resolved.write_text(resolved.read_text().replace("load_in_4bit: false", "load_in_4bit: true"))
    r = run_cli("export", "--adapter", adapter, "--output", tmp_path / "bf16", "--dtype", "bfloat16")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "the adapter was trained on a 4-bit base" in r.stderr and "is loaded in bfloat16 for the merge" in r.stderr
    parity = json.loads((tmp_path / "bf16" / "parity.json").read_text())
    assert parity["tolerance"] == 0.25 and parity["max_abs_logit_delta"] <= 0.25 and parity["dtype"] == "bfloat16"
    weights = load_file(str(next((tmp_path / "bf16").glob("*.safetensors"))))
    assert all(t.dtype == torch.bfloat16 for t in weights.values())


@pytest.mark.parametrize("damage", ["nan", "shape"])
def test_a_corrupted_adapter_fails_in_one_line_and_leaves_nothing(trained, tmp_path, damage):
    import shutil

    _, _, out, _, _ = trained
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(out / "adapter_config.json", bad)
    weights = load_file(str(out / "adapter_model.safetensors"))
    name = next(k for k in weights if "lora_B" in k)
    weights[name] = torch.full_like(weights[name], float("nan")) if damage == "nan" else torch.zeros(3, 5)
    save_file(weights, str(bad / "adapter_model.safetensors"))
    r = run_cli("export", "--adapter", bad, "--output", tmp_path / "merged")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    # a tensor of the wrong shape is refused before the base loads, non-finite weights once it has
    refused = "export refused" if damage == "nan" else f"--adapter {bad}: made for another model than "
    assert last.startswith("sdgrpo export: error:") and refused in last, last
    assert not (tmp_path / "merged").exists() and not (tmp_path / "merged.partial").exists()


def test_generate_from_base_adapter_and_exported_folder(trained, tiny_model_dir, tmp_path):
    root, _, out, _, _ = trained
    merged = root / "merged"
    if not merged.exists():
        assert run_cli("export", "--adapter", out, "--output", merged).returncode == 0
    texts = {}
    for name, source in (("base", ["--model_name_or_path", tiny_model_dir]), ("adapter", ["--adapter", out]),
                         ("exported", ["--model_name_or_path", merged])):
        path = tmp_path / f"{name}.jsonl"
        r = run_cli("generate", *source, "--prompt", "And the LORD said", "--prompt", "Then Jonah prayed",
                    "--num_samples", 2, "--max_new_tokens", 12, "--seed", 3, "--output", path)
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.count("### prompt") == 4 and "4 samples" in r.stderr
        rows = [json.loads(x) for x in path.read_text().splitlines()]
        assert len(rows) == 4 and all(x["mean_logprob"] < 0 and x["tokens"] > 0 for x in rows)
        texts[name] = [x["sample"] for x in rows]
    assert texts["adapter"] == texts["exported"]  # same distribution, same seed: the merge is exact in fp32
    assert texts["adapter"] != texts["base"]
    r = run_cli("generate", "--adapter", out)
    assert r.returncode == 2 and "no prompt" in r.stderr.strip().splitlines()[-1]
    r = run_cli("generate", "--adapter", root, "--prompt", "And")  # a folder with no adapter: before any work
    assert r.returncode == 2 and "no adapter_config.json there" in r.stderr.strip().splitlines()[-1]
