"""Score fixed completions with one backend's policy (adapters disabled), for tests/gpu/test_gpu.py.

Usage: python tests/gpu/gpu_score.py {hf,unsloth} MODEL_DIR OUT.json
Each backend runs in its own process: Unsloth patches transformers' model classes when it loads a model.
The prompts and completions are drawn from a fixed seed, so both processes score the same token ids.
"""

import json
import sys

import torch

from sdgrpo.config import parse_train_args
from sdgrpo.rewards import SelfNLLReward
from sdgrpo.train import load_backend


def fixed_batch(vocab: int, eos: int, n: int = 16):
    g = torch.Generator().manual_seed(0)
    prompts, completions = [], []
    for i in range(n):
        p = torch.randint(10, vocab, (int(torch.randint(4, 40, (1,), generator=g)),), generator=g).tolist()
        c = torch.randint(10, vocab, (int(torch.randint(1, 64, (1,), generator=g)),), generator=g).tolist()
        prompts.append(p)
        completions.append(c + ([eos] if i % 2 else []))
    return prompts, completions


if __name__ == "__main__":
    backend, model_dir, out = sys.argv[1:4]
    train_cfg, model_cfg = parse_train_args(["--backend", backend, "--model_name_or_path", model_dir,
                                             "--dtype", "bfloat16"])
    model, tokenizer, peft_config, _ = load_backend(train_cfg, model_cfg)
    if peft_config is not None:  # the hf backend: TRL would wrap it so
        from peft import get_peft_model

        model = get_peft_model(model, peft_config)
    prompts, completions = fixed_batch(min(len(tokenizer), 4000), tokenizer.eos_token_id)
    reward = SelfNLLReward(model, tokenizer)
    rewards = reward(prompts=None, completions=None, completion_ids=completions, prompt_ids=prompts)
    json.dump({"backend": backend, "rewards": rewards, "dtype": str(next(model.parameters()).dtype)}, open(out, "w"))
