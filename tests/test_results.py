"""benchmarks/results/ and docs/results.md: every current results file carries the common header, and the page is
what benchmarks/results_table.py writes from the files (so no figure there is copied in by hand)."""

from __future__ import annotations

import importlib.util
import json
import signal
import time
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


def test_merge_keeps_every_rows_figures_and_refuses_parts_of_different_runs(tmp_path):
    """benchmarks/merge_results.py: the rows of two calls on one machine in one file, each part's command kept; a
    part with another config (or device) is refused in one line, exit 2, and nothing is written."""
    import subprocess
    import sys

    def part(variant, step, cap=24.0, steps=3):
        return {"benchmark": "bench_step", "date": f"2026-12-06T0{int(step)}:00:00+00:00", "commit": "abc",
                "command": f"python benchmarks/bench_step.py /tmp qwen2.5-7b {variant}", "device": "NVIDIA H200",
                "versions": {"torch": "2.11.0"}, "config": {"shape": "qwen2.5-7b", "memory_cap_gib": cap,
                                                             "steps_timed": steps},
                "results": [{"variant": variant, "step_s": step}]}

    for name, data in (("a", part("sdgrpo_hf_4bit", 3.55)), ("b", part("unsloth_bare_4bit", 28.7, steps=2)),
                       ("c", part("sdgrpo_hf", 4.8, cap=None))):
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
    script = ROOT / "benchmarks" / "merge_results.py"
    r = subprocess.run([sys.executable, script, tmp_path / "ab.json", tmp_path / "a.json", tmp_path / "b.json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    merged = json.loads((tmp_path / "ab.json").read_text())
    assert [(x["variant"], x["step_s"]) for x in merged["results"]] == [("sdgrpo_hf_4bit", 3.55),
                                                                       ("unsloth_bare_4bit", 28.7)]
    assert [p["rows"] for p in merged["parts"]] == [["sdgrpo_hf_4bit"], ["unsloth_bare_4bit"]]
    assert "unsloth_bare_4bit" in merged["command"] and "sdgrpo_hf_4bit" in merged["command"]
    assert results_table().missing_header(tmp_path / "ab.json") == []
    r = subprocess.run([sys.executable, script, tmp_path / "ac.json", tmp_path / "a.json", tmp_path / "c.json"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "config differs" in r.stderr, r.stderr
    assert not (tmp_path / "ac.json").exists()


def test_every_current_results_file_names_the_script_that_runs_it_again():
    """tools/device/README.md gives, for each current results file, the call of a script kept in tools/device/ (not
    archive/) that runs it again (or a CPU command), and every script the README names exists where it says."""
    import re

    readme = (ROOT / "tools" / "device" / "README.md").read_text()
    rows = {m[1]: m[0] for m in re.findall(r"^(\| `([^`]+\.json)` \|.*)$", readme, re.M)}
    for path in sorted((ROOT / "benchmarks" / "results").glob("*.json")):
        assert path.name in rows, f"tools/device/README.md does not say which script makes {path.name}"
        again = rows[path.name].split(" | ")[-1]
        if again.startswith("as `"):  # the same call as another file's row
            again = rows[again.split("`")[1]].split(" | ")[-1]
        kept = re.findall(r"tools/device/(\w+\.sh)", again)
        assert kept or "cpu" in path.name, f"{path.name}: no script of tools/device/ runs it again"
        for name in kept:
            assert (ROOT / "tools" / "device" / name).is_file(), f"{path.name}: tools/device/{name} is not there"
    named = set(re.findall(r"^\| `(\w+\.sh)`", readme, re.M))
    named |= {n for cell in re.findall(r"^\| `(\w+\.sh)`, `(\w+\.sh)`", readme, re.M) for n in cell}
    on_disk = {p.name for p in (ROOT / "tools" / "device").rglob("*.sh")}
    assert named == on_disk, (f"README lists {sorted(named - on_disk)} that are not there, "
                              f"omits {sorted(on_disk - named)}")


def test_the_length_plot_groups_rows_by_variant_without_their_length_and_marks_what_did_not_run(tmp_path):
    """plot_length: rows of two runs, a variant at 3 lengths (one out of memory) and another at one: two series, the
    lengths read from each row's lenN (the run's completion_tokens where it has none), and a PNG written."""
    spec = importlib.util.spec_from_file_location("plot_length", ROOT / "benchmarks" / "plot_length.py")
    plot_length = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot_length)
    first = {"config": {"completion_tokens": 512}, "results": [
        {"variant": "sdgrpo_hf_4bit+model", "peak_gpu_gib": 8.5, "step_s": 8.6},
        {"variant": "sdgrpo_hf_4bit+model+len2048", "peak_gpu_gib": 9.7, "step_s": 33.0},
        {"variant": "unsloth_bare_4bit+len2048", "peak_gpu_gib": 17.0, "step_s": 85.4}]}
    second = {"config": {"completion_tokens": 512}, "results": [
        {"variant": "sdgrpo_hf_4bit+model+len4096", "error": "CUDA out of memory", "peak_gpu_gib": None},
        {"variant": "sdgrpo_hf_4bit+model+cap16+len4096", "error": "timed out", "peak_gpu_gib": None}]}
    paths = []
    for i, data in enumerate((first, second)):
        paths.append(tmp_path / f"r{i}.json")
        paths[-1].write_text(json.dumps(data))
    got = plot_length.series(paths)
    assert {k: [n for n, _ in v] for k, v in got.items()} == {"sdgrpo_hf_4bit+model": [512, 2048, 4096],
                                                               "unsloth_bare_4bit": [2048],
                                                               "sdgrpo_hf_4bit+model+cap16": [4096]}
    assert plot_length.mark_height(got) == pytest.approx(17.0 * 1.05)  # above every peak, also for a series that
    # never ran (it was marked at 1.05 GiB)
    plot_length.plot(paths, tmp_path / "length.png")
    assert (tmp_path / "length.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _gpu_suite(tmp_path):
    """benchmarks/gpu_suite.py as a module, and an empty test folder that knows the gpu mark."""
    spec = importlib.util.spec_from_file_location("gpu_suite", ROOT / "benchmarks" / "gpu_suite.py")
    gpu_suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_suite)
    tests = tmp_path / "suite"
    tests.mkdir()
    (tests / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: a GPU test\n")
    return gpu_suite, tests


def test_the_gpu_suite_record_counts_what_pytest_ran_and_keeps_every_tests_time(tmp_path):
    """gpu_suite.py over a folder of GPU-marked tests (one passes, one fails, one is skipped, one is an expected
    failure) and one unmarked test, left out: the counts, pytest's exit code and each test's outcome, in a results
    file with the common header."""
    gpu_suite, tests = _gpu_suite(tmp_path)
    (tests / "test_four.py").write_text(
        "import pytest\n"
        "gpu = pytest.mark.gpu\n"
        "@gpu\ndef test_passes(): assert True\n"
        "@gpu\ndef test_fails(): assert 1 == 2\n"
        "@gpu\ndef test_skips(): pytest.skip('no card')\n"
        "@gpu\n@pytest.mark.xfail(reason='known')\ndef test_xfails(): assert False\n"
        "def test_not_marked_gpu_is_left_out(): pass\n")
    out = tmp_path / "out"
    rc = gpu_suite.main([str(out), "--workers", "1", "--timeout", "120", "--tests", str(tests)])
    assert rc == 1
    [path] = out.glob("gpu_tests_*.json")
    data = json.loads(path.read_text())
    assert [key for key in ("benchmark", "date", "commit", "command", "device", "versions", "config")
            if key not in data] == []
    [row] = data["rows"]
    assert {k: row[k] for k in ("passed", "failed", "skipped", "xfailed", "exit_code")} == {
        "passed": 1, "failed": 1, "skipped": 1, "xfailed": 1, "exit_code": 1}
    outcomes = {t["test"].split("::")[-1]: t["outcome"] for t in row["tests"]}
    assert outcomes == {"test_passes": "passed", "test_fails": "failed", "test_skips": "skipped",
                        "test_xfails": "xfailed"}


def test_a_gpu_suite_stopped_at_its_timeout_still_records_the_tests_that_finished(tmp_path):
    """gpu_suite.py at its timeout interrupts pytest as Ctrl-C does, also from a process that ignores SIGINT (a
    background job's; CI ran it so): the tests that finished (one passed, one failed) are in the results file with the
    run marked timed out, and the hung test is not waited for."""
    gpu_suite, tests = _gpu_suite(tmp_path)
    (tests / "test_hangs.py").write_text(
        "import time\nimport pytest\n"
        "gpu = pytest.mark.gpu\n"
        "@gpu\ndef test_a_passes(): assert True\n"
        "@gpu\ndef test_b_fails(): assert 1 == 2\n"
        "@gpu\ndef test_c_hangs(): time.sleep(600)\n")
    out = tmp_path / "out"
    started = time.monotonic()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a background job: pytest must still be stopped
    try:
        rc = gpu_suite.main([str(out), "--workers", "1", "--timeout", "20", "--tests", str(tests)])
    finally:
        signal.signal(signal.SIGINT, previous)
    assert rc == 124 and time.monotonic() - started < 20 + gpu_suite.GRACE_S
    [row] = json.loads(next(out.glob("gpu_tests_*.json")).read_text())["rows"]
    assert row["timed_out"] is True and "error" not in row and row["interrupted"] == 1
    assert {t["test"].split("::")[-1]: t["outcome"] for t in row["tests"]} == {"test_a_passes": "passed",
                                                                               "test_b_fails": "failed"}


def test_gpu_tests_are_ordered_longest_first_by_the_newest_suite_record(tmp_path):
    """conftest.longest_first with conftest.recorded_seconds: the newest record by date decides (not the file name),
    tests it does not know go first, and the rest by their seconds, longest first."""
    from types import SimpleNamespace

    import conftest

    def record(date, times):
        return {"date": date, "rows": [{"tests": [{"test": f"tests.gpu.test_gpu::{n}", "seconds": s}
                                                  for n, s in times.items()]}]}

    (tmp_path / "gpu_tests_h100_b.json").write_text(json.dumps(record("2026-12-01", {"a": 1.0, "b": 9.0})))
    (tmp_path / "gpu_tests_h100_a.json").write_text(json.dumps(record("2026-12-07", {"a": 5.0, "b": 2.0,
                                                                                     "c[x]": 7.5})))
    seconds = conftest.recorded_seconds(tmp_path)
    assert seconds == {"tests.gpu.test_gpu::a": 5.0, "tests.gpu.test_gpu::b": 2.0, "tests.gpu.test_gpu::c[x]": 7.5}
    items = [SimpleNamespace(nodeid=f"tests/gpu/test_gpu.py::{n}") for n in ("b", "a", "new", "c[x]")]
    conftest.longest_first(items, seconds)
    assert [i.nodeid.split("::")[1] for i in items] == ["new", "c[x]", "a", "b"]
    assert conftest.recorded_seconds(tmp_path / "none") == {}
