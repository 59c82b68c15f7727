"""sdgrpo.tiling: the MLP over tiles of tokens, against the same pass untiled (loss and LoRA gradients within float32
tolerance), with and without checkpointing and offloading, with dropout, with an input that wants no gradient; and
what a tiled MLP keeps for its backward, counted."""

from __future__ import annotations

import pytest
import torch

from sdgrpo import offload, tiling


def _lora(base, dropout: float = 0.0):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", lora_dropout=dropout))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(hash(name) % 2**31))
    return model.train()


def _tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(3)
    config = Qwen2Config(vocab_size=512, hidden_size=96, intermediate_size=352, num_hidden_layers=3,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256)
    return Qwen2ForCausalLM(config)


def _pass(model, ids):
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("make", ["tiny", "qwen2"])
@pytest.mark.parametrize("checkpointing", ["off", "non-reentrant", "reentrant", "offloaded"])
def test_a_tiled_pass_has_the_untiled_loss_and_lora_gradients(tiny_model_dir, make, checkpointing):
    """The shipped model and a random Qwen2 shape, 3 rows x 40 tokens, tiles of 7 tokens (17 whole and a remainder):
    loss and every LoRA gradient as the untiled pass's, to float32 rounding; every MLP ran tiled once in the
    forward (and once more in a checkpoint's recompute)."""
    model = _lora(_tiny(tiny_model_dir) if make == "tiny" else _qwen2())
    if checkpointing != "off":
        reentrant = checkpointing == "reentrant"
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        if checkpointing == "offloaded":
            offload.install(model, [0])
    ids = torch.randint(5, model.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(1))
    loss, grads = _pass(model, ids)
    layers = model.config.num_hidden_layers
    assert tiling.install(model, tile=7) == layers
    assert tiling.install(model, tile=7) == layers  # once: the wrappers are kept
    tiled_loss, tiled = _pass(model, ids)
    calls = [m.forward.tiled_calls for m in tiling.mlp_modules(model)]
    assert calls == [1 if checkpointing == "off" else 2] * layers
    assert grads.keys() == tiled.keys() and len(grads) == 7 * 2 * layers
    assert tiled_loss == pytest.approx(loss, rel=1e-6)
    for name in grads:
        scale = grads[name].abs().max().item()
        assert torch.allclose(tiled[name], grads[name], rtol=1e-4, atol=1e-5 * scale), name
    assert tiling.uninstall(model) == layers and "forward" not in tiling.mlp_modules(model)[0].__dict__


def _mlp(dropout: float):
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

    torch.manual_seed(5)
    mlp = Qwen2MLP(Qwen2Config(hidden_size=32, intermediate_size=80))
    from peft import LoraConfig, get_peft_model

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = mlp

        def forward(self, x):
            return self.mlp(x)

    model = get_peft_model(Holder(), LoraConfig(r=4, target_modules=["gate_proj", "up_proj", "down_proj"],
                                                lora_dropout=dropout))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, 0, 0.1)
    return model.train(), model.base_model.model.mlp


@pytest.mark.parametrize("input_grad", [True, False])
def test_tiles_replay_dropout_and_give_lora_gradients_where_the_input_wants_none(input_grad):
    """LoRA dropout 0.3: the tiled backward draws the masks its forward drew (against the same tiles run with plain
    autograd from the same seed; without the replay the masks, so the gradients, differ); and an input that wants no
    gradient (a frozen embedding's output) still gives the LoRA weights theirs."""
    model, mlp = _mlp(0.3)
    x = torch.randn(2, 9, 32, requires_grad=input_grad)
    weights = [p for p in model.parameters() if p.requires_grad]

    torch.manual_seed(11)
    flat = x.reshape(-1, 32)
    want = torch.cat([mlp(flat[s:s + 4].unsqueeze(0))[0] for s in range(0, 18, 4)]).view(2, 9, 32)
    want.pow(2).sum().backward()
    reference = [p.grad.clone() for p in weights] + ([x.grad.clone()] if input_grad else [])
    model.zero_grad()
    x.grad = None

    wrapper = tiling.TiledForward(mlp.forward, mlp, tile=4)
    torch.manual_seed(11)
    got = wrapper(x)
    assert torch.equal(got, want) and wrapper.tiled_calls == 1
    torch.manual_seed(99)  # the backward must not draw from the state it finds
    got.pow(2).sum().backward()
    tiled = [p.grad.clone() for p in weights] + ([x.grad.clone()] if input_grad else [])
    assert len(tiled) == len(reference) and all(g is not None for g in tiled)
    for a, b in zip(tiled, reference):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_tiled_mlp_keeps_only_its_input_for_the_backward_and_leaves_short_calls_alone():
    """What autograd keeps for the backward of one MLP call over 2 x 300 tokens, counted by saved-tensor hooks: the
    untiled call keeps the gate, up, activation and LoRA intermediates (more than 4 x the intermediate width a token);
    the tiled one keeps its input and nothing else (hidden x 4 bytes a token). A pass without gradients gives the
    untiled output; a call of no more tokens than a tile (decoding) goes to the MLP as it is."""
    model, mlp = _mlp(0.0)
    x = torch.randn(2, 300, 32, requires_grad=True)

    def saved_bytes(fn):
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size() if t.data_ptr() not in weights else 0
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(x)
        return total[0]

    weights = {p.data_ptr() for p in model.parameters()}
    plain = saved_bytes(mlp.forward)
    wrapper = tiling.TiledForward(mlp.forward, mlp, tile=64)
    assert plain > 600 * 4 * 80 * 4
    assert saved_bytes(wrapper) == 600 * 32 * 4
    with torch.no_grad():
        assert torch.allclose(wrapper(x), mlp.forward(x), rtol=1e-6, atol=1e-6)
    assert wrapper.tiled_calls == 2
    short = torch.randn(8, 1, 32)
    assert torch.equal(wrapper(short), mlp.forward(short)) and wrapper.tiled_calls == 2


def test_the_engine_decodes_a_tiled_model_as_the_untiled_one(tiny_model_dir, tiny_tokenizer):
    """A tiled model (tiles of 5 tokens: the prompts' prefill runs tiled, each decoding step of 4 rows does not)
    decodes through sdgrpo's engine to the same greedy tokens and log-probs as without tiling."""
    from sdgrpo.engine import DecodeEngine

    model = _lora(_tiny(tiny_model_dir)).eval()
    prompts = ["In the beginning God created", "And the LORD said unto Noah", "Then", "And it came to pass"]
    enc = tiny_tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    settings = dict(max_new_tokens=12, do_sample=False, pad_token_id=tiny_tokenizer.pad_token_id,
                    eos_token_id=tiny_tokenizer.eos_token_id)
    plain = DecodeEngine()
    plain.record = []
    want = plain.generate(model, **enc, **settings)
    tiling.install(model, tile=5)
    tiled = DecodeEngine()
    tiled.record = []
    got = tiled.generate(model, **enc, **settings)
    assert torch.equal(got, want) and tiled.fallbacks == 0
    assert [m.forward.tiled_calls for m in tiling.mlp_modules(model)] == [1] * model.config.num_hidden_layers
    assert torch.allclose(tiled.record[0].logprobs, plain.record[0].logprobs, atol=1e-5)
