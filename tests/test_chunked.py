"""Log-probs without whole logits (sdgrpo.chunked): every pass sdgrpo runs, against an independent computation from
the model's whole logits (values, and LoRA gradients where the pass trains), and the bound itself: no tensor of more
than a chunk of tokens x the vocabulary, forward or backward, while the sequences are several chunks long."""

from __future__ import annotations

import pytest
import torch

from conftest import LargestLogits, make_llama, make_qwen2
from test_grpo_trainer import dataset, teacher_trainer  # noqa: F401 (a fixture)


@pytest.fixture(params=["tiny", "qwen2"])
def policy_dir(request, tmp_path_factory, tiny_tokenizer):
    """The shipped tiny model with its tokenizer, or a random Qwen2 (tied embeddings, 3000 ids) with the test
    tokenizer."""
    from transformers import AutoTokenizer

    from sdgrpo.config import TINY_MODEL

    if request.param == "tiny":
        return TINY_MODEL, AutoTokenizer.from_pretrained(TINY_MODEL)
    path = tmp_path_factory.mktemp("qwen2-random")
    make_qwen2(vocab=3000, seed=4).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path, tiny_tokenizer


def grpo_batch(tokenizer, vocab: int, seed: int = 0):
    """Four rows of TRL's (prompt, completion) layout: left-padded prompts, right-padded completions (one row with
    no completion token attended), 6 + 12 tokens; and random top-5 ids (B, 12, 5)."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, min(vocab, 500), (4, 6), generator=g)
    completion = torch.randint(3, min(vocab, 500), (4, 12), generator=g)
    prompt_mask = torch.ones(4, 6, dtype=torch.long)
    prompt_mask[1, :2] = 0
    prompt_mask[3, :4] = 0
    completion_mask = torch.ones(4, 12, dtype=torch.long)
    completion_mask[0, 9:] = 0
    completion_mask[2, 3:] = 0
    completion_mask[3, :] = 0  # a truncated row TRL masks whole
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    prompt[prompt_mask == 0] = pad
    completion[completion_mask == 0] = pad
    ids = torch.randint(0, vocab, (4, 12, 5), generator=g)
    return torch.cat([prompt, completion], 1), torch.cat([prompt_mask, completion_mask], 1), completion_mask, ids


def lora_grads(model) -> dict:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}
    model.zero_grad()
    return out


@pytest.mark.parametrize("topk", [False, True])
def test_grpo_policy_pass_equals_whole_logits_and_holds_a_chunk(topk, policy_dir, dataset, tmp_path,  # noqa: F811
                                                                monkeypatch):
    """The loss's policy pass (TRL's fused head on CPU, and under --distill_topk the pass that also gives the
    policy's log-probs at the teacher's top-K ids), at temperature 0.8, rows in two of TRL's micro-batches: log-probs,
    entropies, top-K log-probs (temperature 1) and the adapters' gradients of a loss of all three equal those of the
    model's whole logits; meanwhile no tensor exceeds 8 tokens x vocabulary, with 30 labelled tokens a call."""
    from sdgrpo import chunked

    monkeypatch.setattr(chunked, "CHUNK_TOKENS", 8)
    path, tokenizer = policy_dir
    trainer, _ = teacher_trainer(path, tokenizer, dataset, tmp_path, "distill", make_llama(tokenizer, seed=45),
                                 "--lora_dropout", "0", "--temperature", "0.8",
                                 *(("--distill_topk", "5") if topk else ()))
    model = trainer.model
    vocab, hidden = model.get_output_embeddings().weight.shape
    input_ids, attention, mask, ids = grpo_batch(tokenizer, vocab)
    completion = input_ids[:, -12:]
    g = torch.Generator().manual_seed(1)
    w_logp, w_ent, w_top = torch.randn(4, 12, generator=g), torch.randn(4, 12, generator=g), torch.randn(4, 12, 5,
                                                                                                        generator=g)
    m = mask.float()

    def loss_of(logps, entropy, top):
        loss = (logps * w_logp * m).sum() + (entropy * w_ent * m).sum()
        return loss + ((top * w_top).sum(-1) * m).sum() if topk else loss

    trainer._student_topk = ids if topk else None
    with LargestLogits(vocab, hidden) as seen:
        logps, entropy, _ = trainer._get_per_token_logps_and_entropies(model, input_ids, attention, 12, batch_size=3,
                                                                       compute_entropy=True)
        top = trainer._student_topk_logps if topk else None
        loss_of(logps, entropy, top).backward()
    trainer._student_topk = None
    got = lora_grads(model)
    assert 0 < seen.largest <= 8 * vocab, seen.shape
    assert int(attention[:3, 1:].sum()) > 30  # several chunks in the first call

    logits = model(input_ids=input_ids, attention_mask=attention).logits[:, -13:-1].float()  # the whole logits
    logp = torch.log_softmax(logits / 0.8, -1)
    want_logps = logp.gather(-1, completion[..., None]).squeeze(-1)
    want_entropy = -(logp.exp() * logp).sum(-1)
    want_top = torch.log_softmax(logits, -1).gather(-1, ids)
    loss_of(want_logps, want_entropy, want_top).backward()
    want = lora_grads(model)
    keep = mask.bool()
    torch.testing.assert_close(logps[keep], want_logps[keep], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy[keep], want_entropy[keep], atol=1e-5, rtol=1e-5)
    assert not logps[~keep].any() and not entropy[~keep].any()  # TRL's 0 where no label is scored
    if topk:
        assert top.shape == ids.shape
        torch.testing.assert_close(top[keep], want_top[keep], atol=1e-5, rtol=1e-5)
    assert got.keys() == want.keys() and len(got) > 0
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)


