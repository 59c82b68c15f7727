"""Distil a teacher into a smaller student with sdgrpo's rewards and measure what it does, on CPU or GPU.

Runs `sdgrpo train` on the student with three rewards (self_nll: the student's own base scores; teacher_nll: the
teacher's mean log-likelihood; distill: mean log q_teacher - log p_policy) and, as the control a user would pick
instead, `sdgrpo sft` on the same prompts' true continuations for the same number of steps; and `kd`, the same SFT
run with the teacher's per-token KL on that text mixed into its loss (`sdgrpo sft --teacher_model_name_or_path`).
Then measures, for the teacher, the base student and each trained student: held-out bits per byte on the last 5%
of every training book (the prompts come from the first 95% only) and, on samples at T=1 from held-out prompts,
the diversity metrics (distinct-2, seq-rep-4, length, EOS rate) and the teacher's mean log-likelihood of the
samples; the base student is also sampled at T=0.85 and 0.7 (what plain sharpening gives).

    python studies/distill_study.py --teacher DIR --student DIR --out DIR [--steps N] [--data_dir DIR]
    python studies/distill_study.py --plot RESULT.json OUT.png

The defaults: the shipped model teaches a student of about a quarter of its size, pretrained with the same recipe
and tokenizer by `studies/archive/pretrain_incontext_sweep.py` (candidate student-h128-l4).
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE.parent / "benchmarks"))  # common.py

# Rewards and the settings that differ between them. distill carries its own KL (to the teacher): no KL to the base.
RUNS = {
    "self_nll": dict(reward="self_nll", beta=0.04),
    "teacher_nll": dict(reward="teacher_nll", beta=0.04),
    "distill": dict(reward="distill", beta=0.0),
}
# The control: LoRA SFT on the prompts + true continuations, 16 sequences a step, the same number of steps.
SFT = dict(learning_rate=3e-4, per_device_train_batch_size=16, lr_scheduler_type="constant", save_strategy="no",
           report_to="none")
COMMON = dict(learning_rate=3e-4, num_generations=8, per_device_train_batch_size=16, max_completion_length=48,
              lr_scheduler_type="constant", save_strategy="no", report_to="none", seed=0, collapse_guard="warn")


def prepare_prompts(data_dir: Path, work: Path, max_prompts: int = 2000, continuation_tokens: int = 64) -> Path:
    """Prompts from the training part (first 95%) of every book; held-out prompts from the last 5%."""
    from sdgrpo.config import TINY_MODEL
    from sdgrpo.data import PrepareConfig, prepare
    from sdgrpo.modeling import load_tokenizer
    from sdgrpo.probes import load_corpus

    train_dir, held_dir = work / "train_text", work / "heldout_text"
    for d in (train_dir, held_dir):
        d.mkdir(parents=True, exist_ok=True)
    for name, train, held in load_corpus(data_dir):
        stem = name.replace("/", "__")
        (train_dir / stem).write_text(train)
        (held_dir / stem).write_text(held)
    tok = load_tokenizer(str(TINY_MODEL))
    prepare(PrepareConfig(inputs=[str(train_dir)], output=str(work / "prompts"), max_prompts=max_prompts, seed=0,
                          continuation_tokens=continuation_tokens), tok)
    prepare(PrepareConfig(inputs=[str(held_dir)], output=str(work / "heldout_prompts"), max_prompts=64, seed=0,
                          test_size=0.0), tok)
    return work / "prompts"


def dense_distill(student_dir: str, teacher, tokenizer, prompts: list[str], out: Path, steps: int,
                  lr: float = 3e-4) -> None:
    """On-policy distillation with a dense loss (GKD with lambda 1 and reverse KL): each step samples 16 completions
    of 48 tokens from the student (2 prompts x 8, as the GRPO arms), then minimises the per-token KL(student ||
    teacher) over the whole vocabulary at every sampled position; LoRA r 16 on all linear layers, AdamW, constant lr.
    Hand-written for this study: TRL's GKD and IW-OPD trainers take chat-format data only."""
    import random

    import torch
    from peft import LoraConfig, get_peft_model

    from sdgrpo.modeling import load_model
    from sdgrpo.samples import sample

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    student = get_peft_model(load_model(student_dir, torch.float32, device),
                             LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=lr)
    rng = random.Random(0)
    pad = tokenizer.pad_token_id
    for step in range(steps):
        drawn = sample(student, tokenizer, rng.sample(prompts, 2), 8, 48, 1.0, seed=step)
        rows = [p + c for p, c in zip(drawn.prompt_ids, drawn.completion_ids)]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        scored = torch.zeros_like(ids, dtype=torch.bool)  # positions whose next token is a sampled one
        for i, (p, c) in enumerate(zip(drawn.prompt_ids, drawn.completion_ids)):
            ids[i, : len(p) + len(c)] = torch.tensor(p + c)
            mask[i, : len(p) + len(c)] = 1
            scored[i, len(p) - 1 : len(p) + len(c) - 1] = True
        ids, mask, scored = ids.to(device), mask.to(device), scored.to(device)
        student.train()
        logp = torch.log_softmax(student(input_ids=ids, attention_mask=mask).logits.float(), -1)[scored]
        with torch.no_grad():
            logq = torch.log_softmax(teacher(input_ids=ids, attention_mask=mask).logits.float(), -1)[scored]
        loss = (logp.exp() * (logp - logq)).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0:
            logging.info("dense_distill step %d: KL(student || teacher) %.4f per token", step, loss.item())
    student.save_pretrained(str(out))
    (out / "metrics.jsonl").write_text("")


