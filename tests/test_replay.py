"""Self-replay (sdgrpo.replay, --replay_share): the order of the rows, the losses and rewards of the replay rows
against independent computations, the cached samples, and both verbs through the real CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import make_llama, reference_logps, run_cli, with_lora
from sdgrpo import replay


# --- the order of the rows -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("share, batch", [(0.25, 8), (0.5, 8), (0.5, 2), (0.3, 10)])
def test_every_batch_holds_its_share_and_every_domain_row_comes_once(share, batch):
    domain, pool = list(range(100)), list(range(100, 117))
    seen_replay = []
    for epoch in range(3):
        order = replay.epoch_order(domain, pool, share, seed=7, epoch=epoch)
        assert sorted(i for i in order if i < 100) == domain  # every domain row once an epoch
        assert len(order) == 100 + replay.slots(100, share) and order[-1] < 100
        for start in range(0, len(order) - batch + 1, batch):  # aligned batches: share * batch replay rows each
            assert sum(i >= 100 for i in order[start : start + batch]) == round(share * batch)
        seen_replay += [i for i in order if i >= 100]
        # the same seed and epoch give the same order; another seed another
        assert order == replay.epoch_order(domain, pool, share, seed=7, epoch=epoch)
        assert order != replay.epoch_order(domain, pool, share, seed=8, epoch=epoch)
    # replay rows go round the pool: each pass over it takes every sample once
    for start in range(0, len(seen_replay) - len(pool) + 1, len(pool)):
        assert sorted(seen_replay[start : start + len(pool)]) == pool
    assert replay.epoch_order(domain, pool, 0.0, 7, 0) == replay.epoch_order(domain, [], 0.5, 7, 0)


def test_the_prompt_sampler_repeats_like_trls():
    """Over the same order, ReplayRepeatSampler yields what TRL's RepeatSampler (no shuffle) yields: chunks of
    prompts, each repeated, each prompt once per completion of its group."""
    from trl.trainer.utils import RepeatSampler

    flags = [False] * 13 + [True] * 5
    ours = replay.ReplayRepeatSampler(flags, 0.5, 3, mini_repeat_count=4, batch_size=2, repeat_count=3)
    order = replay.epoch_order(list(range(13)), list(range(13, 18)), 0.5, 3, 0)
    trl = RepeatSampler(order, mini_repeat_count=4, batch_size=2, repeat_count=3, shuffle=False)
    got = list(ours)
    assert got == [order[i] for i in trl] and len(got) == len(ours) == len(trl)
    following = replay.epoch_order(list(range(13)), list(range(13, 18)), 0.5, 3, 1)
    assert list(ours) == [following[i] for i in trl]  # the next pass: the next epoch's order
    ours.set_epoch(0)  # the Trainer's epoch, where it sets it
    assert list(ours) == got


# --- sdgrpo sft: the loss of a batch -------------------------------------------------------------------------------
TEXTS = ["In the beginning God created the heaven and the earth.", "And the earth was without form, and void;",
         "And God said, Let there be light: and there was light.", "Then"]


@pytest.mark.parametrize("with_teacher", [False, True])
def test_sft_replay_rows_are_kl_to_the_base_and_domain_rows_unchanged(with_teacher, tiny_tokenizer, tmp_path):
    """One batch of 2 domain and 2 replay rows through the trainer's own loss (TRL's compute_loss, fused head
    routed): its value and its gradients against one plain forward per row in fp64 / whole logits: domain tokens
    cross-entropy (with a teacher (1 - w) CE + w KL(teacher || student)), replay tokens KL(base || student) over the
    vocabulary, the base being the adapters-off model, the sum over all counted tokens."""
    from datasets import Dataset

    from sdgrpo.config import SDSFTConfig
    from sdgrpo.sft import _distilling_trainer

    model = with_lora(make_llama(tiny_tokenizer, seed=1), 0.05, seed=2)  # adapters that move it off the base
    teacher = make_llama(tiny_tokenizer, seed=5) if with_teacher else None
    w = 0.3
    data = Dataset.from_dict({"text": TEXTS, "replay": [False, True, False, True]})
    args = SDSFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, replay_share=0.5, max_length=64,
                       gradient_checkpointing=False)
    trainer = _distilling_trainer(teacher, w, "adapters")(model=model, args=args, train_dataset=data,
                                                          processing_class=tiny_tokenizer)
    batch = trainer.data_collator([dict(trainer.train_dataset[i]) for i in range(4)])
    assert batch["replay"].tolist() == [False, True, False, True]
    model.train()
    model.zero_grad()
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    ids, labels = batch["input_ids"], batch["labels"]
    flags = batch["replay"].tolist()
    # the value: one unpadded fp64 pass per row
    total = count = 0.0
    for row in range(4):
        keep = batch["attention_mask"][row].bool()
        row_ids, row_labels = ids[row][keep][None], labels[row][keep]
        with torch.no_grad():
            s = torch.log_softmax(model(input_ids=row_ids).logits[0].double(), -1)
            with model.disable_adapter():
                b = torch.log_softmax(model(input_ids=row_ids).logits[0].double(), -1)
            t = torch.log_softmax(teacher(input_ids=row_ids).logits[0].double(), -1) if teacher else None
        for pos in range(row_ids.size(1) - 1):
            target = int(row_labels[pos + 1])
            if target == -100:
                continue
            count += 1
            if flags[row]:
                total += (b[pos].exp() * (b[pos] - s[pos])).sum().item()
            elif teacher is not None:
                total += -(1 - w) * s[pos, target].item() + w * (t[pos].exp() * (t[pos] - s[pos])).sum().item()
            else:
                total -= s[pos, target].item()
    assert count == int((labels[:, 1:] != -100).sum())
    assert loss.item() == pytest.approx(total / count, rel=1e-5)

    # the gradients: the same loss from whole logits of the padded batch, by autograd
    model.zero_grad()
    inputs = {"input_ids": ids, "attention_mask": batch["attention_mask"]}
    s = torch.log_softmax(model(**inputs).logits[:, :-1].float(), -1)
    with torch.no_grad(), model.disable_adapter():
        b = torch.log_softmax(model(**inputs).logits[:, :-1].float(), -1)
    target = labels[:, 1:]
    counted = target != -100
    ce = -s.gather(-1, target.clamp(min=0)[..., None])[..., 0]
    kl_base = (b.exp() * (b - s)).sum(-1)
    domain_term = ce
    if teacher is not None:
        with torch.no_grad():
            t = torch.log_softmax(teacher(**inputs).logits[:, :-1].float(), -1)
        domain_term = (1 - w) * ce + w * (t.exp() * (t - s)).sum(-1)
    per_token = torch.where(batch["replay"][:, None], kl_base, domain_term)
    (per_token[counted].sum() / counted.sum()).backward()
    for name, grad in got.items():
        torch.testing.assert_close(grad, model.get_parameter(name).grad, rtol=1e-4, atol=1e-6, msg=name)
    assert any(g.abs().sum() > 0 for g in got.values())


def test_sft_replay_of_every_weight_takes_a_frozen_copy_of_the_base(tiny_tokenizer, tmp_path):
    """--use_peft false: the base is a frozen model; at the start (student == base) every replay token's KL is 0 and
    the loss is the domain rows' cross-entropy over all counted tokens."""
    from datasets import Dataset

    from sdgrpo.config import SDSFTConfig
    from sdgrpo.sft import _distilling_trainer

    student, base = make_llama(tiny_tokenizer, seed=1), make_llama(tiny_tokenizer, seed=1).requires_grad_(False)
    data = Dataset.from_dict({"text": TEXTS, "replay": [True, False, True, False]})
    args = SDSFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, replay_share=0.5, max_length=64,
                       gradient_checkpointing=False)
    trainer = _distilling_trainer(None, 0.5, base)(model=student, args=args, train_dataset=data,
                                                   processing_class=tiny_tokenizer)
    batch = trainer.data_collator([dict(trainer.train_dataset[i]) for i in range(4)])
    with torch.no_grad():
        loss = trainer.compute_loss(student, dict(batch))
        logp = torch.log_softmax(student(input_ids=batch["input_ids"],
                                         attention_mask=batch["attention_mask"]).logits[:, :-1].double(), -1)
    target = batch["labels"][:, 1:]
    domain = (target != -100) & ~batch["replay"][:, None]
    ce = -logp.gather(-1, target.clamp(min=0)[..., None])[..., 0]
    assert loss.item() == pytest.approx((ce[domain].sum() / (target != -100).sum()).item(), rel=1e-5)


