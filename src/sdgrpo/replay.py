"""Self-replay: a share of every batch drawn from text the base wrote before training, taught by the frozen base.

Training on a new domain moves the model on every row; what it knew elsewhere drifts (forgetting). Mixing in rows
whose teacher is the base itself holds the model to the base there (Thinking Machines, "On-Policy Distillation",
2025; MixSD). Without a general corpus at hand, the base's own samples stand for what it knew:

- **The samples** (:func:`base_samples`): ``--replay_samples`` samples of up to ``--replay_tokens`` tokens from the
  base before any training, at temperature 1 (no top-k, no top-p), from BOS alone where the tokenizer adds one, else
  from short neutral prefixes (:data:`NEUTRAL_PREFIXES`), seeded by ``--seed``. Made once into
  ``OUTPUT_DIR/replay/`` (``samples.jsonl``, then ``replay.json``: model, size, seed, start, written last) and reused
  while those are unchanged (a resumed run, a rerun); samples that are nothing but EOS are dropped (counted there).
- **The rows**: ``sdgrpo sft`` trains on each sample's whole text (:func:`text_rows`); ``sdgrpo train`` takes the
  first half of each sample's tokens as a prompt (:func:`prompt_rows`) and samples the policy from it. A dataset
  column ``replay`` marks them.
- **The batches** (:func:`epoch_order`): each epoch takes every domain row once, in a seeded shuffle, and puts a
  replay row at the positions ``i`` where ``floor((i + 1) * share)`` steps up, the replay rows drawn in seeded
  shuffles of the pool, one after the other across epochs: any run of consecutive rows holds the share to within one
  row, so a batch of 8 at share 0.25 holds exactly 2 (sft). ``sdgrpo train`` samples whole prompt groups, so its
  unit is the prompt (:class:`ReplayRepeatSampler`, TRL's ``RepeatSampler`` repetition over that order).
- **The teacher**: on replay rows the frozen base (the model with its adapters off; with ``--use_peft false`` a
  frozen copy), on domain rows what it was. ``sft``: the loss of a replay token is KL(base || student) over the
  vocabulary at that position (:func:`mixed_kd`), not the cross-entropy of the sampled token; domain tokens keep
  theirs; the sum over the batch's tokens is divided by TRL's token count as before. ``train --reward distill``: the
  reward's teacher log-probs of a replay row come from the base, so its per-token term (``--advantage token``) is
  log p_base - log p_policy, the reverse-KL direction to the base on the policy's own samples.
"""

from __future__ import annotations

import json
import logging
import math
import random
from fractions import Fraction
from pathlib import Path

import torch

from sdgrpo.errors import UserError

logger = logging.getLogger(__name__)

FOLDER, MANIFEST, SAMPLES = "replay", "replay.json", "samples.jsonl"
# Starts for a tokenizer that adds no BOS (an empty prompt gives nothing to decode from): common sentence openings.
NEUTRAL_PREFIXES = ("The", "In", "A", "It", "When", "This", "There", "He", "She", "They", "We", "One", "I", "But")


def starts(tokenizer) -> list[str]:
    """What the samples start from: the empty prompt (BOS alone) where the tokenizer adds a BOS, else the prefixes."""
    ids = tokenizer("", add_special_tokens=True)["input_ids"]
    return [""] if ids and ids == [tokenizer.bos_token_id] else list(NEUTRAL_PREFIXES)


def make_samples(model, tokenizer, count: int, tokens: int, seed: int, batch_size: int = 64) -> tuple[list, int]:
    """``count`` samples of the model as it is (temperature 1, seeded), as rows ``{"prefix", "ids", "text"}`` (the
    sampled ids, EOS included where sampled; the prefix and the decoded ids), and how many were dropped for holding
    nothing but EOS."""
    from sdgrpo.samples import sample

    begin = starts(tokenizer)
    prompts = [begin[i % len(begin)] for i in range(count)]
    drawn = sample(model, tokenizer, prompts, 1, tokens, temperature=1.0, seed=seed, batch_size=batch_size)
    rows = [{"prefix": p, "ids": ids, "text": p + text}
            for p, ids, text in zip(prompts, drawn.completion_ids, drawn.texts) if text.strip()]
    return rows, count - len(rows)


def _ours(folder: Path) -> bool:
    """Whether ``folder`` holds only what :func:`base_samples` writes (its manifest, or a write cut short)."""
    return all(p.name in (MANIFEST, SAMPLES, SAMPLES + ".tmp", MANIFEST + ".tmp") for p in folder.iterdir())