def scoring_models(tiny_tokenizer):
    """(name, model, vocab) of the passes' models: the shipped tiny model, a random Qwen2, a soft-capped Gemma-2."""
    from transformers import AutoModelForCausalLM, Gemma2Config, Gemma2ForCausalLM

    from sdgrpo.config import TINY_MODEL

    torch.manual_seed(2)
    gemma = Gemma2ForCausalLM(Gemma2Config(vocab_size=600, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           num_key_value_heads=2, head_dim=8, intermediate_size=64,
                                           final_logit_softcapping=0.5, pad_token_id=0)).eval()
    return [("tiny", AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32).eval()),
            ("qwen2", make_qwen2(vocab=3000, seed=5)), ("gemma2-softcap", gemma)]


def whole_logps(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of the model's whole logits of one unpadded sequence ([T, V], fp64)."""
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)


def test_reward_and_probe_passes_equal_whole_logits_and_hold_a_chunk(tiny_tokenizer, monkeypatch):
    """The reward passes (``completion_logprobs``: self_nll's and the policy's own pass, teacher_nll's, the distill
    rewards' teacher pass with its top-K) and the probes (held-out NLL, per-token log-probs) of completions 30-70
    tokens long, in chunks of 8 tokens: each model's whole-logits values, and no tensor above 8 x vocabulary."""
    from sdgrpo import chunked, probes
    from sdgrpo.scoring import completion_logprobs

    monkeypatch.setattr(chunked, "CHUNK_TOKENS", 8)
    g = torch.Generator().manual_seed(0)
    for name, model in scoring_models(tiny_tokenizer):
        vocab, hidden = model.get_output_embeddings().weight.shape
        prompts = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (5, 9, 3)]
        completions = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (30, 70, 41)]
        stream = torch.randint(3, 500, (150,), generator=g)
        with LargestLogits(vocab, hidden) as seen:
            logps, tops = completion_logprobs(model, prompts, completions, pad_token_id=0, topk=3)
            nll = probes.heldout_nll(model, stream, 64, "cpu")
            rows = probes._token_logps(model, [stream[:50].tolist(), stream[50:100].tolist()], "cpu")
        assert 0 < seen.largest <= 8 * vocab, (name, seen.shape)
        for p, c, lp, (values, ids) in zip(prompts, completions, logps, tops):
            want = whole_logps(model, p + c)[len(p) - 1 : -1]
            torch.testing.assert_close(lp.double(), want[torch.arange(len(c)), c], atol=1e-5, rtol=0, msg=name)
            want_values, want_ids = want.topk(3, dim=-1)
            assert torch.equal(ids, want_ids), name
            torch.testing.assert_close(values.double(), want_values, atol=1e-5, rtol=0, msg=name)
        want_nll = 0.0
        for s in range(0, 149, 63):
            x = stream[s : s + 64].tolist()
            want_nll -= whole_logps(model, x)[torch.arange(len(x) - 1), x[1:]].sum().item()
        assert nll == pytest.approx(want_nll, rel=1e-6), name
        for row, got in zip((stream[:50].tolist(), stream[50:100].tolist()), rows):
            want = whole_logps(model, row)[torch.arange(len(row) - 1), row[1:]]
            torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("student", ["tiny", "qwen2"])