# --- sdgrpo train: the reward of a replay row ----------------------------------------------------------------------
def test_distill_takes_the_base_as_the_teacher_of_replay_rows(tiny_tokenizer, teacher_student_batch):
    """Replay rows: log p_base - log p_policy per token, the base being the policy with its adapters off (and with
    top-K, the base's top K); the other rows keep the teacher's."""
    from sdgrpo.rewards import DistillReward

    teacher, _, prompts, comps = teacher_student_batch
    base = make_llama(tiny_tokenizer, seed=12)
    policy = with_lora(make_llama(tiny_tokenizer, seed=12), 0.05, seed=4)
    reward = DistillReward(teacher, tiny_tokenizer, policy=policy)
    reward.topk = 3
    flags = [True, False, True]
    got = reward(prompts=[""] * 3, completions=[""] * 3, completion_ids=comps, prompt_ids=prompts, replay=flags)
    for p, c, flag, term, (top_values, top_ids), r in zip(prompts, comps, flags, reward.token_terms,
                                                          reward.token_topk, got):
        scorer = base if flag else teacher
        want = reference_logps(scorer, p, c) - reference_logps(policy, p, c)
        torch.testing.assert_close(term.double(), want, atol=1e-5, rtol=0)
        assert r == pytest.approx(want.mean().item(), abs=1e-5)
        with torch.no_grad():
            logits = scorer(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1 : len(p) + len(c) - 1].double()
        values, ids = torch.log_softmax(logits, -1).topk(3, dim=-1)
        assert torch.equal(top_ids, ids) and torch.allclose(top_values.double(), values, atol=1e-5)
    # the base differs from the teacher, so a reward that ignored the flags would fail above
    gap = reference_logps(base, prompts[0], comps[0]) - reference_logps(teacher, prompts[0], comps[0])
    assert gap.abs().max() > 0.1


