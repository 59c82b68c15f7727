"""Tune gemlite's split-K kernel (GEMM_SPLITK, what it runs at 5-63 rows) for a model's projections at the row counts
the engine decodes, on this GPU, and write the winners as a gemlite config file.

gemlite ships tuned configurations per card (``gemlite/configs/h100.json``: the Qwen2.5-7B widths are in it, tuned
with another Triton; every one of them with ``num_stages`` 1). Per projection (the engine's groups: q k v stacked, o,
gate up stacked, down) and rows: the shipped configuration's time, then a coordinate search over SPLIT_K, BLOCK_SIZE_N,
num_stages, num_warps, BLOCK_SIZE_K (at most the group: gemlite reads one row of scales a block, and sdgrpo pads the
scales for SPLIT_K <= 16, ``engine.int4.gemlite_meta_rows``), A_load_order and, from 17 rows, BLOCK_SIZE_M, starting
from the shipped one. Each candidate is forced through gemlite's own cache (``GEMLITE_TRITON_CONFIG_CACHE``, what
``GemLiteLinear.load_config`` fills) and timed as the engine runs it: the layers' copies of the projection (distinct
weights: no layer's weight is in L2 from the last) applied once each in one CUDA graph, replayed; each case gets its
share of TUNE_SECONDS. Every candidate's output is checked against the shipped configuration's (the same sums in
another order; the shipped one's against the dequantised weight), and the forced configuration against the one the
kernel ran. A winner is timed again twice beside gemlite's own and kept only where both times are below MARGIN of it.

Writes ``tune_gemlite_<shape>_<device>_<date>.json`` (every time measured) and ``gemlite_<card>.json`` (the winners,
the file ``sdgrpo/assets/gemlite/`` ships and the engine loads over gemlite's own, ``engine.gemlite_tuned``).

    python benchmarks/tune_gemlite.py OUT_DIR [shape]     # env: BENCH_ROWS="8 32 16", TUNE_SECONDS=300
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

ROWS = [int(r) for r in os.environ.get("BENCH_ROWS", "8 32 16").split()]
SECONDS = float(os.environ.get("TUNE_SECONDS", "300"))
GROUP = 64  # the engine's group (engine.int4.GEMLITE_GROUP)
KNOBS = {  # searched in this order (values gemlite's own autotuning lists use), twice where the first pass moved
    "SPLIT_K": [1, 2, 4, 8, 16],
    "BLOCK_SIZE_N": [32, 64, 128, 256, 512],
    "num_stages": [1, 2, 3, 4],
    "num_warps": [4, 8],
    "BLOCK_SIZE_K": [32, 64],
    "A_load_order": [0, 2],
    "BLOCK_SIZE_M": [16, 32],
}
MARGIN = 0.98  # a winner's time, timed again twice beside gemlite's, is at most this fraction of it
REPLAYS = 20


def card() -> str:
    """The card's tag as gemlite names its config files (the longest of its tags in the device name; else the name)."""
    name = torch.cuda.get_device_properties(0).name.lower().replace(" ", "_")
    for tag in ("h200", "h100", "a100", "l40s", "l4", "4090"):
        if tag in name:
            return tag
    return name


def layers_of(n: int, k: int, count: int) -> list:
    from sdgrpo.engine import GemliteLinear

    torch.manual_seed(n * 7 + k)
    weight = torch.randn(n, k, device="cuda", dtype=torch.float32) * 0.02
    out = []
    for _ in range(count):
        layer = GemliteLinear(n, k, GROUP, "cuda", bias=False)
        layer.load(None, 0, weight)
        out.append(layer)
    return out


