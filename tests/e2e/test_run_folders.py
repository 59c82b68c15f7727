"""What sdgrpo promises about your files (docs/usage.md): it never deletes, moves or overwrites what it did not write;
one process writes a folder at a time; an earlier run is continued or moved aside, never mixed; text and outputs do
not overlap; a folder that cannot be written is one line before any work."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from conftest import run_cli


def verb_args(verb, model, data, out, *extra):
    """A small run of ``train`` or ``sft`` on the tiny model."""
    grpo = ("--num_generations", 4, "--max_completion_length", 8, "--collapse_guard", "off") if verb == "train" else ()
    return [verb, "--model_name_or_path", model, "--dataset_path", data, "--output_dir", out,
            "--per_device_train_batch_size", 4, "--report_to", "none", *grpo, *extra]


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(r, verb: str) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert lines[-1].startswith(f"sdgrpo {verb}: error: "), r.stderr[-3000:]
    return lines[-1]


def steps_logged(out: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"reward"' in x]


@pytest.mark.parametrize("verb", ["train", "sft"])
def test_text_where_the_prepared_copy_goes_is_refused_and_kept(verb, tmp_path, tiny_model_dir, corpus):
    """`--dataset_path data --output_dir .`: the user's text is the folder raw text is prepared into. It stays as
    it was (it used to be deleted to prepare it again)."""
    (tmp_path / "data").mkdir()
    shutil.copy(corpus / "jonah.txt", tmp_path / "data" / "jonah.txt")
    before = snapshot(tmp_path)
    r = run_cli(*verb_args(verb, tiny_model_dir, "data", ".", "--max_steps", 1), cwd=tmp_path)
    assert "--dataset_path data is inside --output_dir ." in one_error_line(r, verb)
    assert snapshot(tmp_path) == before


def test_a_folder_of_other_files_is_not_written_into(tmp_path, tiny_model_dir, prepared):
    """An --output_dir holding the user's files (here a README.md, the name of sdgrpo's model card) is refused, not
    written into."""
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "README.md").write_text("my project\n")
    (mine / "notes.txt").write_text("keep\n")
    r = run_cli(*verb_args("train", tiny_model_dir, prepared, mine, "--max_steps", 1))
    assert "this folder holds files sdgrpo did not write (README.md, notes.txt)" in one_error_line(r, "train")
    assert snapshot(mine) == {"README.md": b"my project\n", "notes.txt": b"keep\n"}


@pytest.mark.slow
def test_prepare_replaces_only_its_own_output(tmp_path, tiny_model_dir, corpus):
    prep = ["--model", tiny_model_dir, "--max_prompt_tokens", 24]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep\n")
    r = run_cli("prepare", corpus / "jonah.txt", "--output", mine, *prep)
    assert "holds files sdgrpo did not write (notes.txt)" in one_error_line(r, "prepare")
    assert snapshot(mine) == {"notes.txt": b"keep\n"}

    out = tmp_path / "prepared"
    for book in ("jonah.txt", "ruth.txt"):  # the second replaces the first: both are sdgrpo's
        r = run_cli("prepare", corpus / book, "--output", out, *prep)
        assert r.returncode == 0, r.stderr[-3000:]
        assert json.loads((out / "prepare.json").read_text())["config"]["inputs"] == [str(corpus / book)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "prepared"]  # no .partial, no .replaced-*
    (out / "notes.txt").write_text("mine now\n")
    kept = snapshot(out)
    r = run_cli("prepare", corpus / "jonah.txt", "--output", out, *prep)
    assert "holds files sdgrpo did not write (notes.txt)" in one_error_line(r, "prepare")
    assert snapshot(out) == kept


def test_outputs_inside_the_text_they_read_are_refused(tmp_path, tiny_model_dir, corpus):
    """A run or prepare output inside the text folder would be read as text by the next run: refused, nothing
    written."""
    texts = tmp_path / "texts"
    texts.mkdir()
    shutil.copy(corpus / "jonah.txt", texts / "jonah.txt")
    r = run_cli(*verb_args("train", tiny_model_dir, texts, texts / "run", "--max_steps", 1))
    assert f"--output_dir {texts / 'run'} is inside the text of --dataset_path {texts}" in one_error_line(r, "train")
    r = run_cli("prepare", texts, "--output", texts / "prepared", "--model", tiny_model_dir)
    assert f"--output {texts / 'prepared'} and the input {texts} overlap" in one_error_line(r, "prepare")
    assert sorted(p.name for p in texts.iterdir()) == ["jonah.txt"]


@contextmanager
def read_only(folder: Path):
    """``folder`` made unwritable for this user: chmod, or as root (which chmod does not stop) the immutable
    attribute."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        made = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
        undo = ["chattr", "-i", str(folder)]
    else:
        folder.chmod(0o555)
        made, undo = True, ["chmod", "755", str(folder)]
    try:
        try:
            (folder / "probe").mkdir()
            writable = True
        except OSError:
            writable = False
        if not made or writable:
            pytest.skip("cannot make a read-only folder on this machine")
        yield folder
    finally:
        subprocess.run(undo, capture_output=True)


