"""`sdgrpo eval` end to end on the shipped tiny model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.fixture
def prepared_demo(tmp_path):
    from sdgrpo.demo import DEMO_TEXT

    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "sdgrpo.cli", "prepare", DEMO_TEXT, "--output", out,
                        "--min_prompt_tokens", "8", "--max_prompt_tokens", "20", "--continuation_tokens", "16",
                        "--test_size", "0.2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return out


def test_eval_base_only_writes_report(tmp_path, prepared_demo):
    r = subprocess.run([sys.executable, "-m", "sdgrpo.cli", "eval", "--data", prepared_demo, "--output",
                        tmp_path / "e", "--samples", "2", "--max_new_tokens", "8", "--temperatures", "1.0,0.5"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "e" / "eval.json").read_text())
    temps = result["base"]["temperatures"]
    assert set(temps) == {"1.0", "0.5"}
    assert temps["0.5"]["reward_mean"] > temps["1.0"]["reward_mean"]  # colder sampling: more likely text
    ppl = result["base"]["continuation_nll"]
    assert ppl["perplexity"] == pytest.approx(2.718281828 ** ppl["nll_per_token"])
    assert (tmp_path / "e" / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    assert "| base, T=0.5 |" in (tmp_path / "e" / "report.md").read_text()