class Forcer:
    """Forces one configuration of gemlite's GEMM_SPLITK kernel for one signature (gemlite's own config cache, and
    the Triton autotuner's choice cleared, so the next call prunes to it)."""

    def __init__(self):
        from gemlite import core
        from gemlite.triton_kernels import gemm_splitK_kernels

        self.core, self.kernel = core, gemm_splitK_kernels.gemm_splitK_INT_kernel
        self.table = core.GEMLITE_TRITON_CONFIG_CACHE.setdefault("GEMM_SPLITK", {})
        self.triton_bench = self.kernel.do_bench  # Triton 3.6 times even a lone pruned config (~0.15 s)

    def signature(self, layer, rows: int) -> str:
        """gemlite's cache key for this layer at ``rows``: read from the autotuner's key after one call (gemlite's
        own choice: its table's entry, else its autotuning, timed as Triton does)."""
        self.kernel.do_bench = self.triton_bench
        self.kernel.cache.clear()
        with torch.no_grad():
            layer(torch.zeros(rows, layer.in_features, device="cuda", dtype=torch.bfloat16))
        (key,) = list(self.kernel.cache)
        return str(tuple(key[:6]))

    def force(self, signature: str, config: dict) -> None:
        self.table[signature] = dict(config)
        self.kernel.cache.clear()
        self.kernel.do_bench = lambda kernel_call, quantiles: [0.0, 0.0, 0.0]  # one config: nothing to time

    def check(self, config: dict) -> None:
        """Raises unless the autotuner ran ``config`` (gemlite's table rebound would leave the forcing without
        effect)."""
        (chosen,) = self.kernel.cache.values()
        got = {k: chosen.kwargs[k] for k in ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "SPLIT_K", "A_load_order")}
        got.update(num_warps=chosen.num_warps, num_stages=chosen.num_stages)
        if any(got[k] != config[k] for k in got):
            raise RuntimeError(f"forced {config}, the kernel ran {got}")


def replay_ms(layers: list, rows: int) -> tuple[float, torch.Tensor]:
    """(ms per replay of a CUDA graph applying every layer once to its own input, the first layer's output)."""
    from common import graph_ms

    torch.manual_seed(1)
    inputs = [torch.randn(rows, m.in_features, device="cuda", dtype=torch.bfloat16) for m in layers]

    def run():
        for m, x in zip(layers, inputs):
            m(x)

    ms = graph_ms(run, replays=REPLAYS, repeats=3, warmups=1, settle=1)
    with torch.no_grad():
        out = layers[0](inputs[0]).float()
    return ms, out


def shipped_config(forcer: Forcer, signature: str) -> dict:
    found = forcer.table.get(signature)
    if found is None:  # not in gemlite's file: its autotuned choice
        config = next(iter(forcer.kernel.cache.values()))
        found = {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages, "num_ctas": 1}
        found.pop("NUM_STAGES", None)
    from sdgrpo.engine.gemlite_tuned import KEYS

    return {k: v for k, v in found.items() if k in KEYS | {"num_ctas"}}


