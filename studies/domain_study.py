"""Which recipe makes a model better at a new domain without making it worse at everything else?

    python studies/split_articles.py ../shared/data/wikitext-2/valid.txt work/wiki_train.txt work/wiki_heldout.txt
    python studies/domain_study.py --domain_train work/wiki_train.txt --domain_heldout work/wiki_heldout.txt \
        --out studies/results/domain_study [--budget_s 300] [--model PATH] [--general_data ../shared/data]
    # on a GPU, every arm the same number of optimizer steps, arms in parallel processes:
    python studies/domain_study.py ... --steps 1000 --jobs 12 --arms base,sft,context_distill,context_distill_token,\
        distill,distill_token --seeds 0,1,2 --seed_arms distill,distill_token

Arms, each trained for the same wall-clock budget on this machine, or (``--steps``) for the same number of
optimizer steps of 8 sequences (LoRA r 16 on all linear layers):
- ``base``: no training;
- ``sft@LR``: `sdgrpo sft` on the domain text at several learning rates: the frontier a user gets without sdgrpo;
- ``self_nll``: GRPO with the default reward (the base's likelihood of the policy's samples);
- ``context_distill``: GRPO with the base shown the true continuation as the teacher;
- ``distill<-sft``: GRPO distilling a teacher = base + an SFT adapter trained on the same text (the teacher's SFT
  takes half of this arm's budget; with ``--steps``, the teacher is the ``sft@1e-3`` arm's adapter);
- ``context_distill_token``, ``distill_token`` (named ``...@token``): the same rewards with the per-token
  advantage (``--advantage token``: each completion token's teacher log-prob minus the policy's), on-policy
  distillation as GKD / SDPO form it;
- ``distill_topk`` (``distill<-sft@topk``): ``distill_token`` plus the reverse KL over the teacher's top-``--topk``
  tokens at every position (``--distill_topk``), SDPO's vocabulary-level form;
- ``sdft``: TRL's SDFTTrainer, the dense (per-token) form of context_distill: the frozen base shown the true
  continuation before the prompt teaches the policy shown the prompt alone (not in the default ``--arms``).

Arms for forgetting (none in the default ``--arms``), each at ``--replay_lr``:
- ``sft_kl@W``: SFT with a KL-to-base penalty on the domain rows: `sdgrpo sft --teacher_model_name_or_path BASE
  --kd_weight W`, the loss per token (1 - W) * cross-entropy + W * KL(base || model), for W in ``--kl_weights``;
- ``sft_replay@S``: SFT with self-replay (``--replay_share S``: a share S of every batch is the base's own samples,
  trained by KL(base || model)), for S in ``--replay_shares``;
- ``distill_replay@S``: ``distill_token`` from the SFT teacher (``sft@`` the first ``--teacher_lr``) with
  ``--replay_share S`` (replay prompts taught by the base); share 0 of both is ``sft@LR`` and ``distill_token``;
- ``distill_sampler`` (``distill<-sft@token@S``): ``distill_token`` from the same teacher with rollouts from the
  sampler S of ``--samplers`` (transformers' generate, int4 copies, 2 or 4 steps per generation): a faster sampler
  must train as well as the default one (``distill<-sft@token``; seeds for both);
- SFT stopped early is the trajectory of one run: ``--trajectory LR:EVERY`` measures the ``sft@LR`` arm's
  checkpoint every EVERY steps (drawn as the frontier: the points along one run, not a line from the base to its
  last point); ``--sft_trajectory`` instead trains separate runs of fewer steps.

Measured for each: bits per byte on the domain's held-out file (the gain), bits per byte on the held-out slice of
the general corpus the model was pretrained on (the last 5% of every book: the forgetting), and distinct-2 and
seq-rep-4 of samples on held-out domain prompts, beside the base sampled at T = 1, 0.85, 0.7, and a second measure
of forgetting: KL(trained || base) over the vocabulary per token of the general held-out text (``general_kl``, nats;
its first ``--kl_tokens`` tokens). Writes OUT/domain_study.json (the common results header; rewritten as each arm
ends) and OUT/domain_study.png (gain against each measure of forgetting, SFT's frontier as a line). ``--seeds``
repeats the ``--seed_arms`` (named ``ARM#sN``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
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
    return model.to("cuda" if torch.cuda.is_available() else "cpu").eval(), tokenizer


@torch.no_grad()
def kl_to_base(model, base, tokenizer, texts: list[str], max_tokens: int, seq_len: int = 256) -> float:
    """Mean over the first ``max_tokens`` tokens of ``texts`` (windows of ``seq_len``, each token once) of
    KL(model || base) over the vocabulary at that position, in nats: how far training moved the next-token
    distribution on general text, whether or not the true token got likelier."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        for start in range(0, len(ids), seq_len):
            window = torch.tensor([ids[start : start + min(seq_len, max_tokens - count)]], device=device)
            p = torch.log_softmax(model(input_ids=window).logits[0].float(), -1)
            q = torch.log_softmax(base(input_ids=window).logits[0].float(), -1)
            total += (p.exp() * (p - q)).sum().item()
            count += window.size(1)
            if count >= max_tokens:
                return total / count
    return total / max(count, 1)