# --- the cached samples --------------------------------------------------------------------------------------------
def test_the_base_samples_are_made_once_and_reused_while_unchanged(tiny_tokenizer, tmp_path):
    model = make_llama(tiny_tokenizer, seed=3)
    rows = replay.base_samples(model, tiny_tokenizer, tmp_path, "m", 6, 12, 5)
    folder = tmp_path / "replay"
    manifest = json.loads((folder / "replay.json").read_text())
    assert {k: manifest[k] for k in ("model", "samples", "tokens", "seed", "start")} == {
        "model": "m", "samples": 6, "tokens": 12, "seed": 5, "start": "BOS"}
    assert manifest["kept"] + manifest["dropped_empty"] == 6 and len(rows) == manifest["kept"] > 0
    # samples of the model from BOS at temperature 1: up to 12 tokens, the text their decoding
    assert all(r["prefix"] == "" and 0 < len(r["ids"]) <= 12 for r in rows)
    assert all(r["text"] == tiny_tokenizer.decode(r["ids"], skip_special_tokens=True) for r in rows)
    written = (folder / "samples.jsonl").stat().st_mtime_ns
    assert replay.base_samples(model, tiny_tokenizer, tmp_path, "m", 6, 12, 5) == rows
    assert (folder / "samples.jsonl").stat().st_mtime_ns == written  # reused, not rewritten
    other = replay.base_samples(model, tiny_tokenizer, tmp_path, "m", 6, 12, 6)  # another seed: made again
    assert other != rows and json.loads((folder / "replay.json").read_text())["seed"] == 6
    # a folder of that name sdgrpo did not write is refused, and left as it was
    mine = tmp_path / "user"
    (mine / "replay").mkdir(parents=True)
    (mine / "replay" / "notes.txt").write_text("mine")
    from sdgrpo.errors import UserError

    with pytest.raises(UserError, match="was not written by sdgrpo"):
        replay.base_samples(model, tiny_tokenizer, mine, "m", 6, 12, 5)
    assert [p.name for p in (mine / "replay").iterdir()] == ["notes.txt"]


