"""Decoding speed on the GPU: sdgrpo's engine against transformers' generate, against the memory-bandwidth limit.

Per shape (Qwen2.5-0.5B and -1.5B configs, 32k vocabulary, random bf16 weights) and per variant, one batch of G=8
rows of 128 prompt tokens decoded to exactly 512 new tokens (min_new_tokens = max_new_tokens, so no row stops
early), sampling at T=1:

  generate           PEFT LoRA r16 (unmerged), transformers' generate, dynamic cache (what TRL runs by default)
  generate_compiled  the same with a static cache and transformers' compiled decoding step
  engine             sdgrpo.engine.DecodeEngine: static cache, compiled step captured as one CUDA graph, LoRA folded,
                     sibling projections (q k v; gate up) as one matmul, grouped-query attention without per-head
                     copies of the keys and values (its defaults)
  engine_unfused     the engine with one matmul per projection (fuse_projections=False)
  engine_cdt         the engine compiled with Inductor's coordinate-descent tuning of its generated kernels
  engine_autotune    the engine compiled with mode="max-autotune-no-cudagraphs" (matrix kernels tuned for the
                     decoding batch; the engine captures the graph itself)
  engine_repeat_kv   the engine with transformers' SDPA function, which copies every key/value head once per query
                     head of its group (DecodeEngine(grouped_attention=False))
  engine_eager       the engine without compiling the step
  engine_no_lora     the engine on the model without adapters (what folding is measured against)
  engine_int4        the engine decoding int4 copies of base + LoRA (generation_weights="int4"; refreshed, i.e.
                     quantised again, at every call: in the time)
  engine_unmerged    the engine with LoRA unmerged (a memory budget that holds no copy; A matrices stacked)
With BENCH_KERNELS=1, first the matrix kernels alone on the shape's projections (rows 1 and 8): bf16 F.linear
against PyTorch's int4 weight-only matmul (tinygemm), time and bandwidth of the bytes each reads.

Reports tokens/s, ms per decoding step (a step makes one token for each of the 8 rows), peak memory above the
model, and the ratio to the bandwidth limit: the bytes of the weights that one step reads (every parameter once)
divided by the device's copy bandwidth measured in the same run. Also the greedy agreement of the engine with
generate in bf16 (fraction of identical tokens over 8 x 128 greedy tokens). Warm-up: one call per variant (it
compiles), then the median of 3. With BENCH_PROFILE=1, one more engine call runs under torch.profiler and the GPU
time per kernel family goes to OUT_DIR/profile_<shape>.txt (where a decoding step's time goes).

    python benchmarks/bench_generate.py OUT_DIR [shape ...]
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

G, PROMPT, NEW, REPEATS = 8, 128, 512, 3
VARIANTS = ["generate", "generate_compiled", "engine", "engine_unfused", "engine_cdt",
            "engine_repeat_kv", "engine_autotune", "engine_eager", "engine_no_lora", "engine_int4", "engine_unmerged"]
REPEATS = int(os.environ.get("BENCH_REPEATS", REPEATS))


def timed(fn) -> tuple[float, float, object]:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()  # warm-up (compiles)
    torch.cuda.synchronize()
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / 2**30, out


def profile(engine, model, input_ids, mask, common: dict, path: Path) -> None:
    """One warm engine call under torch.profiler: GPU time by kernel, and the step's GPU time against its wall time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        engine.generate(model, input_ids=input_ids, attention_mask=mask, **common)
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    table = events.table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=90)
    path.write_text(f"wall {wall:.3f} s (profiled), GPU kernel time {gpu_us / 1e6:.3f} s\n{table}\n")
    print(f"profile: wall {wall:.3f} s, GPU kernel time {gpu_us / 1e6:.3f} s -> {path}", flush=True)


