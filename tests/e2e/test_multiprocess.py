"""Two processes under `accelerate launch` on CPU (DDP, and DeepSpeed ZeRO-2/3 where the extra is installed): same
rewards and metrics on both ranks, one writer, resume.

`accelerate launch --cpu` starts a single process unless an MPI set-up is configured; `--multi_gpu` uses torch's
elastic launcher, which on a machine without GPUs runs the processes on CPU with the gloo backend.

Every launch takes a free port (two launches on one port, from suites run side by side, fail to rendezvous), and
checks how its processes ended: exit handlers run, then no interpreter teardown, where gloo's threads aborted a
process now and then (exit -6) after all its work (sdgrpo.runs.leave).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).resolve().parents[1] / "probes" / "train_probe.py"
CLI_PROBE = PROBE.parent / "cli_probe.py"
# accelerate's launcher through this interpreter (not whatever `accelerate` is on PATH, or none: a virtual
# environment used without activating it), so that these tests run wherever the suite does.
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]
cpu_only = pytest.mark.skipif(torch.cuda.is_available(),
                              reason="the CPU multi-process path; GPUs take another")


def _free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def _ended_without_teardown(debug: Path, run: subprocess.CompletedProcess) -> None:
    """Both processes ran their exit handlers, then left without the interpreter's teardown of their objects, where
    gloo's threads (alive as long as the group object, after destroy_process_group too) met it."""
    for rank in (0, 1):
        exit_file = debug / f"exit_{rank}.txt"
        assert exit_file.is_file(), f"rank {rank} ran no exit handler: {run.stderr[-3000:]}"
        at_exit = exit_file.read_text().split()  # the threads beside the exit handlers
        assert not (debug / f"teardown_{rank}.txt").exists(), f"rank {rank} went on to the teardown with {at_exit}"
        exit_file.unlink()


def _launcher(launch_args, tiny_model_dir, data, out, debug):
    def launch(*extra):
        return subprocess.run([*LAUNCH, *launch_args, "--num_processes", "2", "--num_machines", "1",
                               "--main_process_port", _free_port(), "--mixed_precision", "no", str(PROBE), str(debug),
                               "--model_name_or_path", str(tiny_model_dir), "--dataset_path", str(data),
                               "--output_dir", str(out), "--per_device_train_batch_size", "4",
                               "--num_generations", "4", "--max_completion_length", "8", "--report_to", "none",
                               "--save_steps", "2", *extra], capture_output=True, text=True, timeout=900)

    return launch


def _check_two_steps_and_resume(launch, out, debug):
    """2 steps: both ranks logged the same collapse metrics, of the whole generation batch; the main process alone
    wrote metrics, one checkpoint and the adapter. Then resume with the same number of processes to 4 steps."""
    r = launch("--max_steps", "2")
    assert r.returncode == 0, r.stderr[-4000:]
    _ended_without_teardown(debug, r)
    ranks = [[json.loads(x) for x in (debug / f"rank{i}.jsonl").read_text().splitlines()] for i in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 2
    for a, b in zip(*ranks):
        # Each rank generated its own 4 completions; equal collapse metrics mean both judged the gathered 8.
        assert {k: v for k, v in a.items() if k.startswith("collapse/")} == \
            {k: v for k, v in b.items() if k.startswith("collapse/")}
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"reward"' in x]
    assert steps == [1, 2]  # written once, by the main process
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert (out / "adapter_model.safetensors").is_file()
    ckpt = out / "checkpoint-2"
    assert (ckpt / "rng_state_0.safetensors").is_file() and (ckpt / "rng_state_1.safetensors").is_file()

    r = launch("--max_steps", "4", "--resume")
    assert r.returncode == 0, r.stderr[-4000:]
    _ended_without_teardown(debug, r)
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"reward"' in x]
    assert steps == [1, 2, 3, 4]
    assert json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4
    return ranks


@cpu_only
def test_two_processes_train_and_agree(tmp_path, tiny_model_dir, prepared):
    data, out, debug = prepared, tmp_path / "run", tmp_path / "debug"
    debug.mkdir()
    launch = _launcher(["--multi_gpu", "--dynamo_backend", "no"], tiny_model_dir, data, out, debug)
    _check_two_steps_and_resume(launch, out, debug)


@cpu_only
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="the deepspeed extra is not installed")
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_on_two_processes(stage, tmp_path, tiny_model_dir, prepared):
    """The shipped DeepSpeed configs (ZeRO-2, ZeRO-3) on two CPU processes (DeepSpeed's CPU accelerator, gloo): the
    same checks as DDP, DeepSpeed's own checkpoint format, and under ZeRO-3 (parameters partitioned across ranks) an
    adapter saved whole: every LoRA matrix r x d or d x r, none empty."""
    from safetensors.torch import load_file

    data, out, debug = prepared, tmp_path / "run", tmp_path / "debug"
    debug.mkdir()
    config = ROOT / "configs" / "accelerate" / f"deepspeed_zero{stage}.yaml"
    launch = _launcher(["--config_file", str(config)], tiny_model_dir, data, out, debug)
    if stage == 3:  # at temperature 0.9 the reward runs its own pass, over parameters that ZeRO-3 partitions
        _check_two_steps_and_resume(lambda *a: launch(*a, "--temperature", "0.9"), out, debug)
    else:
        _check_two_steps_and_resume(launch, out, debug)
    assert (out / "checkpoint-2" / "global_step2").is_dir()  # DeepSpeed's engine saved its state
    adapter = load_file(str(out / "adapter_model.safetensors"))
    layers = json.loads((Path(tiny_model_dir) / "config.json").read_text())["num_hidden_layers"]
    assert len(adapter) == layers * 7 * 2  # every linear projection of every layer, A and B
    assert all(16 in t.shape and t.numel() > 16 and torch.isfinite(t).all() for t in adapter.values())


