"""Interruption, resume, NaN losses and bad config values: nothing lost, one clear line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from sdgrpo.checkpointing import COMPLETE_MARKER, last_complete_checkpoint


def cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "sdgrpo.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def train_args(model, data, out, *extra):
    return ["train", "--model_name_or_path", model, "--dataset_path", data, "--output_dir", out,
            "--per_device_train_batch_size", 4, "--num_generations", 4, "--max_completion_length", 8,
            "--report_to", "none", "--collapse_guard", "off", *extra]


def steps_logged(out) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(x)["step"] for x in path.read_text().splitlines() if '"reward"' in x]


def wait_for(cond, proc, timeout=300):
    t0 = time.time()
    while not cond():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() - t0 < timeout
        time.sleep(0.2)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_saves_adapter_and_state(sig, code, tmp_path, prepared, tiny_model_dir):
    """Ctrl-C, and SIGTERM (what a scheduler or `timeout` sends), finish the step and save everything."""
    out = tmp_path / "run"
    proc = cli(*train_args(tiny_model_dir, prepared, out, "--max_steps", 500, "--save_steps", 1000))
    wait_for(lambda: len(steps_logged(out)) >= 2, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-3000:]
    assert "continue with the same command and --resume" in err.splitlines()[-1]
    assert (out / "adapter_model.safetensors").is_file()
    ckpt = last_complete_checkpoint(out)
    assert ckpt is not None and (ckpt / "trainer_state.json").is_file()
    assert {"optimizer.safetensors", "optimizer.json", "scheduler.json", "rng_state.safetensors"} <= {
        p.name for p in ckpt.iterdir()}
    assert not [p.name for p in ckpt.iterdir() if p.suffix in (".pt", ".pth", ".bin", ".pkl")]  # no pickles
    assert int(ckpt.name.split("-")[1]) == json.loads((ckpt / "trainer_state.json").read_text())["global_step"]


def test_kill_9_then_resume_reaches_the_same_step_count(tmp_path, prepared, tiny_model_dir):
    out = tmp_path / "run"
    args = train_args(tiny_model_dir, prepared, out, "--max_steps", 6, "--save_steps", 2)
    proc = cli(*args)
    wait_for(lambda: (out / "checkpoint-2" / COMPLETE_MARKER).exists(), proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    # A half-written checkpoint (no completion marker) must never be picked up.
    (out / "checkpoint-9").mkdir()
    (out / "checkpoint-9" / "trainer_state.json").write_text("{")
    resumed = subprocess.run([sys.executable, "-m", "sdgrpo.cli", *map(str, args), "--resume"],
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert steps_logged(out) == [1, 2, 3, 4, 5, 6]
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    assert not (out / "training_args.bin").exists()  # no pickle in the final output

    changed = subprocess.run([sys.executable, "-m", "sdgrpo.cli", *map(str, args), "--learning_rate", "0.5",
                              "--resume"], capture_output=True, text=True)
    assert changed.returncode == 2
    assert "was trained with other settings (learning_rate" in changed.stderr.splitlines()[-1]


def test_kill_9_then_resume_keeps_the_best_heldout_adapter_of_the_uninterrupted_run(tmp_path, prepared,
                                                                                     tiny_model_dir):
    """The held-out record and the best adapter travel with each checkpoint: a run killed after a checkpoint and
    resumed is the uninterrupted run bit for bit: its history (step 0 included, and the steps trained again), best
    step, last checkpoint's adapter and final adapter. The best adapter once sat in each checkpoint under PEFT's file
    name, which transformers' resume loads as a second adapter while it skips the checkpoint's own: the resumed run
    trained its adapter on from the initial values."""
    from safetensors.torch import load_file

    extra = ("--max_steps", 6, "--save_steps", 2, "--heldout_eval_steps", 2, "--keep_best_heldout", "true",
             "--heldout_eval_prompts", 8, "--learning_rate", 0.02)
    whole = subprocess.run([sys.executable, "-m", "sdgrpo.cli", *map(str, train_args(
        tiny_model_dir, prepared, tmp_path / "whole", *extra))], capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr[-3000:]
    out = tmp_path / "run"
    args = train_args(tiny_model_dir, prepared, out, *extra)
    proc = cli(*args)
    wait_for(lambda: (out / "checkpoint-4" / COMPLETE_MARKER).exists(), proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    resumed = subprocess.run([sys.executable, "-m", "sdgrpo.cli", *map(str, args), "--resume"],
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want, got = (json.loads((d / "heldout.json").read_text()) for d in (tmp_path / "whole", out))
    assert [h["step"] for h in got["history"]] == [0, 2, 4, 6]
    assert got["history"] == want["history"]
    assert want["best"][0] <= 4 and got["best"] == want["best"]
    for name in ("adapter_model.safetensors", "checkpoint-4/adapter_model.safetensors",
                 "checkpoint-6/adapter_model.safetensors"):
        a, b = (load_file(d / name) for d in (tmp_path / "whole", out))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    before = load_file(out / "checkpoint-4" / "adapter_model.safetensors")
    assert any(not torch.equal(a[k], before[k]) for k in a)  # the resumed steps trained it on
    # what the checkpoints keep of the best adapter is not an adapter sub-folder to transformers' resume
    assert not [p for p in out.glob("checkpoint-*/*/adapter_model.*")]


@pytest.mark.slow
def test_sft_saves_on_ctrl_c_and_resumes_to_the_uninterrupted_runs_adapter(tmp_path, prepared, tiny_model_dir):
    """`sdgrpo sft` as `train`: Ctrl-C saves a whole checkpoint and the adapter (exit 130, the command to continue);
    --resume continues from it, logs each step once, and ends with the adapter of a run never interrupted."""
    from safetensors.torch import load_file

    def sft_args(out, steps, *extra):
        return ["sft", "--model_name_or_path", tiny_model_dir, "--dataset_path", prepared, "--output_dir", out,
                "--per_device_train_batch_size", 4, "--learning_rate", "3e-3", "--report_to", "none",
                "--save_steps", 1000, "--max_steps", steps, "--lr_scheduler_type", "constant", *extra]

    def loss_steps(out):
        return [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]

    out = tmp_path / "run"
    proc = cli(*sft_args(out, 500))
    wait_for(lambda: (out / "metrics.jsonl").is_file() and len(loss_steps(out)) >= 2, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert err.splitlines()[-1].startswith("sdgrpo sft: interrupted by Ctrl-C at step ")
    assert "continue with the same command and --resume" in err.splitlines()[-1]
    ckpt = last_complete_checkpoint(out)
    assert ckpt is not None and (out / "adapter_model.safetensors").is_file()
    assert not [p.name for p in ckpt.iterdir() if p.suffix in (".pt", ".pth", ".bin", ".pkl")]  # no pickles
    stopped = int(ckpt.name.split("-")[1])
    total = stopped + 2
    resumed = subprocess.run([sys.executable, "-m", "sdgrpo.cli", *map(str, sft_args(out, total)), "--resume"],
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert loss_steps(out) == list(range(1, total + 1))
    whole = subprocess.run([sys.executable, "-m", "sdgrpo.cli", *map(str, sft_args(tmp_path / "whole", total))],
                           capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr[-3000:]
    a, b = (load_file(d / "adapter_model.safetensors") for d in (tmp_path / "whole", out))
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_a_damaged_last_checkpoint_and_a_torn_metrics_line_resume_from_the_one_before(tmp_path, prepared,
                                                                                      tiny_model_dir):
    """The newest checkpoint's adapter cut short and the last metrics line torn (a crash while writing): --resume
    names the damage, continues from the checkpoint before, logs each step once, and sets the damaged one aside."""
    out = tmp_path / "run"
    args = [sys.executable, "-m", "sdgrpo.cli", *map(str, train_args(tiny_model_dir, prepared, out, "--save_steps", 2))]
    first = subprocess.run([*args, "--max_steps", "4"], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    adapter = out / "checkpoint-4" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[: adapter.stat().st_size // 2])
    with (out / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 5, "rew')
    resumed = subprocess.run([*args, "--max_steps", "6", "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "checkpoint-4 is damaged (adapter_model.safetensors holds" in resumed.stderr
    assert "line(s) cut short" in resumed.stderr
    assert steps_logged(out) == [1, 2, 3, 4, 5, 6]
    assert [p.name for p in out.glob("previous-*/*")] == ["checkpoint-4"]
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6 and [h["step"] for h in state["log_history"] if "reward" in h] == [1, 2, 3, 4,
                                                                                                        5, 6]


def test_nan_loss_stops_and_keeps_the_last_good_adapter(tmp_path, prepared, tiny_model_dir, monkeypatch):

    from sdgrpo.config import parse_train_args
    from sdgrpo.errors import UserError
    from sdgrpo.grpo_trainer import SelfDistillGRPOTrainer
    from sdgrpo.train import main

    original = SelfDistillGRPOTrainer.compute_loss

    def compute_loss(self, model, inputs, *a, **k):
        loss = original(self, model, inputs, *a, **k)
        return loss * torch.nan if self.state.global_step >= 2 else loss

    monkeypatch.setattr(SelfDistillGRPOTrainer, "compute_loss", compute_loss)
    out = tmp_path / "nan"
    train_cfg, model_cfg = parse_train_args([str(a) for a in train_args(
        tiny_model_dir, prepared, out, "--max_steps", 6, "--save_steps", 1)[1:]])
    message = r"the loss became non-finite \(grad_norm nan\) at step 3; the last good adapter \(checkpoint-2\)"
    with pytest.raises(UserError, match=message):
        main(train_cfg, model_cfg)
    from safetensors.torch import load_file

    saved = load_file(out / "adapter_model.safetensors")
    good = load_file(out / "checkpoint-2" / "adapter_model.safetensors")
    assert all(torch.equal(saved[k], good[k]) for k in good)
    assert all(torch.isfinite(v).all() for v in saved.values())
    assert not (out / "checkpoint-3").exists()


@pytest.mark.parametrize("yaml_text, message", [
    ("learning_rate: abc\n", "argument --learning_rate/--learning-rate: invalid float value: 'abc'"),
    ("lr_scheduler_type: cosinus\n", "invalid choice: 'cosinus' (choose from 'linear', 'cosine'"),
    ("use_cpu: perhaps\n", "Truthy value expected"),
    ("num_generations: 3\nper_device_train_batch_size: 4\ngeneration_batch_size: 4\n",
     "generation_batch_size (4) must be divisible by num_generations (3)"),
])
def test_mistyped_config_values_name_the_option(tmp_path, yaml_text, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml_text)
    r = subprocess.run([sys.executable, "-m", "sdgrpo.cli", "train", "--config", cfg], capture_output=True,
                       text=True)
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("sdgrpo train: error:") and message in last, r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_more_bad_inputs_are_one_line(tmp_path, prepared, tiny_model_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    (tmp_path / "a.csv").write_text("id,body\n1,hello there\n")
    pq.write_table(pa.table({"body": ["hello"]}), tmp_path / "b.parquet")
    Dataset.from_dict({"text": ["x"]}).save_to_disk(str(tmp_path / "noprompt"))
    cases = [
        (["prepare", tmp_path / "a.csv", "--output", tmp_path / "o"], "a.csv: no column 'text'"),
        (["prepare", tmp_path / "b.parquet", "--output", tmp_path / "o"], "b.parquet: no column 'text'"),
        (train_args(tiny_model_dir, tmp_path / "noprompt", tmp_path / "x"), "dataset has no 'prompt' column"),
        (["eval", "--data", prepared, "--adapter", tmp_path, "--output", tmp_path / "e",
          "--model_name_or_path", tiny_model_dir], "no adapter_config.json"),
        (["pretrain", "--data_dir", tmp_path / "nothing"], "nothing: no such folder; pass --data_dir"),
        (["pretrain"], "pretrain needs --data_dir"),
        (["prepare", prepared, "--output", tmp_path / "o"], "dataset has no column 'text'"),
    ]
    for args, message in cases:
        r = subprocess.run([sys.executable, "-m", "sdgrpo.cli", *map(str, args)], capture_output=True, text=True)
        assert r.returncode == 2, (args, r.stderr[-2000:])
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("sdgrpo ") and message in last, (args, r.stderr[-2000:])
        assert "Traceback" not in r.stderr


def test_nan_and_none_rewards_are_excluded_not_best(tmp_path, prepared, tiny_model_dir):
    """TRL excludes a NaN/None reward from the group baseline and gives it zero advantage; we count it."""
    import math

    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig

    from sdgrpo.compat import ensure_trl_runs_without_triton
    from sdgrpo.grpo_trainer import SelfDistillGRPOTrainer

    ensure_trl_runs_without_triton()
    seen = {}

    def reward(prompts, completions, completion_ids, **kw):
        out = [float(-len(c)) for c in completions]
        out[0], out[1] = math.nan, None
        return out

    args = GRPOConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=6, report_to="none", use_cpu=True, bf16=False, save_strategy="no")
    trainer = SelfDistillGRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), reward_funcs=[reward], args=args,
        train_dataset=load_from_disk(str(prepared))["train"].select(range(4)),
        processing_class=AutoTokenizer.from_pretrained(tiny_model_dir))
    original = trainer._generate_and_score_completions

    def capture(inputs):
        out = original(inputs)
        seen.update(out)
        return out

    trainer._generate_and_score_completions = capture
    trainer.train()
    adv = seen["advantages"]
    assert adv[0] == 0 and adv[1] == 0  # unscorable: no push either way
    assert torch.isfinite(adv).all()
    assert trainer.state.log_history[0]["collapse/unscored_rate"] == pytest.approx(0.5)


@pytest.mark.parametrize("args, message", [
    (["prepare"], "need PATH... and --output FOLDER"),
    (["demo", "--max_steps", "x"], "argument --max_steps/--max-steps: invalid int value: 'x'"),
    (["eval", "--bogus", "1"], "unknown option(s) bogus;"),
    (["pretrain", "--max_steps"], "argument --max_steps/--max-steps: expected one argument"),
    (["export", "--dtype", "float32", "stray"], "unexpected argument(s) stray"),
    (["generate", "--prompt", "x", "--seed", "1.5"], "argument --seed: invalid int value: '1.5'"),
])
def test_every_verb_answers_bad_arguments_in_one_line(args, message):
    r = subprocess.run([sys.executable, "-m", "sdgrpo.cli", *args], capture_output=True, text=True)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith(f"sdgrpo {args[0]}: error:")




BAD_INPUTS = {  # kind -> (argv with {file} {binary} {out} {model} {data} placeholders, what the line must say)
    "not text": (["generate", "--model_name_or_path", "{model}", "--prompts", "{binary}"], "not valid UTF-8"),
    "missing prompts file": (["generate", "--prompts", "{out}/nope.txt"], "--prompts {out}/nope.txt: no such file"),
    "negative length": (["train", "--model_name_or_path", "{model}", "--dataset_path", "{data}", "--output_dir",
                         "{out}/run", "--max_completion_length", "-4"],
                        "--max_completion_length must be at least 1, not -4"),
    "negative temperature": (["generate", "--model_name_or_path", "{model}", "--prompt", "x", "--temperature", "-1"],
                             "--temperature must be above 0, not -1.0"),
    "top_p of 0": (["generate", "--model_name_or_path", "{model}", "--prompt", "x", "--top_p", "0"],
                   "--top_p must be in (0, 1], not 0.0"),
    "output_dir is a file": (["sft", "--model_name_or_path", "{model}", "--dataset_path", "{data}",
                              "--output_dir", "{file}"], "--output_dir {file} is a file, not a folder"),
    "output under a file": (["eval", "--data", "{data}", "--output", "{file}/eval"], "a part of this path is a file"),
    "generate output is a folder": (["generate", "--prompt", "x", "--output", "{out}"], "is a folder; pass the file"),
    "missing adapter": (["eval", "--adapter", "{out}/no-such-run", "--data", "{data}", "--output", "{out}/eval"],
                        "--adapter {out}/no-such-run: no adapter_config.json there"),
    "eval temperatures": (["eval", "--data", "{data}", "--temperatures", "1.0,-0.5", "--output", "{out}/eval"],
                          "--temperatures must be comma-separated numbers, each above 0, not '1.0,-0.5'"),
    "missing dataset": (["train", "--dataset_path", "{out}/no-text", "--output_dir", "{out}/run"],
                        "--dataset_path {out}/no-text: no such dataset folder"),
    "missing local model": (["sft", "--model_name_or_path", "./no-such-model", "--dataset_path", "{data}",
                             "--output_dir", "{out}/run"], "--model_name_or_path ./no-such-model: no such folder"),
    "lora dropout of 1": (["sft", "--dataset_path", "{data}", "--output_dir", "{out}/run", "--lora_dropout", "1"],
                          "--lora_dropout must be in [0, 1), not 1.0"),
    "prepare test size": (["prepare", "{data}", "--output", "{out}/p", "--test_size", "1.5"],
                          "--test_size must be in [0, 1), not 1.5"),
    "a mode's typo": (["train", "--dataset_path", "{data}", "--output_dir", "{out}/run", "--loss_type", "dapoo"],
                      "--loss_type must be one of grpo, dr_grpo, dapo, bnpo, cispo, sapo, luspo, vespo, not 'dapoo'"),
    "no iterations": (["train", "--dataset_path", "{data}", "--output_dir", "{out}/run", "--num_iterations", "0"],
                      "--num_iterations must be at least 1, not 0"),
    "generation memory below the cache": (["train", "--model_name_or_path", "{model}", "--dataset_path", "{data}",
                                           "--output_dir", "{out}/run", "--generation_memory_gib", "0.0001"],
                                          "--generation_memory_gib 0.0001: decoding 8 rows of 640 positions"),
    "generate output folder missing": (["generate", "--prompt", "x", "--output", "{out}/none/s.jsonl"],
                                       "--output {out}/none/s.jsonl: there is no folder {out}/none to write it in"),
}


@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_bad_input_is_one_line_before_any_work(kind, tmp_path, tiny_model_dir, prepared):
    """Each kind of bad input a new user tries (ranges, kinds of path, files that must exist, files that are not
    text): one line naming the option, exit 2, checked before a model is loaded, and nothing written."""
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "binary.txt").write_bytes(bytes(range(128, 256)) * 4)
    out = tmp_path / "out"
    out.mkdir()
    fill = {"file": tmp_path / "a-file", "binary": tmp_path / "binary.txt", "out": out, "model": tiny_model_dir,
            "data": prepared}
    argv, message = BAD_INPUTS[kind]
    r = subprocess.run([sys.executable, "-m", "sdgrpo.cli", *[a.format(**fill) for a in argv]], capture_output=True,
                       text=True, cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    assert lines[0].startswith(f"sdgrpo {argv[0]}: error:") and message.format(**fill) in lines[0], lines[0]
    assert list(out.iterdir()) == []  # nothing written


def test_a_checkpoint_that_cannot_be_written_is_one_line_and_resume_continues(tmp_path, prepared, tiny_model_dir):
    """A filesystem that refuses writes (a file-size limit: every file over 200 kB fails, as on a full disk) while
    checkpoint-4 is saved: one line naming the failure and checkpoint-2, exit 2, the half-written folder gone; once
    writes work again, --resume continues from checkpoint-2 with no duplicate metric rows."""
    import resource

    out = tmp_path / "run"
    args = [sys.executable, "-m", "sdgrpo.cli", *map(str, train_args(tiny_model_dir, prepared, out, "--save_steps", 2))]
    first = subprocess.run([*args, "--max_steps", "2"], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]

    def refuse_large_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    refused = subprocess.run([*args, "--max_steps", "6", "--resume"], capture_output=True, text=True,
                             preexec_fn=refuse_large_files)
    assert refused.returncode == 2, refused.stderr[-3000:]
    line = refused.stderr.strip().splitlines()[-1]
    assert line.startswith("sdgrpo train: error: writing ") and "checkpoint-4 failed (File too large)" in line, line
    assert f"the last complete checkpoint is {out / 'checkpoint-2'}" in line and "--resume" in line
    assert "Traceback" not in refused.stderr
    assert not (out / "checkpoint-4").exists() and last_complete_checkpoint(out) == out / "checkpoint-2"
    resumed = subprocess.run([*args, "--max_steps", "6", "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert steps_logged(out) == [1, 2, 3, 4, 5, 6]
