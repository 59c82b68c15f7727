"""The lock on a folder being written: who holds it, and when a holder is gone (the e2e tests run two real runs)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from sdgrpo.errors import UserError
from sdgrpo.folders import LOCK, lock_holder, release_lock, take_lock


def write_lock(folder, **holder):
    (folder / LOCK).write_text(json.dumps({"host": socket.gethostname(), "verb": "train", **holder}))


def test_a_lock_is_refused_while_its_process_runs_and_taken_over_after(tmp_path, caplog):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        write_lock(tmp_path, pid=sleeper.pid)
        with pytest.raises(UserError, match=f"sdgrpo train \\(pid {sleeper.pid} on "):
            take_lock(tmp_path, "sft")
    finally:
        sleeper.kill()
        sleeper.wait()
    take_lock(tmp_path, "sft")
    assert "no longer runs" in caplog.text
    assert lock_holder(tmp_path / LOCK)["pid"] == os.getpid()
    release_lock(tmp_path)
    assert not (tmp_path / LOCK).exists()


def test_a_reused_pid_is_not_a_live_holder_but_another_hosts_lock_is_kept(tmp_path):
    """The lock records its process's start time: the same pid started later (here, this very process) is another
    process. A lock from another host cannot be checked, so it is refused and left in place."""
    write_lock(tmp_path, pid=os.getpid(), start="1")
    take_lock(tmp_path, "train")
    assert lock_holder(tmp_path / LOCK)["start"] != "1"
    release_lock(tmp_path)
    (tmp_path / LOCK).write_text(json.dumps({"pid": os.getpid(), "host": "elsewhere", "verb": "train"}))
    with pytest.raises(UserError, match="on elsewhere"):
        take_lock(tmp_path, "train")
    release_lock(tmp_path)  # not this process's: kept
    assert lock_holder(tmp_path / LOCK)["host"] == "elsewhere"


def test_a_run_folder_is_never_replaced_by_a_whole_result(tmp_path):
    """`prepare --output RUN` must not swap a training run's folder (its checkpoints) for a dataset: a run's manifest
    lists no files, so the folder is not replaceable, while a finished result of sdgrpo's is, until a file is added."""
    from sdgrpo.folders import check_replaceable, write_manifest

    run, result = tmp_path / "run", tmp_path / "result"
    (run / "checkpoint-2").mkdir(parents=True)
    (run / "checkpoint-2" / "adapter_model.safetensors").write_bytes(b"x")
    write_manifest(run, "train")
    with pytest.raises(UserError, match="the folder of a run of sdgrpo train"):
        check_replaceable(run, "--output")
    result.mkdir()
    (result / "dataset_dict.json").write_text("{}")
    write_manifest(result, "prepare", list_files=True)
    check_replaceable(result, "--output")
    (result / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"did not write \(notes.txt\)"):
        check_replaceable(result, "--output")


def test_demo_refuses_a_folder_of_the_users_and_sets_an_earlier_demos_report_aside(tmp_path, monkeypatch):
    """`sdgrpo demo --output DIR`: a folder holding the user's files is one line, exit 2, before anything is written
    (it overwrote their report.md and demo.json before); an earlier demo's folder is reused with its report, figures
    and results moved aside into previous-DATE/, never overwritten."""
    import sdgrpo.demo as demo
    from conftest import run_cli

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.md").write_text("my notes")
    (mine / "demo.json").write_text("{}")
    r = run_cli("demo", "--output", mine, "--max_steps", 1)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith(f"sdgrpo demo: error: --output {mine}: this folder holds "
                                                        "files sdgrpo did not write"), r.stderr[-500:]
    assert sorted(p.name for p in mine.iterdir()) == ["demo.json", "report.md"]
    assert (mine / "report.md").read_text() == "my notes"

    written = []

    def fake_demo(cfg, out):  # what a demo writes at the top of its folder
        for name in demo.DEMO_WRITES:
            (out / name).write_text(f"run {len(written)}")
        written.append(sorted(p.name for p in out.iterdir()))
        return 0

    monkeypatch.setattr(demo, "_demo", fake_demo)
    out = tmp_path / "demo"
    assert demo.main(demo.DemoConfig(output=str(out))) == 0
    assert demo.main(demo.DemoConfig(output=str(out))) == 0
    aside = [p for p in out.iterdir() if p.name.startswith("previous-")]
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == sorted(demo.DEMO_WRITES)
    assert all((aside[0] / n).read_text() == "run 0" and (out / n).read_text() == "run 1" for n in demo.DEMO_WRITES)
    assert not (out / "sdgrpo.lock").exists() and (out / "sdgrpo_manifest.json").is_file()


