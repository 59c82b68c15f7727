"""``sdgrpo export``: the base with a trained adapter merged in, saved as a plain model folder, with a parity check.

The merged folder loads with plain ``transformers.AutoModelForCausalLM`` (no PEFT), vLLM or conversion tools. The
parity check always runs: on held-out prompts (the adapter's prepared test split when its resolved config names one,
else a few built-in lines), the merged model's logits against base + adapter (max |delta logit|) and greedy-token
agreement. Outside tolerance the export fails with one line and leaves nothing: the folder is written under
``OUTPUT.partial`` (made and locked before the models load: an unwritable target is one line at once) and renamed
only after the check passed.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from sdgrpo.errors import UserError

logger = logging.getLogger(__name__)

# Max |delta logit| accepted per dtype: fp32 merges are exact up to summation order; 16-bit weights round.
TOLERANCE = {"float32": 1e-4, "bfloat16": 0.25, "float16": 0.05}
BUILTIN_PROMPTS = ["The morning was cold, and", "In the beginning", "She opened the letter and read", "It is a truth"]


@dataclass
class ExportConfig:
    adapter: str = field(default="", metadata={
        "help": "The LoRA adapter folder to merge (from `sdgrpo train` or `sft`)."})
    output: str = field(default="", metadata={
        "help": "A new folder for the merged model (safetensors, tokenizer, export.json); an existing one is refused."})
    model_name_or_path: str = field(default="", metadata={
        "help": "The base to merge into (default: the adapter's base_model_name_or_path)."})
    dtype: str = field(default="float32", metadata={
        "help": f"dtype of the merged weights, one of {', '.join(TOLERANCE)}."})
    max_delta: float = field(default=0.0, metadata={
        "help": "Largest |delta logit| between the merged model and base + adapter that passes the parity check "
                f"(0: per dtype, {', '.join(f'{k} {v:g}' for k, v in TOLERANCE.items())}); above it nothing is "
                "written."})
    push_to_hub: str = field(default="", metadata={"help": "Also upload the merged folder to this hub repository."})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "Run code shipped with the model (off: only transformers' own architectures load)."})


def adapter_base(adapter: Path) -> str:
    path = adapter / "adapter_config.json"
    if not path.is_file():
        raise UserError(f"{adapter}: no adapter_config.json; pass a folder written by `sdgrpo train` or `sdgrpo sft`")
    return json.loads(path.read_text()).get("base_model_name_or_path") or ""


def training_config(adapter: Path) -> dict:
    """The ``resolved_config.yaml`` that ``train``/``sft`` wrote beside the adapter, or {}."""
    resolved = adapter / "resolved_config.yaml"
    return yaml.safe_load(resolved.read_text()) or {} if resolved.is_file() else {}


def parity_prompts(adapter: Path, tokenizer, limit: int = 8) -> tuple[list[list[int]], str]:
    """Token ids of held-out prompts: the adapter's prepared test split when known, else built-in lines."""
    data = training_config(adapter).get("dataset_path")
    if data and Path(data).is_dir():
        from sdgrpo.data import load_prompts

        try:
            texts = list(load_prompts(data, "test", limit)["prompt"])
            return tokenizer(texts)["input_ids"], f"{data} (test split, {len(texts)} prompts)"
        except UserError:
            pass
    return tokenizer(BUILTIN_PROMPTS)["input_ids"], f"{len(BUILTIN_PROMPTS)} built-in lines"


@torch.no_grad()
def parity(merged, reference, prompts: list[list[int]], new_tokens: int = 16) -> dict:
    """Max |delta logit| over every position of the prompts, and greedy agreement over ``new_tokens`` tokens."""
    max_delta, agree, total = 0.0, 0, 0
    for ids in prompts:
        x = torch.tensor([ids])
        a, b = merged(input_ids=x).logits.float(), reference(input_ids=x).logits.float()
        max_delta = max(max_delta, (a - b).abs().max().item())
        ga = merged.generate(x, max_new_tokens=new_tokens, do_sample=False)[0, len(ids):]
        gb = reference.generate(x, max_new_tokens=new_tokens, do_sample=False)[0, len(ids):]
        n = min(len(ga), len(gb))
        agree += int((ga[:n] == gb[:n]).sum())
        total += max(len(ga), len(gb))
    return {"max_abs_logit_delta": max_delta, "greedy_token_agreement": agree / max(1, total), "prompts": len(prompts)}


