"""Model cards (Hugging Face format: YAML front matter, then Markdown) for adapter and exported folders.

What a card says is read from files beside the weights: ``resolved_config.yaml`` (settings), ``metrics.jsonl``
(steps, final metrics), the prepared data's ``prepare.json`` (files, sizes, prompt counts; never the text),
``eval.json`` (the verdict) and ``heldout.json``, and the base model's own card for its licence.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

KEYS = ("reward", "learning_rate", "beta", "num_generations", "max_completion_length", "lora_r", "lora_alpha",
        "max_steps", "per_device_train_batch_size", "temperature", "teacher_adapter", "teacher_model_name_or_path")


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("sdgrpo", "torch", "transformers", "trl", "peft"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def base_licence(base: str) -> str | None:
    """The ``license`` field of the base model's card, where the base is a local folder that has one."""
    card = Path(base) / "README.md"
    if not card.is_file():
        return None
    match = re.match(r"---\n(.*?)\n---", card.read_text(), re.S)
    if not match:
        return None
    try:
        return (yaml.safe_load(match.group(1)) or {}).get("license")
    except yaml.YAMLError:
        return None


def _last_metrics(folder: Path) -> tuple[int | None, dict]:
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return None, {}
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    steps = [r for r in rows if "loss" in r or "reward" in r]
    if not steps:
        return None, {}
    last = steps[-1]
    keep = {k: v for k, v in last.items() if k in ("reward", "kl", "loss", "heldout/bpb", "collapse/distinct_2",
                                                   "collapse/seq_rep_4", "mean_token_accuracy")}
    return last["step"], keep


def adapter_card(folder: str | Path, base: str, verb: str | None = None) -> str:
    """The README.md of an adapter folder written by ``sdgrpo train`` (verb "train") or ``sdgrpo sft`` ("sft"); with
    no verb, the resolved config tells (only GRPO configs have a reward)."""
    folder = Path(folder)
    cfg = yaml.safe_load((folder / "resolved_config.yaml").read_text()) if (folder / "resolved_config.yaml").is_file() \
        else {}
    verb = verb or ("train" if "reward" in cfg else "sft")
    steps, final = _last_metrics(folder)
    data = cfg.get("dataset_path")
    prepared = Path(data) / "prepare.json" if data else None
    summary = json.loads(prepared.read_text()) if prepared and prepared.is_file() else None
    licence = base_licence(base)
    full = (folder / "model.safetensors").is_file() and not (folder / "adapter_config.json").is_file()
    tags = ["sdgrpo", "full-fine-tune" if full else "lora", "grpo" if verb == "train" else "sft"]
    front = {"base_model": base, "library_name": "transformers" if full else "peft", "tags": tags}
    if licence:
        front["license"] = licence
    teacher = cfg.get("teacher_model_name_or_path")
    method = (f"GRPO with the `{cfg.get('reward', 'self_nll')}` reward (`sdgrpo train`)" if verb == "train"
              else f"supervised {'fine-tuning of every weight' if full else 'LoRA fine-tuning'} on the prepared text "
              "(`sdgrpo sft`)" + (f", distilling `{teacher}` (kd_weight {cfg.get('kd_weight')})" if teacher else ""))
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {base} fine-tuned" if full else f"# LoRA adapter for {base}", "",
             f"Trained by sdgrpo: {method}, for {steps} steps.", "",
             "## Training text", ""]
    if summary:
        lines += [f"- from: {', '.join(summary['config']['inputs'])}",
                  f"- files read: {summary.get('files_read')}, skipped: {len(summary.get('files_skipped', []))}",
                  f"- documents: {summary.get('documents')}, prompts: {summary.get('prompts')} (train "
                  f"{summary.get('train')}, test {summary.get('test')})",
                  f"- prompt tokens: {summary.get('prompt_tokens')}, continuation tokens: "
                  f"{summary.get('continuation_tokens')}"]
    else:
        lines.append(f"- dataset: {data or 'unknown'} (no prepare.json found)")
    lines += ["", "## Settings", ""]
    lines += [f"- `{k}`: {cfg[k]}" for k in KEYS if cfg.get(k) not in (None, "")]
    lines += ["", "## Final metrics", ""]
    lines += [f"- `{k}`: {v:.4g}" if isinstance(v, float) else f"- `{k}`: {v}" for k, v in final.items()] or ["- none"]
    heldout = folder / "heldout.json"
    if heldout.is_file():
        h = json.loads(heldout.read_text())
        first, last = h["history"][0], h["history"][-1]
        lines += [f"- held-out bits per byte: {first['heldout_bpb']:.4f} at step {first['step']}, "
                  f"{last['heldout_bpb']:.4f} at step {last['step']}" + (f"; best {h['best'][1]:.4f} at step "
                                                                         f"{h['best'][0]}" if h.get("best") else "")]
    evaluation = folder / "eval" / "eval.json"
    if evaluation.is_file():
        ev = json.loads(evaluation.read_text())
        lines += ["", "## Evaluation (`sdgrpo eval`)", "", ev.get("verdict", ""), ""]
        if (folder / "eval" / "frontier.png").is_file():
            lines.append("![reward against diversity](eval/frontier.png)")
    lines += ["", "## Library versions", ""] + [f"- {k} {v}" for k, v in _versions().items()]
    return "\n".join(lines) + "\n"


def export_card(adapter: Path, base: str, check: dict) -> str:
    """The README.md of an exported (merged) folder: the adapter's card, re-headed, with the parity check."""
    card = adapter_card(adapter, base)
    card = card.replace("library_name: peft", "library_name: transformers", 1)
    card = card.replace(f"# LoRA adapter for {base}", f"# {base} with an sdgrpo adapter merged in", 1)
    parity = ["## Merge check", "",
              f"Merged from `{adapter}` ({check['dtype']}). On {check['prompts_from']}: max |delta logit| against "
              f"base + adapter {check['max_abs_logit_delta']:.3g} (tolerance {check['tolerance']:g}), greedy-token "
              f"agreement {check['greedy_token_agreement']:.1%}.", ""]
    head, _, rest = card.partition("## Training text")
    return head + "\n".join(parity) + "\n## Training text" + rest


def write_card(trainer, out: Path, base: str, verb: str) -> None:
    """The adapter folder's model card (README.md), on the main process."""
    if trainer.args.should_save:
        (out / "README.md").write_text(adapter_card(out, base, verb))