def rel_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest |got - want| relative to the largest |want| (NaN where either holds NaN)."""
    return ((got - want).abs().max() / want.abs().max()).item()


def main() -> None:
    from bench_int4 import projections
    from common import SHAPES, device_tag, header

    out = Path(sys.argv[1] if len(sys.argv) > 1 else HERE / "results")
    shape = sys.argv[2] if len(sys.argv) > 2 else "qwen2.5-7b"
    count = SHAPES[shape]["num_hidden_layers"]
    head = header("tune_gemlite", {"shape": shape, "layers": count, "rows": ROWS, "group": GROUP,
                                   "seconds": SECONDS, "replays": REPLAYS, "knobs": KNOBS,
                                   "margin": MARGIN})
    import gemlite

    from sdgrpo.engine import gemlite_tuned

    gemlite_tuned.ENABLED = False  # gemlite's own configurations are the baseline, not an earlier run's winners
    head["versions"]["gemlite"] = gemlite.__version__
    import triton

    head["versions"]["triton"] = triton.__version__
    name = f"tune_gemlite_{shape}_{device_tag()}_{head['date'][:10]}"
    out.mkdir(parents=True, exist_ok=True)
    forcer, t0 = Forcer(), time.perf_counter()
    results, winners, summary = [], {}, {}
    order = sorted(projections(shape), key=lambda p: -p[1] * p[2])  # the largest first
    cases = len(order) * len(ROWS)
    for proj, n, k in order:
        layers = layers_of(n, k, count)
        for rows in ROWS:
            # each case its share of the time left
            deadline = time.perf_counter() + max(0.0, SECONDS - (time.perf_counter() - t0)) / (cases - len(results))
            signature = forcer.signature(layers[0], rows)
            base = shipped_config(forcer, signature)
            forcer.force(signature, base)
            base_ms, base_out = replay_ms(layers, rows)
            forcer.check(base)
            torch.manual_seed(1)
            x0 = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            want = (x0.float() @ layers[0].dequantised().float().t())
            reference_error = rel_diff(base_out, want)
            tried = {json.dumps(base, sort_keys=True): base_ms}
            best, best_ms, errors = dict(base), base_ms, 0
            for _ in range(2):
                moved = False
                for knob, values in KNOBS.items():
                    if knob == "BLOCK_SIZE_M" and rows <= 16:
                        continue
                    for value in values:
                        if time.perf_counter() > deadline:
                            break
                        config = {**best, knob: value}
                        key = json.dumps(config, sort_keys=True)
                        if key in tried:
                            continue
                        forcer.force(signature, config)
                        try:
                            ms, out_c = replay_ms(layers, rows)
                            forcer.check(config)
                        except Exception as err:  # noqa: BLE001 - a config that does not compile or fit
                            tried[key], errors = None, errors + 1
                            print(proj, rows, config, type(err).__name__, str(err)[:120], flush=True)
                            continue
                        diff = rel_diff(out_c, base_out)
                        if not diff < 1e-2:  # NaN too
                            tried[key], errors = None, errors + 1
                            print(proj, rows, config, "output off by", diff, flush=True)
                            continue
                        tried[key] = ms
                        if ms < best_ms:
                            best, best_ms, moved = config, ms, True
                if not moved:  # a second pass only where the first moved
                    break
            # the winner timed again twice beside gemlite's own: it must beat it both times by the margin
            forcer.force(signature, best)
            again1, best_out = replay_ms(layers, rows)
            forcer.force(signature, base)
            base_again, _ = replay_ms(layers, rows)
            forcer.force(signature, best)
            again2, _ = replay_ms(layers, rows)
            error = rel_diff(best_out, base_out)
            won = best != base and max(again1, again2) < MARGIN * base_again and error < 1e-2
            if won:
                winners[signature] = best
            row = {"rows": rows, "projection": proj, "n": n, "k": k, "signature": signature,
                   "shipped": base, "shipped_ms": base_again, "best": best, "best_ms": max(again1, again2),
                   "won": won, "search_ms": {"shipped": base_ms, "best": best_ms},
                   "max_rel_diff_vs_shipped": error, "shipped_vs_dequantised_reference": reference_error,
                   "tried": len(tried), "failed": errors, "all": [[json.loads(c), ms] for c, ms in tried.items()]}
            results.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "all"}), flush=True)
            forcer.force(signature, base)  # gemlite's own again for what follows
            s = summary.setdefault(rows, {"shipped_ms": 0.0, "tuned_ms": 0.0, "projections": 0})
            s["shipped_ms"] += base_again
            s["tuned_ms"] += max(again1, again2) if won else base_again
            s["projections"] += 1
            (out / f"{name}.json").write_text(json.dumps({**head, "summary_ms_per_token_step": summary,
                                                          "wall_s": time.perf_counter() - t0,
                                                          "results": results}, indent=1))
            (out / f"gemlite_{card()}.json").write_text(json.dumps({"GEMM_SPLITK": winners}, indent=1))
        del layers
        torch.cuda.empty_cache()
    print("summary (ms per token step, the layers' projections):", json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