def test_sft_distillation_equals_kd_loss_of_whole_logits_and_holds_a_chunk(student, tiny_tokenizer, tmp_path,
                                                                          monkeypatch):
    """``sdgrpo sft`` with a teacher: the loss, its two logged terms and the adapters' gradients equal ``kd_loss`` of
    both models' whole logits (itself checked against fp64 passes in test_sft), with vocabularies of different
    widths (the teacher's wider, then narrower); meanwhile no tensor exceeds 8 tokens x vocabulary."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    from sdgrpo import chunked
    from sdgrpo.compat import ensure_trl_runs_without_triton
    from sdgrpo.config import TINY_MODEL
    from sdgrpo.sft import _distilling_trainer, kd_loss

    ensure_trl_runs_without_triton()
    monkeypatch.setattr(chunked, "CHUNK_TOKENS", 8)
    if student == "tiny":
        tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
        model = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32)
        teacher = make_qwen2(vocab=len(tokenizer) + 64, seed=6, hidden=48)
    else:
        tokenizer, model = tiny_tokenizer, make_qwen2(vocab=3000, seed=7)
        teacher = make_llama(tiny_tokenizer, seed=8)
    teacher.requires_grad_(False)
    texts = ["In the beginning God created the heaven and the earth. And the earth was without form, and void",
             "And God said, Let there be light: and there was light.", "And God saw the light, that it was good"]
    args = SFTConfig(output_dir=str(tmp_path), report_to="none", per_device_train_batch_size=3, max_length=64,
                     save_strategy="no", bf16=False, use_cpu=True)
    data = Dataset.from_dict({"text": texts})
    trainer = _distilling_trainer(teacher, 0.3)(model=model, args=args, train_dataset=data,
                                                processing_class=tokenizer,
                                                peft_config=LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    policy = trainer.model.train()
    vocab, hidden = policy.get_output_embeddings().weight.shape
    seen_teacher = LargestLogits(teacher.config.vocab_size, teacher.config.hidden_size)
    with LargestLogits(vocab, hidden) as seen_student, seen_teacher:
        loss = trainer.compute_loss(policy, batch, num_items_in_batch=None)
        loss.backward()
    got = lora_grads(policy)
    assert int((batch["labels"][:, 1:] != -100).sum()) > 3 * 8
    assert 0 < seen_student.largest <= 8 * vocab, seen_student.shape
    assert 0 < seen_teacher.largest <= 8 * teacher.config.vocab_size, seen_teacher.shape

    keys = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    with torch.no_grad():
        t_logits = teacher(**keys).logits
    want, ce, kl = kd_loss(policy(**keys).logits, t_logits, batch["labels"], 0.3)
    want.backward()
    want_grads = lora_grads(policy)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert trainer._metrics["train"]["kd/cross_entropy"][-1] == pytest.approx(ce.item(), rel=1e-5)
    assert trainer._metrics["train"]["kd/kl"][-1] == pytest.approx(kl.item(), rel=1e-5)
    assert got.keys() == want_grads.keys() and len(got) > 0
    for name in got:
        torch.testing.assert_close(got[name], want_grads[name], atol=1e-5, rtol=1e-4, msg=name)
