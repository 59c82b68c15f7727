"""`sdgrpo train` with test probes attached, for tests that run training in other processes (accelerate launch,
the GPU machine). Library code carries no test hooks; this script adds them from outside.

    python tests/probes/train_probe.py PROBE_DIR [--check_reuse] [--resume] TRAIN_ARGS...

- Every process appends its logged collapse metrics and the longest prompt it saw to PROBE_DIR/rank{i}.jsonl
  (a callback), so a test can check that all ranks judged the same, whole batch.
- With --check_reuse, every self-NLL reward call that was served from the KL pass is also scored by the reward's own
  pass, and both are appended to PROBE_DIR/reuse_check_{pid}.jsonl.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from transformers import TrainerCallback


class RankLog(TrainerCallback):
    def __init__(self, folder: Path):
        self.folder = folder

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "collapse/length" in logs:
            record = {"step": state.global_step, **{k: v for k, v in logs.items() if k.startswith("collapse/")},
                      "prompt_tokens_max": PROMPT_MAX.pop() if PROMPT_MAX else None}
            with open(self.folder / f"rank{args.process_index}.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")


PROMPT_MAX: list[int] = []


def worst_tokens(tokenizer, kept, pairs, prompt_ids, completion_ids) -> list[dict]:
    """Per reused row: where the reused and own log-probs differ most, the token there and its neighbours, and
    where the pad/eos ids sit in the row (to find what the reference pass did differently)."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    out = []
    for i, (reused, own) in zip(kept, pairs):
        diff = (reused - own).abs()
        j = int(diff.argmax())
        ids, prompt = [int(t) for t in completion_ids[i]], [int(t) for t in prompt_ids[i]]
        out.append({"row": i, "pos": j, "diff": float(diff[j]), "reused": float(reused[j]), "own": float(own[j]),
                    "second_diff": float(diff.topk(2).values[-1]) if len(diff) > 1 else 0.0,
                    "over_half_nat_at": [k for k, d in enumerate(diff.tolist()) if d > 0.5],
                    "id": ids[j], "prev": ids[j - 1] if j else prompt[-1], "completion_len": len(ids),
                    "prompt_len": len(prompt), "pad_at": [k for k, t in enumerate(ids) if t == pad],
                    "eos_at": [k for k, t in enumerate(ids) if t == eos],
                    "prompt_pad_at": [k for k, t in enumerate(prompt) if t == pad]})
    return out


def patch_reward(folder: Path, check_reuse: bool) -> None:
    from sdgrpo.rewards import SelfNLLReward, aggregate

    original = SelfNLLReward.__call__

    def call(self, prompts, completions, completion_ids, prompt_ids=None, ref_per_token_logps=None, **kwargs):
        if prompt_ids is not None:
            PROMPT_MAX.append(max(map(len, prompt_ids)))
        out = original(self, prompts, completions, completion_ids, prompt_ids=prompt_ids,
                       ref_per_token_logps=ref_per_token_logps, **kwargs)
        if check_reuse and ref_per_token_logps is not None:
            passes = self.forward_passes
            own = self.token_logprobs(prompt_ids, completion_ids)
            self.forward_passes = passes  # a check, not a scoring pass
            kept = [i for i, (r, c) in enumerate(zip(ref_per_token_logps, completion_ids)) if r is not None and len(c)]
            pairs = [(ref_per_token_logps[i][: len(completion_ids[i])].float().cpu(), own[i]) for i in kept]
            record = {"rows": len(completion_ids), "rows_reused": len(pairs),
                      "max_token_diff": max(((a - b).abs().max().item() for a, b in pairs), default=0.0),
                      "rewards": [(aggregate(a, "mean"), aggregate(b, "mean")) for a, b in pairs],
                      "worst": worst_tokens(self.tokenizer, kept, pairs, prompt_ids, completion_ids)}
            with open(folder / f"reuse_check_{os.getpid()}.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")
        return out

    SelfNLLReward.__call__ = call


def main(argv: list[str]) -> None:
    from sdgrpo.config import parse_train_args
    from sdgrpo.train import main as train

    # as `sdgrpo` configures it (cli.py): sdgrpo's INFO lines on stderr, whatever an imported library set up after
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    folder, argv = Path(argv[0]), argv[1:]
    folder.mkdir(parents=True, exist_ok=True)
    patch_reward(folder, "--check_reuse" in argv)
    resume = "--resume" in argv
    train_cfg, model_cfg = parse_train_args([a for a in argv if a not in ("--resume", "--check_reuse")])
    train(train_cfg, model_cfg, resume=resume, callbacks=[RankLog(folder)])


if __name__ == "__main__":
    main(sys.argv[1:])
