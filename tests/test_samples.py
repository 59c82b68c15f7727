"""Sampling K completions per prompt (sdgrpo.samples): one stop set for every verb."""

from __future__ import annotations

from conftest import boost, make_llama


def test_sampling_stops_on_the_generation_configs_eos_too(tiny_tokenizer, corpus):
    from sdgrpo.samples import sample, stop_token_ids

    model = make_llama(tiny_tokenizer, seed=9)
    turn_end = 300  # stands for an instruct model's end-of-turn token
    boost(model, turn_end, 4.0, tiny_tokenizer, (corpus / "jonah.txt").read_text()[:2000])
    model.generation_config.eos_token_id = [tiny_tokenizer.eos_token_id, turn_end]
    assert stop_token_ids(model, tiny_tokenizer) == [tiny_tokenizer.eos_token_id, turn_end]
    samples = sample(model, tiny_tokenizer, ["And the LORD said", "Then Jonah prayed"], k=6, max_new_tokens=20)
    ends = [c[-1] for c in samples.completion_ids if c]
    assert turn_end in ends
    for c in samples.completion_ids:
        assert turn_end not in c[:-1] and tiny_tokenizer.eos_token_id not in c[:-1]
