"""``sdgrpo generate``: sample from a base model, a base + adapter, or an exported folder, with the sampling code of
training and evaluation (the same stop tokens). Streams each prompt's samples to stdout as they are drawn;
``--output FILE.jsonl`` also writes prompt, sample and the sample's mean log-prob under the model that drew it."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from sdgrpo.errors import UserError


@dataclass
class GenerateConfig:
    model_name_or_path: str = field(default="", metadata={
        "help": "Base model or exported folder (default: the adapter's base, else the shipped tiny model)."})
    adapter: str = field(default="", metadata={"help": "A LoRA adapter folder written by `sdgrpo train` or `sft`."})
    prompt: list[str] = field(default_factory=list, metadata={"help": "Prompts (`--prompt A --prompt B` or "
                                                                      "`--prompt A B`)."})
    prompts: str = field(default="", metadata={"help": "A text file with one prompt per line."})
    num_samples: int = field(default=1, metadata={"help": "Samples per prompt."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (above 0)."})
    top_p: float = field(default=1.0, metadata={
        "help": "Nucleus sampling: the smallest set of tokens with this much probability."})
    max_new_tokens: int = field(default=64, metadata={"help": "Tokens sampled per completion."})
    seed: int = field(default=0, metadata={"help": "Sampling seed."})
    output: str = field(default="", metadata={"help": "Also write a JSONL file: prompt, sample, mean_logprob."})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "Run code shipped with the model (off: only transformers' own architectures load)."})


def base_model(model_name_or_path: str, adapter: str) -> str:
    """The model generate samples from: the one given, else the adapter's base, else the shipped tiny model."""
    from sdgrpo.config import TINY_MODEL
    from sdgrpo.export import adapter_base

    named = adapter_base(Path(adapter)) if adapter else ""  # refuses a folder without adapter_config.json
    return model_name_or_path or named or TINY_MODEL


def load(model_name_or_path: str, adapter: str, trust_remote_code: bool = False, tokenizer=None):
    """(model, tokenizer) for sampling: a model folder or hub name, with an adapter on top when given."""
    import torch

    from sdgrpo.modeling import load_model, load_tokenizer, resolve_dtype

    base = base_model(model_name_or_path, adapter)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = tokenizer or load_tokenizer(base, trust_remote_code)
    model = load_model(base, resolve_dtype(None, device), device, trust_remote_code)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model.eval(), tokenizer


def main(args: GenerateConfig) -> int:
    from sdgrpo.samples import sample
    from sdgrpo.scoring import aggregate, completion_logprobs

    prompts = list(args.prompt)
    if args.prompts:
        from sdgrpo.textio import TextDecodeError, read_text_file

        path = Path(args.prompts)
        if not path.is_file():
            raise UserError(f"{path}: no such prompts file")
        try:
            prompts += [line for line in read_text_file(path).splitlines() if line.strip()]
        except TextDecodeError as err:
            raise UserError(str(err)) from None
    if not prompts:
        raise UserError("no prompt: pass --prompt TEXT (repeatable) or --prompts FILE")
    if args.output and Path(args.output).exists():  # sdgrpo never overwrites a file it did not write
        raise UserError(f"--output {args.output} already exists; pass a new file name (nothing was written)")
    from sdgrpo.modeling import check_positions, load_tokenizer, model_config

    base = base_model(args.model_name_or_path, args.adapter)  # the positions are checked before the model loads
    tokenizer = load_tokenizer(base, args.trust_remote_code)
    longest = max(len(ids) for ids in tokenizer(prompts)["input_ids"])
    check_positions(model_config(base, args.trust_remote_code), longest + args.max_new_tokens,
                    f"the longest prompt ({longest} tokens) and --max_new_tokens {args.max_new_tokens}", base)
    model, tokenizer = load(args.model_name_or_path, args.adapter, args.trust_remote_code, tokenizer)
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
