"""sdgrpo.offload: gradient checkpointing's saved layer inputs in CPU memory until the backward, against the same
pass without it (gradients bit for bit), and the bytes sent counted against the layers' input shapes."""

from __future__ import annotations

import torch

from sdgrpo import offload


def _lora_model(tiny_model_dir, reentrant: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    return model.train()


def _grads(model, ids):
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_offloaded_layer_inputs_give_the_same_gradients_and_are_exactly_the_layers_inputs(tiny_model_dir):
    """Offloading changes where the checkpointed inputs wait, nothing else: the LoRA gradients equal the plain pass's
    bit for bit; what went to CPU memory is each decoder layer's input and nothing more (layers x rows x tokens x
    hidden x 4 bytes); installing twice keeps one wrapper. Also with reentrant checkpointing."""
    for reentrant in (False, True):
        model = _lora_model(tiny_model_dir, reentrant)
        config = model.config
        ids = torch.randint(5, config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(1))
        plain = _grads(model, ids)
        counter = [0]
        assert offload.install(model, counter) == config.num_hidden_layers
        assert offload.install(model, counter) == config.num_hidden_layers
        assert all(type(m._gradient_checkpointing_func.inner) is not offload.OffloadedCheckpoint
                   for m in offload.checkpointed_layers(model))
        got = _grads(model, ids)
        assert plain.keys() == got.keys() and len(plain) == 7 * 2 * config.num_hidden_layers
        assert all(torch.equal(plain[k], got[k]) for k in plain), reentrant
        assert counter[0] == config.num_hidden_layers * 3 * 40 * config.hidden_size * 4, reentrant


def test_a_model_without_checkpointing_has_nothing_to_offload(tiny_model_dir):
    model = _lora_model(tiny_model_dir, False)
    model.gradient_checkpointing_disable()
    assert offload.install(model, [0]) == 0
