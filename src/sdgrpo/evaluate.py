"""``sdgrpo eval``: a trained adapter against its base, and against the base sampled at lower temperatures.

For held-out prompts (the ``test`` split of ``sdgrpo prepare``) it samples K continuations from the base at several
temperatures and from the adapter at temperature 1, and reports the reward (mean log-prob under the base), the
policy's NLL on the true continuations (held-out perplexity), diversity and repetition of the samples and of the
true continuations, and the length. The colder base samples draw the reward-versus-diversity frontier that plain
sharpening reaches without training; one sentence says whether the training beat it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from sdgrpo.metrics import collapse_metrics
from sdgrpo.samples import stop_token_ids

logger = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "The base model (default: the adapter's base, else the shipped tiny model)."})
    adapter: str | None = field(default=None, metadata={
        "help": "A LoRA adapter folder written by `sdgrpo train` or `sft`; without it only the base is sampled."})
    data: str = field(default="data/prepared", metadata={
        "help": "Prepared data (`sdgrpo prepare`, or OUTPUT_DIR/data of a run): its prompts are sampled."})
    output: str = field(default="outputs/eval", metadata={
        "help": "Folder for the report, samples and figures: new, empty, or an earlier eval's (a folder holding "
                "files sdgrpo did not write is refused)."})
    split: str = field(default="test", metadata={"help": "Which split of --data gives the prompts."})
    max_prompts: int = field(default=64, metadata={"help": "Prompts taken from the split."})
    samples: int = field(default=8, metadata={"help": "Samples per prompt and temperature."})
    max_new_tokens: int = field(default=64, metadata={"help": "Tokens sampled per completion."})
    temperatures: str = field(default="1.0,0.85,0.7,0.5", metadata={
        "help": "Comma-separated temperatures the base is sampled at (the trained adapter at 1.0): the frontier a "
                "colder base draws, to compare the adapter with."})
    seed: int = field(default=0, metadata={"help": "Sampling seed."})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "Run code shipped with the model (off: only transformers' own architectures load)."})


def summarize(model, tokenizer, base_scorer, prompts, k, max_new_tokens, temperature, seed,
              keep_rewards: bool = False) -> tuple[dict, object]:
    """Sample K per prompt and summarise: reward under the base (``base_scorer`` with adapters off), collapse metrics.

    With ``keep_rewards`` the per-sample rewards are included under ``rewards``.
    """
    from sdgrpo.samples import base_rewards, sample

    samples = sample(model, tokenizer, prompts, k, max_new_tokens, temperature=temperature, seed=seed)
    rewards = [r for r in base_rewards(base_scorer, tokenizer, samples) if r is not None]
    eos_ids = samples.eos_ids
    out = {"temperature": temperature, "reward_mean": statistics.fmean(rewards),
           "reward_std": statistics.pstdev(rewards), "prompts": len(prompts),
           "unscored": len(samples.texts) - len(rewards),
           **collapse_metrics(samples.completion_ids, samples.texts, eos_ids, group_size=k)}
    if keep_rewards:
        out["rewards"] = rewards
    return out, samples


def frontier(base, tokenizer, prompts, k, max_new_tokens, temperatures, seed, policy=None,
             keep_rewards: bool = False) -> tuple[dict, dict | None, str | None, dict]:
    """The comparison `eval` and `demo` make: the base sampled at each temperature and, with ``policy`` (the
    trained adapter on the base), the policy at T=1; every reward under the base. Returns (base statistics by
    temperature, the policy's or None, the verdict or None, the samples by label)."""
    base_stats, samples_by = {}, {}
    for t in temperatures:
        logger.info("sampling the base at T=%g", t)
        base_stats[t], samples_by[f"base T={t}"] = summarize(base, tokenizer, base, prompts, k, max_new_tokens, t,
                                                             seed, keep_rewards=keep_rewards)
    if policy is None:
        return base_stats, None, None, samples_by
    trained, samples_by["trained T=1"] = summarize(policy, tokenizer, policy, prompts, k, max_new_tokens, 1.0, seed,
                                                   keep_rewards=keep_rewards)
    return base_stats, trained, verdict(trained, base_stats), samples_by


def continuation_nll(model, tokenizer, prompts: list[str], continuations: list[str]) -> dict:
    """The model's (adapters on) mean NLL per token of the true continuations given their prompts.

    The continuation is tokenized on its own (no BOS) after the prompt's ids: a close, documented approximation of
    how the text would tokenize as one piece.
    """
    from sdgrpo.scoring import completion_logprobs

    prompt_ids = tokenizer(prompts)["input_ids"]
    cont_ids = tokenizer(continuations, add_special_tokens=False)["input_ids"]
    logps = completion_logprobs(model, prompt_ids, cont_ids, pad_token_id=tokenizer.pad_token_id)
    total = sum(-lp.sum().item() for lp in logps)
    tokens = sum(lp.numel() for lp in logps)
    return {"nll_per_token": total / tokens, "perplexity": math.exp(total / tokens), "tokens": tokens}


# Differences of distinct-2 below this are not called either way: the sampling noise of a few hundred samples.
DISTINCT_TOLERANCE = 0.01


def reward_tolerance(a: dict, b: dict) -> float:
    """Two standard errors of the difference of two mean rewards, each taken as its samples' standard deviation over
    the square root of its prompts (samples of one prompt are not independent: this overstates the error rather than
    understates it); 0 where a summary lacks ``reward_std`` or ``prompts``."""
    def se(x: dict) -> float:
        return x["reward_std"] / math.sqrt(x["prompts"]) if x.get("prompts") and "reward_std" in x else 0.0

    return 2 * math.hypot(se(a), se(b))


def verdict(trained: dict, baselines: dict) -> str:
    """One honest sentence: is the trained model dominated by the base sampled at some temperature?

    A baseline dominates when its reward and its distinct-2 are both at least the trained model's, within sampling
    noise (:func:`reward_tolerance`, :data:`DISTINCT_TOLERANCE`): a trained model better by less than the noise has
    not beaten anything. Within the noise of the base at T=1 (the temperature the trained model is sampled at) on
    both, the sentence says no measurable difference; behind the base at T=1, that it did not beat the base at its own
    temperature; behind a colder base only, that training only sharpened.
    """
    def close(v: dict) -> tuple[bool, bool]:
        return (abs(v["reward_mean"] - trained["reward_mean"]) <= reward_tolerance(v, trained),
                abs(v["distinct_2"] - trained["distinct_2"]) <= DISTINCT_TOLERANCE)

    dominating = [(t, v) for t, v in baselines.items()
                  if v["reward_mean"] >= trained["reward_mean"] - reward_tolerance(v, trained)
                  and v["distinct_2"] >= trained["distinct_2"] - DISTINCT_TOLERANCE]
    if dominating:
        if 1.0 in baselines and all(close(baselines[1.0])):  # the base at the temperature the trained model samples at
            t, v = 1.0, baselines[1.0]
            return (f"Training made no measurable difference: the base model sampled at T={t} has the same reward "
                    f"({v['reward_mean']:.3f} vs {trained['reward_mean']:.3f}, noise +-"
                    f"{reward_tolerance(v, trained):.3f}) and diversity (distinct-2 {v['distinct_2']:.3f} vs "
                    f"{trained['distinct_2']:.3f}) as the trained model.")
        t, v = max(dominating, key=lambda tv: tv[1]["reward_mean"])
        if 1.0 in dict(dominating):  # behind the base at its own temperature: not a sharpened base, a worse one
            one = baselines[1.0]
            colder = f"; at T={t} its reward is higher still ({v['reward_mean']:.3f})" if t != 1.0 else ""
            return (f"Training did not beat the base model at its own temperature: sampled at T=1.0, as the trained "
                    f"model is, the base has at least the trained model's reward ({one['reward_mean']:.3f} vs "
                    f"{trained['reward_mean']:.3f}) and diversity (distinct-2 {one['distinct_2']:.3f} vs "
                    f"{trained['distinct_2']:.3f}) within sampling noise{colder}.")
        return (f"Training did not beat the temperature frontier: the base model sampled at T={t} has at least the "
                f"trained model's reward ({v['reward_mean']:.3f} vs {trained['reward_mean']:.3f}) and diversity "
                f"(distinct-2 {v['distinct_2']:.3f} vs {trained['distinct_2']:.3f}) within sampling noise"
                + ("; this run only sharpened the base." if t < 1.0 else "."))
    return ("Training beat the temperature frontier: no temperature tried gives the base model both the trained "
            f"model's reward ({trained['reward_mean']:.3f}) and its diversity (distinct-2 "
            f"{trained['distinct_2']:.3f}), beyond sampling noise.")


def plot_frontier(baselines: dict, trained: dict | None, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted(baselines.items())
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot([v["distinct_2"] for _, v in pts], [v["reward_mean"] for _, v in pts], "o-", label="base at T")
    for t, v in pts:
        ax.annotate(f"T={t}", (v["distinct_2"], v["reward_mean"]), textcoords="offset points", xytext=(4, 4))
    if trained is not None:
        ax.plot([trained["distinct_2"]], [trained["reward_mean"]], "r*", markersize=14, label="trained, T=1")
    ax.set_xlabel("distinct-2 of samples (diversity)")
    ax.set_ylabel("reward: mean log-prob under base")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def main(cfg: EvalConfig) -> dict:
    import torch
    from peft import PeftModel

    from sdgrpo.config import TINY_MODEL
    from sdgrpo.data import load_prompts
    from sdgrpo.errors import UserError
    from sdgrpo.folders import check_replaceable, staged
    from sdgrpo.modeling import check_positions, load_model, load_tokenizer, model_config, resolve_dtype
    from sdgrpo.report import fmt, markdown_table, samples_table

    name = cfg.model_name_or_path or TINY_MODEL
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # the output folder: new, empty, or an earlier eval's (every file in it sdgrpo's), checked before any work and
    # written as a whole at the end (folders.staged): a folder of the user's is never written into
    check_replaceable(Path(cfg.output), "--output")
    ds = load_prompts(cfg.data, cfg.split, cfg.max_prompts)
    if "continuation" not in ds.column_names:
        raise UserError(f"{cfg.data}: no 'continuation' column; make the data with `sdgrpo prepare`")
    prompts, conts = list(ds["prompt"]), list(ds["continuation"])
    tokenizer = load_tokenizer(name, cfg.trust_remote_code)
    longest = max(len(ids) for ids in tokenizer(prompts)["input_ids"])
    check_positions(model_config(name, cfg.trust_remote_code), longest + cfg.max_new_tokens,
                    f"the longest prompt of {cfg.data} ({longest} tokens) and --max_new_tokens {cfg.max_new_tokens}",
                    name)
    if cfg.adapter and not (Path(cfg.adapter) / "adapter_config.json").is_file():
        raise UserError(f"{cfg.adapter}: no adapter_config.json; pass the output_dir of `sdgrpo train`")
    base = load_model(name, resolve_dtype(None, device), device, cfg.trust_remote_code)
    temps = [float(t) for t in cfg.temperatures.split(",") if t.strip()]
    out = Path(cfg.output)  # written only once there is something to write: a failure leaves no folder
    eos_ids = set(stop_token_ids(base, tokenizer))
    true_ids = tokenizer(conts, add_special_tokens=False)["input_ids"]
    result = {"config": dataclasses.asdict(cfg), "prompts": len(prompts),
              "true_continuations": collapse_metrics(true_ids, conts, eos_ids),
              "base": {"continuation_nll": continuation_nll(base, tokenizer, prompts, conts), "temperatures": {}}}
    base_stats, _, _, samples_by = frontier(base, tokenizer, prompts, cfg.samples, cfg.max_new_tokens, temps,
                                            cfg.seed)
    result["base"]["temperatures"] = {str(t): v for t, v in base_stats.items()}
    trained = None
    if cfg.adapter:  # the adapter goes onto the base only now: PEFT wraps the base's layers in place
        policy = PeftModel.from_pretrained(base, cfg.adapter)
        _, trained, _, more = frontier(base, tokenizer, prompts, cfg.samples, cfg.max_new_tokens, [], cfg.seed,
                                       policy=policy)
        samples_by.update(more)
        result["trained"] = {"continuation_nll": continuation_nll(policy, tokenizer, prompts, conts), **trained}
        result["verdict"] = verdict(trained, base_stats)
    files = {"eval.json": json.dumps(result, indent=2)}

    keys = ["reward_mean", "distinct_2", "seq_rep_4", "compression_ratio", "length", "eos_rate"]
    rows = [[f"base, T={t}", *(fmt(v[k]) for k in keys)] for t, v in result["base"]["temperatures"].items()]
    if trained:
        rows.append(["trained, T=1", *(fmt(trained[k]) for k in keys)])
    rows.append(["true continuations", "", *(fmt(result["true_continuations"][k]) for k in keys[1:])])
    nll_rows = [["base", fmt(result["base"]["continuation_nll"]["perplexity"], 2)]]
    if trained:
        nll_rows.append(["trained", fmt(result["trained"]["continuation_nll"]["perplexity"], 2)])
    first = next(iter(samples_by))
    cols = [samples_by[first].texts[:: cfg.samples],
            samples_by.get("trained T=1", samples_by[first]).texts[:: cfg.samples]]
    report = f"""# sdgrpo eval

Model `{name}`{f", adapter `{cfg.adapter}`" if cfg.adapter else ""}; {len(prompts)} held-out prompts from
`{cfg.data}` ({cfg.split}), {cfg.samples} samples each, at most {cfg.max_new_tokens} new tokens, seed {cfg.seed}.

{result.get("verdict", "")}

{markdown_table(["", *keys], rows)}

Held-out perplexity of the true continuations (lower is better):

{markdown_table(["model", "perplexity"], nll_rows)}

![reward against diversity](frontier.png)

## Samples (first per prompt; left: {first}, right: {"trained T=1" if trained else first})

{samples_table(prompts, cols[0], cols[1])}
"""
    files["report.md"] = report
    with staged(out, "eval") as folder:
        plot_frontier({float(t): v for t, v in result["base"]["temperatures"].items()}, trained,
                      folder / "frontier.png")
        for file, text in files.items():
            (folder / file).write_text(text)
    return result
