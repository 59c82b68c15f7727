"""CPU peak memory of one GRPO policy pass (forward and backward) with the whole logits and in token chunks.

Shape: a random Qwen2 (hidden 256, 2 layers, vocabulary 152064, tied embeddings, fp32) with LoRA r 8 on every linear
layer, patched by TRL's ``add_fused_lm_head`` as GRPOTrainer patches its policy; 8 rows x 512 tokens, the last 256 of
each labelled (the completion), loss = -sum(log-probs) + 0.01 sum(entropy), backward. The fused head's operands go
to sdgrpo's CPU function (``chunked``: CHUNK_TOKENS tokens at a time) or to the whole-logits function sdgrpo used
before (``whole``). Each variant runs in its own process; memory is that process's peak resident set
(``ru_maxrss``), and ``setup`` the peak of the same process after building the model and the batch, before the pass.
Usage: python benchmarks/bench_chunked_memory.py [OUT_DIR]
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

CONFIG = dict(shape="qwen2-h256-l2", hidden=256, layers=2, vocab_size=152064, rows=8, tokens=512, completion=256,
              lora_r=8)


def whole_logits(hidden, weight, bias, targets, temperature, chunk_size, softcap=None, logit_scale=1.0,
                 outputs=("entropy",)):
    """sdgrpo's CPU fused head before chunking: the [N, V] logits at once, autograd's backward."""
    import torch

    logits = hidden @ weight.to(hidden.dtype).t()  # [N, V]
    if bias is not None:
        logits = logits + bias.to(hidden.dtype)
    logits = logits.float() * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logp = torch.log_softmax(logits / temperature, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1) if "entropy" in outputs else None
    return logp.gather(-1, targets[:, None]).squeeze(-1), entropy, None, None, None


def child(variant: str) -> dict:
    import contextlib

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from sdgrpo.compat import ensure_trl_runs_without_triton, fused_head_route

    ensure_trl_runs_without_triton()
    torch.manual_seed(0)
    c = CONFIG
    config = Qwen2Config(vocab_size=c["vocab_size"], hidden_size=c["hidden"], num_hidden_layers=c["layers"],
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=2 * c["hidden"],
                         tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config)
    add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    model = get_peft_model(model, LoraConfig(r=c["lora_r"], target_modules="all-linear"))
    ids = torch.randint(3, c["vocab_size"], (c["rows"], c["tokens"]))
    labels = ids.clone()
    labels[:, : c["tokens"] - c["completion"]] = -100
    setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB (Linux reports KiB)
    route = fused_head_route(whole_logits) if variant == "whole" else contextlib.nullcontext()
    t0 = time.perf_counter()
    with route:
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, fused_lm_head=True)
        (-out.log_probs.sum() + 0.01 * out.entropy.sum()).backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    grad = sum(p.grad.double().abs().sum().item() for n, p in model.named_parameters() if p.grad is not None)
    return {"variant": variant, "setup_peak_gib": round(setup, 3), "peak_rss_gib": round(peak, 3),
            "pass_gib": round(peak - setup, 3), "wall_s": round(seconds, 1), "lora_grad_l1": grad,
            "loss": (-out.log_probs.sum()).item()}


def main(out_dir: str | None = None):
    from common import header, save

    from sdgrpo.chunked import CHUNK_TOKENS

    rows = []
    for variant in ("chunked", "whole"):
        run = subprocess.run([sys.executable, __file__, "--child", variant], capture_output=True, text=True,
                             check=True)
        rows.append(json.loads(run.stdout.strip().splitlines()[-1]))
    payload = {**header("bench_chunked_memory", {**CONFIG, "chunk_tokens": CHUNK_TOKENS}), "results": rows}
    kwargs = {"out_dir": out_dir} if out_dir else {}
    return save(f"bench_chunked_memory_cpu_{payload['date'][:10]}", payload, **kwargs)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2])))
    else:
        main(sys.argv[1] if len(sys.argv) > 1 else None)
