"""GPU tests (`pytest -m gpu` on the GPU machine; skipped elsewhere): both backends train and agree on rewards."""

from __future__ import annotations

import gc
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu


def _unsloth_available() -> bool:
    try:
        import importlib.util

        return importlib.util.find_spec("unsloth") is not None
    except Exception:
        return False


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory, tiny_tokenizer):
    """A Qwen2.5-0.5B-shaped model with random weights (bf16 safetensors) and the tiny test tokenizer: the layer's
    shape (widths, heads, biases, tied embeddings) of the real model, 4 of its 24 layers (their number is not what
    these tests check, and a suite that runs after every GPU change must stay short)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = tmp_path_factory.mktemp("qwen-0.5b-random")
    config = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=4, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=len(tiny_tokenizer), tie_word_embeddings=True,
                         max_position_embeddings=2048, bos_token_id=tiny_tokenizer.bos_token_id,
                         eos_token_id=tiny_tokenizer.eos_token_id, pad_token_id=tiny_tokenizer.pad_token_id)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, corpus):
    """Prompts tokenized by the shipped model's tokenizer (both GPU models use it)."""
    from conftest import run_cli

    out = tmp_path_factory.mktemp("prepared")
    r = run_cli("prepare", corpus / "exodus.txt", "--output", out)
    assert r.returncode == 0, r.stderr
    return out


PROBE = Path(__file__).resolve().parents[1] / "probes" / "train_probe.py"


def _train(model_dir, prepared, out, backend, *extra, probe=None, compiled=False):
    """3 steps of `sdgrpo train`; the engine's step compiled and captured only with ``compiled`` (a compile costs
    ~30 s per process, and one test of it in training is enough: the engine's own test checks the captured step)."""
    extra = (*extra, "--generation_compile", str(compiled).lower())
    entry = [str(PROBE), str(probe), "--check_reuse"] if probe else ["-m", "sdgrpo.cli", "train"]
    r = subprocess.run([sys.executable, *entry, "--backend", backend, "--model_name_or_path",
                        str(model_dir), "--dataset_path", str(prepared), "--output_dir", str(out), "--max_steps", "3",
                        "--per_device_train_batch_size", "8", "--num_generations", "4", "--max_completion_length",
                        "32", "--learning_rate", "1e-4", "--save_strategy", "no", *map(str, extra)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    (out / "stderr.log").write_text(r.stderr)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in rows if "reward" in x]
    assert len(steps) == 3
    for x in steps:
        assert all(math.isfinite(x[k]) for k in ("reward", "kl", "loss", "collapse/seq_rep_4"))
    from safetensors.torch import load_file

    weights = load_file(out / "adapter_model.safetensors")
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b), "adapter weights did not change"
    return steps


@pytest.mark.parametrize("model", ["tiny", "qwen"])
def test_hf_backend_trains(model, qwen_dir, prepared, tmp_path):
    from sdgrpo.config import TINY_MODEL

    _train(TINY_MODEL if model == "tiny" else qwen_dir, prepared, tmp_path / "hf", "hf", compiled=model == "qwen")


@pytest.mark.skipif(not _unsloth_available(), reason="unsloth is not installed (see make-wheelhouse.sh)")
def test_unsloth_backend_trains(prepared, tmp_path):
    """The shipped tiny model; the Qwen shape trains under `sdgrpo train --backend unsloth` with every check of this
    test and more in test_unsloth_model_decodes_through_the_engine[False] (a second run of it here cost 71 s)."""
    from sdgrpo.config import TINY_MODEL

    _train(TINY_MODEL, prepared, tmp_path / "unsloth", "unsloth")