def lora_adapter(model_dir: Path, folder: Path) -> Path:
    """A LoRA adapter of the tiny model with non-zero weights, saved by PEFT (no training needed to export one)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("verb", ["prepare", "train", "export"])
def test_a_target_that_cannot_be_written_is_one_line_before_any_work(verb, tmp_path, tiny_model_dir, prepared,
                                                                    corpus):
    """A read-only target is refused at the start, in one line (it used to be a traceback after the whole prepare,
    or the whole merge)."""
    with read_only(tmp_path / "locked") as locked:
        target = locked / "out"
        argv = {"prepare": ["prepare", corpus / "jonah.txt", "--output", target, "--model", tiny_model_dir],
                "train": verb_args("train", tiny_model_dir, prepared, target, "--max_steps", 1),
                "export": ["export", "--adapter", lora_adapter(tiny_model_dir, tmp_path / "adapter"), "--output",
                           target]}[verb]
        r = run_cli(*argv)
        line = one_error_line(r, verb)
        assert ": cannot write there (" in line and "nothing was done" in line, line
        assert "parity" not in r.stderr and "prepared" not in r.stdout  # refused before the work
        assert list(locked.iterdir()) == []


def test_export_leaves_a_partial_folder_alone_unless_it_is_a_dead_exports(tmp_path, tiny_model_dir):
    """``OUTPUT.partial`` is removed only where it is a stale export's (its lock's process is gone); the user's
    folder of that name is refused and kept, and a live export's lock refuses a second export."""
    adapter = lora_adapter(tiny_model_dir, tmp_path / "adapter")
    partial = tmp_path / "merged.partial"
    partial.mkdir()
    (partial / "mine.txt").write_text("keep\n")
    r = run_cli("export", "--adapter", adapter, "--output", tmp_path / "merged")
    assert "merged.partial exists and was not made by sdgrpo" in one_error_line(r, "export")
    assert snapshot(partial) == {"mine.txt": b"keep\n"}
    shutil.rmtree(partial)

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        partial.mkdir()
        (partial / "sdgrpo.lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(),
                                                         "verb": "export"}))
        r = run_cli("export", "--adapter", adapter, "--output", tmp_path / "merged")
        assert f"sdgrpo export (pid {holder.pid} on {socket.gethostname()}" in one_error_line(r, "export")
        assert partial.is_dir() and not (tmp_path / "merged").exists()
    finally:
        holder.kill()
        holder.wait()
    r = run_cli("export", "--adapter", adapter, "--output", tmp_path / "merged")  # its process is gone: stale
    assert r.returncode == 0, r.stderr[-3000:]
    assert "no longer runs" in r.stderr and not partial.exists()
    assert (tmp_path / "merged" / "parity.json").is_file() and (tmp_path / "merged" / "sdgrpo_manifest.json").is_file()


@pytest.mark.slow
def test_a_rerun_is_refused_and_start_over_moves_the_earlier_run_aside(tmp_path, tiny_model_dir, prepared):
    """A second run into a finished run's folder without --resume is refused, nothing changed; with --start_over the
    earlier checkpoints and metrics move into previous-DATE/ and the new run starts clean, so a later --resume
    continues the new run alone (it used to log steps 1, 2 then 3, 4 of another run's checkpoints)."""
    out = tmp_path / "run"
    args = verb_args("train", tiny_model_dir, prepared, out, "--save_steps", 2)
    first = run_cli(*args, "--max_steps", 4)
    assert first.returncode == 0, first.stderr[-3000:]
    before = snapshot(out)
    r = run_cli(*args, "--max_steps", 2)
    line = one_error_line(r, "train")
    assert f"--output_dir {out} holds an earlier run" in line and "--resume (from checkpoint-4)" in line
    assert "--start_over" in line and snapshot(out) == before

    (out / "notes.txt").write_text("mine\n")
    again = run_cli(*args, "--max_steps", 2, "--start_over", "--learning_rate", "1e-3")
    assert again.returncode == 0, again.stderr[-3000:]
    (aside,) = out.glob("previous-*")
    assert snapshot(aside) == {k: v for k, v in before.items() if not k.startswith("sdgrpo_manifest")}
    assert (out / "notes.txt").read_text() == "mine\n"  # not the run's: left where it was
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"] and steps_logged(out) == [1, 2]
    resumed = run_cli(*args, "--max_steps", 4, "--resume", "--learning_rate", "1e-3")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert steps_logged(out) == [1, 2, 3, 4]
    assert "learning_rate: 0.001" in (out / "resolved_config.yaml").read_text()


