"""Exact completion log-probs (sdgrpo.scoring) against one unpadded forward per sequence."""

from __future__ import annotations

import torch

from conftest import make_llama, reference_logps
from sdgrpo.scoring import completion_logprobs, micro_batches


def test_completion_logprobs_match_reference_in_padded_batches(tiny_tokenizer, cases):
    model = make_llama(tiny_tokenizer, seed=2)
    prompts, completions = cases
    for budget, chunk_tokens in ((10_000, 4096), (40, 7), (1, 1)):
        # one batch, several micro-batches with 7-token logit chunks, one sequence and one token at a time
        got = completion_logprobs(model, prompts, completions, pad_token_id=tiny_tokenizer.pad_token_id,
                                  token_budget=budget, chunk_tokens=chunk_tokens)
        for p, c, lp in zip(prompts, completions, got):
            assert lp.shape == (len(c),)
            torch.testing.assert_close(lp.double(), reference_logps(model, p, c), atol=1e-5, rtol=0)


def test_softcapped_model_is_scored_in_chunks_with_its_cap(tiny_tokenizer, cases):
    """A model whose logits are not a plain ``lm_head(hidden)`` (Gemma-2's soft cap) goes through its head in chunks
    of 7 tokens too, the cap applied as its own forward applies it: its own logits' log-probs."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from sdgrpo.scoring import _split_head

    torch.manual_seed(2)
    config = Gemma2Config(vocab_size=len(tiny_tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, intermediate_size=128, final_logit_softcapping=0.5,
                          pad_token_id=tiny_tokenizer.pad_token_id, bos_token_id=tiny_tokenizer.bos_token_id,
                          eos_token_id=tiny_tokenizer.eos_token_id)
    model = Gemma2ForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 1.0)  # logits far beyond the cap, so capping changes every number
    assert _split_head(model)[2:] == (1.0, 0.5)
    prompts, completions = cases
    got = completion_logprobs(model, prompts, completions, pad_token_id=tiny_tokenizer.pad_token_id, chunk_tokens=7)
    for p, c, lp in zip(prompts, completions, got):
        torch.testing.assert_close(lp.double(), reference_logps(model, p, c), atol=1e-5, rtol=0)
    # The cap matters here: the uncapped head's log-probs are far from the capped ones.
    ids = torch.tensor([prompts[0] + completions[0]])
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state
        raw = torch.log_softmax(model.lm_head(hidden)[0].double(), -1)
    uncapped = raw[len(prompts[0]) - 1, completions[0][0]].item()
    assert abs(uncapped - got[0][0].item()) > 0.5


def test_micro_batches_respect_budget():
    lengths = [5, 50, 7, 20, 20, 3, 100]
    groups = micro_batches(lengths, token_budget=60)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        assert len(g) == 1 or len(g) * max(lengths[i] for i in g) <= 60


def test_top_k_log_probs_match_a_full_forward_on_both_paths(tiny_tokenizer, cases, monkeypatch):
    """``topk``: at every completion position, the k largest log-probs and their ids of one unpadded forward of the
    sequence alone, on the split-head path (logit chunks of 7 tokens) and on the full-logits path; the sampled
    tokens' log-probs unchanged; an empty completion gets empty [0, k] tensors."""
    from sdgrpo import scoring

    model = make_llama(tiny_tokenizer, seed=3)
    prompts, completions = cases
    prompts, completions = [*prompts, prompts[0]], [*completions, []]

    def full(p, c):
        ids = torch.tensor([list(p) + list(c)])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        return logp[len(p) - 1: len(p) - 1 + len(c)]

    for split in (True, False):
        if not split:
            monkeypatch.setattr(scoring, "_split_head", lambda m: None)
        logps, tops = completion_logprobs(model, prompts, completions, pad_token_id=tiny_tokenizer.pad_token_id,
                                          chunk_tokens=7, topk=4)
        for p, c, lp, (values, ids) in zip(prompts, completions, logps, tops):
            assert values.shape == ids.shape == (len(c), 4)
            if not c:
                continue
            want_values, want_ids = full(p, c).topk(4, dim=-1)
            assert torch.equal(ids, want_ids)
            torch.testing.assert_close(values.double(), want_values, atol=1e-5, rtol=0)
            torch.testing.assert_close(lp.double(), reference_logps(model, p, c), atol=1e-5, rtol=0)