@pytest.mark.skipif(not _unsloth_available(), reason="unsloth is not installed (see make-wheelhouse.sh)")
@pytest.mark.parametrize("model", ["tiny", "qwen"])
def test_unsloth_reward_reuses_the_left_packed_reference_pass(model, qwen_dir, prepared, tmp_path):
    """Under Unsloth the reward is read from the KL pass's (B, C + max_left_pad) log-probs, equal to an own pass.

    Rows holding a sampled pad-id token are sent to the own pass (completion_columns), so every reused row must be
    free of inner pad tokens. On the Qwen shape this once failed (2 of 8 rows ~0.2 nats off, exactly the rows with a
    pad sampled inside): `sdgrpo train --backend unsloth` got the hf backend's trainer class, which reads the KL
    pass's columns as TRL lays them out and never refused those rows (test_grpo_trainer.py,
    test_the_unsloth_trainer_reads_left_packed_log_probs_whatever_the_import_order). Also checks that Unsloth's
    trainer goes through sdgrpo's prompt hooks: max_prompt_length holds.
    """
    from sdgrpo.config import TINY_MODEL

    out = tmp_path / "run"
    _train(TINY_MODEL if model == "tiny" else qwen_dir, prepared, out, "unsloth", "--max_prompt_length", 24,
           probe=tmp_path)  # reuse and the engine by default
    log = (out / "stderr.log").read_text()
    ours = [line for line in log.splitlines() if "sdgrpo" in line or "reuse" in line or "dropout" in line]
    assert "reward reused from the KL pass in 3 of the reward calls" in log, "\n".join(ours)[-4000:]
    checks = [json.loads(x) for f in tmp_path.glob("reuse_check_*.jsonl") for x in f.read_text().splitlines()]
    assert len(checks) == 3
    for c in checks:
        reused, own = zip(*c["rewards"])
        assert reused == pytest.approx(own, abs=0.02), c  # bf16 forward of the same weights, different kernels
        assert c["max_token_diff"] < 0.25, c
        for w in c["worst"]:  # a reused row holds no sampled pad-id token
            assert not w["pad_at"], w
    if model == "tiny":  # a trained model: rewards differ between completions, so a misaligned column would show
        spread = max(r for c in checks for r, _ in c["rewards"]) - min(r for c in checks for r, _ in c["rewards"])
        assert spread > 0.05, checks
    seen = [json.loads(x) for f in tmp_path.glob("rank*.jsonl") for x in f.read_text().splitlines()]
    assert seen and all(0 < s["prompt_tokens_max"] <= 24 for s in seen), seen


@pytest.mark.skipif(not _unsloth_available(), reason="unsloth is not installed (see make-wheelhouse.sh)")
@pytest.mark.parametrize("four_bit", [False, True])
def test_unsloth_model_decodes_through_the_engine(four_bit, qwen_dir, prepared, tmp_path):
    """`--backend unsloth --generation_engine true`: the engine decodes Unsloth's model with transformers' forwards
    put back (recorded before Unsloth's import), every call served (no fallback to generate), the sampler within
    bf16 rounding of the policy (16-bit: LoRA folded in bf16; 4-bit: 16-bit copies of the dequantised base, tinygemm
    named: with gemlite installed the default plan reads int4 copies, mismatch 0.22 on this shape, one H100,
    2026-12-07; the int4 modes are the hf tests')."""
    extra = ("--load_in_4bit", "true", "--generation_int4_kernel", "tinygemm") if four_bit else ()
    steps = _train(qwen_dir, prepared, tmp_path / "us", "unsloth", "--generation_engine", "true",
                   "--rollout_correction", "true", *extra, compiled=True)
    log = (tmp_path / "us" / "stderr.log").read_text()
    assert "put in its place" not in log, log[-3000:]  # no call handed to generate for Unsloth's forwards
    for x in steps:
        assert x["engine/fallbacks"] == 0 and x["engine/calls"] >= 1, x
        assert "sampling/sampling_logp_difference/mean" in x, (sorted(x), log[-3000:])
        assert x["sampling/sampling_logp_difference/mean"] < 0.1, x
        assert not four_bit or x["engine/mode"] == 3.0, x  # 16-bit copies of the dequantised base