@cpu_only
def test_two_processes_log_the_distillation_terms_as_per_token_means(tmp_path, tiny_model_dir, corpus,
                                                                      tiny_tokenizer):
    """`sdgrpo sft` with a teacher on two processes with 2 micro-batches each, on raw text: the main process
    prepares it while the other waits, and every step's logged loss is the weighted sum of its logged
    cross-entropy and KL (each process's terms are shares of the step's token count). Its processes end as sdgrpo's
    do: exit handlers, no interpreter teardown (`sdgrpo sft` once left its process group alive into it)."""
    from conftest import make_llama

    teacher = tmp_path / "teacher"
    make_llama(tiny_tokenizer, seed=5).save_pretrained(teacher)
    tiny_tokenizer.save_pretrained(teacher)
    out, debug = tmp_path / "sft", tmp_path / "debug"
    debug.mkdir()
    r = subprocess.run([*LAUNCH, "--multi_gpu", "--dynamo_backend", "no", "--num_processes", "2", "--num_machines",
                        "1", "--main_process_port", _free_port(), "--mixed_precision", "no", str(CLI_PROBE),
                        str(debug), "sft",
                        "--model_name_or_path", str(tiny_model_dir), "--dataset_path", str(corpus / "ruth.txt"),
                        "--output_dir", str(out), "--max_steps", "3", "--per_device_train_batch_size", "2",
                        "--gradient_accumulation_steps", "2", "--learning_rate", "3e-3", "--report_to", "none",
                        "--save_strategy", "no", "--teacher_model_name_or_path", str(teacher), "--kd_weight", "0.4"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    _ended_without_teardown(debug, r)
    assert r.stderr.count("prepared with the default options") == 1  # by the main process alone
    assert json.loads((out / "data" / "prepare.json").read_text())["prompts"] > 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [x["step"] for x in rows] == [1, 2, 3]
    for x in rows:
        assert x["loss"] == pytest.approx(0.6 * x["kd/cross_entropy"] + 0.4 * x["kd/kl"], rel=1e-3, abs=1e-6)


def test_leave_runs_the_exit_handlers_then_skips_the_teardown(tmp_path):
    """sdgrpo.runs.leave in a process of a multi-process launch (WORLD_SIZE 2): its exit handlers run, its output is
    flushed, its exit code kept, and the interpreter does not tear itself down; in a lone process it hands the code
    back and the process ends as usual."""
    script = "\n".join([
        "import sys", f"sys.path.insert(0, {str(PROBE.parent)!r})", "from exit_watch import watch",
        f"watch({str(tmp_path)!r})", "from sdgrpo.runs import leave", "print('not flushed yet', end='')",
        "sys.exit(leave(3))"])
    for world, torn_down in (("2", False), ("1", True)):
        r = subprocess.run([sys.executable, "-c", script], env={**os.environ, "WORLD_SIZE": world},
                           capture_output=True, text=True, timeout=300)
        assert (r.returncode, r.stdout) == (3, "not flushed yet"), r.stderr[-2000:]
        assert (tmp_path / "exit_0.txt").is_file()
        assert (tmp_path / "teardown_0.txt").is_file() == torn_down
        for name in ("exit_0.txt", "teardown_0.txt"):
            (tmp_path / name).unlink(missing_ok=True)


def test_the_exit_probe_leaves_out_a_thread_that_ends_while_it_reads_the_names(tmp_path):
    """exit_watch's thread list: a thread whose name file is gone when opened, or whose process is gone when read
    (ProcessLookupError, as gloo's threads ended under the exit handler of a DeepSpeed run on 2026-12-07), is left out
    and the file still written (the test above failed for want of it)."""
    sys.path.insert(0, str(PROBE.parent))
    from exit_watch import _write_threads

    fake = 10_000  # stand-in descriptors of the tasks' name files, above any real one

    def read(fd, n):
        if fd == fake + 2:
            raise ProcessLookupError(3, "No such process")
        return b"thread-%d" % (fd - fake)

    def open_fd(path, flags, *mode):
        if "/task/" in path:
            task = int(path.split("/")[4])
            if task == 3:
                raise FileNotFoundError(path)
            return fake + task
        return os.open(path, flags, *mode)

    closed = []
    out = tmp_path / "exit_0.txt"
    _write_threads(str(out), listdir=lambda _: ["1", "2", "3", "4"], open_fd=open_fd, read=read,
                   close=lambda fd: closed.append(fd - fake) if fd >= fake else os.close(fd))
    assert out.read_bytes() == b"thread-1\nthread-4" and closed == [1, 2, 4]
