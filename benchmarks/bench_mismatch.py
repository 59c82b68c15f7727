"""How far each decoding-engine mode's sampler is from the policy it stands for, on trained weights, and how much of
a batch each importance-correction mode keeps.

The shipped model (trained; bf16) with LoRA r 16 on every linear layer (B ~ N(0, 0.02): a policy that differs from
its base), as a bf16 base and as an NF4 base (bitsandbytes, as ``--load_in_4bit`` loads it). Per engine mode, 32
prompts of 64 tokens of the demo text decoded at T = 1 to exactly N new tokens (no EOS stops a row; N = 512, 1024,
2048: the model was trained at 1024 positions, so 2048 measures the sampler past them); the policy's log-prob of
every sampled token from one forward of the PEFT model (LoRA unmerged, the weights training reads). Reported per
(base, mode, N): mean and max |delta log p| per token, KL(sampler || policy) (k3), and for each of TRL's correction
modes (clip_max 3) the mean weight it gives (per token, or per row for the sequence modes, as TRL logs them) and the
share it zeroes.

Modes: bf16 base: folded (16-bit copies), unmerged, int4 (tinygemm), int4 (gemlite); NF4 base: dequantised (16-bit
copies), unmerged over NF4 (bitsandbytes reads the base as it is), int4 (tinygemm), int4 (gemlite).

    python benchmarks/bench_mismatch.py OUT_DIR
"""

from __future__ import annotations

import json
import os
import sys
import time
import weakref
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

ROWS, PROMPT = 32, 64
LENGTHS = [int(n) for n in os.environ.get("BENCH_LENGTHS", "512 1024 2048").split()]
MODES = {"bf16": [("folded", "model", "auto"), ("unmerged", "model", "auto"), ("int4", "int4", "tinygemm"),
                  ("int4", "int4", "gemlite")],
         "nf4": [("dequantised", "auto", "tinygemm"), ("unmerged", "model", "auto"), ("int4", "int4", "tinygemm"),
                 ("int4", "int4", "gemlite")]}
CORRECTIONS = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def model_for(base: str):
    from peft import LoraConfig, get_peft_model

    from sdgrpo.config import TINY_MODEL
    from sdgrpo.modeling import load_model

    model = load_model(TINY_MODEL, torch.bfloat16, "cuda", load_in_4bit=base == "nf4")
    lora = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return lora.eval()


def prompts(tok) -> torch.Tensor:
    from sdgrpo.config import TINY_MODEL

    text = (Path(TINY_MODEL).parent / "demo").glob("*.txt")
    ids = tok("\n".join(p.read_text(encoding="utf-8") for p in sorted(text)), add_special_tokens=False)["input_ids"]
    step = max(1, (len(ids) - PROMPT) // ROWS)
    rows = [[tok.bos_token_id] + ids[i * step: i * step + PROMPT - 1] for i in range(ROWS)]
    return torch.tensor(rows, device="cuda")


def policy_logps(model, seq: torch.Tensor, width: int) -> torch.Tensor:
    """log p_policy of each sampled token (the completion part of ``seq``), one row at a time, fp32."""
    out = []
    with torch.no_grad():
        for row in seq:
            logits = model(input_ids=row[None]).logits[0, width - 1:-1].float()
            out.append(torch.log_softmax(logits, -1).gather(-1, row[width:, None])[:, 0])
    return torch.stack(out)


def main() -> None:
    from common import device_tag, header

    from sdgrpo.config import TINY_MODEL
    from sdgrpo.engine import DecodeEngine, Sampling
    from sdgrpo.grpo_trainer import importance_weights, ratio_stats, rollout_mismatch
    from sdgrpo.modeling import load_tokenizer

    out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else HERE / "results")
    tok = load_tokenizer(TINY_MODEL)
    head = header("bench_mismatch", {"rows": ROWS, "prompt_tokens": PROMPT, "lengths": LENGTHS, "lora_r": 16,
                                     "lora_b_std": 0.02, "temperature": 1.0, "clip_max": 3.0,
                                     "model": "shipped tiny model (sdgrpo/assets/tiny-llama)"})
    name = f"bench_mismatch_tiny_{device_tag()}_{head['date'][:10]}"
    input_ids = prompts(tok)
    mask = torch.ones_like(input_ids)
    results = []
    for base, modes in MODES.items():
        model = model_for(base)
        for mode, weights, kernel in modes:
            engine = DecodeEngine(compile=True, generation_weights=weights, int4_kernel=kernel,
                                  reserve=PROMPT + max(LENGTHS))  # one cache length: compiled once per mode
            if base == "bf16" and mode == "unmerged":  # the fold fits this small model: unmerged decoding asked for
                engine.mode, engine._mode_for = "unmerged", weakref.ref(model)
            for length in LENGTHS:
                t0 = time.perf_counter()
                torch.manual_seed(1)
                # no EOS: every row runs to N tokens, and one compiled step serves every N (a new min_new_tokens
                # would compile it again)
                s = Sampling(max_new_tokens=length, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             eos_token_ids=(), pad_token_id=tok.pad_token_id)
                try:
                    decoded = engine.decode(model, input_ids, mask, s)
                except Exception as err:  # noqa: BLE001 - recorded as the row's error
                    results.append({"base": base, "mode": mode, "kernel": kernel, "new_tokens": length,
                                    "error": f"{type(err).__name__}: {err}"[:300]})
                    print(json.dumps(results[-1]), flush=True)
                    continue
                policy = policy_logps(model, decoded.sequences, PROMPT)
                done = torch.ones_like(policy)
                row = {"base": base, "mode": engine.mode, "asked": mode, "kernel": kernel if engine.mode == "int4"
                       else None, "new_tokens": length,
                       **{k: v.item() for k, v in rollout_mismatch(policy, decoded.logprobs, done).items()}}
                for correction in CORRECTIONS:
                    ratio = importance_weights(policy, decoded.logprobs, done, correction, None, 3.0)
                    stats = ratio_stats(ratio, done)
                    row[f"{correction}/mean_weight"] = stats["importance_sampling_ratio/mean"].item()
                    row[f"{correction}/zeroed"] = stats["importance_sampling_ratio/zeroed"].item()
                row["seconds"] = time.perf_counter() - t0
                results.append(row)
                print(json.dumps(row), flush=True)
                (out_dir / f"{name}.json").parent.mkdir(parents=True, exist_ok=True)
                (out_dir / f"{name}.json").write_text(json.dumps({**head, "results": results}, indent=2))
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