def test_a_tokenizer_without_bos_starts_from_neutral_prefixes(tiny_tokenizer, tmp_path):
    from tokenizers import processors

    plain = tiny_tokenizer.__class__(tokenizer_object=tiny_tokenizer.backend_tokenizer.__class__.from_str(
        tiny_tokenizer.backend_tokenizer.to_str()), eos_token=tiny_tokenizer.eos_token, pad_token="<pad>")
    plain.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A")
    assert plain("")["input_ids"] == []
    assert replay.starts(plain) == list(replay.NEUTRAL_PREFIXES) and replay.starts(tiny_tokenizer) == [""]
    rows = replay.base_samples(make_llama(tiny_tokenizer, seed=3), plain, tmp_path, "m", 4, 6, 0)
    assert [r["prefix"] for r in rows] == list(replay.NEUTRAL_PREFIXES[:len(rows)])
    assert all(r["text"].startswith(r["prefix"]) for r in rows)
    assert json.loads((tmp_path / "replay" / "replay.json").read_text())["start"] == "prefixes"
    # a replay prompt of train: the prefix and the first half of the sampled tokens
    row = {"prefix": "The", "ids": [5, 6, 7, 8, 9, plain.eos_token_id]}
    assert replay.replay_prompt(row, plain) == "The" + plain.decode([5, 6])