# Tokens of the general held-out text KL(trained || base) is measured on (--kl_tokens), set by main.
KL_TOKENS = 100_000


def measure(model_path, adapter, domain_texts, general_texts, prompts, temperatures=(1.0,)) -> dict:
    from sdgrpo.evaluate import summarize

    model, tokenizer = load(model_path, adapter)
    base, _ = load(model_path, None)
    out = {"domain_bpb": bits_per_byte(model, tokenizer, domain_texts),
           "general_bpb": bits_per_byte(model, tokenizer, general_texts),
           "general_kl": kl_to_base(model, base, tokenizer, general_texts, KL_TOKENS), "samples": {}}
    for t in temperatures:
        summary, _ = summarize(model, tokenizer, base, prompts, 4, 48, t, seed=0)
        out["samples"][str(t)] = {k: summary[k] for k in ("reward_mean", "distinct_2", "seq_rep_4", "length")}
    return out


# The arms' step budget (``--steps``; None: the wall-clock budget alone) and seed, set by main.
STEPS: int | None = None
SEED = 0


def grpo_args(data: Path, out: Path, model: str, reward: str, lr: float, beta: float, *extra) -> list[str]:
    return ["--model_name_or_path", model, "--dataset_path", str(data), "--output_dir", str(out), "--reward", reward,
            "--learning_rate", str(lr), "--beta", str(beta), "--max_steps", str(STEPS or 100000),
            "--per_device_train_batch_size", "8", "--num_generations", "4", "--max_completion_length", "48",
            "--report_to", "none", "--save_strategy", "no", "--collapse_guard", "warn", "--logging_steps", "1",
            "--seed", str(SEED), *extra]


def run_grpo(args: list[str], budget: float) -> dict:
    from sdgrpo.config import parse_train_args
    from sdgrpo.train import main

    clock = TimeBudget(budget)
    t0 = time.perf_counter()
    main(*parse_train_args(args), callbacks=[clock], start_over=True)  # the study owns its arms' folders
    return {"steps": clock.steps, "train_s": round(time.perf_counter() - t0, 1)}


def run_sft(data: Path, out: Path, model: str, lr: float, budget: float, steps: int | None = None, *extra,
            every: int | None = None) -> dict:
    """`sdgrpo sft` (``extra``: more of its options); ``every``: a checkpoint every that many steps (the
    trajectory)."""
    from sdgrpo.config import parse_sft_args
    from sdgrpo.sft import main

    clock = TimeBudget(budget)
    t0 = time.perf_counter()
    save = ["--save_strategy", "steps", "--save_steps", str(every), "--save_only_model", "true"] if every else [
        "--save_strategy", "no"]
    main(*parse_sft_args(["--model_name_or_path", model, "--dataset_path", str(data), "--output_dir", str(out),
                          "--learning_rate", str(lr), "--max_steps", str(steps or STEPS or 100000),
                          "--per_device_train_batch_size", "8", "--report_to", "none", *save,
                          "--seed", str(SEED), *map(str, extra)]), callbacks=[clock], start_over=True)
    return {"steps": clock.steps, "train_s": round(time.perf_counter() - t0, 1)}


