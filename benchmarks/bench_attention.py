"""One decoded token's attention under grouped-query attention with a padding mask, the way the engine's step runs it.

Per shape (Qwen2.5-1.5B: 12 query heads over 2 key/value heads; Qwen2.5-7B: 28 over 4; head dim 128), G = 8 rows,
a static cache of 640 positions (128 prompt + 512 new tokens), a float mask that hides each row's left padding and
the cache's unused tail, bf16. Each variant's 28 calls (one per layer) are captured in one CUDA graph and replayed,
as in the engine, so the time is the kernels' and not their launches':

  sdpa_grouped     SDPA on the group's query heads as the query axis (B, kv_heads, group, D): the engine's
                   grouped_sdpa today (PyTorch picks its memory-efficient kernel: a mask rules out flash)
  sdpa_repeat_kv   transformers' SDPA path: keys and values copied per query head (repeat_kv), then SDPA
  matmul           scores = q k^T (one batched matmul), masked softmax in fp32, then p v: what Inductor compiles
                   into two cuBLAS calls and one fused softmax
  matmul_compiled  the same under torch.compile (as inside the engine's compiled step)
  matmul_fp32      the same with the scores' matmul writing fp32 (bmm's out_dtype), compiled
  flex             FlexAttention (compiled; its decoding kernel splits the keys across blocks), GQA native, the
                   mask added through score_mod
  cudnn_grouped    SDPA forced onto cuDNN's kernel, grouped layout (skipped where cuDNN refuses)
  flash_no_mask    flash attention without the mask (wrong for padded rows: a floor, not a candidate)

Also the largest difference of each variant's output from an fp32 reference. Microseconds per call, median of 5.

    python benchmarks/bench_attention.py OUT_DIR
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

G, LENGTH, FILLED, LAYERS = 8, 640, 400, 28
SHAPES = {"qwen2.5-1.5b": (12, 2, 128), "qwen2.5-7b": (28, 4, 128)}


def inputs(heads: int, kv_heads: int, dim: int):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(G, heads, 1, dim, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(G, kv_heads, LENGTH, dim, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(G, kv_heads, LENGTH, dim, device="cuda", dtype=torch.bfloat16, generator=g)
    mask = torch.zeros(G, 1, 1, LENGTH, device="cuda", dtype=torch.bfloat16)
    pads = torch.arange(G, device="cuda") * 7  # row r: 7r positions of left padding
    positions = torch.arange(LENGTH, device="cuda")
    hidden = (positions[None] < pads[:, None]) | (positions[None] >= FILLED)
    mask.masked_fill_(hidden[:, None, None], torch.finfo(torch.bfloat16).min)
    return q, k, v, mask


def sdpa_grouped(q, k, v, mask):
    b, h, _, d = q.shape
    out = torch.nn.functional.scaled_dot_product_attention(q.reshape(b, k.shape[1], h // k.shape[1], d), k, v,
                                                           attn_mask=mask)
    return out.reshape(b, h, 1, d)


def sdpa_repeat_kv(q, k, v, mask):
    group = q.shape[1] // k.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(group, 1),
                                                            v.repeat_interleave(group, 1), attn_mask=mask)


def matmul(q, k, v, mask):
    b, h, _, d = q.shape
    grouped = q.reshape(b, k.shape[1], h // k.shape[1], d)
    scores = torch.matmul(grouped, k.transpose(-1, -2)).float() * d**-0.5 + mask
    out = torch.matmul(scores.softmax(-1).to(v.dtype), v)
    return out.reshape(b, h, 1, d)


def matmul_fp32(q, k, v, mask):
    b, h, _, d = q.shape
    kv = k.shape[1]
    grouped = q.reshape(b * kv, h // kv, d)
    scores = torch.bmm(grouped, k.reshape(b * kv, -1, d).transpose(-1, -2), out_dtype=torch.float32)
    scores = scores.view(b, kv, h // kv, -1) * d**-0.5 + mask
    out = torch.matmul(scores.softmax(-1).to(v.dtype), v)
    return out.reshape(b, h, 1, d)


def flex(q, k, v, mask):
    from torch.nn.attention.flex_attention import flex_attention

    bias = mask[:, 0, 0, :]

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[b, kv_idx]

    return flex_attention(q, k, v, score_mod=score_mod, enable_gqa=True)


def cudnn_grouped(q, k, v, mask):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return sdpa_grouped(q, k, v, mask)


def flash_no_mask(q, k, v, mask):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def reference(q, k, v, mask):
    group = q.shape[1] // k.shape[1]
    kk, vv = k.float().repeat_interleave(group, 1), v.float().repeat_interleave(group, 1)
    scores = q.float() @ kk.transpose(-1, -2) * q.shape[-1] ** -0.5 + mask.float()
    return scores.softmax(-1) @ vv


def per_call_us(fn, args) -> float:
    """One CUDA graph of LAYERS calls, replayed: microseconds per call, median of 5 replays of 20."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(LAYERS):
            fn(*args)
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / (20 * LAYERS))
    return statistics.median(times)


def main():
    from common import header, save

    out = Path(sys.argv[1] if len(sys.argv) > 1 else HERE / "results")
    variants = {"sdpa_grouped": sdpa_grouped, "sdpa_repeat_kv": sdpa_repeat_kv, "matmul": matmul,
                "matmul_compiled": torch.compile(matmul, dynamic=False),
                "matmul_fp32": torch.compile(matmul_fp32, dynamic=False), "flex": torch.compile(flex, dynamic=False),
                "cudnn_grouped": cudnn_grouped,
                "flash_no_mask": flash_no_mask}
    rows = []
    for shape, (heads, kv_heads, dim) in SHAPES.items():
        args = inputs(heads, kv_heads, dim)
        ref = reference(*args)
        valid = args[3][:, 0, 0, :].eq(0)  # every row has positions it attends to
        assert bool(valid.any(-1).all())
        for name, fn in variants.items():
            row = {"shape": shape, "variant": name}
            try:
                got = fn(*args)
                row["max_abs_diff"] = float((got.float() - ref).abs().max())
                row["us_per_call"] = per_call_us(fn, args)
            except Exception as e:  # noqa: BLE001 - a kernel that refuses the inputs is a result too
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            print(row, flush=True)
            rows.append(row)
    config = {"G": G, "cache_positions": LENGTH, "filled": FILLED, "calls_per_graph": LAYERS, "dtype": "bfloat16",
              "shapes": {s: {"heads": h, "kv_heads": kv, "head_dim": d} for s, (h, kv, d) in SHAPES.items()}}
    path = save("bench_attention", {**header("bench_attention", config), "results": rows}, out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