def measure(model, tokenizer, teacher, heldout_texts, prompts, device, temperature: float = 1.0) -> dict:
    """Held-out bits per byte, and diversity + teacher log-likelihood of samples from held-out prompts."""
    import torch

    from sdgrpo.evaluate import summarize
    from sdgrpo.probes import evaluate_bpb

    t0 = time.time()
    with torch.no_grad():
        bpb, _ = evaluate_bpb(model, tokenizer, heldout_texts, 256, device)
    samples, _ = summarize(model, tokenizer, teacher, prompts, 4, 48, temperature, 0)  # scored by the teacher
    return {"heldout_bpb": bpb, "teacher_loglik_of_samples": samples["reward_mean"],
            **{k: samples[k] for k in ("distinct_2", "seq_rep_4", "length", "eos_rate")},
            "seconds": time.time() - t0}


def main() -> None:
    import argparse

    import torch
    from common import environment
    from peft import PeftModel

    from sdgrpo.config import TINY_MODEL, parse_sft_args, parse_train_args
    from sdgrpo.data import load_prompts
    from sdgrpo.modeling import load_model, load_tokenizer
    from sdgrpo.probes import load_corpus
    from sdgrpo.sft import main as sft
    from sdgrpo.train import main as train

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default=TINY_MODEL)
    ap.add_argument("--student", required=True, help="a model folder with the teacher's tokenizer")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--data_dir", default=str(HERE.parent.parent / "shared" / "data"))
    ap.add_argument("--dense_lr", type=float, default=3e-4, help="learning rate of the dense_distill arm")
    ap.add_argument("--kd_weight", type=float, default=0.5, help="weight of the teacher's KL in the kd arm")
    ap.add_argument("--max_prompts", type=int, default=2000, help="training windows prepared from the books")
    ap.add_argument("--continuation_tokens", type=int, default=64, help="true continuation per training window "
                    "(the sft and kd arms train on prompt + continuation)")
    ap.add_argument("--sft_extra", default="", help="more `sdgrpo sft` options for the sft and kd arms, e.g. "
                    "'--lora_r 64 --lora_modules_to_save embed_tokens'")
    ap.add_argument("--sft_lr", type=float, default=SFT["learning_rate"], help="learning rate of the sft and kd arms")
    ap.add_argument("--runs", default=",".join([*RUNS, "sft", "kd"]), help="comma-separated arms")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    teacher_dir, student_dir, out, steps, data_dir = args.teacher, args.student, Path(args.out), args.steps, \
        Path(args.data_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    prompts_dir = prepare_prompts(data_dir, out / "work", args.max_prompts, args.continuation_tokens)
    held_prompts = list(load_prompts(str(out / "work" / "heldout_prompts"), "train", 48)["prompt"])
    heldout_texts = [h for _, _, h in load_corpus(data_dir)]
    tokenizer = load_tokenizer(str(TINY_MODEL))
    if load_tokenizer(student_dir).get_vocab() != tokenizer.get_vocab():
        sys.exit(f"{student_dir}: the student must share the teacher's tokenizer")
    teacher = load_model(str(teacher_dir), torch.float32, device).eval()
    student = load_model(str(student_dir), torch.float32, device).eval()
    results = {"teacher": measure(teacher, tokenizer, teacher, heldout_texts, held_prompts, device),
               "base_student": measure(student, tokenizer, teacher, heldout_texts, held_prompts, device)}
    for t in (0.85, 0.7):
        results[f"base_student_T{t}"] = measure(student, tokenizer, teacher, heldout_texts, held_prompts, device, t)
    print(json.dumps(results, indent=1), flush=True)
    for name in args.runs.split(","):
        t0 = time.time()
        if name == "dense_distill":
            train_prompts = list(load_prompts(str(prompts_dir), "train", 2000)["prompt"])
            dense_distill(str(student_dir), teacher, tokenizer, train_prompts, out / name, steps, args.dense_lr)
        elif name in ("sft", "kd"):
            argv = ["--dataset_path", str(prompts_dir), "--output_dir", str(out / name), "--max_steps", str(steps),
                    "--model_name_or_path", str(student_dir)]
            if name == "kd":  # the same SFT run, its loss mixed with the teacher's KL on the same text
                argv += ["--teacher_model_name_or_path", str(teacher_dir), "--kd_weight", str(args.kd_weight)]
            for k, v in {**SFT, "learning_rate": args.sft_lr, "seed": 0}.items():
                argv += [f"--{k}", str(v)]
            argv += args.sft_extra.split()
            sft(*parse_sft_args(argv), start_over=True)
        else:
            argv = ["--dataset_path", str(prompts_dir), "--output_dir", str(out / name), "--max_steps", str(steps),
                    "--teacher_model_name_or_path", str(teacher_dir), "--model_name_or_path", str(student_dir)]
            for k, v in {**COMMON, **RUNS[name]}.items():
                argv += [f"--{k}", str(v)]
            train(*parse_train_args(argv), start_over=True)
        if (out / name / "adapter_config.json").is_file():
            trained = PeftModel.from_pretrained(load_model(str(student_dir), torch.float32, device), str(out / name))
            trained = trained.merge_and_unload().eval()
        else:  # `sdgrpo sft --use_peft false`: the whole model
            trained = load_model(str(out / name), torch.float32, device).eval()
        rows = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
        rewards = [r["reward"] for r in rows if "reward" in r]
        results[name] = {**measure(trained, tokenizer, teacher, heldout_texts, held_prompts, device),
                         "train_seconds": time.time() - t0, "steps": steps}
        if rewards:
            results[name].update(reward_first10=statistics.fmean(rewards[:10]),
                                 reward_last10=statistics.fmean(rewards[-10:]))
        print(name, json.dumps(results[name]), flush=True)
        (out / "distill_study.json").write_text(json.dumps(results, indent=2))
    base = results["base_student"]
    for row in results.values():
        row["bpb_change_vs_base_pct"] = 100 * (row["heldout_bpb"] - base["heldout_bpb"]) / base["heldout_bpb"]
        row["seq_rep_4_change_vs_base"] = row["seq_rep_4"] - base["seq_rep_4"]
    payload = {"benchmark": "distill_study", "teacher": str(teacher_dir), "student": str(student_dir),
               "config": {"steps": steps, **COMMON, "runs": RUNS, "sft": {**SFT, "learning_rate": args.sft_lr},
                          "kd_weight": args.kd_weight, "dense_lr": args.dense_lr, "max_prompts": args.max_prompts,
                          "continuation_tokens": args.continuation_tokens,
                          "sft_extra": args.sft_extra},
               **environment(), "results": results}
    (out / "distill_study.json").write_text(json.dumps(payload, indent=2))
    plot(results, out / "distill_study.png")
    print(json.dumps(payload, indent=2))


def plot(results: dict, path: Path) -> None:
    """Held-out bits per byte and distinct-2 of the samples, per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, label in ((axes[0], "heldout_bpb", "held-out bits per byte (lower is better)"),
                           (axes[1], "distinct_2", "distinct-2 of T=1 samples (higher is more diverse)")):
        values = [results[n][key] for n in names]
        ax.bar(names, values, color=[f"C{i % 10}" for i in range(len(names))])
        ax.set_title(label, fontsize=10)
        ax.set_ylim(min(values) * 0.97, max(values) * 1.01)
        ax.tick_params(axis="x", rotation=20, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--plot":  # replot a saved result
    plot(json.loads(Path(sys.argv[2]).read_text())["results"], Path(sys.argv[3]))
    sys.exit(0)


if __name__ == "__main__":
    main()
