"""The decoding engine (sdgrpo.engine) against transformers' generate and a teacher-forced pass, on CPU in fp32."""

from __future__ import annotations

import pytest
import torch

from conftest import affine_dequantised, boost, int4_dequantised, int4_reference, make_llama, reference_logps, with_lora
from sdgrpo.engine import DecodeEngine, serving

PROMPTS = ["In the beginning God created", "And the LORD said unto Noah", "Then", "And it came to pass, when men"]


def assert_decodes_as(reference, got, logprobs, enc, eos: int, tol: float = 0.02) -> None:
    """The reference model teacher-forced on the engine's greedy tokens ``got`` (one unpadded forward per row): each
    token is its argmax up to bf16's rounding (``tol`` nats), and the engine's ``logprobs`` are its log-probs."""
    width = enc["input_ids"].size(1)
    for row in range(got.size(0)):
        start = int((enc["attention_mask"][row] == 0).sum())
        completion = got[row, width:]
        ended = (completion == eos).nonzero()
        n = int(ended[0]) + 1 if len(ended) else completion.numel()
        with torch.no_grad():
            logits = reference(input_ids=got[row:row + 1, start:width + n]).logits[0].float()
        logps = torch.log_softmax(logits[width - start - 1: width - start - 1 + n], -1)
        chosen = logps.gather(-1, completion[:n, None])[:, 0]
        assert bool((chosen >= logps.amax(-1) - tol).all())
        assert torch.allclose(logprobs[row, :n], chosen, atol=tol)


@pytest.fixture(scope="module")
def model(tiny_tokenizer, corpus):
    """A random 2-layer Llama that ends some completions: its EOS made likely after any context."""
    m = make_llama(tiny_tokenizer, seed=21)
    boost(m, tiny_tokenizer.eos_token_id, 0.4, tiny_tokenizer, (corpus / "jonah.txt").read_text()[:2000])
    return m


@pytest.fixture(scope="module")
def lora(model):
    """The same model with non-zero LoRA adapters on every linear layer."""
    import copy

    return with_lora(copy.deepcopy(model), 0.3, seed=22)


def encode(tokenizer, prompts=PROMPTS):
    return tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")


def settings(tokenizer, **kw):
    return dict(max_new_tokens=24, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **kw)


# The names these tests patch, and the modules of sdgrpo.engine that look each up at call time: a patch must reach
# each of them (sdgrpo.engine's re-export is one more binding, which the engine's own code never reads).
CALLERS = {"_quantised_base": ("quantised", "budget"), "_foldable_lora_layers": ("folded", "budget"),
           "INT4_CHUNK": ("quantised",), "GEMLITE_AUTO": ("int4",), "gemlite_available": ("int4",),
           "grouped_sdpa": ("attention",), "_ORIGINAL_FORWARDS": ("originals",), "_ORIGINAL_CLASSES": ("originals",)}


def patch_engine(monkeypatch, name: str, value) -> None:
    """``name`` set to ``value`` for the test wherever the engine looks it up (:data:`CALLERS`)."""
    for module in CALLERS[name]:
        monkeypatch.setattr(f"sdgrpo.engine.{module}.{name}", value)


def test_a_patch_reaches_each_engine_file_that_looks_the_name_up():
    """Every module of the engine package that binds a name the tests patch (its definition, or an import of it) is
    among its CALLERS, so that a patch changes what every caller sees."""
    import importlib
    import pkgutil

    import sdgrpo.engine

    for name, where in CALLERS.items():
        binding = {m.name for m in pkgutil.iter_modules(sdgrpo.engine.__path__)
                   if hasattr(importlib.import_module(f"sdgrpo.engine.{m.name}"), name)}
        assert binding == set(where), name


@pytest.mark.parametrize("which", ["plain", "lora"])
def test_greedy_gives_generates_tokens_with_padding_and_eos(which, model, lora, tiny_tokenizer):
    m = model if which == "plain" else lora
    enc = encode(tiny_tokenizer)
    want = m.generate(**enc, do_sample=False, **settings(tiny_tokenizer))
    engine = DecodeEngine()
    got = engine.generate(m, **enc, do_sample=False, **settings(tiny_tokenizer))
    assert engine.calls == 1 and engine.fallbacks == 0
    assert torch.equal(got, want)
    if which == "plain":  # rows 0 and 2 end (after 15 and 1 tokens), the others run to the limit
        ends = [(row == tiny_tokenizer.eos_token_id).nonzero().flatten()[:1].tolist()
                for row in want[:, enc["input_ids"].size(1):]]
        assert ends == [[14], [], [0], []]


def test_one_cache_serves_shorter_calls_and_grows_for_longer_ones(model, tiny_tokenizer):
    """Prompts of other lengths reuse the cache while they fit (no new cache, so no recompiled step on a GPU), with
    the tokens still generate's; a call that does not fit makes a larger cache once."""
    engine = DecodeEngine(length_bucket=8)
    calls = [(PROMPTS, 24), (PROMPTS[2:3], 24), (PROMPTS[:1] * 4, 10), (PROMPTS, 40), (PROMPTS[1:2] * 4, 24)]
    setups = []
    for prompts, new in calls:
        enc = encode(tiny_tokenizer, prompts)
        kw = dict(do_sample=False, max_new_tokens=new, pad_token_id=tiny_tokenizer.pad_token_id,
                  eos_token_id=tiny_tokenizer.eos_token_id)
        want = model.generate(**enc, **kw)
        got = engine.generate(model, **enc, **kw)
        assert torch.equal(got, want), (prompts, new)
        setups.append(engine.setups)
    # batch 4 (setup 1); batch 1 (2); batch 4 again, shorter: the batch changed, so a new cache (3); longer (4);
    # shorter again: reused
    assert setups == [1, 2, 3, 4, 4]


def test_a_reserved_cache_serves_every_call_that_fits_it(model, tiny_tokenizer):
    """With ``reserve`` the first cache is made that long (rounded up to the bucket), so calls of every length up to
    it share one cache (on a GPU: one compiled step); the tokens are still generate's."""
    longest = encode(tiny_tokenizer)["input_ids"].size(1) + 40
    engine = DecodeEngine(length_bucket=8, reserve=longest)
    for prompts, new in [(PROMPTS[:1] * 4, 10), (PROMPTS, 24), (PROMPTS, 40), (PROMPTS[1:2] * 4, 24)]:
        enc = encode(tiny_tokenizer, prompts)
        kw = dict(do_sample=False, max_new_tokens=new, pad_token_id=tiny_tokenizer.pad_token_id,
                  eos_token_id=tiny_tokenizer.eos_token_id)
        assert torch.equal(engine.generate(model, **enc, **kw), model.generate(**enc, **kw)), (prompts, new)
    assert engine.setups == 1 and engine._length == -(-longest // 8) * 8


def test_train_mode_with_gradient_checkpointing_still_decodes_with_the_cache(lora, tiny_tokenizer):
    """How TRL generates: the Trainer's train mode, gradient checkpointing on (layers then drop the KV cache)."""
    enc = encode(tiny_tokenizer)
    want = lora.generate(**enc, do_sample=False, **settings(tiny_tokenizer))
    lora.gradient_checkpointing_enable()
    lora.train()
    try:
        got = DecodeEngine().generate(lora, **enc, do_sample=False, **settings(tiny_tokenizer))
        assert lora.training and lora.get_base_model().model.layers[0].training  # left as it was
    finally:
        lora.gradient_checkpointing_disable()
        lora.eval()
    assert torch.equal(got, want)


def test_folding_leaves_the_trained_weights_and_flags_as_they_were(lora, tiny_tokenizer):
    before = {n: p.detach().clone() for n, p in lora.named_parameters()}
    grads = {n: p.requires_grad for n, p in lora.named_parameters()}
    params = {n: id(p) for n, p in lora.named_parameters()}
    calls = []
    hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for n, m in lora.named_modules()
             if n.endswith("lora_A.default")]
    DecodeEngine().generate(lora, **encode(tiny_tokenizer), do_sample=True, **settings(tiny_tokenizer))
    assert not calls  # folded: no LoRA matmul while decoding
    lora.generate(**encode(tiny_tokenizer), do_sample=True, **settings(tiny_tokenizer))
    assert len(calls) >= len(hooks)  # what the hooks would have seen unfolded
    for h in hooks:
        h.remove()
    for n, p in lora.named_parameters():
        assert id(p) == params[n] and p.requires_grad == grads[n] and torch.equal(p, before[n]), n
    from peft.tuners.lora import LoraLayer

    assert not any(m.disable_adapters for m in lora.modules() if isinstance(m, LoraLayer))


