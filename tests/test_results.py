"""benchmarks/results/ and docs/results.md: every current results file carries the common header, and the page is
what benchmarks/results_table.py writes from the files (so no figure there is copied in by hand)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def results_table():
    spec = importlib.util.spec_from_file_location("results_table", ROOT / "benchmarks" / "results_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", sorted((ROOT / "benchmarks" / "results").glob("*.json")), ids=lambda p: p.name)
def test_every_current_results_file_has_the_header(path):
    data = json.loads(path.read_text())
    assert results_table().missing_header(path) == []
    assert data["date"][:4].isdigit() and data["device"] and data["versions"].get("torch")
    assert data.get("results") or data.get("rows")


def test_the_results_page_is_what_the_script_writes():
    assert (ROOT / "docs" / "results.md").read_text() == results_table().table()


def test_the_check_fails_when_a_file_changes(tmp_path, monkeypatch):
    """The page depends on the files' figures: a changed figure gives another page."""
    module = results_table()
    source = sorted(module.RESULTS.glob("bench_step_*.json"))[0]
    data = json.loads(source.read_text())
    data["results"][0]["step_s"] = 123.456
    (tmp_path / source.name).write_text(json.dumps(data))
    monkeypatch.setattr(module, "RESULTS", tmp_path)
    assert "123" in module.table() and module.table() != (ROOT / "docs" / "results.md").read_text()