def base_samples(model, tokenizer, output_dir: str | Path, model_name: str, count: int, tokens: int, seed: int,
                 args=None) -> list[dict]:
    """The base's samples in ``output_dir/replay``, made now from ``model`` (the base, before any training) unless a
    manifest there records the same model, size, seed and start. With several processes (``args``: the run's
    ``TrainingArguments``) the main one samples while the others wait, then read. A folder of that name that sdgrpo did
    not write is refused, not replaced."""
    import contextlib

    from sdgrpo.textio import write_atomic

    folder = Path(output_dir) / FOLDER
    want = {"model": str(model_name), "samples": count, "tokens": tokens, "seed": seed, "start":
            "BOS" if starts(tokenizer) == [""] else "prefixes"}
    main = args is None or args.process_index == 0
    with args.main_process_first(local=False, desc="the base's replay samples") if args else contextlib.nullcontext():
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except (OSError, ValueError):
            manifest = None
        if manifest is not None and {k: manifest.get(k) for k in want} == want:
            rows = [json.loads(line) for line in (folder / SAMPLES).read_text().splitlines() if line.strip()]
            if main:
                logger.info("replay: reusing the base's %d samples in %s", len(rows), folder)
            return rows
        if folder.exists() and (not folder.is_dir() or (manifest is None and not _ours(folder))):
            raise UserError(f"{folder}: exists and was not written by sdgrpo (no {MANIFEST}); the replay samples go "
                            "there: move it away or pass another --output_dir")
        if not main:
            raise UserError(f"{folder}: the main process did not write the replay samples")
        folder.mkdir(parents=True, exist_ok=True)
        rows, dropped = make_samples(model, tokenizer, count, tokens, seed)
        if not rows:
            raise UserError(f"{model_name}: all {count} replay samples were empty (EOS at once); the base cannot "
                            "write its own replay text: drop --replay_share")
        write_atomic(folder / SAMPLES, "".join(json.dumps(r) + "\n" for r in rows))
        write_atomic(folder / MANIFEST, json.dumps({**want, "temperature": 1.0, "kept": len(rows),
                                                    "dropped_empty": dropped}, indent=2))
        logger.warning("replay: the base wrote %d samples of up to %d tokens (seed %d) into %s", len(rows), tokens,
                       seed, folder)
        return rows


# --- the rows ------------------------------------------------------------------------------------------------------
def text_rows(domain, rows: list[dict]):
    """``sdgrpo sft``'s train set: the domain's ``text`` rows and the samples' texts, with a ``replay`` column."""
    from datasets import Dataset, concatenate_datasets

    domain = domain.add_column("replay", [False] * len(domain))
    replay = Dataset.from_dict({"text": [r["text"] for r in rows], "replay": [True] * len(rows)},
                               features=domain.features)
    return concatenate_datasets([domain, replay])


