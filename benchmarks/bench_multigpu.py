"""Completion tokens per second of `sdgrpo train` on one GPU and on two or four (DDP and FSDP), same per-GPU batch.

Each configuration is its own launch: one GPU runs the training in one plain process; several GPUs run it under
`accelerate launch --config_file configs/accelerate/{ddp,fsdp}.yaml --num_processes N`. The model is a
Qwen2.5-1.5B shape (32k vocabulary, random bf16 weights), the transformers+PEFT backend with sdgrpo's defaults
(LoRA r 16 on all linear layers, beta 0.04, reward from the KL pass), 8 prompts x 8 completions per GPU per step.
Random weights rarely sample EOS, so completions run to max_completion_length: throughput is not flattered by
early stops. Per step: wall time between optimizer-step ends on rank 0 (CUDA-synchronised); completion tokens from
TRL's logged mean length x the global batch. 1 warm-up step, then the median of the rest.
Runs (BENCH_RUNS, comma-separated; default 1gpu,ddp_2gpu,fsdp_2gpu): see RUNS below. One-process
runs go first, side by side, one per GPU (CUDA_VISIBLE_DEVICES); each launch of several processes runs alone.
Usage: python benchmarks/bench_multigpu.py OUT_DIR [shape] [completion_tokens] [steps]
NCCL's NVLink multicast stays off (NCCL_NVLS_ENABLE=0), as the GPU machine requires.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PER_GPU_PROMPTS, G = 8, 8
# (name, accelerate config, processes, extra `sdgrpo train` arguments, the 1-GPU run it is compared with). Each
# two-GPU run is compared with the one-GPU run of the same generation settings: sdgrpo's defaults compile generation
# for one process, DDP and FSDP2 (weights held gathered and FSDP's hooks off for generation), not for DeepSpeed.
RUNS = [("1gpu", None, 1, [], None),
        ("ddp_2gpu", "ddp.yaml", 2, [], "1gpu"),
        ("fsdp_2gpu", "fsdp.yaml", 2, [], "1gpu"),
        ("ddp_4gpu", "ddp.yaml", 4, [], "1gpu"),
        ("fsdp_4gpu", "fsdp.yaml", 4, [], "1gpu"),
        ("1gpu_nocompile", None, 1, ["--generation_compile", "false"], None),
        ("fsdp_2gpu_nocompile", "fsdp.yaml", 2, ["--generation_compile", "false"], "1gpu_nocompile"),
        # FSDP's hooks kept for generation (compiled generation then defaults off: a graph break at every module).
        ("fsdp_2gpu_hooks", "fsdp.yaml", 2, ["--fsdp_skip_hooks_in_generation", "false"], "1gpu_nocompile"),
        # Every layer re-gathered at every decoding step, as TRL 1.15 does it.
        ("fsdp_2gpu_pergather", "fsdp.yaml", 2, ["--fsdp_gather_for_generation", "false"], "1gpu_nocompile"),
        # Need deepspeed on the machine (tools/device/add_deepspeed_wheels.sh); not in the default set.
        ("zero2_2gpu", "deepspeed_zero2.yaml", 2, [], "1gpu_nocompile"),
        ("zero3_2gpu", "deepspeed_zero3.yaml", 2, [], "1gpu_nocompile")]
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def child(model_dir: str, data_dir: str, out: str, completion: int, steps: int) -> None:
    """One training run (one process of it); rank 0 appends each step's time to OUT/steps.jsonl."""
    from common import StepClock

    from sdgrpo.config import parse_train_args
    from sdgrpo.train import main

    argv = ["--model_name_or_path", model_dir, "--dataset_path", data_dir, "--output_dir", str(Path(out) / "run"),
            "--per_device_train_batch_size", str(PER_GPU_PROMPTS * G), "--num_generations", str(G),
            "--max_completion_length", str(completion), "--max_steps", str(steps), "--save_strategy", "no",
            "--report_to", "none", "--logging_steps", "1", "--collapse_guard", "off", "--learning_rate", "1e-5"]
    argv += os.environ.get("BENCH_EXTRA_ARGS", "").split()
    train_cfg, model_cfg = parse_train_args(argv)
    main(train_cfg, model_cfg, callbacks=[StepClock(Path(out) / "steps.jsonl")], start_over=True)


def summarize(out: Path, world: int) -> dict:
    steps = [json.loads(x) for x in (out / "steps.jsonl").read_text().splitlines()]
    metrics = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    engine = [m for m in metrics if "engine/captures" in m]
    lengths = {m["step"]: m["completions/mean_length"] for m in metrics if "completions/mean_length" in m}
    timed = steps[1:]  # the first step warms up
    per_step = [lengths[s["step"]] * PER_GPU_PROMPTS * G * world / s["seconds"] for s in timed if s["step"] in lengths]
    return {"processes": world, "steps_timed": len(timed), "step_s": statistics.median(s["seconds"] for s in timed),
            "completion_tokens_per_s": statistics.median(per_step) if per_step else None,
            "completion_tokens_per_s_mean": statistics.mean(per_step) if per_step else None,
            "mean_completion_length": statistics.mean(lengths.values()) if lengths else None,
            "peak_gpu_gib_rank0": max(s["peak_gpu_gib"] or 0 for s in steps),
            # the decoding engine's running totals after the last step (rank 0): calls, new caches, graph captures
            "engine": {k.split("/", 1)[1]: v for k, v in engine[-1].items() if k.startswith("engine/")} if engine
            else {},
            "step_times_s": [s["seconds"] for s in steps]}


