"""Model cards (sdgrpo.cards) from what a run leaves in its folder: config, metrics, held-out history, eval."""

from __future__ import annotations

import json

import yaml

from sdgrpo.cards import adapter_card, base_licence, export_card


def run_folder(tmp_path, reward: str | None = "context_distill"):
    data = tmp_path / "data"
    data.mkdir()
    (data / "prepare.json").write_text(json.dumps({"config": {"inputs": ["books/"]}, "files_read": 3,
                                                   "files_skipped": ["x.bin"], "documents": 3, "prompts": 120,
                                                   "train": 114, "test": 6, "prompt_tokens": {"mean": 40},
                                                   "continuation_tokens": {"mean": 64}}))
    run = tmp_path / "run"
    run.mkdir()
    cfg = {"dataset_path": str(data), "learning_rate": 3e-4, **({"reward": reward} if reward else {})}
    (run / "resolved_config.yaml").write_text(yaml.safe_dump(cfg))
    rows = [{"step": 1, "reward": -3.0, "loss": 0.1}, {"step": 2, "reward": -2.5, "kl": 0.02, "loss": 0.05,
                                                       "other": 1}, {"step": 2, "train_runtime": 9.0}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (run / "heldout.json").write_text(json.dumps({"history": [{"step": 0, "heldout_bpb": 1.5},
                                                              {"step": 2, "heldout_bpb": 1.45}],
                                                  "best": [2, 1.45]}))
    return run


def test_adapter_card_says_what_trained_it_on_what_and_how_it_ended(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n# a model\n")
    assert base_licence(str(base)) == "apache-2.0"
    card = adapter_card(run_folder(tmp_path), str(base))
    front = yaml.safe_load(card.split("---")[1])
    assert front == {"base_model": str(base), "library_name": "peft", "tags": ["sdgrpo", "lora", "grpo"],
                     "license": "apache-2.0"}
    assert "GRPO with the `context_distill` reward (`sdgrpo train`), for 2 steps." in card
    assert "- documents: 3, prompts: 120 (train 114, test 6)" in card and "skipped: 1" in card
    assert "- `reward`: -2.5\n- `kl`: 0.02\n- `loss`: 0.05\n" in card and "`other`" not in card
    assert "- held-out bits per byte: 1.5000 at step 0, 1.4500 at step 2; best 1.4500 at step 2" in card


def test_sft_card_and_export_card(tmp_path):
    run = run_folder(tmp_path, reward=None)
    card = adapter_card(run, "some/base")
    assert "supervised LoRA fine-tuning on the prepared text (`sdgrpo sft`)" in card and "license" not in card
    check = {"dtype": "float32", "prompts_from": "the training text", "max_abs_logit_delta": 1.2e-5,
             "tolerance": 1e-4, "greedy_token_agreement": 1.0}
    merged = export_card(run, "some/base", check)
    assert "library_name: transformers" in merged and "# some/base with an sdgrpo adapter merged in" in merged
    assert merged.index("## Merge check") < merged.index("## Training text")
    assert ("max |delta logit| against base + adapter 1.2e-05 (tolerance 0.0001), greedy-token agreement 100.0%"
            in merged)
