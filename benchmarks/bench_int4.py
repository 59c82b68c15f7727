"""4-bit weight-only kernels for decoding on the GPU: ms per token step of a model's projections against the bytes
they read, at the row counts a GRPO generation decodes (1, 8, 16, 32 rows).

Per kernel and rows: the shape's layers x (q k v stacked, o, gate up stacked, down; the engine's groups), each
applied once to ``rows`` rows of random bf16 activations, all captured as one CUDA graph (as the engine's decoding
step runs them) and replayed; ms per replay is ms per token step (no attention, LM head or norms). Kernels:

  bf16              F.linear on bf16 weights: what 16-bit generation copies (mode ``dequantised``) read
  bnb_nf4           bitsandbytes' Linear4bit, NF4, bf16 compute: the 4-bit base read as it is (``--generation_weights
                    model``); bitsandbytes chooses its own kernel by architecture and rows
  tinygemm          PyTorch's int4 weight-only matmul (engine.Int4Linear, groups of 128)
  gemlite_g64       gemlite's A16W4 kernels (engine.GemliteLinear, groups of 64, the engine's default), gemlite's own
                    kernel choice by rows and its shipped tuned configurations for the card
  gemlite_g128      the same, groups of 128
  gemlite_g64_TYPE  gemlite with its kernel forced: GEMV, GEMV_REVSPLITK, GEMV_SPLITK, GEMM_SPLITK, GEMM

``bytes`` is what one step reads of each kernel's weights (values, scales, zeros); ``x_bytes`` the step's time over
those bytes at the copy bandwidth measured in the same run. Writes bench_int4_<shape>_<device>_<date>.json.

    python benchmarks/bench_int4.py OUT_DIR [shape] [kernel ...]
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

ROWS = [int(r) for r in os.environ.get("BENCH_ROWS", "1 8 16 32").split()]
KERNELS = ["bf16", "bnb_nf4", "tinygemm", "gemlite_g64", "gemlite_g128", "gemlite_g64_GEMV_REVSPLITK",
           "gemlite_g64_GEMV_SPLITK", "gemlite_g64_GEMM_SPLITK", "gemlite_g64_GEMM"]
REPLAYS = 50
DOUBLE_QUANT = False  # as sdgrpo's --load_in_4bit loads a base (modeling.load_model)


def projections(shape: str) -> list[tuple[str, int, int]]:
    from common import SHAPES

    c = SHAPES[shape]
    h, i = c["hidden_size"], c["intermediate_size"]
    kv = c["num_key_value_heads"] * h // c["num_attention_heads"]
    return [("qkv", h + 2 * kv, h), ("o", h, h), ("gate_up", 2 * i, h), ("down", h, i)]


def build(kernel: str, n: int, k: int, weight: torch.Tensor):
    """(module, bytes it reads a call) for ``kernel`` holding ``weight`` ([n, k] bf16 on the GPU)."""
    if kernel == "bf16":
        layer = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
        layer.weight.data.copy_(weight)
        return layer, n * k * 2
    if kernel == "bnb_nf4":
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                                  compress_statistics=DOUBLE_QUANT, device="meta")
        layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4",
                                         compress_statistics=DOUBLE_QUANT)
        layer = layer.cuda()  # quantises, on the GPU
        state = layer.weight.quant_state
        absmax = state.absmax.numel() * state.absmax.element_size() + (
            state.state2.absmax.numel() * 4 + 256 * 4 if state.nested else 0)
        return layer, n * k // 2 + absmax
    from sdgrpo.engine import GemliteLinear, Int4Linear, int4_layout

    if kernel == "tinygemm":
        group, tiles = int4_layout(n, k)
        layer = Int4Linear(n, k, group, tiles, "cuda", bias=False)
        nbytes = Int4Linear.nbytes(n, k, group) - n * 2
    else:
        group = int(kernel.split("_")[1][1:])
        layer = GemliteLinear(n, k, group, "cuda", bias=False)
        nbytes = GemliteLinear.nbytes(n, k, group) - n * 2
        forced = kernel.split("_", 2)[2] if kernel.count("_") >= 2 else None
        if forced:
            from gemlite.core import GEMLITE_MATMUL_TYPES_MAPPING

            layer.matmul_type = GEMLITE_MATMUL_TYPES_MAPPING[forced]
    values = torch.empty(n, k, dtype=torch.uint8, device="cuda")
    layer.load(values, 0, weight.float())
    layer.pack(values)
    return layer, nbytes


def step_ms(layers: list, rows: int) -> float:
    """ms per replay of one CUDA graph applying every layer once to its own [rows, k] input."""
    from common import graph_ms

    inputs = [torch.randn(rows, m.in_features if hasattr(m, "in_features") else m.weight.shape[1], device="cuda",
                          dtype=torch.bfloat16) for m in layers]

    def run():
        for m, x in zip(layers, inputs):
            m(x)

    return graph_ms(run, replays=REPLAYS)


def agreement(layers: list, reference: list, rows: int = 8) -> float:
    """Largest |kernel - bf16| over the layers' outputs for one random input, relative to the bf16 output's largest
    value (quantisation error plus the kernel's rounding)."""
    worst = 0.0
    with torch.no_grad():
        for m, r in zip(layers, reference):
            x = torch.randn(rows, r.in_features, device="cuda", dtype=torch.bfloat16)
            want = r(x).float()
            worst = max(worst, ((m(x).float() - want).abs().max() / want.abs().max()).item())
    return worst


def main() -> None:
    from common import SHAPES, copy_bandwidth, device_tag, header

    out = Path(sys.argv[1] if len(sys.argv) > 1 else HERE / "results")
    shape = sys.argv[2] if len(sys.argv) > 2 else "qwen2.5-7b"
    kernels = sys.argv[3:] or KERNELS
    layers_n = SHAPES[shape]["num_hidden_layers"]
    bandwidth = copy_bandwidth()
    config = {"shape": shape, "layers": layers_n, "rows": ROWS, "replays": REPLAYS, "nf4_double_quant": DOUBLE_QUANT,
              "projections": projections(shape)}
    head = header("bench_int4", config)
    try:
        import gemlite

        head["versions"]["gemlite"] = gemlite.__version__
    except Exception as err:  # noqa: BLE001 - recorded in the results
        head["versions"]["gemlite"] = f"not importable: {type(err).__name__}: {err}"
    name = f"bench_int4_{shape}_{device_tag()}_{head['date'][:10]}"
    print("device", head["device"], "copy bandwidth GB/s", round(bandwidth / 1e9), "gemlite",
          head["versions"]["gemlite"], flush=True)
    torch.manual_seed(0)
    weights = {name: torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for name, n, k in projections(shape)}
    rows_out = []
    for kernel in kernels:
        t0 = time.perf_counter()
        try:
            built = [build(kernel, n, k, weights[name]) for _ in range(layers_n) for name, n, k in projections(shape)]
        except Exception as err:  # noqa: BLE001 - a kernel that cannot be built is a row with its error
            rows_out.append({"kernel": kernel, "error": f"{type(err).__name__}: {err}"[:400]})
            print(kernel, rows_out[-1]["error"], flush=True)
            continue
        layers, nbytes = [m for m, _ in built], sum(b for _, b in built)
        reference = [build("bf16", n, k, weights[name])[0] for name, n, k in projections(shape)]
        error = agreement(layers[: len(reference)], reference)
        del reference
        for rows in ROWS:
            try:
                ms = step_ms(layers, rows)
                row = {"kernel": kernel, "rows": rows, "ms_per_step": ms, "bytes": nbytes,
                       "limit_ms": 1000 * nbytes / bandwidth, "x_bytes": ms / (1000 * nbytes / bandwidth),
                       "max_rel_error_vs_bf16": error}
            except Exception as err:  # noqa: BLE001
                row = {"kernel": kernel, "rows": rows, "error": f"{type(err).__name__}: {err}"[:400]}
            rows_out.append(row)
            print(json.dumps(row), flush=True)
        print(kernel, f"{time.perf_counter() - t0:.1f} s", flush=True)
        del layers, built
        torch.cuda.empty_cache()
        (out / f"{name}.json").parent.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.json").write_text(json.dumps({**head, "copy_bandwidth_gb_s": bandwidth / 1e9,
                                                      "results": rows_out}, indent=2))


if __name__ == "__main__":
    main()
