"""``sdgrpo demo``: the whole loop on the shipped tiny model and demo text, offline on CPU, with a report.

prepare the demo openings -> sample the base model on held-out prompts -> self-distillation GRPO -> sample the
trained adapters on the same prompts with the same seed -> report (rewards before/after, curves, samples).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from sdgrpo.config import TINY_MODEL, parse_train_args

logger = logging.getLogger(__name__)

# What a demo writes at the top of its folder beside data/ and adapter/: an earlier demo's are moved aside first.
DEMO_WRITES = ("demo.json", "report.md", "curves.png", "rewards.png")

DEMO_TEXT = Path(__file__).parent / "assets" / "demo" / "openings.txt"


@dataclass
class DemoConfig:
    output: str = field(default="outputs/demo", metadata={
        "help": "Folder for the demo's run, report and figures (new, or an earlier demo's)."})
    max_steps: int = field(default=80, metadata={"help": "GRPO optimizer steps."})
    learning_rate: float = field(default=3e-4, metadata={"help": "LoRA learning rate."})
    beta: float = field(default=0.04, metadata={"help": "Weight of the KL penalty to the base."})
    num_generations: int = field(default=8, metadata={"help": "Completions sampled per prompt (G)."})
    prompts_per_step: int = field(default=2, metadata={"help": "Prompts per optimizer step."})
    max_completion_length: int = field(default=32, metadata={"help": "Tokens per completion."})
    eval_samples: int = field(default=8, metadata={"help": "Samples per held-out prompt in the comparison."})
    baseline_temperatures: str = field(default="0.85,0.7", metadata={
        "help": "Temperatures the base is sampled at for comparison: what plain sharpening gives."})
    seed: int = field(default=0, metadata={"help": "Seed of training and sampling."})


def main(cfg: DemoConfig) -> int:
    """The demo in ``cfg.output``: a new or empty folder, or an earlier demo's (sdgrpo's manifest), locked while it
    runs; a folder holding anything else is refused in one line before anything is written."""
    from sdgrpo.folders import PREVIOUS, read_manifest, set_aside, write_manifest
    from sdgrpo.runs import run_folder

    out = Path(cfg.output)
    if (out.is_dir() and read_manifest(out) is None and all((out / n).is_dir() for n in ("data", "adapter"))
            and (out / "demo.json").is_file() and all(p.name in (*DEMO_WRITES, "data", "adapter")
                                                      or p.name.startswith(PREVIOUS) for p in out.iterdir())):
        write_manifest(out, "demo")  # a demo's folder from before demos wrote manifests: only what a demo writes
    with run_folder(out, "demo", resume=False, start_over=False, option="--output"):
        earlier = [name for name in DEMO_WRITES if (out / name).exists()]
        if earlier:
            logger.warning("an earlier demo's %s moved into %s", ", ".join(earlier), set_aside(out, earlier))
        return _demo(cfg, out)


def _demo(cfg: DemoConfig, out: Path) -> int:
    import torch
    from datasets import load_from_disk
    from peft import PeftModel
    from rich.console import Console

    from sdgrpo.callbacks import read_metrics
    from sdgrpo.data import PrepareConfig, prepare
    from sdgrpo.evaluate import frontier
    from sdgrpo.modeling import load_model, load_tokenizer
    from sdgrpo.report import fmt, markdown_table, plot_before_after, plot_curves, samples_table
    from sdgrpo.train import main as train_main

    console = Console()
    t0 = time.time()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    tokenizer = load_tokenizer(TINY_MODEL)

    console.rule("[bold]1/3 prepare the demo text")
    summary = prepare(PrepareConfig(inputs=[str(DEMO_TEXT)], output=str(out / "data"), min_prompt_tokens=8,
                                    max_prompt_tokens=20, continuation_tokens=32, test_size=0.2, seed=cfg.seed),
                      tokenizer)
    console.print(f"{summary['prompts']} prompts: {summary['train']} to train on, {summary['test']} held out")
    held_out = list(load_from_disk(str(out / "data"))["test"]["prompt"])

    console.rule("[bold]2/3 self-distillation GRPO (LoRA, KL to the base)")
    train_cfg, model_cfg = parse_train_args([
        "--dataset_path", str(out / "data"), "--output_dir", str(out / "adapter"),
        "--max_steps", str(cfg.max_steps), "--learning_rate", str(cfg.learning_rate), "--beta", str(cfg.beta),
        "--num_generations", str(cfg.num_generations),
        "--per_device_train_batch_size", str(cfg.num_generations * cfg.prompts_per_step),
        "--max_completion_length", str(cfg.max_completion_length), "--save_strategy", "no",
        "--lr_scheduler_type", "constant", "--seed", str(cfg.seed), "--report_to", "tensorboard",
    ])
    train_main(train_cfg, model_cfg, start_over=True)  # a demo run again: the last one is moved aside
    rows = read_metrics(out / "adapter" / "metrics.jsonl")
    how_long = f"trained for {rows[-1]['step'] if rows else 0} steps"
    guard = out / "adapter" / "collapse_guard.json"
    tripped = json.loads(guard.read_text()) if guard.is_file() else {}
    if tripped.get("tripped_at"):
        how_long += (f" of {cfg.max_steps}: the collapse guard stopped it at step {tripped['tripped_at']} "
                     f"({tripped['reason']})")

    console.rule("[bold]3/3 sample the base (at each temperature) and the trained adapters on held-out prompts")
    base = load_model(TINY_MODEL, torch.float32, "cpu")
    trained = PeftModel.from_pretrained(load_model(TINY_MODEL, torch.float32, "cpu"), str(out / "adapter"))
    temps = [1.0, *(float(x) for x in cfg.baseline_temperatures.split(",") if x.strip())]
    base_stats, s_after, sentence, samples_by = frontier(base, tokenizer, held_out, cfg.eval_samples,
                                                         cfg.max_completion_length, temps, cfg.seed, policy=trained,
                                                         keep_rewards=True)
    s_before, before, after = base_stats[1.0], samples_by["base T=1.0"], samples_by["trained T=1"]
    colder = {t: {k: v for k, v in stats.items() if k != "rewards"} for t, stats in base_stats.items() if t != 1.0}
    plot_curves(rows, out / "curves.png")
    plot_before_after(s_before.pop("rewards"), s_after.pop("rewards"), out / "rewards.png")
    elapsed = time.time() - t0
    result = {"config": dataclasses.asdict(cfg), "before": s_before, "after": s_after,
              "base_colder": {str(t): v for t, v in colder.items()},
              "verdict": sentence, "steps": rows, "trained": how_long,
              "held_out_prompts": len(held_out), "seconds": elapsed}
    (out / "demo.json").write_text(json.dumps(result, indent=2))
    keys = ["reward_mean", "reward_std", "length", "eos_rate", "distinct_2", "seq_rep_4", "compression_ratio"]
    table = markdown_table(["", *keys], [["base, T=1", *(fmt(s_before[k]) for k in keys)],
                                         *[[f"base, T={t}", *(fmt(v[k]) for k in keys)] for t, v in colder.items()],
                                         ["trained, T=1", *(fmt(s_after[k]) for k in keys)]])
    firsts = slice(0, None, cfg.eval_samples)  # the first sample of each prompt
    report = f"""# sdgrpo demo

The shipped tiny model ({TINY_MODEL.rsplit('/', 1)[-1]}), self-distillation GRPO on {summary['train']} prompts from
the demo text, {how_long}; evaluated on {len(held_out)} held-out prompts,
{cfg.eval_samples} samples each at temperature 1, same seed before and after. Reward = mean log-prob of the sample
under the frozen base model. Took {elapsed:.0f} s.

{table}

{sentence}

A higher reward with seq-rep-4 and distinct-2 near the base's means sharper text without collapse; a higher reward
bought with repetition is the known failure of this reward. The colder rows are the base model sampled at a lower
temperature: the sharpening that needs no training at all.

![training curves](curves.png)

![rewards before and after](rewards.png)

## Samples (first sample per held-out prompt)

{samples_table(held_out, before.texts[firsts], after.texts[firsts])}
"""
    (out / "report.md").write_text(report)
    console.print(table)
    console.print(f"{how_long}; reward {s_before['reward_mean']:.3f} -> {s_after['reward_mean']:.3f}. {sentence}")
    console.print(f"report in {out / 'report.md'} ({elapsed:.0f} s)")
    return 0
