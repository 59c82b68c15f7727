#!/usr/bin/env bash
# Collapse study on CPU: self-distillation vs. two collapsing runs on the shipped tiny model and the demo text.
# Writes outputs/<run>/ (adapters, metrics, eval reports) and studies/results/collapse_study_tiny_cpu2_DATE.json.
set -euo pipefail
cd "$(dirname "$0")/.."
sdgrpo prepare src/sdgrpo/assets/demo/openings.txt --output data/demo --min_prompt_tokens 8 --max_prompt_tokens 20 \
  --continuation_tokens 32 --test_size 0.2 > /dev/null
# run name (its output_dir under outputs/ and its key in the results) = config under configs/tiny/
for pair in tiny-selfdistill=grpo-demo tiny-collapse-beta0=collapse-beta0 \
            tiny-score-with-policy=collapse-score-with-policy; do
  run="${pair%%=*}"
  rm -rf "outputs/$run"
  sdgrpo train --config "configs/tiny/${pair#*=}.yaml"
  sdgrpo eval --adapter "outputs/$run" --data data/demo --output "outputs/$run/eval" --max_new_tokens 32 \
    --temperatures 1.0,0.85,0.7,0.5
done
python3 - <<'PY'
import json, platform, datetime
from pathlib import Path
out = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "device": "cpu",
       "machine": platform.processor() or platform.machine(), "runs": {}}
for run in ["tiny-selfdistill", "tiny-collapse-beta0", "tiny-score-with-policy"]:
    d = Path("outputs") / run
    steps = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "reward" in s]
    ev = json.loads((d / "eval" / "eval.json").read_text())
    guard = json.loads((d / "collapse_guard.json").read_text()) if (d / "collapse_guard.json").exists() else None
    out["runs"][run] = {
        "steps_run": len(steps), "guard": guard,
        "first_step": {k: steps[0][k] for k in ("reward", "collapse/seq_rep_4", "collapse/distinct_2")},
        "last_step": {k: steps[-1][k] for k in ("reward", "collapse/seq_rep_4", "collapse/distinct_2")},
        "eval_base_T1": ev["base"]["temperatures"]["1.0"], "eval_trained": ev["trained"], "verdict": ev["verdict"],
    }
Path(f"studies/results/collapse_study_tiny_cpu2_{datetime.date.today()}.json").write_text(json.dumps(out, indent=2))
print(json.dumps({r: {"steps": v["steps_run"], "tripped_at": (v["guard"] or {}).get("tripped_at"),
                      "reason": (v["guard"] or {}).get("reason"),
                      "reward base->trained": (v["eval_base_T1"]["reward_mean"], v["eval_trained"]["reward_mean"]),
                      "seq_rep_4 base->trained": (v["eval_base_T1"]["seq_rep_4"], v["eval_trained"]["seq_rep_4"]),
                      "distinct_2 base->trained": (v["eval_base_T1"]["distinct_2"], v["eval_trained"]["distinct_2"])}
                  for r, v in out["runs"].items()}, indent=1))
PY