def trajectory(model_path, out: Path, domain_texts, general_texts) -> list[dict]:
    """Gain and forgetting of every checkpoint of one run (``out/checkpoint-N``), in the order of their steps: the
    frontier that stopping that run early gives."""
    points = []
    for ckpt in sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])):
        model, tokenizer = load(model_path, ckpt)
        base, _ = load(model_path, None)
        points.append({"step": int(ckpt.name.split("-")[1]),
                       "domain_bpb": bits_per_byte(model, tokenizer, domain_texts),
                       "general_bpb": bits_per_byte(model, tokenizer, general_texts),
                       "general_kl": kl_to_base(model, base, tokenizer, general_texts, KL_TOKENS)})
    return points


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


def names_teacher(name: str) -> bool:
    """Whether a distill arm's name says which SFT arm teaches it (``distill<-sft@1e-4@token``; the first teacher's
    arms are ``distill<-sft[@token|@topk]``)."""
    return name.startswith("distill<-sft@") and name.split("@")[1] not in ("token", "topk")


# arms whose parameter is their kind (a share, a weight, a sampler): one marker each
PARAMETER_KINDS = ("sft_kl@", "sft_replay@", "distill_replay@", "distill<-sft@token@")
# the distill_sampler arms' rollouts (distill<-sft@token@NAME), against distill<-sft@token's (the engine's default:
# LoRA folded into 16-bit generation copies, its rollouts corrected): transformers' generate (exact, no correction),
# int4 copies (read by gemlite on an H100), and 2 or 4 optimizer steps per generation (a policy lag)
SAMPLERS = {"generate": ["--generation_engine", "false"], "int4": ["--generation_weights", "int4"],
            "spg2": ["--steps_per_generation", "2"], "spg4": ["--steps_per_generation", "4"]}


def kind_of(name: str) -> str:
    """An arm's kind for the figure: its name without the learning rate or seed (``context_distill@1e-3#s1`` ->
    ``context_distill``), ``@token``/``@topk`` kept, and a distill arm's teacher where it is named
    (``distill<-sft@1e-4@token``)."""
    base = name.split("#")[0]
    if names_teacher(base) or base.startswith(PARAMETER_KINDS):
        return base
    return base.split("@")[0] + next((f"@{v}" for v in ("token", "topk") if base.endswith(f"@{v}")), "")


def point(arm: dict, base: dict, forgetting: str) -> tuple[float, float] | None:
    """(domain gain, forgetting) of an arm or a trajectory point: gain as held-out bits per byte % lower than the
    base's; forgetting as general bits per byte % higher (``general_bpb``) or as KL(trained || base) in nats
    (``general_kl``); None where the arm has no such figure."""
    if forgetting not in arm:
        return None
    gain = 100 * (base["domain_bpb"] - arm["domain_bpb"]) / base["domain_bpb"]
    if forgetting == "general_kl":
        return gain, arm["general_kl"]
    return gain, 100 * (arm["general_bpb"] - base["general_bpb"]) / base["general_bpb"]


MARKERS = {"self_nll": ("s", "tab:red"), "context_distill": ("D", "tab:blue"), "distill<-sft": ("^", "tab:green"),
           "sdft": ("P", "tab:purple"), "context_distill@token": ("d", "tab:cyan"),
           "distill<-sft@token": ("v", "tab:olive"), "distill<-sft@topk": ("<", "tab:brown")}
OTHERS = [("X", "tab:pink"), ("p", "tab:orange"), ("h", "darkgreen"), ("8", "navy"), ("*", "maroon"),
          ("H", "teal"), ("o", "darkviolet"), (">", "goldenrod"), ("1", "crimson"), ("2", "slateblue")]


