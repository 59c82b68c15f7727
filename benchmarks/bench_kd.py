"""Peak GPU memory and time of one distillation step (`sdgrpo sft --teacher_model_name_or_path`: student forward,
teacher forward, `sft.kd_loss`, backward) at a real vocabulary, with the loss computed in checkpointed chunks of rows
(the default) against the whole batch at once (the form before chunking), in one process on one GPU.

    python benchmarks/bench_kd.py --shape qwen2.5-1.5b --rows 16 --tokens 512 --out benchmarks/results

Random weights of the real shape (Qwen2.5-1.5B: vocabulary 151,936); the student carries LoRA r 16 on every linear
layer with gradient checkpointing, as `sdgrpo sft` trains it; the teacher is a second model of the same shape.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import device_tag, header, random_model, save

from sdgrpo.sft import kd_loss


def whole_batch_kd(student_logits, teacher_logits, labels, weight, num_items_in_batch=None):
    """The loss as it was computed before chunking (every fp32 [rows, tokens, vocab] tensor at once)."""
    width = min(student_logits.size(-1), teacher_logits.size(-1))
    target = labels[:, 1:]
    counted = target != -100
    s_logp = torch.log_softmax(student_logits[:, :-1, :width].float(), dim=-1)[counted]
    t_logp = torch.log_softmax(teacher_logits[:, :-1, :width].float(), dim=-1)[counted]
    ce = -s_logp.gather(-1, target[counted][:, None])[:, 0]
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    n = counted.sum().clamp(min=1)
    ce, kl = ce.sum() / n, kl.sum() / n
    return (1 - weight) * ce + weight * kl, ce.detach(), kl.detach()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen2.5-1.5b")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    from peft import LoraConfig, get_peft_model

    student = get_peft_model(random_model(args.shape), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student.enable_input_require_grads()
    student.train()
    teacher = random_model(args.shape).requires_grad_(False)
    vocab = student.config.vocab_size
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(3, vocab, (args.rows, args.tokens), device="cuda", generator=g)
    labels = ids.clone()
    rows = []
    for name, loss_fn in (("chunked", kd_loss), ("whole_batch", whole_batch_kd)):
        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                s_logits = student(input_ids=ids).logits
                with torch.no_grad():
                    t_logits = teacher(input_ids=ids).logits
                loss, ce, kl = loss_fn(s_logits, t_logits, labels, 0.5)
            loss.backward()
            student.zero_grad(set_to_none=True)
            return loss.item()

        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        row = {"loss_form": name}
        try:
            step()  # warm-up
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            times, values = [], []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                values.append(step())
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            row.update(step_s=sorted(times)[len(times) // 2], peak_gpu_gib=torch.cuda.max_memory_allocated() / 2**30,
                       above_weights_gib=(torch.cuda.max_memory_allocated() - base) / 2**30, loss=values[-1])
        except torch.cuda.OutOfMemoryError as err:
            row.update(error=f"out of memory: {str(err).splitlines()[0][:200]}")
        torch.cuda.empty_cache()
        print(row, flush=True)
        rows.append(row)
    config = {"shape": args.shape, "vocab_size": vocab, "rows": args.rows, "tokens": args.tokens, "lora_r": 16,
              "gradient_checkpointing": True, "dtype": "bf16 weights, bf16 autocast", "teacher": "same shape",
              "weights_gib": base / 2**30}
    head = header("bench_kd", config)
    save(f"bench_kd_{args.shape}_{device_tag()}_{head['date'][:10]}", {**head, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