@pytest.mark.slow
def test_two_runs_on_one_folder_the_second_is_refused_and_a_dead_runs_lock_is_taken_over(tmp_path, tiny_model_dir,
                                                                                       prepared):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "sdgrpo.cli", *map(str, verb_args("train", tiny_model_dir, prepared, out,
                                                                     "--save_steps", 1))]
    first = subprocess.Popen([*args, "--max_steps", "500"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while not (out / "checkpoint-1" / "sdgrpo_complete.json").exists():
            assert first.poll() is None, first.communicate()[1][-3000:]
            assert time.time() - t0 < 300
            time.sleep(0.2)
        second = subprocess.run([*args, "--max_steps", "1", "--resume"], capture_output=True, text=True)
        line = one_error_line(second, "train")
        assert f"sdgrpo train (pid {first.pid} on {socket.gethostname()}" in line and "holds" in line
        assert first.poll() is None  # the first run goes on
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.communicate()
    assert (out / "sdgrpo.lock").is_file()  # left by the killed run
    last = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if (p / "sdgrpo_complete.json").exists())
    resumed = subprocess.run([*args, "--max_steps", str(last + 1), "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "no longer runs" in resumed.stderr and not (out / "sdgrpo.lock").exists()
    assert steps_logged(out) == list(range(1, last + 2))


@pytest.mark.slow
def test_resume_takes_the_folder_written_another_way_and_a_moved_run(tmp_path, tiny_model_dir, corpus):
    """`run/` and `run` are one folder, and a run folder moved elsewhere (raw text prepared inside it) resumes;
    settings that differ are still refused, with advice that keeps the run."""
    (tmp_path / "texts").mkdir()
    shutil.copy(corpus / "jonah.txt", tmp_path / "texts" / "jonah.txt")

    def train(out, *extra):
        return run_cli(*verb_args("train", tiny_model_dir, "texts", out, "--save_steps", 1, *extra), cwd=tmp_path)

    assert train("a/run", "--max_steps", 1).returncode == 0
    r = train("a/run/", "--max_steps", 2, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    shutil.move(tmp_path / "a" / "run", tmp_path / "moved")
    r = train(tmp_path / "moved", "--max_steps", 3, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert steps_logged(tmp_path / "moved") == [1, 2, 3]
    assert "using the prepared data" in r.stderr  # the moved run's own prepared copy
    r = train(tmp_path / "moved", "--max_steps", 4, "--resume", "--learning_rate", "0.5")
    line = one_error_line(r, "train")
    assert "was trained with other settings (learning_rate" in line
    assert f"resume with the settings in {tmp_path / 'moved' / 'resolved_config.yaml'}" in line


def test_eval_and_generate_never_write_over_the_users_files(tmp_path, prepared, tiny_model_dir):
    """`eval --output` into a folder of the user's and `generate --output` onto an existing file: one line each,
    before any model loads, the user's files as they were; an earlier eval's own folder is replaced whole."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.md").write_text("my report")
    r = run_cli("eval", "--model_name_or_path", tiny_model_dir, "--data", prepared, "--output", mine,
                "--max_prompts", 2, "--samples", 1, "--max_new_tokens", 4, "--temperatures", "1.0")
    assert "holds files sdgrpo did not write (report.md)" in one_error_line(r, "eval")
    assert (mine / "report.md").read_text() == "my report" and sorted(p.name for p in mine.iterdir()) == ["report.md"]
    ours = tmp_path / "eval"
    for _ in range(2):  # the second run replaces the first's folder, which sdgrpo wrote
        r = run_cli("eval", "--model_name_or_path", tiny_model_dir, "--data", prepared, "--output", ours,
                    "--max_prompts", 2, "--samples", 1, "--max_new_tokens", 4, "--temperatures", "1.0")
        assert r.returncode == 0, r.stderr[-3000:]
    assert {"eval.json", "report.md", "frontier.png"} <= {p.name for p in ours.iterdir()}
    assert not ours.with_name("eval.partial").exists()
    existing = tmp_path / "samples.jsonl"
    existing.write_text("precious\n")
    r = run_cli("generate", "--model_name_or_path", tiny_model_dir, "--prompt", "In the beginning",
                "--max_new_tokens", 4, "--output", existing)
    assert "already exists; pass a new file name" in one_error_line(r, "generate")
    assert existing.read_text() == "precious\n"


def test_resuming_a_run_that_reached_max_steps_trains_nothing(tmp_path, tiny_model_dir, prepared):
    """A run that reached --max_steps, resumed (as a run killed after its last checkpoint would be): nothing is
    trained (transformers' Trainer trains one step past max_steps there, and with a constant learning rate changed
    the adapter), the final adapter is the last checkpoint's, the metrics stop at max_steps; a larger --max_steps
    trains on from there."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    args = verb_args("train", tiny_model_dir, prepared, out, "--save_steps", 1, "--lr_scheduler_type", "constant",
                     "--learning_rate", "1e-3")
    assert run_cli(*args, "--max_steps", 2).returncode == 0
    before = load_file(out / "adapter_model.safetensors")
    r = run_cli(*args, "--max_steps", 2, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "checkpoint-2 is the run's last step (--max_steps 2)" in r.stderr
    assert not (out / "checkpoint-3").exists() and steps_logged(out) == [1, 2]
    after = load_file(out / "adapter_model.safetensors")
    last = load_file(out / "checkpoint-2" / "adapter_model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) and torch.equal(last[k], after[k])
                                                 for k in after)
    assert run_cli(*args, "--max_steps", 3, "--resume").returncode == 0
    assert steps_logged(out) == [1, 2, 3]