def kernel_rates(shape: str, bandwidth: float) -> list[dict]:
    """bf16 ``F.linear`` against the int4 weight-only matmul on the shape's projections (q k v stacked, o, gate up
    stacked, down), rows 1 and 8: microseconds per call (median of 200 after a warm-up) and the share of the copy
    bandwidth that the bytes each reads make."""
    from common import SHAPES

    from sdgrpo.engine import Int4Linear, int4_layout

    c = SHAPES[shape]
    h, i = c["hidden_size"], c["intermediate_size"]
    kv = c["num_key_value_heads"] * h // c["num_attention_heads"]
    rows = []
    for name, n, k in (("qkv", h + 2 * kv, h), ("o", h, h), ("gate_up", 2 * i, h), ("down", h, i)):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        group, tiles = int4_layout(n, k)
        q = Int4Linear(n, k, group, tiles, "cuda", bias=False)
        values = torch.empty(n, k, dtype=torch.uint8, device="cuda")
        q.load(values, 0, w.float())
        q.pack(values)
        for m in (1, 8):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            for label, fn, nbytes in (("bf16", lambda: torch.nn.functional.linear(x, w), w.numel() * 2),
                                      ("int4", lambda: q(x), Int4Linear.nbytes(n, k, group))):
                for _ in range(10):
                    fn()
                torch.cuda.synchronize()
                times = []
                for _ in range(200):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn()
                    end.record()
                    end.synchronize()
                    times.append(start.elapsed_time(end) * 1000)
                us = statistics.median(times)
                rows.append({"projection": name, "shape": [n, k], "rows": m, "kernel": label, "us": us,
                             "bandwidth_share": nbytes / (us / 1e6) / bandwidth})
                print(shape, json.dumps(rows[-1]), flush=True)
    return rows