# --- the options ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("verb, extra, message", [
    ("sft", ["--replay_share", "1"], "--replay_share must be in [0, 1), not 1.0"),
    ("sft", ["--replay_share", "-0.25"], "--replay_share must be in [0, 1), not -0.25"),
    ("train", ["--replay_share", "nan"], "--replay_share must be a finite number, not nan"),
    ("train", ["--replay_share", "half"], "--replay_share/--replay-share: invalid float value: 'half'"),
    ("train", ["--replay_share", "0.25"], "--replay_share 0.25 needs --reward distill"),
    ("sft", ["--replay_share", "0.5", "--packing", "true"], "--replay_share 0.5 with --packing true"),
    ("sft", ["--replay_share", "0.5", "--loss_type", "dft"], "--replay_share 0.5: sft computes its own loss"),
    ("sft", ["--replay_samples", "0"], "--replay_samples must be at least 1, not 0"),
])
def test_bad_replay_settings_are_one_line_before_anything_is_written(verb, extra, message, tmp_path, capsys):
    from sdgrpo.cli import main

    assert main([verb, "--output_dir", str(tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"sdgrpo {verb}: error: ") and message in err[0], err
    assert not list(tmp_path.iterdir())


def test_the_options_come_from_yaml(tmp_path):
    from sdgrpo.config import parse_sft_args, parse_train_args

    path = tmp_path / "c.yaml"
    path.write_text("replay_share: 0.25\nreplay_samples: 64\nreplay_tokens: 32\nreward: distill\n")
    cfg, _ = parse_train_args(["--config", str(path), "--replay_tokens", "48"])
    assert (cfg.replay_share, cfg.replay_samples, cfg.replay_tokens) == (0.25, 64, 48)
    path.write_text("replay_share: 0.5\n")
    assert parse_sft_args(["--config", str(path)])[0].replay_share == 0.5


# --- both verbs through the CLI ------------------------------------------------------------------------------------
def metric_rows(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def test_sft_with_replay_through_the_cli(tmp_path, prepared, tiny_model_dir):
    """Half of every batch is the base's text; at step 1 (adapters zero: the model is the base) their KL is 0, then
    positive; a second run into the same folder reuses the samples."""
    out = tmp_path / "sft"
    argv = ["sft", "--model_name_or_path", tiny_model_dir, "--dataset_path", prepared, "--output_dir", out,
            "--max_steps", 3, "--per_device_train_batch_size", 4, "--learning_rate", "3e-3", "--report_to", "none",
            "--save_strategy", "no", "--replay_share", 0.5, "--replay_samples", 6, "--replay_tokens", 12]
    r = run_cli(*argv)
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = json.loads((out / "replay" / "replay.json").read_text())
    assert (manifest["samples"], manifest["tokens"], manifest["seed"]) == (6, 12, 42)
    assert len((out / "replay" / "samples.jsonl").read_text().splitlines()) == manifest["kept"]
    rows = metric_rows(out)
    assert [x["step"] for x in rows] == [1, 2, 3] and all(x["replay/share"] == 0.5 for x in rows)
    assert rows[0]["replay/kl"] == pytest.approx(0, abs=1e-6) and rows[0]["replay/loss"] == pytest.approx(0, abs=1e-6)
    assert all(x["replay/kl"] > 1e-4 and 0 < x["replay/loss"] < x["replay/kl"] for x in rows[1:])
    assert "replay_share: 0.5" in (out / "resolved_config.yaml").read_text()
    written = (out / "replay" / "samples.jsonl").stat().st_mtime_ns
    r = run_cli(*argv, "--start_over")  # the earlier run set aside; the base's samples stay and are reused
    assert r.returncode == 0, r.stderr[-3000:]
    assert "reusing the base's" in r.stderr and (out / "replay" / "samples.jsonl").stat().st_mtime_ns == written


def test_train_with_replay_resumes_with_the_same_samples(tmp_path, prepared, tiny_model_dir, tiny_tokenizer):
    """`train --reward distill --replay_share 0.25` at two prompts a generation: every fourth prompt is a replay
    prompt, the second of every other generation, so the steps' shares are 0, 0.5, 0, 0.5 and only those with replay
    rows log a KL. Interrupted after 2 steps and resumed to 4, the run reuses the samples it made and goes on in the
    same order (a resumed run that started the order again would have share 0 at step 4)."""
    teacher = tmp_path / "teacher"
    make_llama(tiny_tokenizer, seed=5).save_pretrained(teacher)
    tiny_tokenizer.save_pretrained(teacher)
    out = tmp_path / "grpo"
    argv = ["train", "--model_name_or_path", tiny_model_dir, "--dataset_path", prepared, "--output_dir", out,
            "--reward", "distill", "--teacher_model_name_or_path", teacher, "--advantage", "token", "--beta", 0,
            "--per_device_train_batch_size", 4, "--num_generations", 2, "--max_completion_length", 6,
            "--report_to", "none", "--save_steps", 1, "--replay_share", 0.25, "--replay_samples", 4,
            "--replay_tokens", 10]
    r = run_cli(*argv, "--max_steps", 2)
    assert r.returncode == 0, r.stderr[-3000:]
    written = (out / "replay" / "samples.jsonl").stat().st_mtime_ns
    r = run_cli(*argv, "--max_steps", 4, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "reusing the base's" in r.stderr and (out / "replay" / "samples.jsonl").stat().st_mtime_ns == written
    rows = metric_rows(out)
    assert [x["step"] for x in rows] == [1, 2, 3, 4] and [x["replay/share"] for x in rows] == [0, 0.5, 0, 0.5]
    assert ["replay/kl" in x for x in rows] == [False, True, False, True]
    assert all(math.isfinite(x["replay/kl"]) for x in rows[1::2])


def test_grpo_replay_metrics_are_the_share_and_the_policys_kl_on_replay_tokens():
    terms = [torch.tensor([-0.5, 0.1]), torch.tensor([0.2]), torch.tensor([-1.0, -2.0, 0.0]), torch.empty(0)]
    got = replay.grpo_metrics(terms, [True, False, True, True])
    assert got["replay/share"] == 0.75 and got["replay/kl"] == pytest.approx((0.5 - 0.1 + 1 + 2 - 0) / 5)
    assert math.isnan(replay.grpo_metrics(terms, [False] * 4)["replay/kl"])
