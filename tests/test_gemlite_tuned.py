"""engine.gemlite_tuned: which shipped file a card gets, what a file must hold, and that it reaches gemlite's table
once a process. The configurations' speed and outputs are measured on the GPU (benchmarks/tune_gemlite.py,
tests/gpu/test_gpu.py)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from sdgrpo.engine import gemlite_tuned

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
ENTRY = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 8, "SPLIT_K": 4,
         "A_load_order": 2, "num_warps": 4, "num_stages": 3}


def test_a_card_gets_the_longest_tag_in_its_name(tmp_path):
    for tag in ("h100", "h100_pcie", "a100"):
        (tmp_path / f"{tag}.json").write_text("{}")
    assert gemlite_tuned.file_for("NVIDIA H100 80GB HBM3", tmp_path) == tmp_path / "h100.json"
    assert gemlite_tuned.file_for("NVIDIA H100 PCIe", tmp_path) == tmp_path / "h100_pcie.json"
    assert gemlite_tuned.file_for("NVIDIA H200", tmp_path) is None
    assert gemlite_tuned.file_for("NVIDIA H100", tmp_path / "absent") is None


def test_a_table_needs_gemlite_signatures_and_every_key_its_pruner_reads():
    gemlite_tuned.check({"GEMM_SPLITK": {"(8, 4608, 3584, 64, 8, 104)": ENTRY}})
    without = {k: v for k, v in ENTRY.items() if k != "num_stages"}
    with pytest.raises(ValueError, match="missing \\['num_stages'\\]"):
        gemlite_tuned.check({"GEMM_SPLITK": {"(8, 4608, 3584, 64, 8, 104)": without}})
    with pytest.raises(ValueError, match="not a gemlite signature"):
        gemlite_tuned.check({"GEMM_SPLITK": {"(8, 4608, 3584)": ENTRY}})


def test_loaded_into_gemlite_once_a_process_and_not_when_disabled(tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType("gemlite")
    fake.GemLiteLinear = types.SimpleNamespace(load_config=lambda path: calls.append(path) or True)
    monkeypatch.setitem(sys.modules, "gemlite", fake)
    (tmp_path / "h100.json").write_text(json.dumps({"GEMM_SPLITK": {"(8, 4608, 3584, 64, 8, 104)": ENTRY}}))
    monkeypatch.setattr(gemlite_tuned, "FOLDER", tmp_path)
    monkeypatch.setattr(gemlite_tuned, "_loaded", {})
    monkeypatch.setattr(gemlite_tuned, "ENABLED", False)
    assert gemlite_tuned.load("NVIDIA H100 80GB HBM3") is None and calls == []
    monkeypatch.setattr(gemlite_tuned, "ENABLED", True)
    assert gemlite_tuned.load("NVIDIA H100 80GB HBM3") == "h100.json"
    assert gemlite_tuned.load("NVIDIA H100 80GB HBM3") == "h100.json"
    assert calls == [str(tmp_path / "h100.json")]
    assert gemlite_tuned.load("NVIDIA A10") is None and len(calls) == 1
    (tmp_path / "h100.json").write_text(json.dumps({"GEMM_SPLITK": {"(8, 1)": ENTRY}}))
    monkeypatch.setattr(gemlite_tuned, "_loaded", {})
    with pytest.raises(ValueError, match="not a gemlite signature"):
        gemlite_tuned.load("NVIDIA H100 80GB HBM3")


@pytest.mark.parametrize("path", sorted(gemlite_tuned.FOLDER.glob("*.json")), ids=lambda p: p.name)
def test_every_shipped_file_is_what_a_tuning_run_measured(path):
    """A shipped file is well formed and is exactly the winners of the tune_gemlite results files of that card (each
    timed below the run's margin of gemlite's own configuration there, its output within 1e-2 of it)."""
    table = json.loads(path.read_text())
    gemlite_tuned.check(table)
    runs = [json.loads(p.read_text()) for p in sorted(RESULTS.glob(f"tune_gemlite_*_{path.stem}_*.json"))]
    assert runs, f"no benchmarks/results/tune_gemlite_*_{path.stem}_*.json measured {path.name}"
    winners = {}
    for run in runs:
        for row in run["results"]:
            if row["won"]:
                assert row["best_ms"] < run["config"]["margin"] * row["shipped_ms"], row["signature"]
                assert row["max_rel_diff_vs_shipped"] < 1e-2, row["signature"]
                winners[row["signature"]] = row["best"]
    assert table == {"GEMM_SPLITK": winners}
