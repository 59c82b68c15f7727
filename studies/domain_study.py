"""Which recipe makes a model better at a new domain without making it worse at everything else?

    python studies/split_articles.py ../shared/data/wikitext-2/valid.txt work/wiki_train.txt work/wiki_heldout.txt
    python studies/domain_study.py --domain_train work/wiki_train.txt --domain_heldout work/wiki_heldout.txt \
        --out studies/results/domain_study [--budget_s 300] [--model PATH] [--general_data ../shared/data]

Arms, each trained for the same wall-clock budget on this machine (LoRA r 16 on all linear layers):
- ``base``: no training;
- ``sft@LR``: `sdgrpo sft` on the domain text at several learning rates: the frontier a user gets without sdgrpo;
- ``self_nll``: GRPO with the default reward (the base's likelihood of the policy's samples);
- ``context_distill``: GRPO with the base shown the true continuation as the teacher;
- ``distill<-sft``: GRPO distilling a teacher = base + an SFT adapter trained on the same text (the teacher's SFT
  takes half of this arm's budget);
- ``sdft``: TRL's SDFTTrainer, the dense (per-token) form of context_distill: the frozen base shown the true
  continuation before the prompt teaches the policy shown the prompt alone (not in the default ``--arms``).

Measured for each: bits per byte on the domain's held-out file (the gain), bits per byte on the held-out slice of
the general corpus the model was pretrained on (the last 5% of every book: the forgetting), and distinct-2 and
seq-rep-4 of samples on held-out domain prompts, beside the base sampled at T = 1, 0.85, 0.7. Writes
OUT/domain_study.json and OUT/domain_study.png (gain against forgetting, SFT's frontier as a line).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parents[1]


class TimeBudget(TrainerCallback):
    """Stop training once ``seconds`` of wall-clock time have passed since the first step began."""

    def __init__(self, seconds: float):
        self.seconds, self.start, self.steps = seconds, None, 0

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = self.start or time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.steps = state.global_step
        if time.perf_counter() - self.start >= self.seconds:
            control.should_training_stop = True


def prepare(files: list[str], out: Path, model: str, test_size: float = 0.0) -> Path:
    from sdgrpo.data import PrepareConfig, prepare
    from sdgrpo.modeling import load_tokenizer

    if not (out / "prepare.json").is_file():
        prepare(PrepareConfig(inputs=files, output=str(out), model=model, test_size=test_size),
                load_tokenizer(model, False))
    return out


def bits_per_byte(model, tokenizer, texts: list[str]) -> float:
    from sdgrpo.probes import evaluate_bpb

    return evaluate_bpb(model, tokenizer, texts, 256, next(model.parameters()).device)[0]


def load(model_path: str, adapter: Path | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return model.eval(), tokenizer


def measure(model_path, adapter, domain_texts, general_texts, prompts, temperatures=(1.0,)) -> dict:
    from sdgrpo.evaluate import summarize

    model, tokenizer = load(model_path, adapter)
    base, _ = load(model_path, None)
    out = {"domain_bpb": bits_per_byte(model, tokenizer, domain_texts),
           "general_bpb": bits_per_byte(model, tokenizer, general_texts), "samples": {}}
    for t in temperatures:
        summary, _ = summarize(model, tokenizer, base, prompts, 4, 48, t, seed=0)
        out["samples"][str(t)] = {k: summary[k] for k in ("reward_mean", "distinct_2", "seq_rep_4", "length")}
    return out


def grpo_args(data: Path, out: Path, model: str, reward: str, lr: float, beta: float, *extra) -> list[str]:
    return ["--model_name_or_path", model, "--dataset_path", str(data), "--output_dir", str(out), "--reward", reward,
            "--learning_rate", str(lr), "--beta", str(beta), "--max_steps", "100000", "--per_device_train_batch_size",
            "8", "--num_generations", "4", "--max_completion_length", "48", "--report_to", "none",
            "--save_strategy", "no", "--collapse_guard", "warn", "--logging_steps", "1", "--seed", "0", *extra]


def run_grpo(args: list[str], budget: float) -> dict:
    from sdgrpo.config import parse_train_args
    from sdgrpo.train import main

    clock = TimeBudget(budget)
    t0 = time.perf_counter()
    main(*parse_train_args(args), callbacks=[clock])
    return {"steps": clock.steps, "train_s": round(time.perf_counter() - t0, 1)}


def run_sft(data: Path, out: Path, model: str, lr: float, budget: float) -> dict:
    from sdgrpo.config import parse_sft_args
    from sdgrpo.sft import main

    clock = TimeBudget(budget)
    t0 = time.perf_counter()
    main(*parse_sft_args(["--model_name_or_path", model, "--dataset_path", str(data), "--output_dir", str(out),
                          "--learning_rate", str(lr), "--max_steps", "100000", "--per_device_train_batch_size", "8",
                          "--report_to", "none", "--save_strategy", "no", "--seed", "0"]), callbacks=[clock])
    return {"steps": clock.steps, "train_s": round(time.perf_counter() - t0, 1)}


def run_sdft(data: Path, out: Path, model: str, lr: float, budget: float) -> dict:
    """TRL's SDFTTrainer (experimental in TRL 1.15): on-policy self-distillation with a dense, per-token loss (top-100
    logits), the frozen base shown the true continuation before the prompt as the teacher; the same LoRA."""
    from datasets import load_from_disk
    from peft import LoraConfig
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    from sdgrpo.compat import ensure_trl_runs_without_triton
    from sdgrpo.modeling import load_model, load_tokenizer

    ensure_trl_runs_without_triton()
    train = load_from_disk(str(data))["train"]
    train = train.select_columns(["prompt", "continuation"]).rename_column("continuation", "privileged_context")
    tokenizer = load_tokenizer(model)
    cfg = SDFTConfig(output_dir=str(out), learning_rate=lr, max_steps=100000, per_device_train_batch_size=8,
                     num_generations=4, max_completion_length=48, report_to="none", save_strategy="no", seed=0,
                     logging_steps=1, teacher_model_kind="base", use_cpu=not torch.cuda.is_available(),
                     bf16=torch.cuda.is_available(), teacher_prompt_template="{privileged_context}\n\n{prompt}")
    clock = TimeBudget(budget)
    t0 = time.perf_counter()
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SDFTTrainer(model=load_model(model, torch.float32, "cuda" if torch.cuda.is_available() else "cpu"),
                          args=cfg, train_dataset=train, processing_class=tokenizer, callbacks=[clock],
                          peft_config=lora)
    trainer.train()
    trainer.save_model(str(out))
    return {"steps": clock.steps, "train_s": round(time.perf_counter() - t0, 1)}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = result["arms"]["base"]

    def point(arm):
        gain = 100 * (base["domain_bpb"] - arm["domain_bpb"]) / base["domain_bpb"]
        forget = 100 * (arm["general_bpb"] - base["general_bpb"]) / base["general_bpb"]
        return gain, forget

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    sft = sorted((point(a), n) for n, a in result["arms"].items() if n.startswith("sft@"))
    ax.plot([0] + [p[0] for p, _ in sft], [0] + [p[1] for p, _ in sft], "-o", color="gray", label="sft (frontier)")
    for (x, y), name in sft:
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8, color="gray")
    markers = {"self_nll": ("s", "tab:red"), "context_distill": ("D", "tab:blue"), "distill<-sft": ("^", "tab:green"),
               "sdft": ("P", "tab:purple")}
    for name, arm in result["arms"].items():
        kind = name.split("@")[0]
        if kind in markers:
            marker, color = markers[kind]
            x, y = point(arm)
            ax.plot([x], [y], marker, color=color, markersize=9 if kind == name else 6, label=name)
    ax.plot([0], [0], "k*", markersize=10, label="base")
    ax.axhline(0, color="black", lw=0.5)
    ax.axvline(0, color="black", lw=0.5)
    ax.set_xlabel("domain gain: held-out bits/byte, % lower than the base")
    ax.set_ylabel("forgetting: general held-out bits/byte, % higher")
    ax.set_title(f"{result['config']['budget_s']:.0f} s per arm, {result['machine']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domain_train", nargs="+", required=True)
    ap.add_argument("--domain_heldout", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget_s", type=float, default=300)
    ap.add_argument("--model", default=None, help="base model (default: the shipped tiny model)")
    ap.add_argument("--general_data", default=str(ROOT.parent / "shared" / "data"),
                    help="the pretraining corpus whose held-out slice measures forgetting")
    ap.add_argument("--sft_lrs", default="1e-4,3e-4,1e-3")
    ap.add_argument("--context_distill_lrs", default="3e-4",
                    help="learning rates of the context_distill arm (the first is named context_distill)")
    ap.add_argument("--sdft_lrs", default="3e-4", help="learning rates of the sdft arm (the first is named sdft)")
    ap.add_argument("--arms", default="base,sft,self_nll,context_distill,distill")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    from sdgrpo.config import TINY_MODEL
    from sdgrpo.data import load_prompts
    from sdgrpo.probes import load_corpus
    from sdgrpo.textio import read_text_file

    model = args.model or TINY_MODEL
    out = Path(args.out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    data = prepare(args.domain_train, work / "domain_train", model)
    held = prepare([args.domain_heldout], work / "domain_heldout", model, test_size=0.5)
    prompts = list(load_prompts(str(held), "test", 24)["prompt"])
    domain_texts = [read_text_file(args.domain_heldout)]
    general_texts = [h for _, _, h in load_corpus(args.general_data)]
    arms = args.arms.split(",")
    path = out / "domain_study.json"
    result = json.loads(path.read_text()) if path.is_file() else {"arms": {}}
    result.update({"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, "
                   f"{torch.get_num_threads()} threads", "torch": torch.__version__, "model": model,
                   "config": vars(args), "domain_heldout_bytes": len(domain_texts[0].encode()),
                   "general_heldout_bytes": sum(len(t.encode()) for t in general_texts)})

    def save():
        path.write_text(json.dumps(result, indent=2))

    def arm(name, train):
        if name in result["arms"]:
            return
        print(f"== {name}", flush=True)
        info, adapter = train()
        result["arms"][name] = {**measure(model, adapter, domain_texts, general_texts, prompts), **info}
        print(name, {k: v for k, v in result["arms"][name].items() if k != "samples"}, flush=True)
        save()

    budget = args.budget_s
    if "base" in arms and "base" not in result["arms"]:
        result["arms"]["base"] = measure(model, None, domain_texts, general_texts, prompts, (1.0, 0.85, 0.7))
        save()
    if "sft" in arms:
        for lr in args.sft_lrs.split(","):
            arm(f"sft@{lr}", lambda lr=lr: (run_sft(data, work / f"sft_{lr}", model, float(lr), budget),
                                            work / f"sft_{lr}"))
    if "self_nll" in arms:
        arm("self_nll", lambda: (run_grpo(grpo_args(data, work / "self_nll", model, "self_nll", 3e-4, 0.04), budget),
                                 work / "self_nll"))
    if "context_distill" in arms:
        for i, lr in enumerate(args.context_distill_lrs.split(",")):
            name = "context_distill" if i == 0 else f"context_distill@{lr}"
            arm(name, lambda lr=lr, name=name: (
                run_grpo(grpo_args(data, work / name, model, "context_distill", float(lr), 0.0), budget), work / name))
    if "distill" in arms:
        def distill():
            teacher = run_sft(data, work / "distill_teacher", model, 1e-3, budget / 2)
            info = run_grpo(grpo_args(data, work / "distill", model, "distill", 3e-4, 0.0, "--teacher_adapter",
                                      str(work / "distill_teacher")), budget / 2)
            return {**info, "teacher_sft_steps": teacher["steps"]}, work / "distill"

        arm("distill<-sft", distill)
    if "sdft" in arms:
        for i, lr in enumerate(args.sdft_lrs.split(",")):
            name = "sdft" if i == 0 else f"sdft@{lr}"
            arm(name, lambda lr=lr, name=name: (run_sdft(data, work / name, model, float(lr), budget), work / name))
    plot(result, out / "domain_study.png")
    save()
    base = result["arms"]["base"]
    print(f"{'arm':18s} {'domain bpb':>10s} {'gain %':>7s} {'general bpb':>11s} {'forget %':>8s} {'d2':>6s} "
          f"{'rep4':>6s}")
    for name, a in result["arms"].items():
        s = a["samples"]["1.0"]
        print(f"{name:18s} {a['domain_bpb']:10.4f} {100 * (1 - a['domain_bpb'] / base['domain_bpb']):7.2f} "
              f"{a['general_bpb']:11.4f} {100 * (a['general_bpb'] / base['general_bpb'] - 1):8.2f} "
              f"{s['distinct_2']:6.3f} {s['seq_rep_4']:6.3f}")


if __name__ == "__main__":
    main()