def test_sibling_projections_decode_as_one_matmul(lora, tiny_tokenizer):
    """q, k, v (and gate, up) of each layer are served by one matmul over stacked generation copies: none of the
    five projection modules runs while decoding (o and down still do), the tokens are still generate's, and the
    modules are back in place afterwards. Without fusion every projection runs."""
    enc, kw = encode(tiny_tokenizer), settings(tiny_tokenizer, do_sample=False)
    want = lora.generate(**enc, **kw)
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    modules = {n: m for n, m in lora.named_modules() if n.endswith(names)}
    for fuse in (True, False):
        calls = []
        hooks = [m.register_forward_hook(lambda mod, *a, n=n, calls=calls: calls.append(n.rsplit(".", 1)[1]))
                 for n, m in modules.items()]
        engine = DecodeEngine(fuse_projections=fuse)
        got = engine.generate(lora, **enc, **kw)
        for h in hooks:
            h.remove()
        assert torch.equal(got, want), fuse
        expected = {"o_proj", "down_proj"} if fuse else set(names)
        assert set(calls) == expected, fuse
        assert len(engine.fold.groups) == (2 * 2 if fuse else 0)  # 2 layers x (qkv, gate-up)
    assert {n: m for n, m in lora.named_modules() if n.endswith(names)} == modules


def test_sampled_tokens_log_probs_equal_a_teacher_forced_pass(lora, tiny_tokenizer):
    enc = encode(tiny_tokenizer)
    torch.manual_seed(3)
    from sdgrpo.engine import sampling_from

    s = sampling_from(lora, None, do_sample=True, top_k=0, **settings(tiny_tokenizer))
    out = DecodeEngine().decode(lora, enc["input_ids"], enc["attention_mask"], s)
    width = enc["input_ids"].size(1)
    for row in range(len(PROMPTS)):
        prompt = enc["input_ids"][row][enc["attention_mask"][row].bool()].tolist()
        completion = out.sequences[row, width:].tolist()
        if tiny_tokenizer.eos_token_id in completion:
            completion = completion[: completion.index(tiny_tokenizer.eos_token_id) + 1]
        want = reference_logps(lora, prompt, completion)  # one unpadded forward, unmerged LoRA
        torch.testing.assert_close(out.logprobs[row, : len(completion)].double(), want, atol=1e-5, rtol=0)


def test_sampling_with_a_seed_is_reproducible_and_draws_generates_tokens(lora, tiny_tokenizer):
    """The exponential race is how torch.multinomial draws one sample, so on CPU a seeded run draws exactly the
    tokens of a seeded ``generate`` (with top-p and temperature too)."""
    engine, enc = DecodeEngine(), encode(tiny_tokenizer)
    runs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        runs.append(engine.generate(lora, **enc, do_sample=True, top_k=0, **settings(tiny_tokenizer)))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    torch.manual_seed(5)
    assert torch.equal(runs[0], lora.generate(**enc, do_sample=True, top_k=0, **settings(tiny_tokenizer)))
    for kw in (dict(temperature=0.8, top_p=0.9), dict(top_k=30, min_p=0.05)):
        torch.manual_seed(7)
        got = engine.generate(lora, **enc, do_sample=True, **kw, **settings(tiny_tokenizer))
        torch.manual_seed(7)
        assert torch.equal(got, lora.generate(**enc, do_sample=True, **kw, **settings(tiny_tokenizer))), kw


def test_sampling_follows_the_models_distribution(model, tiny_tokenizer):
    """First tokens of 4,000 draws after one prompt against softmax(logits / T) with top-k 20: total variation."""
    enc = encode(tiny_tokenizer, [PROMPTS[0]] * 4000)
    torch.manual_seed(0)
    out = DecodeEngine().generate(model, **enc, do_sample=True, temperature=0.7, top_k=20, max_new_tokens=1,
                                  pad_token_id=tiny_tokenizer.pad_token_id, eos_token_id=tiny_tokenizer.eos_token_id)
    first = out[:, -1]
    logits = model(**encode(tiny_tokenizer, [PROMPTS[0]])).logits[0, -1] / 0.7
    kth = torch.topk(logits, 20).values[-1]
    p = torch.softmax(logits.masked_fill(logits < kth, -float("inf")), -1)
    freq = torch.bincount(first, minlength=p.numel()).double() / len(first)
    assert set(first.tolist()) <= set(torch.nonzero(p).flatten().tolist())
    assert 0.5 * (freq - p.double()).abs().sum() < 0.05


def test_min_new_tokens_and_top_p(model, tiny_tokenizer):
    enc = encode(tiny_tokenizer)
    torch.manual_seed(1)
    out = DecodeEngine().generate(model, **enc, do_sample=True, min_new_tokens=10, **settings(tiny_tokenizer))
    completion = out[:, enc["input_ids"].size(1):]
    assert not (completion[:, :10] == tiny_tokenizer.eos_token_id).any()
    greedy = model.generate(**enc, do_sample=False, **settings(tiny_tokenizer))
    nucleus = DecodeEngine().generate(model, **enc, do_sample=True, top_p=1e-6, **settings(tiny_tokenizer))
    assert torch.equal(nucleus, greedy)  # a tiny nucleus keeps only the top token


def test_what_it_does_not_do_goes_to_generate(model, tiny_tokenizer):
    engine, enc = DecodeEngine(), encode(tiny_tokenizer)
    got = engine.generate(model, **enc, do_sample=False, repetition_penalty=1.3, **settings(tiny_tokenizer))
    want = model.generate(**enc, do_sample=False, repetition_penalty=1.3, **settings(tiny_tokenizer))
    assert engine.fallbacks == 1 and engine.calls == 0 and torch.equal(got, want)


def test_serving_answers_model_generate_and_then_steps_aside(model, tiny_tokenizer):
    engine, enc = DecodeEngine(), encode(tiny_tokenizer)
    with serving(model, engine):
        model.generate(**enc, do_sample=False, **settings(tiny_tokenizer))
    assert engine.calls == 1 and "generate" not in vars(model)
    model.generate(**enc, do_sample=False, **settings(tiny_tokenizer))
    assert engine.calls == 1


def test_serving_puts_back_the_instances_own_generate(tiny_tokenizer):
    """A model with its own ``generate`` on the instance (Unsloth sets one at load): the engine answers inside, even
    when the call raises, and afterwards that very attribute is back and answers again. It once was deleted, for the
    rest of the process."""
    model, enc = make_llama(tiny_tokenizer, seed=21), encode(tiny_tokenizer)
    own_calls = []

    def own_generate(*args, **kwargs):  # what Unsloth's does first, then transformers' generate
        own_calls.append(kwargs)
        return type(model).generate(model, *args, **kwargs)

    model.generate = own_generate
    engine = DecodeEngine()
    with pytest.raises(RuntimeError, match="inside"):
        with serving(model, engine):
            got = model.generate(**enc, do_sample=False, **settings(tiny_tokenizer))
            raise RuntimeError("inside")
    assert engine.calls == 1 and not own_calls
    assert vars(model)["generate"] is own_generate
    want = model.generate(**enc, do_sample=False, **settings(tiny_tokenizer))
    assert len(own_calls) == 1 and engine.calls == 1 and torch.equal(got, want)


@pytest.mark.parametrize("additive", [False, True])
def test_grouped_attention_is_transformers_sdpa_without_the_copies(additive):
    """Boolean masks (transformers' SDPA masks) and additive float masks alike."""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from sdgrpo.engine import grouped_sdpa

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, h, n, 16, generator=g) for h, n in ((8, 1), (2, 10), (2, 10)))
    mask = torch.ones(3, 1, 1, 10, dtype=torch.bool)
    mask[0, ..., :4] = False  # left padding
    mask[1, ..., 7:] = False  # the cache's unwritten tail
    if additive:
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    module = SimpleNamespace(num_key_value_groups=4, is_causal=True)
    want, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.25)
    got, _ = grouped_sdpa(module, q, k, v, mask, scaling=0.25)
    assert got.shape == want.shape == (3, 1, 8, 16)
    assert torch.allclose(got, want, atol=1e-6)