def run_shape(shape: str, bandwidth: float) -> dict:
    from common import random_model
    from peft import LoraConfig, get_peft_model

    from sdgrpo.engine import DecodeEngine
    from sdgrpo.modeling import choose_attention_kernels

    choose_attention_kernels(False)  # as `sdgrpo train` runs
    kernels = kernel_rates(shape, bandwidth) if os.environ.get("BENCH_KERNELS") else None
    base = random_model(shape, vocab_size=32768)
    weight_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=targets, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    model.eval()
    gen = torch.Generator(device="cuda").manual_seed(0)
    input_ids = torch.randint(3, 32768, (G, PROMPT), device="cuda", generator=gen)
    mask = torch.ones_like(input_ids)
    common = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                  pad_token_id=2, eos_token_id=1)
    limit_ms = 1000 * weight_bytes / bandwidth
    rows = []
    engines = {}
    for variant in os.environ.get("BENCH_VARIANTS", " ".join(VARIANTS)).split():
        torch.manual_seed(0)
        if variant.startswith("generate"):
            extra = (dict(cache_implementation="static", disable_compile=False) if variant == "generate_compiled"
                     else dict(disable_compile=True))

            def fn(extra=extra):
                return model.generate(input_ids=input_ids, attention_mask=mask, **common, **extra)
        else:
            mode = "max-autotune-no-cudagraphs" if variant == "engine_autotune" else "default"
            engine = engines[variant] = DecodeEngine(
                compile=variant != "engine_eager", compile_mode=mode, grouped_attention=variant != "engine_repeat_kv",
                fuse_projections=variant != "engine_unfused",
                generation_weights="int4" if variant == "engine_int4" else "model",
                memory_budget_gib=1.0 if variant == "engine_unmerged" else None)

            def fn(engine=engine):
                return engine.generate(model, input_ids=input_ids, attention_mask=mask, **common)
        if variant == "engine_no_lora":
            with model.disable_adapter():  # the base alone (the copies then equal the base weights)
                seconds, peak, out = timed(fn)
        elif variant == "engine_cdt":
            import torch._inductor.config as inductor

            torch._dynamo.reset()  # compiled afresh with the tuning, and afresh after it
            inductor.coordinate_descent_tuning = True
            try:
                seconds, peak, out = timed(fn)
            finally:
                inductor.coordinate_descent_tuning = False
                torch._dynamo.reset()
        else:
            seconds, peak, out = timed(fn)
        assert out.shape == (G, PROMPT + NEW), out.shape
        step_ms = 1000 * seconds / NEW
        if variant == "engine_int4":  # the refresh alone (quantising every copy again), and what one step reads
            from sdgrpo.engine import Int4Linear, _quantisable_lora_layers

            layers = _quantisable_lora_layers(model)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with engine.quantised(model, layers):
                torch.cuda.synchronize()
                refresh = time.perf_counter() - t0
                copies = {id(m): m for m in model.modules() if isinstance(m, Int4Linear)}.values()
                read = sum(Int4Linear.nbytes(m.out_features, m.in_features, m.group) for m in copies) + sum(
                    p.numel() * p.element_size() for n, p in model.named_parameters() if "norm" in n or "lm_head" in n)
            print(shape, f"int4 refresh {refresh:.3f} s; one step reads {read / 2**30:.2f} GiB "
                  f"({1000 * read / bandwidth:.3f} ms at the copy bandwidth)", flush=True)
        rows.append({"variant": variant, "seconds": seconds, "ms_per_step": step_ms, "mode": getattr(
                         engines.get(variant), "mode", None),
                     "graphs_captured": engines[variant].captures if variant in engines else None,
                     "tokens_per_s": G * NEW / seconds, "x_bandwidth_limit": step_ms / limit_ms,
                     "peak_gib_above_model": peak})
        print(shape, json.dumps(rows[-1]), flush=True)
    profiled = os.environ.get("BENCH_PROFILE_VARIANT", "engine")
    if os.environ.get("BENCH_PROFILE") and profiled in engines:
        profile(engines[profiled], model, input_ids, mask, common, Path(sys.argv[1]) / f"profile_{shape}.txt")
    # greedy agreement in bf16: engine (LoRA folded, compiled) against generate (unmerged, dynamic cache), as whole
    # sequences and step by step (the engine's token against the unmerged model's argmax after the same prefix;
    # random weights give near-flat distributions, so near-ties flip under bf16 rounding)
    greedy = dict(max_new_tokens=128, do_sample=False, pad_token_id=2, eos_token_id=1)
    want = model.generate(input_ids=input_ids, attention_mask=mask, disable_compile=True, **greedy)[:, PROMPT:]
    engine = engines.get("engine") or DecodeEngine()
    got_full = engine.generate(model, input_ids=input_ids, attention_mask=mask, **greedy)
    got = got_full[:, PROMPT:]
    n = min(want.size(1), got.size(1))
    agree = (want[:, :n] == got[:, :n]).float().mean().item()
    with torch.no_grad():
        logits = model(input_ids=got_full, attention_mask=torch.ones_like(got_full)).logits[:, PROMPT - 1 : -1]
    step_agree = (logits.argmax(-1) == got).float().mean().item()
    return {"shape": shape, "weight_bytes": weight_bytes, "bandwidth_limit_ms_per_step": limit_ms,
            "greedy_agreement_bf16": agree, "greedy_step_agreement_bf16": step_agree,
            "variants": rows, "kernels": kernels}


def main() -> None:
    from common import copy_bandwidth, environment, save

    out = Path(sys.argv[1] if len(sys.argv) > 1 else HERE / "results")
    shapes = sys.argv[2:] or ["qwen2.5-0.5b", "qwen2.5-1.5b"]
    bandwidth = copy_bandwidth()
    print("copy bandwidth GB/s", bandwidth / 1e9, flush=True)
    env = environment()
    device = env["device"].lower().replace("nvidia ", "").split()[0]
    results = []
    for shape in shapes:
        results.append(run_shape(shape, bandwidth))
        torch.cuda.empty_cache()  # the shape's model is gone with run_shape's frame
        payload = {"benchmark": "decoding", "config": {"G": G, "prompt_tokens": PROMPT, "new_tokens": NEW,
                                                       "lora_r": 16, "vocab": 32768, "dtype": "bfloat16",
                                                       "repeats": REPEATS},
                   "copy_bandwidth_gb_s": bandwidth / 1e9, **env, "results": results}
        save(f"bench_generate_{device}_{env['date'][:10]}", payload, out)  # after every shape: survives a time-out


if __name__ == "__main__":
    main()