def replay_prompt(row: dict, tokenizer) -> str:
    """A sample's prompt for ``sdgrpo train``: its prefix and the first half of its sampled tokens (EOS left out)."""
    ids = [t for t in row["ids"] if t != tokenizer.eos_token_id]
    return row["prefix"] + tokenizer.decode(ids[: len(ids) // 2], skip_special_tokens=True)


def prompt_rows(domain, rows: list[dict], tokenizer):
    """``sdgrpo train``'s prompts: the domain's, and each sample's (:func:`replay_prompt`; its other columns
    empty), with a ``replay`` column."""
    from datasets import Dataset, concatenate_datasets

    domain = domain.add_column("replay", [False] * len(domain))
    fill = {"continuation": "", "source": "replay", "prompt_tokens": 0}
    columns = {name: [fill.get(name)] * len(rows) for name in domain.column_names}
    columns["prompt"] = [replay_prompt(r, tokenizer) for r in rows]
    columns["replay"] = [True] * len(rows)
    return concatenate_datasets([domain, Dataset.from_dict(columns, features=domain.features)])


def mix(cfg, dataset, model, tokenizer, model_name: str, prompts: bool):
    """``dataset`` with the base's samples mixed in where ``cfg.replay_share`` > 0 (``prompts``: as prompts for
    ``sdgrpo train``, else as texts for ``sdgrpo sft``); unchanged otherwise."""
    if not getattr(cfg, "replay_share", 0):
        return dataset
    rows = base_samples(model, tokenizer, cfg.output_dir, model_name, cfg.replay_samples, cfg.replay_tokens,
                        cfg.seed, cfg)
    return prompt_rows(dataset, rows, tokenizer) if prompts else text_rows(dataset, rows)


# --- the order of the rows -----------------------------------------------------------------------------------------
def _rate(share: float) -> Fraction:
    return Fraction(share).limit_denominator(10**6)  # exact slots for 0.25, 0.3, ...: no float drift over a run


def is_slot(i: int, share: float | Fraction) -> bool:
    """Whether position ``i`` of an epoch's order holds a replay row."""
    s = _rate(share)
    return math.floor((i + 1) * s) > math.floor(i * s)


def slots(domain: int, share: float) -> int:
    """Replay rows in one epoch of ``domain`` domain rows: the replay slots before the last domain row's position."""
    s = _rate(share)
    if s >= 1:
        raise ValueError(f"share {share} leaves no domain rows")
    # positions [0, n) hold floor(n * s) replay slots: the smallest n with n - floor(n * s) = domain, ending on a
    # domain position
    n = math.ceil(domain / (1 - s)) if domain else 0
    while n > 0 and n - math.floor(n * s) > domain or (n > 0 and is_slot(n - 1, s)):
        n -= 1
    while n - math.floor(n * s) < domain:
        n += 1
    return n - domain


def epoch_order(domain: list[int], replay: list[int], share: float, seed: int, epoch: int) -> list[int]:
    """One epoch's row order: every index of ``domain`` once (shuffled with ``seed`` and ``epoch``), an index of
    ``replay`` at every replay slot (:func:`is_slot`), taken in turn from seeded shuffles of ``replay`` that go on
    from one epoch to the next."""
    order = list(domain)
    random.Random(f"{seed}:domain:{epoch}").shuffle(order)
    if not replay or not share:
        return order
    s, per_epoch = _rate(share), slots(len(domain), share)
    taken = epoch * per_epoch  # replay rows the epochs before took
    pools: dict[int, list[int]] = {}

    def replay_row(k: int) -> int:
        if k // len(replay) not in pools:
            pools[k // len(replay)] = pool = list(replay)
            random.Random(f"{seed}:replay:{k // len(replay)}").shuffle(pool)
        return pools[k // len(replay)][k % len(replay)]

    out, rows = [], iter(order)
    for i in range(len(order) + per_epoch):
        if is_slot(i, s):
            out.append(replay_row(taken))
            taken += 1
        else:
            out.append(next(rows))
    return out


class ReplaySampler:
    """``sdgrpo sft``'s sampler with replay rows: :func:`epoch_order` of the dataset's ``replay`` flags, epoch by
    epoch (the Trainer's ``set_epoch`` where it calls it, else one more each pass)."""

    def __init__(self, flags: list[bool], share: float, seed: int):
        self.domain = [i for i, f in enumerate(flags) if not f]
        self.replay = [i for i, f in enumerate(flags) if f]
        self.share, self.seed, self.epoch = share, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> list[int]:
        out = epoch_order(self.domain, self.replay, self.share, self.seed, self.epoch)
        self.epoch += 1
        return out

    def __iter__(self):
        return iter(self.order())

    def __len__(self) -> int:
        return len(self.domain) + (slots(len(self.domain), self.share) if self.replay else 0)


class ReplayRepeatSampler(ReplaySampler):
    """``sdgrpo train``'s: TRL's ``RepeatSampler`` (``trl.trainer.utils``; its repetition, not its shuffle) over
    :func:`epoch_order` of the prompts: chunks of ``batch_size`` prompts (an incomplete last one dropped), each
    chunk ``repeat_count`` times, each prompt ``mini_repeat_count`` times in a row (one group)."""

    def __init__(self, flags, share, seed, mini_repeat_count: int, batch_size: int, repeat_count: int):
        super().__init__(flags, share, seed)
        self.mini_repeat_count, self.batch_size, self.repeat_count = mini_repeat_count, batch_size, repeat_count

    def __iter__(self):
        order = self.order()
        for start in range(0, len(order) - self.batch_size + 1, self.batch_size):
            for _ in range(self.repeat_count):
                for index in order[start : start + self.batch_size]:
                    for _ in range(self.mini_repeat_count):
                        yield index

    def __len__(self) -> int:
        return (super().__len__() // self.batch_size) * self.batch_size * self.mini_repeat_count * self.repeat_count


def repeat_sampler(sampler, dataset, share: float, seed: int):
    """TRL's GRPO sampler, or where ``dataset`` has replay rows and ``share`` > 0 its replay form with the same
    repetition (read from TRL's ``RepeatSampler``: ``mini_repeat_count``, ``batch_size``, ``repeat_count``)."""
    if not share or dataset is None or "replay" not in (getattr(dataset, "column_names", None) or []):
        return sampler
    try:
        repeat = (sampler.mini_repeat_count, sampler.batch_size, sampler.repeat_count)
    except AttributeError:
        raise RuntimeError(f"--replay_share: the trainer's sampler {type(sampler).__name__} is not TRL's "
                           "RepeatSampler; its repetition is unknown") from None
    return ReplayRepeatSampler(dataset["replay"], share, seed, *repeat)


# --- the losses ----------------------------------------------------------------------------------------------------
def mixed_kd(hidden, weight, bias, targets, parts, temperature: float = 1.0, logit_scale: float = 1.0,
             softcap: float | None = None, outputs=("entropy",)):
    """Per token, over parts of the positions each with its own teacher: ``(1 - w) * log p(target) - w * KL(teacher
    || student)`` (``w`` the part's weight; no teacher: ``log p(target)``), TRL's entropy and is-argmax (None where
    not in ``outputs``), and per part the summed cross-entropy and KL (detached; KL 0 without a teacher). ``parts``:
    ``(positions [n] long, teacher rows, teacher logits function, w)``, the positions of all parts together every
    row of ``hidden`` ``[N, H]`` once. Chunk by chunk as :func:`sdgrpo.chunked.kd_stats` and ``token_stats``."""
    from sdgrpo.chunked import kd_stats, token_stats

    terms, entropies, tops, sums, order = [], [], [], [], []
    for positions, rows, logits, w in parts:
        positions = positions.to(hidden.device)
        h, t = hidden.index_select(0, positions), targets.index_select(0, positions)
        if rows is None:
            log_probs, entropy, _, _, is_top1, _ = token_stats(h, weight, bias, t, temperature, logit_scale, softcap,
                                                               outputs)
            kl = torch.zeros_like(log_probs)
        else:
            log_probs, kl, entropy, is_top1 = kd_stats(h, weight, bias, t, rows.to(hidden.device), logits,
                                                       temperature, logit_scale, softcap, outputs)
        terms.append((1 - w) * log_probs - w * kl if w else log_probs)
        entropies.append(entropy)
        tops.append(is_top1)
        sums.append((-log_probs.detach().sum(), kl.detach().sum()))
        order.append(positions)
    back = torch.argsort(torch.cat(order))  # each part's values back to their positions

    def joined(values):
        return None if any(v is None for v in values) else torch.cat(values).index_select(0, back)

    return joined(terms), joined(entropies), joined(tops), sums


def base_rows(model, inputs: dict, mask: torch.Tensor):
    """``sft._teacher_rows`` of the base: ``model`` (a PEFT model) with its adapters off, in eval mode, for the forward
    and for every chunk of logits (a LoRA on the head would otherwise be read there)."""
    from sdgrpo.scoring import adapters_disabled
    from sdgrpo.sft import _teacher_rows

    was_training = model.training
    model.eval()
    try:
        with adapters_disabled(model):
            rows, logits = _teacher_rows(model, inputs, mask)
    finally:
        model.train(was_training)

    def base_logits(chunk):
        with adapters_disabled(model):
            return logits(chunk)

    return rows, base_logits


def collate_flags(collator):
    """``collator`` that also returns the examples' ``replay`` flags as a bool tensor ``[B]`` (TRL's language-modeling
    collator keeps only the ids and labels)."""

    def collate(examples):
        flags = torch.tensor([bool(ex.pop("replay")) for ex in examples])
        batch = collator(examples)
        batch["replay"] = flags
        return batch

    return collate


def grpo_metrics(terms, flags: list) -> dict[str, float]:
    """For a generation batch of ``sdgrpo train``: the share of replay rows, and on them the mean over their tokens
    of log p_policy - log p_base (``terms``: the reward's per-token base - policy), an estimate of KL(policy || base)
    on the policy's own samples (NaN where the batch holds none)."""
    replay = [t for t, f in zip(terms or [], flags) if f and t is not None and t.numel()]
    kl = -torch.cat(replay).float().mean().item() if replay else float("nan")
    return {"replay/share": sum(map(bool, flags)) / max(len(flags), 1), "replay/kl": kl}