def test_the_engine_decodes_with_grouped_attention(lora, tiny_tokenizer, monkeypatch):
    """The tiny Llama has 4 query heads over 2 key/value heads: greedy tokens stay generate's, sampled log-probs a
    teacher-forced pass's, and the grouped function is the one that ran."""
    from sdgrpo.engine import grouped_sdpa, sampling_from

    calls = []
    patch_engine(monkeypatch, "grouped_sdpa", lambda *a, **k: calls.append(a[1].shape[2]) or grouped_sdpa(*a, **k))
    assert lora.config._attn_implementation == "sdpa"
    enc = encode(tiny_tokenizer)
    want = lora.generate(**enc, do_sample=False, **settings(tiny_tokenizer))
    engine = DecodeEngine(grouped_attention=True)
    assert torch.equal(engine.generate(lora, **enc, do_sample=False, **settings(tiny_tokenizer)), want)
    assert lora.config._attn_implementation == "sdpa" and calls.count(1) >= 2 * 23  # 2 layers x the decoded steps
    torch.manual_seed(3)
    out = engine.decode(lora, enc["input_ids"], enc["attention_mask"],
                        sampling_from(lora, None, do_sample=True, top_k=0, **settings(tiny_tokenizer)))
    width = enc["input_ids"].size(1)
    for row in range(out.sequences.size(0)):
        ids = out.sequences[row]
        start = int((enc["attention_mask"][row] == 0).sum())
        completion = ids[width:]
        ended = (completion == tiny_tokenizer.eos_token_id).nonzero()
        n = int(ended[0]) + 1 if len(ended) else completion.numel()
        ref = reference_logps(lora, ids[start:width].tolist(), completion[:n].tolist())
        assert torch.allclose(out.logprobs[row, :n].double(), ref, atol=1e-5)


# --- models and adapters beyond the Llama family -----------------------------------------------------------------
def _tiny(kind: str, tokenizer, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    shape = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                 pad_token_id=tokenizer.pad_token_id)
    if kind == "falcon":
        config = transformers.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, **shape)
        return transformers.FalconForCausalLM(config).eval()
    if kind == "mamba":
        config = transformers.MambaConfig(hidden_size=32, num_hidden_layers=2, state_size=4, **shape)
        return transformers.MambaForCausalLM(config).eval()
    config = transformers.Mamba2Config(hidden_size=32, num_hidden_layers=2, num_heads=4, head_dim=16, n_groups=1,
                                       state_size=8, chunk_size=16, **shape)
    return transformers.Mamba2ForCausalLM(config).eval()


def test_a_model_that_tests_its_attention_by_name_keeps_its_own_attention(tiny_tokenizer):
    """Falcon checks ``_attn_implementation == "sdpa"`` literally: renamed for grouped attention it took its eager
    path with SDPA's boolean mask and never masked the left padding. It now keeps its own attention."""
    model = _tiny("falcon", tiny_tokenizer, seed=5)
    assert model.config._attn_implementation == "sdpa"
    enc = encode(tiny_tokenizer)
    assert enc["attention_mask"].min() == 0  # left padding
    want = model.generate(**enc, do_sample=False, **settings(tiny_tokenizer))
    engine = DecodeEngine(grouped_attention=True)
    got = engine.generate(model, **enc, do_sample=False, **settings(tiny_tokenizer))
    assert engine.calls == 1 and engine.fallbacks == 0
    assert torch.equal(got, want)


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_a_model_without_a_kv_cache_goes_to_generate(kind, tiny_tokenizer):
    model = _tiny(kind, tiny_tokenizer, seed=6)
    enc = encode(tiny_tokenizer)
    engine = DecodeEngine()
    for do_sample in (False, True):
        torch.manual_seed(2)
        want = model.generate(**enc, do_sample=do_sample, **settings(tiny_tokenizer))
        torch.manual_seed(2)
        got = engine.generate(model, **enc, do_sample=do_sample, **settings(tiny_tokenizer))
        assert torch.equal(got, want)
    assert engine.calls == 0 and engine.fallbacks == 2


@pytest.mark.parametrize("where, library", [("instance", "unsloth.models.llama"), ("class", "unsloth.models.llama"),
                                            ("class", "unsloth_compiled_module_llama")])
def test_a_model_whose_forwards_unsloth_replaced_goes_to_generate(where, library, lora, tiny_tokenizer, monkeypatch,
                                                                  caplog):
    """Unsloth replaces transformers' attention and MLP forwards (on the classes at import, on module instances
    when it adds LoRA) with its own, which read each projection's weights and LoRA matrices themselves, past the
    engine's swapped projections. A class forward replaced without transformers' own recorded first sends the model
    to generate, in one log line naming the forward; one replaced on an instance only is taken off for the engine's
    call (the class's forward is transformers') and put back after it. Here a forward defined in a module named as
    Unsloth's stands in for its patch (same arithmetic), or in one of the modules unsloth_zoo's compiler writes
    (``unsloth_compiled_module_<model>``), which the engine took for transformers' own before."""
    import logging
    import types

    from transformers.models.llama.modeling_llama import LlamaAttention

    original = LlamaAttention.forward

    def fast_forward(self, *args, **kwargs):
        return original(self, *args, **kwargs)

    fast_forward.__module__ = library
    attention = lora.get_base_model().model.layers[0].self_attn
    if where == "instance":
        attention.forward = types.MethodType(fast_forward, attention)
    else:
        monkeypatch.setattr(LlamaAttention, "forward", fast_forward)
    enc = encode(tiny_tokenizer)
    want = lora.generate(**enc, do_sample=False, **settings(tiny_tokenizer))
    engine = DecodeEngine()
    with caplog.at_level(logging.INFO, logger="sdgrpo.engine"):
        got = engine.generate(lora, **enc, do_sample=False, **settings(tiny_tokenizer))
    assert torch.equal(got, want)
    if where == "class":
        assert engine.calls == 0 and engine.fallbacks == 1
        assert (f"{library}.fast_forward runs a forward that {library.split('.')[0]} put in its place" in caplog.text
                and "transformers' own was not recorded before it" in caplog.text)
    else:
        assert engine.calls == 1 and engine.fallbacks == 0
        assert attention.__dict__["forward"].__func__ is fast_forward  # back in place
        del attention.forward


