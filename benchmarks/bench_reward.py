"""Reward cost on the GPU: the original recipe's loop, sdgrpo's own batched pass, and the reuse of TRL's reference pass.

Shapes: Qwen2.5-1.5B (random weights, bf16), one group of G=8 completions, 128 prompt tokens + 512 or 4096
completion tokens. Time is the median of 5 runs after 2 warm-ups; memory is the peak allocated above the model.
Usage: python benchmarks/bench_reward.py [OUT_DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cuda_time, environment, random_model, save  # noqa: E402

from sdgrpo.rewards import SelfNLLReward  # noqa: E402
from sdgrpo.scoring import completion_logprobs  # noqa: E402


def original_recipe_loop(model, prompts, completions):
    """The original recipe: one forward per completion over its full sequence, fp32 log-softmax of all logits."""
    out = []
    with torch.no_grad():
        for p, c in zip(prompts, completions):
            ids = torch.tensor([p + c], device="cuda")
            logits = model(input_ids=ids).logits
            logp = torch.log_softmax(logits.float(), dim=-1)[0, len(p) - 1 : -1]
            out.append(logp.gather(-1, ids[0, len(p) :, None]).mean().item())
    return out


class _Tok:
    pad_token_id = 2


def main(out_dir: str | None = None):
    model = random_model("qwen2.5-1.5b")
    g = torch.Generator().manual_seed(0)
    results = []
    for prompt_len, comp_len in ((128, 512), (128, 4096)):
        prompts = [torch.randint(3, 150000, (prompt_len,), generator=g).tolist()] * 8
        completions = [torch.randint(3, 150000, (comp_len,), generator=g).tolist() for _ in range(8)]
        t_loop, m_loop = cuda_time(lambda: original_recipe_loop(model, prompts, completions))
        t_own, m_own = cuda_time(lambda: completion_logprobs(model, prompts, completions, pad_token_id=2))
        t_own1g, m_own1g = cuda_time(lambda: completion_logprobs(model, prompts, completions, pad_token_id=2,
                                                                 chunk_tokens=2**30 // (4 * model.config.vocab_size),
                                                                 token_budget=65536))
        ref = torch.randn(8, comp_len, device="cuda").clamp(max=0)  # what TRL's KL pass hands over
        reward = SelfNLLReward(None, _Tok())
        t_reuse, m_reuse = cuda_time(lambda: reward(prompts=[""] * 8, completions=[""] * 8,
                                                    completion_ids=completions, ref_per_token_logps=ref), repeats=20)
        own = [lp.mean().item() for lp in completion_logprobs(model, prompts, completions, pad_token_id=2)]
        loop = original_recipe_loop(model, prompts, completions)
        row = {"prompt_tokens": prompt_len, "completion_tokens": comp_len, "G": 8,
               "original_recipe_loop_s": t_loop, "original_recipe_loop_peak_gib": m_loop,
               "own_pass_s": t_own, "own_pass_peak_gib": m_own,
               "own_pass_1gib_logits_64k_budget_s": t_own1g, "own_pass_1gib_logits_64k_budget_peak_gib": m_own1g,
               "reuse_s": t_reuse, "reuse_peak_gib": m_reuse,
               "own_speedup_vs_loop": t_loop / t_own,
               "max_abs_diff_own_vs_loop": max(abs(a - b) for a, b in zip(own, loop))}
        results.append(row)
        torch.cuda.empty_cache()
    payload = {"benchmark": "reward", "model": "qwen2.5-1.5b shape, random weights, bf16",
               **environment(), "results": results,
               "targets": {"reuse_under_s": 0.001, "own_speedup_at_least": 3.5, "own_peak_at_most_loop": True}}
    save("bench_reward", payload, out_dir or Path(__file__).parent / "results")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