def test_demo_takes_an_earlier_versions_demo_folder_and_refuses_a_training_run(tmp_path, monkeypatch):
    """A demo folder written before demos wrote manifests (only what a demo writes: demo.json, report, figures,
    data/, adapter/) is an earlier demo's: reused, its report set aside. A train run's folder is refused naming
    --output, not train's --resume / --start_over, which demo has not."""
    import sdgrpo.demo as demo

    monkeypatch.setattr(demo, "_demo", lambda cfg, out: 0)
    old = tmp_path / "old"
    (old / "adapter").mkdir(parents=True)
    (old / "data").mkdir()
    for name in demo.DEMO_WRITES:
        (old / name).write_text("earlier")
    assert demo.main(demo.DemoConfig(output=str(old))) == 0
    aside = [p for p in old.iterdir() if p.name.startswith("previous-")]
    assert len(aside) == 1 and (aside[0] / "report.md").read_text() == "earlier"
    (old / "notes.txt").write_text("mine")  # with the manifest now, a user's file beside it stays where it is
    assert demo.main(demo.DemoConfig(output=str(old))) == 0 and (old / "notes.txt").read_text() == "mine"

    mixed = tmp_path / "mixed"  # the same, plus a file no demo writes: the user's folder
    (mixed / "adapter").mkdir(parents=True)
    (mixed / "data").mkdir()
    (mixed / "demo.json").write_text("{}")
    (mixed / "thesis.tex").write_text("mine")
    with pytest.raises(UserError, match="this folder holds files sdgrpo did not write"):
        demo.main(demo.DemoConfig(output=str(mixed)))
    assert sorted(p.name for p in mixed.iterdir()) == ["adapter", "data", "demo.json", "thesis.tex"]

    run = tmp_path / "run"
    run.mkdir()
    (run / "sdgrpo_manifest.json").write_text('{"written_by": "train"}')
    (run / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match=r"--output .*run holds a run of sdgrpo train or sft "
                                        r"\(adapter_model.safetensors\); pass another --output$"):
        demo.main(demo.DemoConfig(output=str(run)))


def test_start_over_moves_an_eval_folder_only_where_sdgrpo_eval_wrote_it(tmp_path):
    """An earlier run's entries are what --start_over moves aside; an eval/ among them only where `sdgrpo eval`
    wrote it (its manifest names every file in it), never one the user made or added a file to."""
    from sdgrpo.folders import write_manifest
    from sdgrpo.runs import earlier_run

    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    write_manifest(run, "train")
    (run / "adapter_model.safetensors").write_bytes(b"x")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (run / "eval" / "my_notes.txt").write_text("mine")
    assert earlier_run(run) == ["adapter_model.safetensors", "metrics.jsonl"]
    (run / "eval" / "my_notes.txt").unlink()
    (run / "eval" / "eval.json").write_text("{}")
    write_manifest(run / "eval", "eval", list_files=True)
    assert earlier_run(run) == ["adapter_model.safetensors", "eval", "metrics.jsonl"]
    (run / "eval" / "my_notes.txt").write_text("mine, added later")
    assert earlier_run(run) == ["adapter_model.safetensors", "metrics.jsonl"]
