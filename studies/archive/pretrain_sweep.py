"""Pretrain several tiny-model configurations at once on one GPU and keep the best (GPU machine).

Usage: python studies/archive/pretrain_sweep.py DATA_DIR OUT_DIR
Writes OUT_DIR/sweep.json (every run's figures and curve) and OUT_DIR/best/ (the best model folder).
All candidates stay within 6M parameters so the bf16 safetensors file stays under 12 MB.
"""

import json
import logging
import multiprocessing as mp
import shutil
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from sdgrpo.config import tiny_model_recipe  # noqa: E402

PretrainConfig, main = tiny_model_recipe().PretrainConfig, tiny_model_recipe().main

CANDIDATES = {
    # Round 1 (no dropout) overfit after ~2,000 steps: best 0.556 of unigram at step 2,000, 0.586 at 4,000.
    # Round 2 (hidden dropout 0.1-0.3, 4-6k steps): 0.526 at best, still improving at the last step.
    # Round 3 (7k steps): 0.5216 (dropout 0.25, attention dropout 0.1, weight decay 0.2), still improving.
    "v4k-l6-drop0.25-adrop0.1-wd0.2-10k": dict(hidden_dropout=0.25, attention_dropout=0.1, weight_decay=0.2,
                                               max_steps=10000, eval_every=2000),
    "v4k-l6-drop0.2-wd0.3-10k": dict(hidden_dropout=0.2, weight_decay=0.3, max_steps=10000, eval_every=2000),
    "v4k-l6-drop0.2-adrop0.1-wd0.3-10k": dict(hidden_dropout=0.2, attention_dropout=0.1, weight_decay=0.3,
                                              max_steps=10000, eval_every=2000),
}


def _run(args):
    name, data_dir, out_dir, overrides = args
    logging.basicConfig(level=logging.INFO, format=f"[{name}] %(message)s")
    cfg = replace(PretrainConfig(data_dir=data_dir, output_dir=str(Path(out_dir) / name)), **overrides)
    try:
        return name, main(cfg)
    except Exception as err:  # one failed candidate must not lose the others
        return name, {"error": repr(err)}


def sweep(candidates: dict, names: list[str], data_dir: str, out_dir: Path, work: Path, key: str,
          json_name: str, best_name: str) -> tuple[str, dict]:
    """Train ``names`` at once (one process each), keep the lowest ``key``: OUT/json_name and OUT/best_name/."""
    with mp.get_context("spawn").Pool(len(names)) as pool:
        results = dict(pool.map(_run, [(n, data_dir, str(work), candidates[n]) for n in names]))
    ok = {n: r for n, r in results.items() if "error" not in r}
    best = min(ok, key=lambda n: ok[n][key])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / json_name).write_text(json.dumps({"best": best, "runs": results}, indent=2))
    shutil.copytree(work / best, out_dir / best_name, dirs_exist_ok=True)
    for n, r in results.items():
        keys = ("parameters", "heldout_bpb", "unigram_bpb", "ratio_to_unigram", "train_seconds", "error")
        print(n, {k: r.get(k) for k in keys})
    print("best:", best)
    return best, results


if __name__ == "__main__":
    names = sys.argv[3].split(",") if len(sys.argv) > 3 else list(CANDIDATES)
    sweep(CANDIDATES, names, sys.argv[1], Path(sys.argv[2]), Path("/tmp/sweep"), "ratio_to_unigram", "sweep.json",
          "best")