def main() -> None:
    out_root = Path(sys.argv[1] if len(sys.argv) > 1 else HERE / "results")
    shape = sys.argv[2] if len(sys.argv) > 2 else "qwen2.5-1.5b"
    completion = int(sys.argv[3]) if len(sys.argv) > 3 else 256
    steps = int(sys.argv[4]) if len(sys.argv) > 4 else 4
    runs = os.environ.get("BENCH_RUNS", "1gpu,ddp_2gpu,fsdp_2gpu").split(",")
    sys.path.insert(0, str(HERE))
    from bench_step import make_assets

    work = Path(os.environ.get("BENCH_WORK", "/tmp/bench_multigpu"))
    if os.environ.get("BENCH_MODEL"):  # a smoke run (e.g. on CPU) with a given model and prompt set
        model_dir, data_dir = Path(os.environ["BENCH_MODEL"]), Path(os.environ["BENCH_DATA"])
    else:
        model_dir, data_dir = make_assets(work, shape)
    env = {**os.environ, **SAFE_ENV, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH",
                                                                                                   "")])}
    results = {}
    out_root.mkdir(parents=True, exist_ok=True)
    todo = [run for run in RUNS if run[0] in runs]
    gpus = max(_gpu_count(), 1)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(gpus)))).split(",")
    # One-process runs go first, as many at once as there are GPUs (each sees its own GPU); then the launches.
    singles = [run for run in todo if run[1] is None]
    waves = [singles[i:i + gpus] for i in range(0, len(singles), gpus)] + [[run] for run in todo if run[1]]
    for wave in waves:
        started = []
        for slot, (name, config, world, extra, _) in enumerate(wave):
            out = work / name
            subprocess.run(["rm", "-rf", str(out)])
            out.mkdir(parents=True)
            args = [str(HERE / "bench_multigpu.py"), "--child", str(model_dir), str(data_dir), str(out),
                    str(completion), str(steps)]
            run_env = {**env, "BENCH_EXTRA_ARGS": " ".join([os.environ.get("BENCH_EXTRA_ARGS", ""), *extra])}
            if config is None:  # one process sees one GPU (with several visible, Trainer would use nn.DataParallel)
                cmd = [sys.executable, *args]
                run_env = {**run_env, "CUDA_VISIBLE_DEVICES": visible[slot]}
            else:
                launcher = ["--config_file", str(ROOT / "configs" / "accelerate" / config)]
                if os.environ.get("BENCH_CPU"):  # CPU smoke: gloo (DeepSpeed's CPU accelerator takes its config)
                    launcher = (launcher if config.startswith("deepspeed") else ["--multi_gpu", "--dynamo_backend",
                                                                                 "no"])
                    launcher += ["--mixed_precision", "no"]
                cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher, "--num_processes", str(world),
                       "--num_machines", "1", *args]
            log = open(out_root / f"bench_multigpu_{name}.log", "w")
            started.append((name, world, out, log, time.time(),
                            subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env=run_env)))
        for name, world, out, log, t0, proc in started:
            try:
                proc.wait(timeout=max(1, int(os.environ.get("BENCH_TIMEOUT", 900)) - (time.time() - t0)))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
            stderr = (out_root / f"bench_multigpu_{name}.log").read_text()[-20000:]
            (out_root / f"bench_multigpu_{name}.log").write_text(stderr)
            try:
                row = summarize(out, world)
                if proc.returncode != 0:
                    row["error_after_timing"] = (stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1][-500:]
            except (FileNotFoundError, KeyError, ValueError, statistics.StatisticsError) as err:
                row = {"processes": world, "error": f"{err!r} (exit {proc.returncode}); {stderr[-1500:]}"}
            row["wall_s"] = time.time() - t0
            row["ran_beside"] = [other for other, *_ in started if other != name]
            results[name] = row
            print(name, json.dumps(row), flush=True)
        _save(results, shape, completion, steps, out_root)  # after every wave: a run cut short keeps the others


def _save(results: dict, shape: str, completion: int, steps: int, out_root: Path) -> None:
    from common import environment, save

    for name, _, _, extra, baseline in RUNS:
        if name not in results:
            continue
        row, base = results[name], results.get(baseline, {}).get("completion_tokens_per_s")
        row["extra_args"] = extra
        if base and row.get("completion_tokens_per_s"):
            row[f"speedup_vs_{baseline}"] = row["completion_tokens_per_s"] / base
    payload = {"benchmark": "multigpu_throughput", "shape": f"{shape}, 32k vocab, random bf16 weights",
               "config": {"per_gpu_prompts": PER_GPU_PROMPTS, "num_generations": G, "completion_tokens": completion,
                          "steps": steps, "warmup_steps": 1, "backend": "hf", "lora_r": 16, "beta": 0.04,
                          "nccl_nvls": "off"},
               **environment(), "gpus": _gpu_count(), "results": results}
    save(f"bench_multigpu_{shape}{os.environ.get('BENCH_SUFFIX', '')}", payload, out_root)


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))
    else:
        main()
