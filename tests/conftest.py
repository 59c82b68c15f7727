"""Shared fixtures: the test corpus (tests/data), tiny models built on the spot, the CLI, a prepared dataset."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CORPUS = Path(__file__).resolve().parent / "data" / "kjv"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():  # Triton kernels run in its interpreter on CPU; set before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")


RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def recorded_seconds(results: Path = RESULTS) -> dict[str, float]:
    """Each test's seconds in the newest GPU suite record (``gpu_tests_*.json`` by its date; benchmarks/gpu_suite.py),
    keyed as pytest's junit XML names a test: ``tests.gpu.test_gpu::test_name[param]``."""
    import json

    records = [json.loads(f.read_text()) for f in results.glob("gpu_tests_*.json")]
    if not records:
        return {}
    newest = max(records, key=lambda r: r["date"])
    return {t["test"]: t["seconds"] for row in newest["rows"] for t in row.get("tests", [])}


def longest_first(items: list, seconds: dict[str, float]) -> None:
    """``items`` sorted in place by their recorded seconds, longest first, and tests without a record before them all
    (a new test may be long). pytest-xdist's load scheduling hands tests out in this order, two queued a worker, so
    the longest do not start last: from the record of 2026-12-07 (one H100, six workers) that order simulates to
    255 s, random orders to 275-312 s."""
    def key(item):
        path, _, name = item.nodeid.partition("::")
        return -seconds.get(f"{path.removesuffix('.py').replace('/', '.')}::{name}", float("inf"))

    items.sort(key=key)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        longest_first(items, recorded_seconds())
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def run_cli(*args, env: dict | None = None, timeout: int = 600, cwd=None) -> subprocess.CompletedProcess:
    """``python -m sdgrpo.cli ARGS`` in a subprocess, output captured as text."""
    return subprocess.run([sys.executable, "-m", "sdgrpo.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=None if env is None else {**os.environ, **env})


def reference_logps(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """log p(completion[t] | prompt + completion[:t]) from one unpadded forward of the sequence alone (fp64
    log-softmax): the independent computation every scoring path is checked against."""
    ids = torch.tensor([list(prompt) + list(completion)], device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double().cpu()
    model.train(was_training)
    logp = torch.log_softmax(logits, dim=-1)
    return torch.stack([logp[len(prompt) - 1 + t, tok] for t, tok in enumerate(completion)])


@pytest.fixture(scope="session")
def corpus() -> Path:
    """The shipped test corpus: six public-domain books (tests/data/SOURCE.md); ruth.txt is BOM + CRLF."""
    return CORPUS


@pytest.fixture(scope="session")
def tiny_tokenizer(corpus):
    """A 512-token byte-level BPE trained on the spot, with BOS added like Llama's."""
    from sdgrpo.config import tiny_model_recipe

    train_tokenizer = tiny_model_recipe().train_tokenizer

    text = (corpus / "genesis.txt").read_text()[:200_000]
    return train_tokenizer([text], 512)


def make_llama(tokenizer, seed: int = 0, layers: int = 2, hidden: int = 64, **config):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=config.pop("intermediate_size", 2 * hidden),
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **config,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A 2-layer Llama with random weights saved as a model folder (safetensors)."""
    path = tmp_path_factory.mktemp("tiny-llama-random")
    make_llama(tiny_tokenizer).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, tiny_model_dir, corpus) -> Path:
    """`sdgrpo prepare` of one book with the random model's tokenizer (prompts of 16-24 tokens)."""
    out = tmp_path_factory.mktemp("prepared")
    r = run_cli("prepare", corpus / "exodus.txt", "--output", out, "--model", tiny_model_dir,
                "--max_prompt_tokens", "24")
    assert r.returncode == 0, r.stderr
    assert "prompts" in r.stdout
    return out


@pytest.fixture(scope="session")
def shipped():
    """The shipped tiny model (fp32) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sdgrpo.config import TINY_MODEL

    tok = AutoTokenizer.from_pretrained(TINY_MODEL)
    return AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32).eval(), tok


@pytest.fixture(scope="session")
def teacher_student_batch(tiny_tokenizer):
    """Two random Llamas (a 3-layer teacher, a 2-layer student) and prompt/completion ids of different lengths."""
    teacher, student = make_llama(tiny_tokenizer, seed=11, layers=3), make_llama(tiny_tokenizer, seed=12)
    g = torch.Generator().manual_seed(0)
    prompts = [[tiny_tokenizer.bos_token_id] + torch.randint(2, 512, (n,), generator=g).tolist() for n in (4, 9, 2)]
    comps = [torch.randint(2, 512, (n,), generator=g).tolist() for n in (6, 1, 12)]
    comps[1].append(tiny_tokenizer.eos_token_id)
    return teacher, student, prompts, comps


@pytest.fixture(scope="module")
def cases(tiny_tokenizer):
    """Prompts and completions of different lengths; some completions end with EOS, one is EOS alone."""
    eos = tiny_tokenizer.eos_token_id
    g = torch.Generator().manual_seed(1)
    prompts, completions = [], []
    for n_prompt, n_comp, with_eos in [(3, 5, False), (11, 1, True), (1, 17, True), (7, 9, False), (20, 2, False),
                                       (5, 30, True), (2, 0, True)]:
        prompt = [tiny_tokenizer.bos_token_id] + torch.randint(2, 512, (n_prompt,), generator=g).tolist()
        comp = torch.randint(2, 512, (n_comp,), generator=g).tolist() + ([eos] if with_eos else [])
        prompts.append(prompt)
        completions.append(comp)
    return prompts, completions


def boost(model, token: int, logit: float, tokenizer, text: str) -> None:
    """Make ``token`` likely after any context (logit about ``logit`` above a near-uniform rest): random models
    would otherwise almost never end a completion."""
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state[0]  # [T, H] after the final norm
        direction = hidden.mean(0)
        model.lm_head.weight[token] = logit * direction / direction.norm() ** 2


def int4_dequantised(weight: torch.Tensor, group: int) -> torch.Tensor:
    """The weight an int4 generation copy stands for, from tinygemm's definition ``w = (q - 8) * scale + zero``, in
    fp32."""
    from sdgrpo.engine import quantise_int4

    q, scales_zeros = quantise_int4(weight, group)
    n, k = q.shape
    scale, zero = scales_zeros[..., 0].t().float(), scales_zeros[..., 1].t().float()  # [N, K / group]
    return ((q.reshape(n, k // group, group).float() - 8) * scale[..., None] + zero[..., None]).reshape(n, k)


def affine_dequantised(weight: torch.Tensor, group: int) -> torch.Tensor:
    """The weight a gemlite int4 copy stands for, from hqq's affine definition ``w = q * scale + low`` with the group's
    low and scale rounded to bf16 and q the nearest level, in fp32 (computed here, not by the engine)."""
    n, k = weight.shape
    w = weight.float().reshape(n, k // group, group)
    low = w.amin(-1).to(torch.bfloat16).float()
    scale = ((w.amax(-1) - w.amin(-1)).clamp(min=1e-6) * (1 / 15)).to(torch.bfloat16).float()  # as the engine's
    q = ((w - low[..., None]) / scale[..., None]).round().clamp(0, 15)
    return (q * scale[..., None] + low[..., None]).reshape(n, k)


def int4_reference(reference, lora, bits: int = 4, kernel: str = "tinygemm"):
    """``reference`` (a plain model of ``lora``'s base architecture) given, for every LoRA layer of ``lora`` that an
    int4 copy serves, the dequantised int4 form of base + LoRA (a bitsandbytes base dequantised first): the model an
    int4 sampler stands for, made without the engine's copies."""
    from peft.utils.integrations import dequantize_bnb_weight

    from sdgrpo.engine import _quantisable_lora_layers, gemlite_layout, int4_layout

    served = {id(m) for m in _quantisable_lora_layers(lora, bits, kernel)}
    with torch.no_grad():
        for name, module in lora.named_modules():
            if id(module) not in served:
                continue
            weight = module.base_layer.weight
            if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                weight = dequantize_bnb_weight(weight, state=getattr(module.base_layer, "state", None))
            merged = weight.float() + (module.lora_B["default"].weight.float() @ module.lora_A["default"].weight.float()
                                       ) * module.scaling["default"]
            target = reference.get_submodule(name.removeprefix("base_model.model."))
            if bits == 4 and kernel == "gemlite":
                merged = affine_dequantised(merged, gemlite_layout(*merged.shape))
            elif bits == 4:
                merged = int4_dequantised(merged, int4_layout(*merged.shape)[0])
            target.weight.copy_(merged.to(target.weight.dtype))
    return reference


def with_lora(model, std: float, seed: int):
    """``model`` with LoRA r 4 on every linear layer and non-zero B matrices (N(0, std)), in eval mode: adapters that
    change the model's outputs, so that a path which ignored them would give other numbers."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)
    return peft_model.eval()


def make_qwen2(vocab: int = 1000, seed: int = 0, layers: int = 2, hidden: int = 32, tie: bool = True):
    """A random Qwen2 (tied embeddings, as Qwen2.5's small models) with a vocabulary of ``vocab`` ids."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=2 * hidden, max_position_embeddings=512,
                         tie_word_embeddings=tie, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return Qwen2ForCausalLM(config).eval()


class LargestLogits:
    """Records the largest tensor (most elements) whose last dimension is ``vocab`` that any operation makes while
    it is on, forward and backward (a torch dispatch mode sees every kernel call; views are not new tensors). A
    tensor of the LM head's transposed shape ``(hidden, vocab)`` (its weight's gradient) is not logits: not counted
    when ``hidden`` is given."""

    def __init__(self, vocab: int, hidden: int | None = None):
        from torch.utils._python_dispatch import TorchDispatchMode

        record = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in torch.utils._pytree.tree_leaves(out):
                    if (isinstance(t, torch.Tensor) and t.dim() and t.size(-1) == record.vocab and not t._is_view()
                            and tuple(t.shape) != (record.hidden, record.vocab) and t.numel() > record.largest):
                        record.largest, record.shape = t.numel(), tuple(t.shape)
                return out

        self.vocab, self.hidden, self.largest, self.shape, self.mode = vocab, hidden, 0, None, Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)