def draw(ax, result: dict, forgetting: str) -> None:
    """One panel: every arm's gain against ``forgetting``; SFT's trajectory along one run (``--trajectory``) as the
    frontier, its learning rates (and runs stopped early) as lines from the base."""
    arms, base = result["arms"], result["arms"]["base"]
    sft = sorted(((point(a, base, forgetting), n) for n, a in arms.items() if n.count("@") == 1
                  and n.startswith("sft@") and "#" not in n and point(a, base, forgetting)),
                 key=lambda item: float(item[1].split("@")[1]))
    ax.plot([0] + [p[0] for p, _ in sft], [0] + [p[1] for p, _ in sft], ":o", color="gray",
            label="sft at each learning rate")
    for name, arm in arms.items():
        points = [q for q in (point(t, base, forgetting) for t in arm.get("trajectory", [])) if q]
        if points and point(arm, base, forgetting):
            # the frontier: the points along one run, from the base through each checkpoint to its end
            line = [(0, 0), *points, point(arm, base, forgetting)]
            ax.plot([x for x, _ in line], [y for _, y in line], "-", color="black", lw=1.5, marker=".",
                    label=f"{name} along one run (frontier)")
    early = sorted(((point(a, base, forgetting), n) for n, a in arms.items() if n.startswith("sft@")
                    and n.count("@") == 2 and point(a, base, forgetting)), key=lambda item: int(item[1].split("@")[2]))
    if early:
        lr = early[0][1].split("@")[1]
        full = [p for p, n in sft if n == f"sft@{lr}"]
        ax.plot([0] + [p[0] for p, _ in early] + [p[0] for p in full],
                [0] + [p[1] for p, _ in early] + [p[1] for p in full], "--s", color="silver",
                label=f"sft@{lr} after fewer steps")
    for (x, y), name in sft + early:
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8, color="gray")
    markers, others, labelled = dict(MARKERS), iter(OTHERS), set()
    for name, arm in arms.items():
        kind, xy = kind_of(name), point(arm, base, forgetting)
        if kind not in markers and name != "base" and not name.startswith("sft@"):
            markers[kind] = next(others, ("o", "black"))
        if kind in markers and xy:
            marker, color = markers[kind]
            named = (kind.replace("distill<-sft", f"distill<-{arm['teacher']}", 1)  # the legend names every teacher
                     if "teacher" in arm and not names_teacher(kind) and kind.startswith("distill<-") else kind)
            ax.plot(*xy, marker, color=color, markersize=9 if "#" not in name else 6,
                    label=named if kind not in labelled else None, alpha=1.0 if "#" not in name else 0.6)
            labelled.add(kind)
    ax.plot([0], [0], "k*", markersize=10, label="base")
    ax.axhline(0, color="black", lw=0.5)
    ax.axvline(0, color="black", lw=0.5)
    ax.set_xlabel("domain gain: held-out bits/byte, % lower than the base")
    ax.set_ylabel("forgetting: general held-out bits/byte, % higher" if forgetting == "general_bpb" else
                  "forgetting: KL(trained || base) on general text, nats/token")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_kl = any("general_kl" in a for n, a in result["arms"].items() if n != "base")
    fig, axes = plt.subplots(1, 2 if with_kl else 1, figsize=(14 if with_kl else 7, 5), squeeze=False)
    for ax, forgetting in zip(axes[0], ("general_bpb", "general_kl")):
        draw(ax, result, forgetting)
    axes[0][0].legend(fontsize=7)
    cfg = result["config"]
    budget = (f"up to {cfg['steps']} steps of 8 sequences per arm" + (f" or {cfg['budget_s']:g} s" if cfg.get(
              "budget_s") else "") if cfg.get("steps") else
              f"{cfg['budget_s']:.0f} s per arm")
    fig.suptitle(f"{budget}, {result['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def arms_of(args, data: Path, work: Path, model: str) -> dict:
    """name -> (train: () -> (info, adapter), the arm it needs first or None), in the order they run."""
    budget = args.budget_s
    out: dict = {}
    names = args.arms.split(",")
    seeds = [int(x) for x in args.seeds.split(",")]
    seed_arms = set(args.seed_arms.split(",")) if args.seed_arms else set()

    def add(kind, name, train, needs=None):
        if kind not in names:
            return
        for seed in seeds if kind in seed_arms else seeds[:1]:
            label = name if seed == seeds[0] else f"{name}#s{seed}"
            out[label] = ((lambda train=train, seed=seed, label=label: train(seed, label)), needs)

    if "base" in names:
        out["base"] = (None, None)
    along, every = args.trajectory.split(":") if args.trajectory else (None, None)
    for lr in args.sft_lrs.split(","):  # with --trajectory, that lr's run saves its checkpoints to be measured
        add("sft", f"sft@{lr}", lambda seed, label, lr=lr, every=int(every) if lr == along else None: (
            run_sft(data, work / label, model, float(lr), budget, every=every), work / label))
    if args.sft_trajectory:  # SFT's frontier below its full-budget gain: one lr stopped after fewer steps
        lr, counts = args.sft_trajectory.split(":")
        for n in counts.split(","):
            add("sft", f"sft@{lr}@{n}", lambda seed, label, lr=lr, n=n: (
                run_sft(data, work / label, model, float(lr), budget, int(n)), work / label))
    add("self_nll", "self_nll", lambda seed, label: (
        run_grpo(grpo_args(data, work / label, model, "self_nll", 3e-4, 0.04), budget), work / label))
    for token in ("", "_token"):
        for i, lr in enumerate(args.context_distill_lrs.split(",")):
            name = "context_distill" + ("" if i == 0 else f"@{lr}") + ("@token" if token else "")
            extra = ["--advantage", "token"] if token else []
            add("context_distill" + token, name, lambda seed, label, lr=lr, extra=extra: (
                run_grpo(grpo_args(data, work / label, model, "context_distill", float(lr), 0.0, *extra), budget),
                work / label))
    def distill_arm(extra, teacher, teacher_lr):
        def distill(seed, label):
            slug = label.replace("<-", "_from_").replace("@", "_").replace("#", "_")
            if STEPS:  # the teacher: the sft arm's adapter
                teacher_dir, info = work / teacher, {"teacher": teacher}
            else:  # half the budget for the teacher's SFT, half for the distillation
                teacher_dir = work / f"{slug}_teacher"
                info = {"teacher_sft_steps": run_sft(data, teacher_dir, model, float(teacher_lr),
                                                     budget / 2)["steps"]}
            run = run_grpo(grpo_args(data, work / slug, model, "distill", float(args.distill_lr), 0.0,
                                     "--teacher_adapter", str(teacher_dir), *extra),
                           budget if STEPS else budget / 2)
            return {**run, **info}, work / slug

        return distill

    for t, teacher_lr in enumerate(args.teacher_lr.split(",")):
        teacher = f"sft@{teacher_lr}"
        for token in ("", "_token", "_topk"):
            # the first teacher's arms are named distill<-sft[@token|@topk]; another's name it: distill<-sft@1e-4@token
            name = ("distill<-sft" if t == 0 else f"distill<-{teacher}") + {"": "", "_token": "@token",
                                                                             "_topk": "@topk"}[token]
            extra = {"": [], "_token": ["--advantage", "token"],
                     "_topk": ["--advantage", "token", "--distill_topk", str(args.topk)]}[token]
            add("distill" + token, name, distill_arm(extra, teacher, teacher_lr), needs=teacher if STEPS else None)
    # forgetting: a KL-to-base penalty on the domain rows, and self-replay at each share
    for w in args.kl_weights.split(","):
        add("sft_kl", f"sft_kl@{w}", lambda seed, label, w=w: (
            run_sft(data, work / label, model, float(args.replay_lr), budget, None,
                    "--teacher_model_name_or_path", model, "--kd_weight", w), work / label))
    first_teacher = args.teacher_lr.split(",")[0]
    for share in args.replay_shares.split(","):
        replay = ["--replay_share", share, "--replay_samples", args.replay_samples]
        add("sft_replay", f"sft_replay@{share}", lambda seed, label, replay=replay: (
            run_sft(data, work / label, model, float(args.replay_lr), budget, None, *replay), work / label))
        add("distill_replay", f"distill_replay@{share}",
            distill_arm(["--advantage", "token", *map(str, replay)], f"sft@{first_teacher}", first_teacher),
            needs=f"sft@{first_teacher}" if STEPS else None)
    # the sampler's quality gate: distill_token from the same teacher with rollouts from another sampler
    for sampler in getattr(args, "samplers", "").split(",") if getattr(args, "samplers", "") else []:
        add("distill_sampler", f"distill<-sft@token@{sampler}",
            distill_arm(["--advantage", "token", *SAMPLERS[sampler]], f"sft@{first_teacher}", first_teacher),
            needs=f"sft@{first_teacher}" if STEPS else None)
    for i, lr in enumerate(args.sdft_lrs.split(",")):
        name = "sdft" if i == 0 else f"sdft@{lr}"
        add("sdft", name, lambda seed, label, lr=lr: (run_sdft(data, work / label, model, float(lr), budget),
                                                      work / label))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domain_train", nargs="+", required=True)
    ap.add_argument("--domain_heldout", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget_s", type=float, default=None,
                    help="seconds of training per arm (default 300; with --steps: none unless given, and then an arm "
                         "stops at whichever comes first, its steps recorded)")
    ap.add_argument("--steps", type=int, default=None,
                    help="train every arm for this many optimizer steps instead of --budget_s seconds")
    ap.add_argument("--jobs", type=int, default=1, help="arms trained at once, each in its own process")
    ap.add_argument("--model", default=None, help="base model (default: the shipped tiny model)")
    ap.add_argument("--general_data", default=str(ROOT.parent / "shared" / "data"),
                    help="the pretraining corpus whose held-out slice measures forgetting")
    ap.add_argument("--sft_lrs", default="1e-4,3e-4,1e-3")
    ap.add_argument("--sft_trajectory", default=None, metavar="LR:N1,N2,...",
                    help="also SFT at LR stopped after N1, N2, ... steps (arms sft@LR@N): the frontier below the "
                         "full-budget gain")
    ap.add_argument("--teacher_lr", default="1e-3",
                    help="learning rate of the distill arms' SFT teacher; several (1e-3,1e-4): the distill arms again "
                         "for each further teacher, named distill<-sft@LR...")
    ap.add_argument("--distill_lr", default="3e-4")
    ap.add_argument("--topk", type=int, default=20, help="K of the distill_topk arm (--distill_topk)")
    ap.add_argument("--context_distill_lrs", default="3e-4",
                    help="learning rates of the context_distill arm (the first is named context_distill)")
    ap.add_argument("--sdft_lrs", default="3e-4", help="learning rates of the sdft arm (the first is named sdft)")
    ap.add_argument("--arms", default="base,sft,self_nll,context_distill,distill",
                    help="of base, sft, self_nll, context_distill, context_distill_token, distill, distill_token, "
                         "distill_topk, sdft, sft_kl, sft_replay, distill_replay, distill_sampler")
    ap.add_argument("--samplers", default="generate,int4,spg2,spg4",
                    help="the distill_sampler arms: distill_token from the first --teacher_lr's SFT with rollouts from "
                         f"each of {', '.join(SAMPLERS)} (see SAMPLERS)")
    ap.add_argument("--trajectory", default=None, metavar="LR:EVERY",
                    help="the sft@LR arm saves a checkpoint every EVERY steps and each is measured: SFT stopped early, "
                         "along one run (the frontier of the figure)")
    ap.add_argument("--replay_lr", default="1e-4", help="learning rate of the sft_kl and sft_replay arms")
    ap.add_argument("--kl_weights", default="0.5", help="--kd_weight of the sft_kl arms (the base as the teacher)")
    ap.add_argument("--replay_shares", default="0.25,0.5",
                    help="--replay_share of the sft_replay and distill_replay arms (their share 0: sft@LR and "
                         "distill_token)")
    ap.add_argument("--replay_samples", default="512", help="--replay_samples of the replay arms")
    ap.add_argument("--kl_tokens", type=int, default=100_000,
                    help="tokens of the general held-out text on which KL(trained || base) is measured")
    ap.add_argument("--eval_prompts", type=int, default=24, help="held-out domain prompts the samples start from")
    ap.add_argument("--seeds", default="0", help="seeds of the --seed_arms (the other arms: the first)")
    ap.add_argument("--seed_arms", default="", help="arm kinds (as in --arms) repeated for every seed")
    ap.add_argument("--only", default=None, help=argparse.SUPPRESS)  # one arm, in a --jobs child process
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    global STEPS, SEED, KL_TOKENS
    STEPS, KL_TOKENS = args.steps, args.kl_tokens
    if args.budget_s is None:
        args.budget_s = float("inf") if STEPS else 300.0
    torch.manual_seed(0)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import header

    from sdgrpo.config import TINY_MODEL
    from sdgrpo.data import load_prompts
    from sdgrpo.probes import load_corpus
    from sdgrpo.textio import read_text_file

    model = args.model or TINY_MODEL
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # its results file is written there (the work folder may be elsewhere)
    work = out / "work" if not os.environ.get("STUDY_WORK") else Path(os.environ["STUDY_WORK"])
    (work / "arms").mkdir(parents=True, exist_ok=True)
    data = prepare(args.domain_train, work / "domain_train", model)
    held = prepare([args.domain_heldout], work / "domain_heldout", model, test_size=0.5)
    prompts = list(load_prompts(str(held), "test", args.eval_prompts)["prompt"])
    domain_texts = [read_text_file(args.domain_heldout)]
    general_texts = [h for _, _, h in load_corpus(args.general_data)]
    arms = arms_of(args, data, work, model)

    def run_arm(name) -> dict:
        global SEED
        SEED = int(name.split("#s")[1]) if "#s" in name else int(args.seeds.split(",")[0])
        if name == "base":
            return measure(model, None, domain_texts, general_texts, prompts, (1.0, 0.85, 0.7))
        info, adapter = arms[name][0]()
        row = {**measure(model, adapter, domain_texts, general_texts, prompts), **info}
        if any(adapter.glob("checkpoint-*")):  # --trajectory: the run's checkpoints
            row["trajectory"] = trajectory(model, adapter, domain_texts, general_texts)
        return row

    if args.only is not None:  # a child: one arm, its row to work/arms/
        row = run_arm(args.only)
        (work / "arms" / f"{args.only.replace('/', '_')}.json").write_text(json.dumps(row))
        return
    path = out / "domain_study.json"
    result = json.loads(path.read_text()) if path.is_file() else {"arms": {}}
    config = {**vars(args), "model": model, "budget_s": None if args.budget_s == float("inf") else args.budget_s}
    result.update({**header("domain_study", config), "machine": f"{platform.machine()}, "
                   f"{torch.get_num_threads()} threads" + (f", {torch.cuda.get_device_name()}"
                                                             if torch.cuda.is_available() else ""),
                   "model": model, "config": config, "domain_heldout_bytes": len(domain_texts[0].encode()),
                   "general_heldout_bytes": sum(len(t.encode()) for t in general_texts)})
    if STEPS:
        cap = "no time cap" if args.budget_s == float("inf") else f"or {args.budget_s:g} s, whichever first"
        result["budget"] = (f"{STEPS} optimizer steps per arm ({cap}; each arm's steps recorded), 8 sequences a step: "
                            "sft trains on 8 prompt + continuation pairs, GRPO samples and trains 8 completions of 48 "
                            "tokens (2 prompts x 4)")

    def save():
        path.write_text(json.dumps(result, indent=2))
        if "base" in result["arms"]:
            plot(result, out / "domain_study.png")

    def done(name, row):  # each arm keeps the commit and date of the call that ran it (a study may span calls)
        result["arms"][name] = {**row, "commit": result["commit"], "date": result["date"]}
        print(name, {k: v for k, v in row.items() if k != "samples"}, flush=True)
        save()

    todo = [n for n in arms if n not in result["arms"]]
    if args.jobs <= 1:
        for name in todo:
            print(f"== {name}", flush=True)
            done(name, run_arm(name))
    else:  # each arm in its own process, at most --jobs at once, an arm after the one it needs
        argv = [a for a in sys.argv[1:]]
        running: dict = {}
        while todo or running:
            for name in [n for n in todo if len(running) < args.jobs]:
                needs = arms[name][1]
                if needs is not None and needs not in result["arms"]:
                    continue
                if len(running) >= args.jobs:
                    break
                log = open(work / "arms" / f"{name}.log", "w")
                running[name] = subprocess.Popen([sys.executable, __file__, *argv, "--only", name], stdout=log,
                                                 stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
                todo.remove(name)
                print(f"== {name} started", flush=True)
            time.sleep(2)
            for name, proc in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[name]
                row_file = work / "arms" / f"{name}.json"
                if proc.returncode == 0 and row_file.is_file():
                    done(name, json.loads(row_file.read_text()))
                else:
                    tail = (work / "arms" / f"{name}.log").read_text()[-1500:]
                    print(f"!! {name} failed ({proc.returncode}):\n{tail}", flush=True)
                    result.setdefault("failed", {})[name] = tail
                    save()
                    todo = [n for n in todo if arms[n][1] != name]
    save()
    base = result["arms"]["base"]
    print(f"{'arm':26s} {'domain bpb':>10s} {'gain %':>7s} {'general bpb':>11s} {'forget %':>8s} {'d2':>6s} "
          f"{'rep4':>6s} {'steps':>6s}")
    for name, a in result["arms"].items():
        s = a["samples"]["1.0"]
        print(f"{name:26s} {a['domain_bpb']:10.4f} {100 * (1 - a['domain_bpb'] / base['domain_bpb']):7.2f} "
              f"{a['general_bpb']:11.4f} {100 * (a['general_bpb'] / base['general_bpb'] - 1):8.2f} "
              f"{s['distinct_2']:6.3f} {s['seq_rep_4']:6.3f} {a.get('steps', 0):6d}")


if __name__ == "__main__":
    main()