def main(cfg: ExportConfig) -> dict:
    from sdgrpo.folders import staged
    from sdgrpo.modeling import check_model_path

    adapter, out = Path(cfg.adapter), Path(cfg.output)
    if not cfg.adapter or not cfg.output:
        raise UserError("export needs --adapter DIR and --output DIR")
    if cfg.dtype not in TOLERANCE:
        raise UserError(f"--dtype {cfg.dtype!r} is not one of {list(TOLERANCE)}")
    base = cfg.model_name_or_path or adapter_base(adapter)
    if not base:
        raise UserError(f"{adapter}: adapter_config.json names no base model; pass --model_name_or_path")
    if out.exists():
        raise UserError(f"{out}: already exists; pass a new --output folder")
    check_model_path(base)
    t0 = time.perf_counter()
    # Before loading anything: OUTPUT.partial made and locked here, so an unwritable target, or another export to
    # it, is one line now rather than after the merge; renamed to OUTPUT once whole, removed on failure.
    with staged(out, "export") as tmp:
        check = _merge_into(tmp, cfg, adapter, base)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    result = {**check, "output": str(out), "seconds": round(time.perf_counter() - t0, 2), "bytes": size}
    if cfg.push_to_hub:
        push(out, cfg.push_to_hub)
    return result


def _merge_into(tmp: Path, cfg: ExportConfig, adapter: Path, base: str) -> dict:
    """Merge, check parity, and write the merged model into ``tmp``; returns the parity check."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sdgrpo.modeling import DTYPES, load_tokenizer

    # PEFT's adapter_config records no quantisation: the training config says whether the base ran in 4 bits, and a
    # base folder saved quantised says so in its config.json (it cannot be merged into without its 16-bit weights).
    if training_config(adapter).get("load_in_4bit"):
        logger.warning("the adapter was trained on a 4-bit base: %s is loaded in %s for the merge", base, cfg.dtype)
    base_config = Path(base) / "config.json"
    if base_config.is_file() and json.loads(base_config.read_text()).get("quantization_config"):
        raise UserError(f"{base}: a quantised checkpoint; pass --model_name_or_path with its 16-bit weights to merge "
                        "into")
    tokenizer = load_tokenizer(base, cfg.trust_remote_code)
    dtype = DTYPES[cfg.dtype]
    load = dict(dtype=dtype, use_safetensors=True, trust_remote_code=cfg.trust_remote_code)
    try:
        reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, **load), str(adapter)).eval()
    except (RuntimeError, ValueError, KeyError) as err:
        raise UserError(f"{adapter}: cannot load this adapter onto {base} ({str(err).splitlines()[0][:200]}); "
                        "export refused") from None
    weights = [p for n, p in reference.named_parameters() if "lora_" in n]
    if not weights or not all(torch.isfinite(p).all() for p in weights):
        raise UserError(f"{adapter}: the adapter holds non-finite weights (NaN or inf); export refused")
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, **load), str(adapter))
    merged = merged.merge_and_unload().eval()
    prompts, source = parity_prompts(adapter, tokenizer)
    check = {**parity(merged, reference, prompts), "prompts_from": source, "dtype": cfg.dtype,
             "tolerance": cfg.max_delta or TOLERANCE[cfg.dtype]}
    check["passed"] = check["max_abs_logit_delta"] <= check["tolerance"]
    if not check["passed"]:
        raise UserError(f"{adapter}: merged model differs from base + adapter by {check['max_abs_logit_delta']:.3g} "
                        f"in the logits (tolerance {check['tolerance']:g}, {cfg.dtype}); nothing was written")
    from sdgrpo.cards import export_card

    merged.save_pretrained(tmp, safe_serialization=True, max_shard_size="2GB")
    tokenizer.save_pretrained(tmp)
    (tmp / "parity.json").write_text(json.dumps(check, indent=2))
    (tmp / "README.md").write_text(export_card(adapter, base, check))
    return check


def push(folder: Path, repo_id: str) -> None:
    """Upload with huggingface_hub (needs the hub and a token; not exercised by the offline tests)."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id)
