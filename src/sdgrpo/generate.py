"""``sdgrpo generate``: sample from a base model, a base + adapter, or an exported folder, with the sampling code of
training and evaluation (the same stop tokens). Streams each prompt's samples to stdout as they are drawn;
``--output FILE.jsonl`` also writes prompt, sample and the sample's mean log-prob under the model that drew it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from sdgrpo.errors import ArgumentParser, UserError


def parse_args(argv: list[str]):
    p = ArgumentParser(prog="sdgrpo generate", description=__doc__.splitlines()[0])
    p.add_argument("--model_name_or_path", default="", help="base model or exported folder (default: the adapter's "
                   "base, else the shipped tiny model)")
    p.add_argument("--adapter", default="", help="a LoRA adapter folder written by `sdgrpo train` or `sdgrpo sft`")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", default="", help="a text file with one prompt per line")
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="", help="also write a JSONL file: prompt, sample, mean_logprob")
    p.add_argument("--trust_remote_code", type=lambda t: t.lower() in ("1", "true", "yes"), default=False)
    return p.parse_args(argv)


def load(model_name_or_path: str, adapter: str, trust_remote_code: bool = False):
    """(model, tokenizer) for sampling: a model folder or hub name, with an adapter on top when given."""
    import torch

    from sdgrpo.config import TINY_MODEL
    from sdgrpo.export import adapter_base
    from sdgrpo.modeling import load_model, load_tokenizer, resolve_dtype

    named = adapter_base(Path(adapter)) if adapter else ""  # refuses a folder without adapter_config.json
    base = model_name_or_path or named or TINY_MODEL
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load_tokenizer(base, trust_remote_code)
    model = load_model(base, resolve_dtype(None, device), device, trust_remote_code)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model.eval(), tokenizer


def main(argv: list[str]) -> int:
    from sdgrpo.rewards import aggregate
    from sdgrpo.sampling import sample
    from sdgrpo.scoring import completion_logprobs

    args = parse_args(argv)
    prompts = list(args.prompt)
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise UserError(f"{path}: no such prompts file")
        prompts += [line for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise UserError("no prompt: pass --prompt TEXT (repeatable) or --prompts FILE")
    if args.num_samples < 1 or args.max_new_tokens < 1:
        raise UserError("--num_samples and --max_new_tokens must be at least 1")
    model, tokenizer = load(args.model_name_or_path, args.adapter, args.trust_remote_code)
    out = open(args.output, "w") if args.output else None
    try:
        for i, prompt in enumerate(prompts):
            drawn = sample(model, tokenizer, [prompt], args.num_samples, args.max_new_tokens, args.temperature,
                           seed=args.seed + i, top_p=args.top_p)
            logps = completion_logprobs(model, drawn.prompt_ids, drawn.completion_ids,
                                        pad_token_id=tokenizer.pad_token_id)
            for j, (text, lp) in enumerate(zip(drawn.texts, logps)):
                print(f"### prompt {i + 1}, sample {j + 1}\n{prompt}{text}\n", flush=True)
                if out:
                    out.write(json.dumps({"prompt": prompt, "sample": text, "mean_logprob": aggregate(lp, "mean"),
                                          "tokens": len(lp)}) + "\n")
    finally:
        if out:
            out.close()
    print(f"{len(prompts) * args.num_samples} samples" + (f"; written to {args.output}" if out else ""),
          file=sys.stderr)
    return 0