@pytest.mark.skipif(not _unsloth_available(), reason="unsloth is not installed (see make-wheelhouse.sh)")
@pytest.mark.parametrize("model", ["tiny", "qwen"])
def test_backends_give_the_same_rewards_for_the_same_completions(model, qwen_dir, tmp_path):
    """16-bit weights, fixed prompt and completion ids: the hf and unsloth policies score them alike."""
    from pathlib import Path

    from sdgrpo.config import TINY_MODEL

    script = Path(__file__).with_name("gpu_score.py")
    scores = {}
    for backend in ("hf", "unsloth"):
        path = tmp_path / f"{backend}.json"
        r = subprocess.run([sys.executable, str(script), backend, str(TINY_MODEL if model == "tiny" else qwen_dir),
                            str(path)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-4000:]
        scores[backend] = json.loads(path.read_text())
        assert scores[backend]["dtype"] == "torch.bfloat16"
    hf, us = scores["hf"]["rewards"], scores["unsloth"]["rewards"]
    assert len(hf) == 16 and all(math.isfinite(x) for x in hf + us)
    assert us == pytest.approx(hf, abs=0.03), (hf, us)


def test_four_bit_teacher(prepared, tmp_path):
    """teacher_nll with the shipped model as a 4-bit NF4 teacher: trains, and the teacher takes less memory."""
    from sdgrpo.config import TINY_MODEL

    out = tmp_path / "q4"
    _train(TINY_MODEL, prepared, out, "hf", "--reward", "teacher_nll", "--teacher_model_name_or_path", TINY_MODEL,
           "--teacher_load_in_4bit", "true")
    log = (out / "stderr.log").read_text()
    assert "4-bit NF4" in log, log[-3000:]


def test_sft_trains_lora_on_a_4bit_base(qwen_dir, prepared, tmp_path):
    """`sdgrpo sft --load_in_4bit true`: the base loads as 4-bit NF4 (smaller than its bf16 weights) and the LoRA
    trains (before, the option was ignored and a 16-bit base trained)."""
    from safetensors.torch import load_file

    from conftest import run_cli

    sizes = {}
    for four_bit in ("false", "true"):
        out = tmp_path / f"sft-{four_bit}"
        r = run_cli("sft", "--model_name_or_path", qwen_dir, "--dataset_path", prepared, "--output_dir", out,
                    "--max_steps", 3, "--per_device_train_batch_size", 4, "--load_in_4bit", four_bit,
                    "--report_to", "none", "--save_strategy", "no")
        assert r.returncode == 0, r.stderr[-3000:]
        line = next(x for x in r.stderr.splitlines() if "sdgrpo.sft: base " in x)
        assert ("4-bit NF4" in line) == (four_bit == "true"), line
        sizes[four_bit] = float(line.split(", ")[-1].split(" MiB")[0])
        lora_b = [v for k, v in load_file(out / "adapter_model.safetensors").items() if "lora_B" in k]
        assert lora_b and any(v.abs().sum() > 0 for v in lora_b)
    assert sizes["true"] < 0.6 * sizes["false"], sizes


def test_engine_on_the_gpu_agrees_with_generate_and_a_teacher_forced_pass(tiny_tokenizer):
    """bf16, compiled step (CUDA graph), LoRA folded, on the shipped model: greedy tokens against generate (unmerged
    LoRA), counted both as whole sequences and step by step (is each engine token the unmerged model's argmax after
    the same prefix?), and the sampled tokens' log-probs against one teacher-forced pass."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sdgrpo.config import TINY_MODEL
    from sdgrpo.engine import DecodeEngine, sampling_from

    tok = AutoTokenizer.from_pretrained(TINY_MODEL)
    base = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.bfloat16).cuda()
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    enc = tok(["In the beginning God created", "And the LORD said unto Noah", "Then the king", "It was a dark"],
              return_tensors="pt", padding=True, padding_side="left").to("cuda")
    kw = dict(max_new_tokens=48, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    width = enc["input_ids"].size(1)

    def teacher_forced(seq):
        mask = torch.cat([enc["attention_mask"], torch.ones_like(seq[:, width:])], 1)
        positions = (mask.cumsum(1) - 1).clamp(min=0)  # as generate (and the engine) place left-padded rows
        with torch.no_grad():
            return model(input_ids=seq, attention_mask=mask, position_ids=positions).logits.float()[:, width - 1 : -1]

    def live(seq):  # completion positions up to and including the first EOS
        ended = torch.cumsum((seq[:, width:] == tok.eos_token_id).int(), 1)
        return (ended == 0) | ((ended == 1) & (seq[:, width:] == tok.eos_token_id))

    engine = DecodeEngine(compile=True)
    want = model.generate(**enc, do_sample=False, disable_compile=True, **kw)
    got = engine.generate(model, **enc, do_sample=False, **kw)
    n = min(want.size(1), got.size(1))
    sequence_agreement = (want[:, :n] == got[:, :n]).float().mean().item()
    step_agreement = (teacher_forced(got).argmax(-1) == got[:, width:])[live(got)].float().mean().item()
    print(f"greedy in bf16: identical tokens {sequence_agreement:.3f}, engine token = unmerged argmax after the same "
          f"prefix {step_agreement:.3f}")
    assert step_agreement >= 0.97
    torch.manual_seed(0)
    out = engine.decode(model, enc["input_ids"], enc["attention_mask"],
                        sampling_from(model, None, do_sample=True, top_k=0, **kw))
    seq = out.sequences
    ref = torch.log_softmax(teacher_forced(seq), -1).gather(-1, seq[:, width:, None])[..., 0]
    diff = (out.logprobs - ref).abs()[live(seq)]
    print(f"sampled log-probs against a teacher-forced pass: max |diff| {diff.max():.3g}, mean {diff.mean():.3g}")
    assert diff.mean() < 0.05 and engine.calls == 2
    # the step ran as a captured CUDA graph, whose random draws follow the seed: the same seed gives the same
    # tokens, the generator moving on gives others
    assert engine.captures >= 1
    sampled = sampling_from(model, None, do_sample=True, top_k=0, **kw)
    torch.manual_seed(0)
    again = engine.decode(model, enc["input_ids"], enc["attention_mask"], sampled).sequences
    other = engine.decode(model, enc["input_ids"], enc["attention_mask"], sampled).sequences
    assert torch.equal(again, seq) and not torch.equal(other, seq)


def _int4_agreement(base, qwen_dir, tok, label, seed, weights="int4", mode="int4", bits=4, kernel="tinygemm"):
    """``base`` with random LoRA r 16 on every linear layer, decoded by the engine with int4 copies (compiled step,
    CUDA graph), against a reference (the bf16 model of ``qwen_dir`` with the int4 forms as plain weights,
    conftest.int4_reference), teacher-forced: greedy tokens are its argmax, sampled tokens' log-probs its."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from conftest import int4_reference
    from sdgrpo.engine import DecodeEngine, sampling_from

    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")).eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    reference = int4_reference(AutoModelForCausalLM.from_pretrained(qwen_dir, dtype=torch.bfloat16).cuda(), model,
                               bits, kernel)

    enc = tok(["In the beginning God created", "And the LORD said unto Noah", "Then the king", "It was a dark"],
              return_tensors="pt", padding=True, padding_side="left").to("cuda")
    kw = dict(max_new_tokens=48, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    width = enc["input_ids"].size(1)

    def teacher_forced(seq):
        mask = torch.cat([enc["attention_mask"], torch.ones_like(seq[:, width:])], 1)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        with torch.no_grad():
            return reference(input_ids=seq, attention_mask=mask, position_ids=positions).logits.float()[:, width - 1:-1]

    def live(seq):
        ended = torch.cumsum((seq[:, width:] == tok.eos_token_id).int(), 1)
        return (ended == 0) | ((ended == 1) & (seq[:, width:] == tok.eos_token_id))

    engine = DecodeEngine(compile=True, generation_weights=weights, int4_kernel=kernel)
    got = engine.generate(model, **enc, do_sample=False, **kw)
    assert engine.mode == mode and engine.captures >= 1
    assert mode != "int4" or engine.quantised.kernel == kernel
    agreement = (teacher_forced(got).argmax(-1) == got[:, width:])[live(got)].float().mean().item()
    torch.manual_seed(0)
    out = engine.decode(model, enc["input_ids"], enc["attention_mask"],
                        sampling_from(model, None, do_sample=True, top_k=0, **kw))
    ref = torch.log_softmax(teacher_forced(out.sequences), -1).gather(-1, out.sequences[:, width:, None])[..., 0]
    diff = (out.logprobs - ref).abs()[live(out.sequences)]
    print(f"{label}: engine token = reference argmax {agreement:.3f}; sampled log-probs |diff| mean "
          f"{diff.mean():.3g}, max {diff.max():.3g}")
    assert agreement >= 0.97 and diff.mean() < 0.05


def test_int4_copies_on_the_gpu_decode_as_a_model_with_their_weights(qwen_dir, tiny_tokenizer):
    """bf16 base (Qwen2.5-0.5B layer shape): the int4 copies, through tinygemm's CUDA kernel in a captured step,
    decode as the independent reference does."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(qwen_dir, dtype=torch.bfloat16).cuda()
    _int4_agreement(base, qwen_dir, tiny_tokenizer, "bf16 base, int4 copies", seed=1)


def test_a_4bit_base_decodes_through_int4_copies(qwen_dir, tiny_tokenizer):
    """NF4 base (bitsandbytes, as --backend hf --load_in_4bit loads it) with QLoRA adapters: the engine serves every
    LoRA layer from int4 copies of dequantised base + LoRA (never bitsandbytes' per-token dequantisation), and they
    decode as the independent reference does."""
    from sdgrpo.modeling import load_model

    base = load_model(str(qwen_dir), torch.bfloat16, "cuda", load_in_4bit=True)
    _int4_agreement(base, qwen_dir, tiny_tokenizer, "NF4 base, int4 copies", seed=2)


def test_gemlite_reads_the_copies_as_its_reference_and_packs_as_gemlite_does():
    """GemliteLinear on the GPU (gemlite's A16W4 kernel) against its own dequantised matmul at 1, 8, 32 and 2,500 rows
    (a prefill's, in slices), on the 7B shape's gate/up stack, loaded in two parts by the refresh's Triton kernel
    (int4_pack, compiled): its words, scales and lows are quantise_affine then pack_gemlite's to the bit; and
    pack_gemlite's words equal those of gemlite's own packing (``GemLiteLinear.pack``) for the same values."""
    from gemlite import DType, GemLiteLinear

    from sdgrpo.engine import GemliteLinear, pack_gemlite, quantise_affine

    torch.manual_seed(0)
    n, k = 2 * 18944, 3584
    w = torch.randn(n, k, device="cuda") * 0.02
    layer = GemliteLinear(n, k, 64, "cuda", bias=False)
    values = torch.empty(n, k, dtype=torch.uint8, device="cuda")
    layer.load(values, 0, w[:5000])
    layer.load(values, 5000, w[5000:])
    layer.pack(values)
    q, scale, low = quantise_affine(w, 64)
    assert torch.equal(layer.W_q, pack_gemlite(q))
    assert torch.equal(layer.scales, scale.t()) and torch.equal(layer.zeros, low.t())
    reference = layer.dequantised()
    for rows in (1, 8, 32, 2500):  # 2,500: a prefill, in slices of GEMLITE_PREFILL_SLICE (the last padded)
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        got, want = layer(x).float(), (x.float() @ reference.float().t())
        assert (got - want).abs().max() < 0.02 * want.abs().max(), rows
    theirs = GemLiteLinear(4, group_size=64, in_features=k, out_features=n, input_dtype=DType.BF16,
                           output_dtype=DType.BF16)
    theirs.pack(q, scale, -low.float() / scale.float(), fma_mode=True, packing_bitwidth=32)
    assert torch.equal(theirs.W_q, pack_gemlite(q))


@pytest.mark.parametrize("group", [32, 64, 128])
def test_the_refresh_kernel_compiled_writes_the_cuda_torch_quantisers_values(group):
    """engine/int4_pack.py compiled (the CPU tests run it in Triton's interpreter): rows not a multiple of its block,
    at a column offset, from float32 and bf16 weights, with constant groups, exact ties and a NaN group; the words,
    scales and lows written are quantise_affine then pack_gemlite's on CUDA to the bit (NaN where torch gives NaN)."""
    from sdgrpo.engine import pack_gemlite, quantise_affine
    from sdgrpo.engine.int4_pack import quantise_pack_into

    torch.manual_seed(group)
    rows, k, first = 1000, 1024, 24
    w = torch.randn(rows, k, device="cuda") * torch.logspace(-3, 1, k, device="cuda")
    w[3, :group] = 0.25
    w[8, :group] = 0.0
    w[8, :16] = torch.arange(16, device="cuda") * 2.0 ** -7 + 2.0 ** -8
    w[8, 15] = 15 * 2.0 ** -7
    w[11, group + 1] = float("nan")
    for weight in (w, w.to(torch.bfloat16)):
        q, scale, low = quantise_affine(weight.float(), group)
        words = torch.full((k // 8, first + rows + 8), -7, dtype=torch.int32, device="cuda")
        meta = torch.full((2, k // group + 2, first + rows + 8), -3.0, dtype=torch.bfloat16, device="cuda")
        quantise_pack_into(weight, words, meta[0, :k // group], meta[1, :k // group], first, group)
        cols = slice(first, first + rows)
        ok = ~scale.t().isnan()
        assert int((~ok).sum()) == 1 and bool(meta[0, 1, first + 11].isnan()) and bool(meta[1, 1, first + 11].isnan())
        assert torch.equal(meta[0, :k // group, cols][ok], scale.t()[ok])
        assert torch.equal(meta[1, :k // group, cols][ok], low.t()[ok])
        clean = torch.ones(rows, dtype=torch.bool, device="cuda")
        clean[11] = False
        assert torch.equal(words[:, cols][:, clean], pack_gemlite(q)[:, clean])
        assert bool((words[:, :first] == -7).all()) and bool((meta[:, k // group:] == -3).all())


def _replayed(layer, static):
    """``layer(static)`` captured as a CUDA graph (after a call on a side stream) and replayed once new random values
    are written into ``static``: the graph's output."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        layer(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer(static)
    static.copy_(torch.randn_like(static))
    graph.replay()
    torch.cuda.synchronize()
    return out


def test_the_tuned_gemlite_configurations_reach_its_kernel_and_read_as_the_reference():
    """engine.gemlite_tuned on this card: the shipped file's entries are in gemlite's table after the first
    GemliteLinear (pins ``GemLiteLinear.load_config`` and ``gemlite.core.GEMLITE_TRITON_CONFIG_CACHE``), the kernel
    runs each entry's configuration (its autotuner's choice), and every tuned shape reads as its dequantised
    reference at the entry's rows, eagerly and from a CUDA graph (NaN in the scales' padding would show)."""
    import gemlite.core
    from gemlite.triton_kernels import gemm_splitK_kernels

    from sdgrpo.engine import GemliteLinear, gemlite_tuned

    path = gemlite_tuned.file_for(torch.cuda.get_device_name())
    if path is None:
        pytest.skip(f"no tuned gemlite file for {torch.cuda.get_device_name()}")
    table = json.loads(path.read_text())["GEMM_SPLITK"]
    torch.manual_seed(0)
    for signature, entry in table.items():
        rows, n, k, group, _, _ = gemlite_tuned.signature_key(signature)
        layer = GemliteLinear(n, k, group, "cuda", bias=False)
        layer.load(None, 0, torch.randn(n, k, device="cuda") * 0.02)
        assert gemlite.core.GEMLITE_TRITON_CONFIG_CACHE["GEMM_SPLITK"][signature] == entry
        reference = layer.dequantised().float()
        gemm_splitK_kernels.gemm_splitK_INT_kernel.cache.clear()
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        want = x.float() @ reference.t()
        got = layer(x).float()
        assert torch.isfinite(got).all() and (got - want).abs().max() < 0.02 * want.abs().max(), signature
        (chosen,) = gemm_splitK_kernels.gemm_splitK_INT_kernel.cache.values()
        assert {name: chosen.kwargs[name] for name in ("BLOCK_SIZE_N", "BLOCK_SIZE_K", "SPLIT_K")} == {
            name: entry[name] for name in ("BLOCK_SIZE_N", "BLOCK_SIZE_K", "SPLIT_K")}, signature
        assert (chosen.num_warps, chosen.num_stages) == (entry["num_warps"], entry["num_stages"]), signature
        out = _replayed(layer, x).float()
        want = x.float() @ reference.t()
        assert torch.isfinite(out).all() and (out - want).abs().max() < 0.02 * want.abs().max(), signature
        del layer
        torch.cuda.empty_cache()


@pytest.mark.parametrize("out_features, in_features, bias", [(1152, 896, True), (896, 896, False), (9728, 896, False),
                                                           (896, 4864, False), (4608, 3584, True),
                                                           (3584, 18944, False)])
def test_gemlite_reads_the_qwen_widths_eagerly_and_from_a_cuda_graph(out_features, in_features, bias):
    """GemliteLinear on the Qwen2.5-0.5B and 7B groups (input widths 896, 4,864, 3,584, 18,944: not all multiples of
    gemlite's BLOCK_SIZE_K x SPLIT_K) at the rows the engine decodes (1, 4) and prefills (40), eagerly and replayed
    from a captured CUDA graph with new inputs: finite and within 2% of its dequantised reference. Written after the
    engine decoded the 0.5B shape to NaN (2026-12-07), to find which width and path does it."""
    from sdgrpo.engine import GemliteLinear

    torch.manual_seed(0)
    n, k = out_features, in_features
    layer = GemliteLinear(n, k, 64, "cuda", bias=bias)
    values = torch.empty(n, k, dtype=torch.uint8, device="cuda")
    layer.load(values, 0, torch.randn(n, k, device="cuda") * 0.02)
    layer.pack(values)
    if bias:
        layer.bias.data.normal_(0, 0.5)
    reference = layer.dequantised().float()

    def want(x):
        return x.float() @ reference.t() + (layer.bias.float() if bias else 0)

    for rows in (1, 4, 40):
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        got = layer(x).float()
        assert torch.isfinite(got).all() and (got - want(x)).abs().max() < 0.02 * want(x).abs().max(), ("eager", rows)
        static = x.clone()
        got = _replayed(layer, static).float()
        assert torch.isfinite(got).all() and (got - want(static)).abs().max() < 0.02 * want(static).abs().max(), (
            "graph", rows)


def test_a_4bit_base_decodes_through_gemlite_int4_copies(qwen_dir, tiny_tokenizer):
    """NF4 base with QLoRA adapters, int4 copies read by gemlite's kernels in the captured step: they decode as the
    independent reference (the affine forms as plain bf16 weights) does."""
    from sdgrpo.modeling import load_model

    base = load_model(str(qwen_dir), torch.bfloat16, "cuda", load_in_4bit=True)
    _int4_agreement(base, qwen_dir, tiny_tokenizer, "NF4 base, gemlite int4 copies", seed=4, kernel="gemlite")


def test_copies_not_held_free_their_memory_and_decode_from_a_new_graph_as_held_ones(qwen_dir, tiny_tokenizer):
    """NF4 base, gemlite int4 copies, ``hold_copies`` false: after each call the copies' memory is allocated no more
    (at least half their weights' bytes below what the engine that holds them keeps, and no more after the third
    call than after the first), the next call captures its CUDA graph again on the new addresses where they moved,
    and its greedy tokens are the held engine's (but for near-ties)."""
    from peft import LoraConfig, get_peft_model

    from sdgrpo.engine import DecodeEngine
    from sdgrpo.modeling import load_model

    base = load_model(str(qwen_dir), torch.bfloat16, "cuda", load_in_4bit=True)
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")).eval()
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    enc = tiny_tokenizer(["In the beginning God created", "Then the king"], return_tensors="pt", padding=True,
                         padding_side="left").to("cuda")
    kw = dict(max_new_tokens=32, pad_token_id=tiny_tokenizer.pad_token_id, eos_token_id=tiny_tokenizer.eos_token_id)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    held = DecodeEngine(compile=True, generation_weights="int4", int4_kernel="gemlite")
    want = [held.generate(model, **enc, do_sample=False, **kw) for _ in range(3)]
    torch.cuda.synchronize()
    held_growth = torch.cuda.memory_allocated() - before
    del held
    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    freed = DecodeEngine(compile=True, generation_weights="int4", int4_kernel="gemlite", hold_copies=False)
    grown = []
    for call in range(3):
        got = freed.generate(model, **enc, do_sample=False, **kw)  # split-K sums in any order: near-ties may flip
        assert got.shape == want[call].shape and (got == want[call]).float().mean() > 0.95
        copies = [c for known in freed.quantised.groups.values() for c, _ in known.values()]
        weights = sum(c.in_features * c.out_features // 2 for c in copies)
        assert weights > 0 and all(c.W_q.numel() == 0 for c in copies)
        # the cache and the graph's pool only: at least half the copies' weights below what the held engine kept (a
        # bound of the weights' bytes alone failed on an H100 at 33.8 MB for 29.8 MB of weights, 2026-12-07: the
        # cache and pool of this small shape weigh about as much as its copies)
        grown.append(torch.cuda.memory_allocated() - before)
        assert held_growth - grown[-1] > weights / 2, (held_growth, weights)
    # later calls hold what the first held: the second once held exactly 32 MiB more (36.3 then 69.9 MB, one H100,
    # 2026-12-07), the size of a cuBLAS workspace there; engine._capture now clears them as inductor does
    assert freed.captures >= 1 and max(grown) - grown[0] < 2**20, grown


def test_a_4bit_base_decodes_through_16bit_copies_where_they_fit(qwen_dir, tiny_tokenizer):
    """NF4 base, ``generation_weights`` auto with the card's memory and tinygemm reading int4 (with gemlite, int4
    copies come first): every LoRA layer served by a 16-bit copy of
    the dequantised base + LoRA (mode ``dequantised``), decoding as the reference with those weights does."""
    from sdgrpo.modeling import load_model

    base = load_model(str(qwen_dir), torch.bfloat16, "cuda", load_in_4bit=True)
    _int4_agreement(base, qwen_dir, tiny_tokenizer, "NF4 base, 16-bit copies", seed=3, weights="auto",
                    mode="dequantised", bits=16, kernel="tinygemm")


@pytest.mark.parametrize("weights, kernel, mode, line", [
    ("int4", "tinygemm", 2.0, "int4 generation copies"),
    ("auto", "gemlite", 2.0, "int4 generation copies of the quantised base, read by gemlite"),
    ("auto", "tinygemm", 3.0, "16-bit generation copies of the dequantised base"),
    ("auto", "auto", None, None)])
def test_hf_backend_trains_a_4bit_base_with_corrected_rollouts(weights, kernel, mode, line, qwen_dir, prepared,
                                                               tmp_path):
    """`sdgrpo train --backend hf --load_in_4bit true`: 3 steps, rollouts from int4 copies (engine/mode 2; as asked,
    or first with gemlite reading them) or, by default, 16-bit copies of the dequantised base (mode 3) where they
    fit, their mismatch with the policy logged and corrected every step."""
    if kernel == "auto":  # the defaults: gemlite's int4 copies first on an H100 (where installed), else 16-bit copies
        from sdgrpo.engine import auto_int4_kernel

        gemlite = auto_int4_kernel()[0] == "gemlite"
        mode, line = ((2.0, "int4 generation copies of the quantised base, read by gemlite") if gemlite else
                      (3.0, "16-bit generation copies of the dequantised base"))
    steps = _train(qwen_dir, prepared, tmp_path / "hf4", "hf", "--load_in_4bit", "true", "--generation_weights",
                   weights, "--generation_int4_kernel", kernel, compiled=True)
    for x in steps:
        assert x["engine/mode"] == mode, x
        assert math.isfinite(x["sampling/sampling_logp_difference/mean"]) and "sampling/kl" in x
    log = (tmp_path / "hf4" / "stderr.log").read_text()
    assert line in log and "rollouts corrected by importance sampling" in log
