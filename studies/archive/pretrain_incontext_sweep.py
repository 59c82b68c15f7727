"""Pretrain candidate recipes for a default model that copies from its context, one GPU each, and keep the best.

    python studies/archive/pretrain_incontext_sweep.py DATA_DIR OUT_DIR [NAME,...]

Each candidate runs `sdgrpo pretrain` in its own process on its own GPU (CUDA_VISIBLE_DEVICES), all at once. Best:
among the runs that reach the targets (induction score >= 2.0 nats/token at 60 tokens, context gain >= 1.0), the
lowest held-out bits per byte; if none does, the highest induction score. Writes OUT_DIR/incontext_sweep.json (every
run's figures and curve), OUT_DIR/best.tar (the best model folder) and OUT_DIR/NAME.tar for every run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

# The shipped model's recipe (dropout 0.2 on attention/MLP outputs, attention dropout 0.1, weight decay 0.3, 10k
# steps of 16,384 tokens), with longer rows and a fraction of rows holding a repeated span.
BASE = dict(max_steps=10000, eval_every=2000, hidden_dropout=0.2, attention_dropout=0.1, weight_decay=0.3,
            seq_len=512, batch_size=32, compile=True, max_seconds=470)
CANDIDATES = {
    "s512-rep0.1": dict(repeat_fraction=0.1),
    "s512-rep0.25": dict(repeat_fraction=0.25),
    "s512-rep0.5": dict(repeat_fraction=0.5),
    "s512-rep0.25-adrop0": dict(repeat_fraction=0.25, attention_dropout=0.0),
    # Students for the distillation study: about a quarter of the shipped model's parameters (1.3M against 5.8M),
    # the shipped model's tokenizer, so that the shipped model can teach them.
    "student-h128-l4": dict(repeat_fraction=0.5, hidden_size=128, num_hidden_layers=4, num_attention_heads=2,
                            intermediate_size=344, tokenizer_path="src/sdgrpo/assets/tiny-llama", max_seconds=400),
    "student-h128-l4-drop0.1": dict(repeat_fraction=0.5, hidden_size=128, num_hidden_layers=4, num_attention_heads=2,
                                    intermediate_size=344, tokenizer_path="src/sdgrpo/assets/tiny-llama",
                                    hidden_dropout=0.1, attention_dropout=0.0, max_seconds=400),
    # The same student pretrained on a tenth and on 30% of the tokens (the schedule run to its end over the shorter
    # run): a student the teacher still knows much more than, as when a small model is distilled early.
    "student-h128-l4-1k": dict(repeat_fraction=0.5, hidden_size=128, num_hidden_layers=4, num_attention_heads=2,
                               intermediate_size=344, tokenizer_path="src/sdgrpo/assets/tiny-llama",
                               max_steps=1000, eval_every=500, max_seconds=400),
    "student-h128-l4-3k": dict(repeat_fraction=0.5, hidden_size=128, num_hidden_layers=4, num_attention_heads=2,
                               intermediate_size=344, tokenizer_path="src/sdgrpo/assets/tiny-llama",
                               max_steps=3000, eval_every=1000, max_seconds=400),
}
TARGETS = {"induction_60": 2.0, "context_gain": 1.0}


def meets(result: dict) -> bool:
    return (result["induction_score"]["60"] >= TARGETS["induction_60"]
            and result["context_gain"] >= TARGETS["context_gain"])


def main(data_dir: str, out_dir: str, names: list[str]) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = Path("/tmp/incontext_sweep")
    procs = {}
    for gpu, name in enumerate(names):
        options = {**BASE, **CANDIDATES[name]}
        args = [f"--{k}={v}" for k, v in options.items()]
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(gpu % max(1, int(os.environ.get("GPUS", len(names))))))
        log = open(out / f"{name}.log", "w")
        procs[name] = subprocess.Popen([sys.executable, "-m", "sdgrpo.cli", "pretrain", "--data_dir", data_dir,
                                        "--output_dir", str(work / name), *args], stdout=log, stderr=log, env=env)
    results = {}
    for name, proc in procs.items():
        proc.wait()
        path = work / name / "pretrain_result.json"
        results[name] = json.loads(path.read_text()) if path.is_file() else {"error": f"exit {proc.returncode}"}
    ok = {n: r for n, r in results.items() if "error" not in r}
    good = [n for n in ok if meets(ok[n])]
    best = (min(good, key=lambda n: ok[n]["heldout_bpb"]) if good
            else max(ok, key=lambda n: ok[n]["induction_score"]["60"]))
    (out / "incontext_sweep.json").write_text(json.dumps({"best": best, "targets": TARGETS, "base": BASE,
                                                          "candidates": CANDIDATES, "runs": results}, indent=2))
    with tarfile.open(out / "best.tar", "w") as tar:
        tar.add(work / best, arcname="model")
    for name in ok:
        with tarfile.open(out / f"{name}.tar", "w") as tar:
            tar.add(work / name, arcname="model")
    for n, r in results.items():
        print(n, {k: r.get(k) for k in ("heldout_bpb", "ratio_to_unigram", "induction_score", "context_gain",
                                        "steps", "train_seconds", "error")})
    print("best:", best)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3].split(",") if len(sys.argv) > 3 else list(CANDIDATES))
