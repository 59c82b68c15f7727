"""A shortened `sdgrpo demo` end to end through the CLI: data, training, report files."""

from __future__ import annotations

import json
import subprocess
import sys


def test_short_demo_writes_report(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "sdgrpo.cli", "demo", "--output", str(out), "--max_steps", "3",
                        "--eval_samples", "2", "--baseline_temperatures", "0.7", "--max_completion_length", "12"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((out / "demo.json").read_text())
    assert [row["step"] for row in result["steps"]] == [1, 2, 3]
    for part in ("before", "after"):
        assert result[part]["reward_mean"] < 0 and 0 <= result[part]["distinct_2"] <= 1
    assert set(result["base_colder"]) == {"0.7"}
    report = (out / "report.md").read_text()
    assert "| base, T=1 |" in report and "| trained, T=1 |" in report and result["verdict"] in report
    for png in ("curves.png", "rewards.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


