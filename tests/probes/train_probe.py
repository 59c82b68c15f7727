"""`sdgrpo train` with test probes attached, for tests that run training in other processes (accelerate launch,
the GPU machine). Library code carries no test hooks; this script adds them from outside.

    python tests/probes/train_probe.py PROBE_DIR [--check_reuse] [--trace_loss] [--resume] TRAIN_ARGS...

- Every process appends its logged collapse metrics and the longest prompt it saw to PROBE_DIR/rank{i}.jsonl
  (a callback), so a test can check that all ranks judged the same, whole batch.
- With --check_reuse, every self-NLL reward call that was served from the KL pass is also scored by the reward's own
  pass, and both are appended to PROBE_DIR/reuse_check_{pid}.jsonl.
- With --trace_loss, each generation and each loss call appends what the trainer holds to PROBE_DIR/loss_trace.jsonl:
  the class that answers compute_loss, the flags that gate the rollout correction, whether the batch carries the
  sampler's log-probs, and the sampling/* metrics logged so far (to follow a batch through another trainer's loss).
  It imports sdgrpo.grpo_trainer before Unsloth is imported, an order `sdgrpo train` does not have.
- How each process ends is watched (exit_watch.py), and it ends as `sdgrpo` does (sdgrpo.runs.leave).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from exit_watch import watch
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


def patch_trace(folder: Path) -> None:
    from sdgrpo.grpo_trainer import SelfDistillMixin

    def write(kind, trainer, batch):
        owner = next((c for c in type(trainer).__mro__ if "compute_loss" in vars(c)), None)
        sampling = batch.get("sampling_per_token_logps")
        record = {"kind": kind, "class": type(trainer).__name__,
                  "mro": [c.__module__ + "." + c.__name__ for c in type(trainer).__mro__[:5]],
                  "compute_loss_of": owner and owner.__module__ + "." + owner.__name__,
                  "use_vllm": bool(trainer.use_vllm), "left_packed": trainer.left_packed_logps,
                  "rollout_correction": trainer.rollout_correction,
                  "correction_flag": bool(trainer.vllm_importance_sampling_correction), "keys": sorted(batch),
                  "sampling_shape": None if sampling is None else list(sampling.shape),
                  "sampling_metrics": sorted(k for k in trainer._metrics["train"] if k.startswith("sampling/"))}
        with open(folder / "loss_trace.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")

    generate, loss = SelfDistillMixin._generate_and_score_completions, SelfDistillMixin.compute_loss

    def traced_generate(self, inputs):
        out = generate(self, inputs)
        write("generation", self, out)
        return out

    def traced_loss(self, model, inputs, *args, **kwargs):
        write("loss", self, inputs)
        return loss(self, model, inputs, *args, **kwargs)

    SelfDistillMixin._generate_and_score_completions, SelfDistillMixin.compute_loss = traced_generate, traced_loss


def main(argv: list[str]) -> None:
    from sdgrpo.config import parse_train_args
    from sdgrpo.train import main as train

    # as `sdgrpo` configures it (cli.py): sdgrpo's INFO lines on stderr, whatever an imported library set up after
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    folder, argv = Path(argv[0]), argv[1:]
    folder.mkdir(parents=True, exist_ok=True)
    watch(folder)
    patch_reward(folder, "--check_reuse" in argv)
    if "--trace_loss" in argv:
        patch_trace(folder)
    resume = "--resume" in argv
    train_cfg, model_cfg = parse_train_args([a for a in argv if a not in ("--resume", "--check_reuse", "--trace_loss")])
    train(train_cfg, model_cfg, resume=resume, callbacks=[RankLog(folder)])


if __name__ == "__main__":
    from sdgrpo.runs import leave

    main(sys.argv[1:])
    sys.exit(leave(0))