def test_a_patched_model_decodes_with_transformers_forwards_put_back(model, tiny_tokenizer, monkeypatch, tmp_path):
    """With transformers' own forwards recorded before the patch (backends/unsloth.py's
    remember_transformers_forwards, as it runs before it imports Unsloth), a model patched the way Unsloth patches a
    Llama (the attention, decoder-layer, model and causal-LM class forwards; the MLP instances' forwards; the
    modeling module's rotary embedding class, so the model's instance is the library's; PEFT's LoRA layer class, as
    Unsloth replaces peft.tuners.lora.bnb.Linear4bit's) decodes through the engine with transformers' forwards and a
    transformers rotary embedding put back for the call: greedy tokens equal generate's through the patches, no
    patched forward runs during the engine's call, and every patch is in place again after it, for a second call
    too. Without PEFT's classes recorded, the patched LoRA class sent every call to generate."""
    import copy
    import types

    import peft.tuners.lora.layer as lora_layer
    import transformers.models.llama.modeling_llama as llama

    from sdgrpo.backends.unsloth import remember_transformers_forwards

    patch_engine(monkeypatch, "_ORIGINAL_FORWARDS", {})
    patch_engine(monkeypatch, "_ORIGINAL_CLASSES", {})
    model.config.save_pretrained(tmp_path)
    remember_transformers_forwards(str(tmp_path), False)
    ran = []

    def patch(cls):
        original = cls.forward

        def fast_forward(self, *args, **kwargs):
            ran.append(cls.__name__)
            return original(self, *args, **kwargs)

        fast_forward.__module__ = "unsloth.models.llama"
        monkeypatch.setattr(cls, "forward", fast_forward)

    for cls in (llama.LlamaAttention, llama.LlamaDecoderLayer, llama.LlamaModel, llama.LlamaForCausalLM,
                lora_layer.Linear):
        patch(cls)

    base_rotary = llama.LlamaRotaryEmbedding

    def rotary_forward(self, *args, **kwargs):
        ran.append("rotary")
        return base_rotary.forward(self, *args, **kwargs)

    # as Unsloth's: the class inherits its forward from a mixin of the library's (_PerDeviceRopeCache), whose
    # forward has no recorded original; the module is swapped whole, so that is no reason to go to generate
    rotary_forward.__module__ = "unsloth.models.llama"
    mixin = type("_PerDeviceRopeCache", (), {"forward": rotary_forward, "__module__": "unsloth.models.llama"})
    rotary = type("LlamaRotaryEmbedding", (mixin, base_rotary), {"__module__": "unsloth.models.llama"})
    monkeypatch.setattr(llama, "LlamaRotaryEmbedding", rotary)
    patched = make_llama(tiny_tokenizer, seed=21)  # made after the patch: its rotary embedding is the library's
    patched.load_state_dict(model.state_dict())
    patched = with_lora(patched, 0.3, seed=22)
    assert type(patched.get_base_model().model.rotary_emb) is rotary

    def mlp_forward(self, x):
        ran.append("mlp")
        return llama.LlamaMLP.forward(self, x)

    mlp_forward.__module__ = "unsloth.models.llama"
    mlps = [layer.mlp for layer in patched.get_base_model().model.layers]
    for mlp in mlps:
        mlp.forward = types.MethodType(mlp_forward, mlp)
    enc = encode(tiny_tokenizer)
    want = patched.generate(**enc, do_sample=False, **settings(tiny_tokenizer))
    assert {"LlamaAttention", "rotary", "mlp"} <= set(ran)  # generate ran through every patch
    reference = copy.deepcopy(patched)
    engine = DecodeEngine()
    for _ in range(2):
        ran.clear()
        got = engine.generate(patched, **enc, do_sample=False, **settings(tiny_tokenizer))
        assert ran == [] and torch.equal(got, want)
    assert engine.calls == 2 and engine.fallbacks == 0
    assert llama.LlamaAttention.forward.__module__ == "unsloth.models.llama"
    assert all(mlp.__dict__["forward"].__func__ is mlp_forward for mlp in mlps)
    assert type(patched.get_base_model().model.rotary_emb) is rotary
    for (name, a), b in zip(patched.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name  # the trained weights untouched


def test_a_patched_forward_on_a_class_that_inherited_its_own_is_taken_off_for_the_call(monkeypatch):
    """A class that had no forward of its own (transformers' is its base's) and was given one by a patch: for the
    call the patch is taken off (the base's forward runs), and it is back after; a patched class whose original was
    never recorded makes the model unrestorable."""
    import sys
    import types

    from sdgrpo.engine import originals

    patch_engine(monkeypatch, "_ORIGINAL_FORWARDS", {})
    patch_engine(monkeypatch, "_ORIGINAL_CLASSES", {})
    home = types.ModuleType("transformers.models.toy.modeling_toy")
    base = type("ToyBase", (torch.nn.Module,), {"forward": lambda self, x: x + 1, "__module__": home.__name__})
    sub = type("ToySub", (base,), {"__module__": home.__name__})
    home.ToyBase, home.ToySub = base, sub
    monkeypatch.setitem(sys.modules, home.__name__, home)
    originals.remember_originals(home)

    def fast(self, x):
        return x + 100

    fast.__module__ = "unsloth.models.toy"
    monkeypatch.setattr(sub, "forward", fast, raising=False)
    model = sub()
    assert model(torch.zeros(1)).item() == 100 and isinstance(originals._put_back_plan(model), tuple)
    with originals.originals_put_back(model):
        assert model(torch.zeros(1)).item() == 1
    assert model(torch.zeros(1)).item() == 100
    patch_engine(monkeypatch, "_ORIGINAL_FORWARDS", {})
    assert isinstance(originals._put_back_plan(model), str)
    # what has no original is named (the fallback's line ends with it), and in the error
    assert originals._put_back_plan(model) == "transformers.models.toy.modeling_toy.ToySub.forward"
    with pytest.raises(ValueError, match="ToySub.forward, replaced by a patching library"):
        with originals.originals_put_back(model):
            pass


def test_models_pushed_through_one_engine_in_turn_each_decode_as_their_own(tiny_tokenizer):
    """The fold's copies belong to one model, held by weak references: a later model whose modules reuse a freed
    model's ids gets its own copies, and what the engine holds stays one model's worth."""
    import gc

    engine, enc = DecodeEngine(), encode(tiny_tokenizer)
    held = []
    for seed in range(12):
        m = with_lora(make_llama(tiny_tokenizer, seed=100 + seed), 0.3, seed=seed)
        want = m.generate(**enc, do_sample=False, **settings(tiny_tokenizer))
        assert torch.equal(engine.generate(m, **enc, do_sample=False, **settings(tiny_tokenizer)), want), seed
        held.append(engine.fold.held())
        del m
        gc.collect()
    lora_layers = 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    assert held == [lora_layers] * 12


@pytest.mark.parametrize("attention_bias", [False, True])
def test_lora_with_a_bias_of_its_own_is_folded_with_it(attention_bias, tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    base = make_llama(tiny_tokenizer, seed=31, attention_bias=attention_bias)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_bias=True))
    torch.manual_seed(32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    model.eval()
    enc = encode(tiny_tokenizer)
    want = model.generate(**enc, do_sample=False, **settings(tiny_tokenizer))
    layers = [m for m in model.modules() if hasattr(m, "base_layer")]
    before = [(m.base_layer.bias, None if m.base_layer.bias is None else m.base_layer.bias.clone()) for m in layers]
    engine = DecodeEngine()
    assert torch.equal(engine.generate(model, **enc, do_sample=False, **settings(tiny_tokenizer)), want)
    assert engine.calls == 1
    for m, (bias, value) in zip(layers, before):  # the layer's own bias object back in place, unwritten
        assert m.base_layer.bias is bias and (bias is None or torch.equal(bias, value))


def test_dropout_in_train_mode_goes_to_generate(tiny_tokenizer):
    """generate in train mode samples under dropout; the engine decodes in eval mode, so it hands such calls over."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make_llama(tiny_tokenizer, seed=41),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.5))
    enc, engine = encode(tiny_tokenizer), DecodeEngine()
    model.train()
    torch.manual_seed(4)
    want = model.generate(**enc, do_sample=True, **settings(tiny_tokenizer))
    torch.manual_seed(4)
    got = engine.generate(model, **enc, do_sample=True, **settings(tiny_tokenizer))
    assert torch.equal(got, want) and engine.fallbacks == 1 and engine.calls == 0
    model.eval()
    engine.generate(model, **enc, do_sample=True, **settings(tiny_tokenizer))
    assert engine.calls == 1


def test_the_fold_is_used_only_where_its_copies_fit_the_budget(lora, tiny_tokenizer, caplog):
    """A budget below the fold's copies decodes the LoRA layers unmerged (no copy made; sibling groups' A matrices
    stacked), with generate's tokens; a
    budget that holds them folds; a budget below the cache itself is one clear error naming the GiB it needs."""
    import logging

    from sdgrpo.engine import cache_bytes, fold_bytes
    from sdgrpo.errors import UserError

    enc = encode(tiny_tokenizer)
    want = lora.generate(**enc, do_sample=False, **settings(tiny_tokenizer))
    length = 64  # the engine's length bucket holds these prompts + 24 tokens
    need, cache = fold_bytes(lora), cache_bytes(lora.get_base_model(), 4, length)
    weights = sum(m.base_layer.weight.numel() * 4 for m in lora.modules() if hasattr(m, "base_layer"))
    assert need == weights and 0 < cache < need
    for budget, mode, held in (((cache + need / 2) / 2**30, "unmerged", 0), ((cache + need) / 2**30, "folded", 14)):
        engine = DecodeEngine(memory_budget_gib=budget, generation_weights="model")
        with caplog.at_level(logging.INFO, logger="sdgrpo.engine"):
            got = engine.generate(lora, **enc, do_sample=False, **settings(tiny_tokenizer))
        assert torch.equal(got, want) and engine.mode == mode and engine.fold.held() == held
        assert engine.stacked.held() == (10 if mode == "unmerged" else 0)  # q k v and gate up: A stacked, 2 layers
        assert f"LoRA {'decoded unmerged' if mode == 'unmerged' else 'folded'}" in caplog.text
    with pytest.raises(UserError, match=rf"needs {cache / 2**30:.2f} GiB for its cache alone"):
        DecodeEngine(memory_budget_gib=cache / 2 / 2**30).generate(lora, **enc, do_sample=False,
                                                                    **settings(tiny_tokenizer))


def test_sampling_log_probs_at_the_calls_temperature(lora, tiny_tokenizer):
    """What the trainer compares with its policy's log-probs: log_softmax(logits / T) of each sampled token, from a
    teacher-forced pass."""
    from sdgrpo.engine import sampling_from

    enc = encode(tiny_tokenizer)
    engine = DecodeEngine()
    engine.record = []
    torch.manual_seed(5)
    s = sampling_from(lora, None, do_sample=True, top_k=0, temperature=0.7, **settings(tiny_tokenizer))
    out = engine.decode(lora, enc["input_ids"], enc["attention_mask"], s)
    assert engine.record == [out] and out.sampling_logprobs is not None
    width = enc["input_ids"].size(1)
    for row in range(out.sequences.size(0)):
        start = int((enc["attention_mask"][row] == 0).sum())
        ids = out.sequences[row, start:]
        completion = out.sequences[row, width:]
        ended = (completion == tiny_tokenizer.eos_token_id).nonzero()
        n = int(ended[0]) + 1 if len(ended) else completion.numel()
        with torch.no_grad():
            logits = lora(input_ids=ids[None]).logits[0].double()
        ref = torch.log_softmax(logits / 0.7, -1)[width - start - 1 : width - start - 1 + n]
        ref = ref.gather(-1, completion[:n, None])[:, 0]
        assert torch.allclose(out.sampling_logprobs[row, :n].double(), ref, atol=1e-5)


def test_lora_that_cannot_be_folded_is_reported_unmerged(tiny_tokenizer):
    """A DoRA adapter is decoded unmerged (PEFT's own forward), and the engine says so: mode ``unmerged``, not
    ``folded``, whatever the budget; a model without LoRA is ``plain``."""
    from peft import LoraConfig, get_peft_model

    dora = get_peft_model(make_llama(tiny_tokenizer, seed=51), LoraConfig(r=4, target_modules="all-linear",
                                                                          use_dora=True)).eval()
    enc = encode(tiny_tokenizer)
    want = dora.generate(**enc, do_sample=False, **settings(tiny_tokenizer))
    engine = DecodeEngine(memory_budget_gib=100.0)
    assert torch.equal(engine.generate(dora, **enc, do_sample=False, **settings(tiny_tokenizer)), want)
    assert engine.mode == "unmerged" and engine.fold.held() == 0
    plain = DecodeEngine(memory_budget_gib=100.0)
    plain.generate(make_llama(tiny_tokenizer, seed=52), **enc, do_sample=False, **settings(tiny_tokenizer))
    assert plain.mode == "plain"


def test_int4_quantisation_is_round_to_nearest_within_half_a_step():
    """Each value is within half a quantisation step (scale / 2) of what it stands for, and the step is the group's
    range over 15 (rounded to bf16)."""
    from sdgrpo.engine import quantise_int4

    torch.manual_seed(0)
    w = torch.randn(16, 256) * torch.linspace(0.1, 3, 256)
    q, scales_zeros = quantise_int4(w, 64)
    assert q.min() >= 0 and q.max() <= 15 and scales_zeros.shape == (4, 16, 2)
    scale = scales_zeros[..., 0].t().float()
    groups = w.reshape(16, 4, 64)
    assert torch.allclose(scale, (groups.amax(-1) - groups.amin(-1)) / 15, rtol=1e-2)
    error = (int4_dequantised(w, 64) - w).reshape(16, 4, 64).abs()
    assert bool((error <= scale[..., None] / 2 * 1.02 + 1e-6).all())


@pytest.mark.parametrize("bias, chunk", [(False, None), (True, None), (False, 8 * 64)])
def test_int4_copies_decode_as_the_model_with_their_weights_would(bias, chunk, tiny_tokenizer, monkeypatch):
    """Int4 generation copies (mode ``int4``; q, k, v and gate, up served as one weight each) against an independent
    model: the base with every LoRA-wrapped weight replaced by the dequantised int4 form of ``W + scale * B @ A``
    (and no LoRA), teacher-forced on the engine's greedy tokens one unpadded row at a time: each token is its argmax
    and each log-prob its log-prob, to bf16's rounding (0.02 nats; decoding the 16-bit weights instead misses both).
    The trained weights untouched. ``chunk``: weights quantised 8 rows at a time."""
    import copy

    if chunk:
        patch_engine(monkeypatch, "INT4_CHUNK", chunk)
    base = make_llama(tiny_tokenizer, seed=61, attention_bias=bias).to(torch.bfloat16)
    if bias:
        with torch.no_grad():
            for name, p in base.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.5)
    reference = copy.deepcopy(base)
    lora = with_lora(base, 0.3, seed=62)
    before = {k: v.clone() for k, v in lora.state_dict().items()}
    int4_reference(reference, lora)
    enc = encode(tiny_tokenizer)
    engine = DecodeEngine(generation_weights="int4")
    engine.record = []
    got = engine.generate(lora, **enc, do_sample=False, **settings(tiny_tokenizer))
    assert engine.mode == "int4" and engine.quantised.held() == 14
    assert all(torch.equal(v, before[k]) for k, v in lora.state_dict().items())
    assert_decodes_as(reference, got, engine.record[0].logprobs, enc, tiny_tokenizer.eos_token_id)


def test_auto_weights_fold_where_that_fits_and_give_int4_copies_to_quantised_bases_only(tiny_tokenizer, caplog,
                                                                                        monkeypatch):
    """``generation_weights`` auto: the 16-bit fold where the budget holds it, else unmerged for a 16-bit base
    (int4 copies only where asked: they decoded no faster on an H200); a quantised base (its bitsandbytes weights
    stood in for here by ``_quantised_base``; the real one is tested on the GPU) gets int4 copies where they fit
    (their bytes: a quarter of the fold's, and a refresh's temporaries), unmerged below that; ``model`` never
    quantises. One log line says which and why. (What each mode decodes is tested above.)"""
    import logging

    from sdgrpo.engine import _quantisable_lora_layers, cache_bytes, dense_bytes, fold_bytes, int4_bytes
    from sdgrpo.engine.folded import _foldable_lora_layers as foldable

    # 8 layers: a refresh's temporaries (a few fp32 chunks of the widest weight) are then small beside the copies
    lora = with_lora(make_llama(tiny_tokenizer, seed=71, layers=8).to(torch.bfloat16), 0.3, seed=72)
    enc = encode(tiny_tokenizer)
    need, cache = fold_bytes(lora), cache_bytes(lora.get_base_model(), 4, 64)
    need4 = int4_bytes(_quantisable_lora_layers(lora))
    held4 = sum(m.out_features * m.in_features // 2 for m in lora.modules() if hasattr(m, "base_layer"))
    assert held4 < need4 < need
    middle = (need + need4) / 2 + cache
    patch_engine(monkeypatch, "_quantised_base", lambda layers: True)
    need16 = dense_bytes(_quantisable_lora_layers(lora, 16))  # with a dequantised weight's room for the refresh
    assert need < need16
    cases = [(need + cache, "auto", False, "folded", "LoRA folded into generation copies"),
             (need16 + cache, "auto", True, "dequantised", "16-bit generation copies of the dequantised base"),
             (need16 + cache, "int4", True, "int4", "int4 generation copies, as asked"),
             (middle, "auto", False, "unmerged", "no generation copy fits the budget"),
             (middle, "int4", False, "int4", "int4 generation copies, as asked"),
             (middle, "auto", True, "int4", "int4 generation copies of the quantised base"),
             (middle, "model", True, "unmerged", "unmerged over the quantised base, as asked"),
             (need4 / 2 + cache, "auto", True, "unmerged", "no generation copy fits the budget")]
    for budget, weights, quantised, mode, line in cases:
        patch_engine(monkeypatch, "_quantised_base", lambda layers, quantised=quantised: quantised)
        # a quantised base is not foldable in place (its weights are not 16-bit)
        patch_engine(monkeypatch, "_foldable_lora_layers", foldable if not quantised else lambda model: None)
        engine = DecodeEngine(memory_budget_gib=budget / 2**30, generation_weights=weights)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="sdgrpo.engine"):
            got = engine.generate(lora, **enc, do_sample=False, **settings(tiny_tokenizer))
        assert engine.mode == mode and line in caplog.text, (weights, quantised, mode, caplog.text)
        assert engine.quantised.held() == (56 if mode == "int4" else 0)
        assert engine.fold.held() == (56 if mode == "folded" else 0)
        assert engine.dense.held() == (56 if mode == "dequantised" else 0)
        assert got.shape[0] == 4 and torch.equal(got[:, :enc["input_ids"].size(1)], enc["input_ids"])


@pytest.mark.parametrize("bias", [False, True])
def test_16bit_copies_of_a_quantised_base_decode_generates_tokens(bias, tiny_tokenizer, monkeypatch):
    """Mode ``dequantised`` (a quantised base, stood in for by ``_quantised_base`` and an unfoldable model; the
    bitsandbytes one is tested on the GPU): every LoRA layer, o and down projections included, is swapped for a
    16-bit copy of base + LoRA, sibling groups as one matmul; fp32 here, so greedy tokens are generate's, and the
    sampled tokens' log-probs are an unpadded forward's. The trained weights are untouched."""
    from sdgrpo.engine import Linear16

    patch_engine(monkeypatch, "_quantised_base", lambda layers: True)
    patch_engine(monkeypatch, "_foldable_lora_layers", lambda model: None)
    base = make_llama(tiny_tokenizer, seed=91, attention_bias=bias)
    if bias:
        with torch.no_grad():
            for name, p in base.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.5)
    lora = with_lora(base, 0.3, seed=92)
    before = {k: v.clone() for k, v in lora.state_dict().items()}
    enc = encode(tiny_tokenizer)
    want = lora.generate(**enc, do_sample=False, **settings(tiny_tokenizer))
    engine = DecodeEngine()
    ran = []
    for m in lora.modules():
        if hasattr(m, "base_layer"):
            m.register_forward_hook(lambda module, args, out: ran.append(module))
    got = engine.generate(lora, **enc, do_sample=False, **settings(tiny_tokenizer))
    assert engine.mode == "dequantised" and engine.dense.held() == 14 and engine.quantised.held() == 0
    assert torch.equal(got, want) and not ran  # no PEFT LoRA forward ran: the copies served every layer
    copies = [m for known in engine.dense.groups.values() for copy, _ in known.values() for m in [copy]]
    assert {type(c) for c in copies} == {Linear16} and len(copies) == 8  # (q k v, o, gate up, down) x 2 layers
    assert all(torch.equal(v, before[k]) for k, v in lora.state_dict().items())
    torch.manual_seed(3)
    from sdgrpo.engine import sampling_from

    out = engine.decode(lora, enc["input_ids"], enc["attention_mask"],
                        sampling_from(lora, None, do_sample=True, top_k=0, **settings(tiny_tokenizer)))
    width = enc["input_ids"].size(1)
    for row in range(out.sequences.size(0)):
        start = int((enc["attention_mask"][row] == 0).sum())
        completion = out.sequences[row, width:]
        ended = (completion == tiny_tokenizer.eos_token_id).nonzero()
        n = int(ended[0]) + 1 if len(ended) else completion.numel()
        with torch.no_grad():
            logits = lora(input_ids=out.sequences[row:row + 1, start:width + n]).logits[0].double()
        ref = torch.log_softmax(logits, -1)[width - start - 1: width - start - 1 + n]
        assert torch.allclose(out.logprobs[row, :n].double(), ref.gather(-1, completion[:n, None])[:, 0], atol=1e-4)


def test_layers_without_an_int4_layout_decode_unmerged_beside_the_int4_copies(tiny_tokenizer, caplog):
    """intermediate_size 112 (no int4 group divides it): the down projections keep PEFT's unmerged forward (their
    trained weights in place while the others are swapped for int4 copies); the log line counts them."""
    import logging

    from sdgrpo.engine import _quantisable_lora_layers

    lora = with_lora(make_llama(tiny_tokenizer, seed=81, intermediate_size=112).to(torch.bfloat16), 0.3, seed=82)
    served = _quantisable_lora_layers(lora)
    assert len(served) == 12 and not any(m.in_features == 112 for m in served)  # all but the 2 down projections
    downs = [m for m in lora.modules() if hasattr(m, "base_layer") and m.in_features == 112]
    seen = []
    for m in downs:
        m.register_forward_hook(lambda module, args, out: seen.append(type(module).__name__))
    enc = encode(tiny_tokenizer)
    engine = DecodeEngine(generation_weights="int4")
    with caplog.at_level(logging.INFO, logger="sdgrpo.engine"):
        got = engine.generate(lora, **enc, do_sample=False, **settings(tiny_tokenizer))
    assert engine.mode == "int4" and engine.quantised.held() == 12
    assert "2 of 14 LoRA layers (no int4 layout, or an adapter variant) decode unmerged" in caplog.text
    assert got.size(0) == 4 and seen and set(seen) == {"Linear"}  # PEFT's LoRA Linear ran for them, every step


def test_generation_room_is_what_the_cap_leaves_less_trainings_reserve(monkeypatch):
    """The 7B-on-24-GiB case in numbers (GiB): an 80 GiB card capped at 24, 14.4 allocated, 15 reserved, 60 free,
    nothing beyond the resident memory seen yet: 24 - 14.4 = 9.6 under the cap, less 0.15 x 24 = 3.6 for training,
    leaves 6.0 (the 7B shape's int4 copies take 3.9 with their temporaries, its cache 0.3, its 16-bit fold 12.2:
    engine.fold_bytes, int4_bytes, cache_bytes on it with LoRA r 16 on every linear layer). Once training
    took 5 GiB beyond the resident memory, that is the reserve."""
    from sdgrpo.engine import generation_room

    gib = 2**30
    cuda = torch.cuda
    peak = {"value": 14.4 * gib}
    monkeypatch.setattr(cuda, "mem_get_info", lambda device: (60 * gib, 80 * gib))
    monkeypatch.setattr(cuda, "get_per_process_memory_fraction", lambda device: 24 / 80)
    monkeypatch.setattr(cuda, "memory_allocated", lambda device: 14.4 * gib)
    monkeypatch.setattr(cuda, "memory_reserved", lambda device: 15 * gib)
    monkeypatch.setattr(cuda, "max_memory_allocated", lambda device: peak["value"])
    room, why = generation_room("cuda")
    assert room / gib == pytest.approx(6.0) and "kept for training" in why
    peak["value"] = 19.4 * gib
    assert generation_room("cuda")[0] / gib == pytest.approx(24 - 14.4 - 5.0)


def test_the_lora_delta_added_in_place_is_scale_b_a_summed_over_active_adapters(tiny_tokenizer):
    """_add_lora_delta_ (one addmm an adapter, no fp32 delta beside the rows; what an int4 refresh adds to each
    chunk) against ``sum(scale * B @ A)`` written out from PEFT's own tensors, for a slice of rows, with two active
    adapters of different scales; with the adapters disabled the rows are left as they are."""
    from peft import LoraConfig

    from sdgrpo.engine.folded import _add_lora_delta_

    lora = with_lora(make_llama(tiny_tokenizer, seed=67), 0.3, seed=68)
    lora.add_adapter("second", LoraConfig(r=2, lora_alpha=8, target_modules="all-linear"))
    layer = lora.base_model.model.model.layers[0].mlp.up_proj
    layer.set_adapter(["default", "second"])
    with torch.no_grad():
        layer.lora_B["second"].weight.normal_(0, 0.3)
    rows = slice(3, 11)
    base = torch.randn(8, layer.in_features)
    want = base.double()
    for name, scale in (("default", 8 / 4), ("second", 8 / 2)):
        assert layer.scaling[name] == scale
        want = want + scale * (layer.lora_B[name].weight[rows].double() @ layer.lora_A[name].weight.double())
    got = _add_lora_delta_(layer, base.clone(), rows)
    assert got.dtype == torch.float32 and torch.allclose(got.double(), want, rtol=0, atol=1e-5)
    assert not torch.allclose(got, base, atol=1e-3)  # the adapters change these rows
    layer._disable_adapters = True
    assert torch.equal(_add_lora_delta_(layer, base.clone(), rows), base)


# --- int4 copies read by gemlite (its reference matmul off CUDA; the kernel itself in tests/gpu) -----------------
def test_gemlite_packing_is_eight_values_a_word_along_k_transposed():
    """pack_gemlite against the layout written out by hand (value j of a row in bits 4 (j % 8) of word j // 8, words
    [K / 8, N]), and unpack_gemlite undoes it."""
    from sdgrpo.engine import pack_gemlite, unpack_gemlite

    torch.manual_seed(0)
    q = torch.randint(0, 16, (24, 64), dtype=torch.uint8)
    words = pack_gemlite(q)
    assert words.shape == (8, 24) and words.dtype == torch.int32 and words.is_contiguous()
    for n in (0, 5, 23):
        for w in (0, 3, 7):
            want = sum(int(q[n, 8 * w + j]) << (4 * j) for j in range(8))
            assert int(words[w, n]) & 0xFFFFFFFF == want
    assert torch.equal(unpack_gemlite(words), q)
    # a few rows at a time (a refresh's temporaries bounded) into a given tensor: the same words
    out = torch.zeros(8, 24, dtype=torch.int32)
    assert pack_gemlite(q, out=out, rows=5) is out and torch.equal(out, words)


def test_affine_words_in_place_are_quantise_affine_then_pack_gemlite_to_the_bit():
    """quantise_affine_words_ (a refresh's one pass over a chunk it owns) against the two-step reference
    (quantise_affine, then pack_gemlite): the same words (transposed), scales and lows to the bit, on weights with
    constant groups, exact ties between levels and a wide range; the weight given up is overwritten, and
    GemliteLinear.load leaves a weight it does not own untouched."""
    from sdgrpo.engine import GemliteLinear, pack_gemlite, quantise_affine, quantise_affine_words_

    torch.manual_seed(5)
    w = torch.randn(40, 256) * torch.logspace(-3, 1, 256)
    w[3, :64] = 0.25  # a constant group: scale clamped, every value on the low end
    w[7, 64:128] = torch.arange(64) % 16 / 15.0  # values on the levels and half-way ties after rounding
    w[9] = -w[9] * 1e4
    q, scale, low = quantise_affine(w, 64)
    given = w.clone()
    words, scale2, low2 = quantise_affine_words_(given, 64)
    assert words.dtype == torch.int32 and words.shape == (40, 32)
    assert torch.equal(words.t(), pack_gemlite(q)) and torch.equal(scale2, scale) and torch.equal(low2, low)
    assert not torch.equal(given, w)  # overwritten: the caller gave it up
    layer, kept = GemliteLinear(40, 256, 64, "cpu", bias=False), w.clone()
    layer.load(None, 0, w[:24])
    layer.load(None, 24, w[24:])
    layer.pack(None)
    assert torch.equal(w, kept) and torch.equal(layer.W_q, pack_gemlite(q))
    assert torch.equal(layer.scales, scale.t()) and torch.equal(layer.zeros, low.t())


def test_affine_quantisation_is_round_to_nearest_within_half_a_step():
    """quantise_affine: levels 0..15 on the group's [low, high], each value within half a step of q * scale + low."""
    from sdgrpo.engine import quantise_affine

    torch.manual_seed(1)
    w = torch.randn(16, 256) * torch.linspace(0.1, 3, 256)
    q, scale, low = quantise_affine(w, 64)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and scale.shape == low.shape == (16, 4)
    groups = w.reshape(16, 4, 64)
    assert torch.allclose(scale.float(), (groups.amax(-1) - groups.amin(-1)) / 15, rtol=1e-2)
    back = q.reshape(16, 4, 64).float() * scale.float()[..., None] + low.float()[..., None]
    assert torch.equal(back.reshape(16, 256), affine_dequantised(w, 64))
    assert bool(((back - groups).abs() <= scale.float()[..., None] / 2 * 1.02 + 1e-6).all())


def test_gemlite_linear_off_cuda_is_the_dequantised_matmul():
    """GemliteLinear loaded in two chunks of rows and packed: its output is x @ W^T + b with W the affine form of the
    weight (computed independently), to bf16 rounding."""
    from sdgrpo.engine import GemliteLinear

    torch.manual_seed(2)
    w, b = torch.randn(48, 128), torch.randn(48)
    layer = GemliteLinear(48, 128, 64, "cpu", bias=True)
    values = torch.empty(48, 128, dtype=torch.uint8)
    layer.load(values, 0, w[:16])
    layer.load(values, 16, w[16:])
    layer.pack(values)
    layer.bias.data.copy_(b)
    x = torch.randn(3, 5, 128)
    want = x @ affine_dequantised(w, 64).t() + b.bfloat16().float()
    got = layer(x)
    assert got.shape == (3, 5, 48) and got.dtype == x.dtype
    assert torch.allclose(got, want, atol=0.05 * want.abs().max().item())


def test_gemlite_rows_in_slices_are_the_whole_matmul_and_every_call_is_one_bucket(monkeypatch):
    """GEMLITE_PREFILL_SLICE 4: 11 rows go to the kernel as three calls of exactly 4 rows (the last zero-padded),
    and the output is the unsliced layer's to the bit, bias included; 4 rows or fewer go whole."""
    import sdgrpo.engine.int4 as int4

    torch.manual_seed(3)
    layer = int4.GemliteLinear(48, 128, 64, "cpu", bias=True)
    layer.load(None, 0, torch.randn(48, 128))
    layer.bias.data.normal_()
    x = torch.randn(11, 128, dtype=torch.bfloat16)
    whole = layer(x)
    calls, matmul = [], layer._matmul
    monkeypatch.setattr(layer, "_matmul", lambda flat: calls.append(flat.size(0)) or matmul(flat))
    monkeypatch.setattr(int4, "GEMLITE_PREFILL_SLICE", 4)
    assert torch.equal(layer(x), whole) and calls == [4, 4, 4]
    assert torch.equal(layer(x[:3]), whole[:3]) and calls[3:] == [3]


@pytest.mark.parametrize("in_features", [64, 256, 896, 3584, 4864, 18944])
def test_gemlite_scales_are_held_zero_padded_as_far_as_its_split_k_kernels_read(in_features):
    """gemlite 0.6's split-K kernels read one row of scales and zeros per block of BLOCK_SIZE_K (32 or 64 columns, at
    most the group) for all cdiv(K, BLOCK_SIZE_K x SPLIT_K) x SPLIT_K blocks, SPLIT_K up to 16, unmasked, and the
    last row's N columns again past its end: the layer's scales and zeros are views of the first K / 64 rows of
    zero-filled stores that reach every row such a config reads (counted here over the configs), and its bytes count
    them. (The 0.5B shape, K 896, decoded to NaN on an H100 before.)"""
    from sdgrpo.engine import GemliteLinear

    group, n = 64, 32
    reads = max(-(-in_features // (block * split)) * split * block // group
                for block in (32, 64) for split in (1, 2, 4, 8, 16))
    layer = GemliteLinear(n, in_features, group, "cpu", bias=False)
    values = torch.empty(n, in_features, dtype=torch.uint8)
    layer.load(values, 0, torch.randn(n, in_features))
    for param, store in zip((layer.scales, layer.zeros), layer._meta_store):
        assert param.shape == (in_features // group, n) and param.data_ptr() == store.data_ptr()
        padding = store[param.shape[0]:]
        assert store.shape[0] >= reads + 1 and store.is_contiguous() and torch.equal(padding, torch.zeros_like(padding))
        assert param.abs().sum() > 0
    rows = layer._meta_store[0].shape[0]
    assert GemliteLinear.nbytes(n, in_features, group) == n * in_features // 2 + rows * n * 4 + n * 2


def test_gemlite_copies_decode_as_the_model_with_their_weights_would(tiny_tokenizer):
    """Mode ``int4`` with ``int4_kernel`` gemlite (here its reference matmul: gemlite runs on CUDA only): every LoRA
    layer swapped for an affine int4 copy of ``W + scale * B @ A``; the engine's greedy tokens are the argmax and its
    log-probs the log-probs of an independent model whose weights are those affine forms, teacher-forced one
    unpadded row at a time (to bf16's rounding); the trained weights untouched."""
    import copy

    from sdgrpo.engine import GemliteLinear

    base = make_llama(tiny_tokenizer, seed=63).to(torch.bfloat16)
    reference = copy.deepcopy(base)
    lora = with_lora(base, 0.3, seed=64)
    before = {k: v.clone() for k, v in lora.state_dict().items()}
    int4_reference(reference, lora, kernel="gemlite")
    enc = encode(tiny_tokenizer)
    engine = DecodeEngine(generation_weights="int4", int4_kernel="gemlite")
    engine.record = []
    got = engine.generate(lora, **enc, do_sample=False, **settings(tiny_tokenizer))
    assert engine.mode == "int4" and engine.quantised.kernel == "gemlite" and engine.quantised.held() == 14
    copies = [c for known in engine.quantised.groups.values() for c, _ in known.values()]
    assert {type(c) for c in copies} == {GemliteLinear}
    assert all(torch.equal(v, before[k]) for k, v in lora.state_dict().items())
    assert_decodes_as(reference, got, engine.record[0].logprobs, enc, tiny_tokenizer.eos_token_id)


@pytest.mark.parametrize("kernel", ["gemlite", "tinygemm"])
def test_copies_not_held_between_calls_are_freed_and_decode_as_held_ones(kernel, tiny_tokenizer):
    """``hold_copies`` false: after every call the int4 copies' weights (and scales) take no memory, the next call
    makes them again from the trained weights (changed in between, as an optimizer step changes them), and every
    call's tokens and log-probs are those of an engine that holds its copies; the modules themselves are kept."""
    base = make_llama(tiny_tokenizer, seed=65).to(torch.bfloat16)
    lora = with_lora(base, 0.3, seed=66)
    enc = encode(tiny_tokenizer)
    held, freed = (DecodeEngine(generation_weights="int4", int4_kernel=kernel, hold_copies=hold) for hold in (True,
                                                                                                            False))

    def weight_bytes(engine):
        return sum(p.numel() * p.element_size() for known in engine.quantised.groups.values()
                   for copy, _ in known.values() for p in copy.parameters() if p.dim() > 1)

    modules = None
    for call in range(3):
        got = [engine.generate(lora, **enc, do_sample=False, **settings(tiny_tokenizer)) for engine in (held, freed)]
        assert torch.equal(got[0], got[1]), call
        assert weight_bytes(held) > 0 and weight_bytes(freed) == 0 and freed.quantised.held() == 14
        now = [c for known in freed.quantised.groups.values() for c, _ in known.values()]
        assert modules is None or all(a is b for a, b in zip(now, modules))
        modules = now
        with torch.no_grad():  # a training step in between
            for name, p in lora.named_parameters():
                if "lora_B" in name:
                    p.add_(torch.randn_like(p) * 0.2)


def test_sixteen_bit_copies_released_are_made_again_as_before():
    """Linear16 (a quantised base's 16-bit copies): released, it holds nothing; made again and loaded, it computes
    what it did."""
    from sdgrpo.engine import Linear16

    torch.manual_seed(7)
    w, x = torch.randn(24, 16), torch.randn(3, 16)
    layer = Linear16(24, 16, torch.float32, "cpu", bias=False)
    layer.reacquire("cpu")
    layer.load(None, 0, w)
    want = layer(x)
    layer.release()
    assert layer.weight.numel() == 0
    layer.reacquire("cpu")
    layer.load(None, 0, w)
    assert torch.equal(layer(x), want) and layer.weight.shape == (24, 16)


def test_the_int4_kernel_is_gemlite_where_chosen_and_installed_else_tinygemm_and_never_silently_another(
        monkeypatch):
    """choose_int4_kernel: auto is gemlite on the architectures of GEMLITE_AUTO (an H100's sm 9.0) where
    gemlite runs, else tinygemm with the reason; gemlite asked for is gemlite where it can run, its reference matmul
    off CUDA, and on a GPU where it cannot run one line (UserError), never silently another kernel."""
    from sdgrpo.engine import GEMLITE_AUTO, choose_int4_kernel
    from sdgrpo.errors import UserError

    assert GEMLITE_AUTO == ((9, 0),)  # an H100: measured fastest and checked against its reference there
    capability = [(9, 0)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[0])
    patch_engine(monkeypatch, "gemlite_available", lambda: None)
    assert choose_int4_kernel("auto", "cuda") == ("gemlite", "auto: the fastest measured on sm 9.0")
    assert choose_int4_kernel("auto", "cpu") == ("tinygemm", "auto")
    assert choose_int4_kernel("tinygemm", "cuda") == ("tinygemm", "as asked")
    assert choose_int4_kernel("gemlite", "cuda") == ("gemlite", "as asked")
    assert choose_int4_kernel("gemlite", "cpu")[0] == "gemlite"
    capability[0] = (8, 9)
    assert choose_int4_kernel("auto", "cuda") == ("tinygemm",
                                                  "auto: gemlite not chosen on sm 8.9 (engine.GEMLITE_AUTO)")
    capability[0] = (9, 0)
    patch_engine(monkeypatch, "gemlite_available", lambda: "gemlite is not installed (pip install gemlite)")
    assert choose_int4_kernel("auto", "cuda") == ("tinygemm", "auto: gemlite is not installed (pip install gemlite)")
    with pytest.raises(UserError, match="--generation_int4_kernel gemlite: gemlite is not installed"):
        choose_int4_kernel("gemlite", "cuda")


def test_a_quantised_base_gets_int4_copies_first_where_the_int4_kernel_is_as_fast(tiny_tokenizer, caplog,
                                                                                  monkeypatch):
    """``generation_weights`` auto, a quantised base (stood in for by ``_quantised_base``), int4 read by a kernel of
    INT4_FIRST (gemlite): int4 copies where they fit, even where 16-bit copies would (memory first), and 16-bit copies
    never; with tinygemm the 16-bit copies come first, as before."""
    import logging

    from sdgrpo.engine import _quantisable_lora_layers, cache_bytes, dense_bytes, int4_bytes

    lora = with_lora(make_llama(tiny_tokenizer, seed=73).to(torch.bfloat16), 0.3, seed=74)
    enc = encode(tiny_tokenizer)
    patch_engine(monkeypatch, "_quantised_base", lambda layers: True)
    patch_engine(monkeypatch, "_foldable_lora_layers", lambda model: None)
    cache = cache_bytes(lora.get_base_model(), 4, 64)
    need4 = int4_bytes(_quantisable_lora_layers(lora, 4, "gemlite"), "gemlite")
    # room for either (at widths 64 gemlite's copies are not the smaller: 17 rows of scales for 1 group, as its kernels
    # read past the end, gemlite_meta_rows; at a real model's widths they are a quarter of the 16-bit copies)
    plenty = max(dense_bytes(_quantisable_lora_layers(lora, 16)), need4) + cache
    for kernel, budget, mode in (("gemlite", plenty, "int4"), ("gemlite", need4 + cache, "int4"),
                                 ("tinygemm", plenty, "dequantised")):
        engine = DecodeEngine(memory_budget_gib=budget / 2**30, int4_kernel=kernel)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="sdgrpo.engine"):
            engine.generate(lora, **enc, do_sample=False, **settings(tiny_tokenizer))
        assert engine.mode == mode and engine.quantised.kernel == kernel, (kernel, caplog.text)
        if mode == "int4":
            assert "int4 generation copies of the quantised base, read by gemlite" in caplog.text


def test_the_budget_is_checked_again_when_a_call_needs_a_bigger_cache(tiny_tokenizer, caplog):
    """--generation_memory_gib: the first call (2 short prompts) fits the fold's copies beside its cache; a later
    call with more rows and longer prompts needs a cache that does not fit beside them: the engine says so, drops the
    copies and decodes that call unmerged (generate's tokens, fp32); a call whose cache alone is above the budget is
    one line (UserError), never an allocation past what the user set."""
    import logging

    from sdgrpo.engine import cache_bytes, fold_bytes
    from sdgrpo.errors import UserError

    lora = with_lora(make_llama(tiny_tokenizer, seed=75), 0.3, seed=76)
    short = encode(tiny_tokenizer, PROMPTS[:2])
    long = encode(tiny_tokenizer, [p * 6 for p in PROMPTS] * 4)
    kw = settings(tiny_tokenizer)
    inner = lora.get_base_model()
    bucket = DecodeEngine().length_bucket
    positions = [-(-(e["input_ids"].size(1) + kw["max_new_tokens"]) // bucket) * bucket for e in (short, long)]
    small, big = cache_bytes(inner, 2, positions[0]), cache_bytes(inner, 16, positions[1])
    copies = fold_bytes(lora)
    budget = big + copies / 2  # the fold fits the first call only; the second call's cache alone fits
    assert small + copies <= budget < big + copies
    engine = DecodeEngine(memory_budget_gib=budget / 2**30)
    engine.generate(lora, **short, do_sample=False, **kw)
    assert engine.mode == "folded" and engine.fold.held() > 0
    want = lora.generate(**long, do_sample=False, **kw)
    with caplog.at_level(logging.INFO, logger="sdgrpo.engine"):
        got = engine.generate(lora, **long, do_sample=False, **kw)
    assert "does not fit beside the folded mode's" in caplog.text
    assert engine.mode == "unmerged" and engine.fold.held() == 0
    assert torch.equal(got, want)
    tight = DecodeEngine(memory_budget_gib=(small + copies) / 2**30)
    tight.generate(lora, **short, do_sample=False, **kw)
    with pytest.raises(UserError, match="for its cache alone"):
        tight.generate(lora, **long, do_sample=False, **kw)


def test_gemlite_that_does_not_import_is_not_available_with_the_reason(tmp_path, monkeypatch):
    """gemlite installed but failing to import (beside a Triton older than it needs): auto falls back to tinygemm
    with that reason, asked for it is one line; before, only its presence was checked and auto failed mid-run."""
    import sys

    from sdgrpo.engine.int4 import gemlite_available

    package = tmp_path / "gemlite"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('triton 3.5.0 is too old')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "gemlite", raising=False)
    assert gemlite_available() == "gemlite does not import here (ImportError: triton 3.5.0 is too old)"
