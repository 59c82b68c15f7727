"""How fast can a student learn from its teacher on the text? A sweep of plain training loops, outside sdgrpo.

For a student and a teacher with the same tokenizer (defaults: the 1k-step student and the shipped model), each arm
trains the student on random windows of the training text (the first 95% of every book, as in pretraining) with
the loss ``(1 - w) * CE + w * KL(teacher || student)`` per token (``sdgrpo.sft.kd_loss``, what `sdgrpo sft
--teacher_model_name_or_path` trains with; w = 0: plain training on the text; w = 1: pure
distillation of the teacher's next-token distributions), AdamW, cosine decay from the arm's learning rate to 0, the
whole model or a LoRA adapter; then measures held-out bits per byte on the last 5% of every book. It answers which
objective, learning rate, number of tokens and trainable part make the student better, so that `sdgrpo sft
--teacher_model_name_or_path` can be run with those settings.

    python studies/archive/distill_sweep.py OUT.json [--student DIR] [--arms part,w,lr,steps ...]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parents[1]  # studies/
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE.parent / "benchmarks"))  # common.py
sys.path.insert(0, str(HERE))  # distill_study.py

ARMS = ["full,1,5e-4,600", "full,0,5e-4,600", "full,0.5,5e-4,600", "full,1,2e-4,600", "full,1,1e-3,600",
        "lora,1,1e-3,600", "lora,0,1e-3,600", "full,1,5e-4,2000", "full,0,5e-4,2000"]


def run_arm(spec: str, student_dir: str, teacher, ids: torch.Tensor, heldout: list[str], tokenizer, batch: int,
            seq_len: int, device: str) -> dict:
    from sdgrpo.modeling import load_model
    from sdgrpo.probes import evaluate_bpb
    from sdgrpo.sft import kd_loss

    part, w, lr, steps = spec.split(",")
    w, lr, steps = float(w), float(lr), int(steps)
    torch.manual_seed(0)
    student = load_model(student_dir, torch.float32, device)
    if part == "lora":
        from peft import LoraConfig, get_peft_model

        student = get_peft_model(student, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    window = torch.arange(seq_len + 1)
    t0, kl_first = time.time(), None
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        x = ids[torch.randint(0, len(ids) - seq_len - 1, (batch,), generator=gen)[:, None] + window].to(device)
        with torch.no_grad():
            t_logits = teacher(input_ids=x).logits
        loss, ce, kl = kd_loss(student(input_ids=x).logits, t_logits, x, w)  # every token counted
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        kl_first = kl.item() if kl_first is None else kl_first
    student.eval()
    bpb, _ = evaluate_bpb(student, tokenizer, heldout, 256, device)
    return {"arm": spec, "part": part, "kd_weight": w, "learning_rate": lr, "steps": steps,
            "tokens": steps * batch * seq_len, "heldout_bpb": bpb, "kl_first": kl_first, "kl_last": kl.item(),
            "ce_last": ce.item(), "seconds": time.time() - t0}


def main() -> None:
    from common import environment

    from sdgrpo.config import TINY_MODEL
    from sdgrpo.modeling import load_model, load_tokenizer
    from sdgrpo.probes import evaluate_bpb, load_corpus

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--student", default=str(HERE.parent / "outputs/students/student-h128-l4-1k/model"))
    ap.add_argument("--teacher", default=TINY_MODEL)
    ap.add_argument("--data_dir", default=str(HERE.parent.parent / "shared" / "data"))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq_len", type=int, default=256)
    ap.add_argument("--arms", nargs="*", default=ARMS, help="part,kd_weight,learning_rate,steps (part: full or lora)")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load_tokenizer(args.teacher)
    corpus = load_corpus(args.data_dir)
    ids = torch.tensor(tokenizer("\n\n".join(train for _, train, _ in corpus))["input_ids"])
    heldout = [held for _, _, held in corpus]
    teacher = load_model(args.teacher, torch.float32, device).eval().requires_grad_(False)
    base = load_model(args.student, torch.float32, device).eval()
    result = {"benchmark": "distill_sweep", "student": args.student, "teacher": args.teacher, **environment(),
              "config": {"batch": args.batch, "seq_len": args.seq_len, "schedule": "cosine to 0", "optimizer":
                         "AdamW, no weight decay, clip 1.0", "lora": "r16 alpha32 all-linear"},
              "teacher_bpb": evaluate_bpb(teacher, tokenizer, heldout, 256, device)[0],
              "base_bpb": evaluate_bpb(base, tokenizer, heldout, 256, device)[0], "arms": []}
    print(json.dumps({k: result[k] for k in ("teacher_bpb", "base_bpb")}), flush=True)
    for spec in args.arms:
        row = run_arm(spec, args.student, teacher, ids, heldout, tokenizer, args.batch, args.seq_len, device)
        row["change_pct"] = 100 * (row["heldout_bpb"] - result["base_bpb"]) / result["base_bpb"]
        result["arms"].append(row)
        print(json.dumps(row), flush=True)
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
