"""Shared helpers for the GPU benchmarks: environment facts, real-shape random models, timing."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

# Real shapes (random weights): public configs of Qwen2.5-0.5B, -1.5B, -7B and -14B.
SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "qwen2.5-14b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40,
                        num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False),
}


def environment() -> dict:
    out = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    for pkg in ("torch", "transformers", "trl", "peft", "accelerate", "unsloth", "bitsandbytes", "torchao"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def device_tag() -> str:
    """A short name of the device for file names: h200, h100, cpu."""
    if not torch.cuda.is_available():
        return "cpu"
    words = [w.lower() for w in torch.cuda.get_device_name().split() if any(c.isdigit() for c in w)]
    return words[0] if words else "gpu"


def header(benchmark: str, config: dict) -> dict:
    """The header every results file carries: benchmark, date, commit, command, device, library versions, config.
    The commit is ``$SDGRPO_COMMIT`` where set, else git's HEAD, and ``commit_source`` says which: on the GPU machine
    (a copy of the checkout) git answered a stale commit once, so set SDGRPO_COMMIT there (tools/device/README.md)."""
    import os
    import subprocess
    import sys

    commit, source = os.environ.get("SDGRPO_COMMIT"), "SDGRPO_COMMIT"
    if not commit:
        source = "git"
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                    cwd=Path(__file__).parent).stdout.strip() or None
        except OSError:
            commit = None
    env = environment()
    return {"benchmark": benchmark, "date": env.pop("date"), "commit": commit, "commit_source": source,
            "command": " ".join(["python", *sys.argv]), "device": env.pop("device"), "versions": env,
            "config": config}


def random_model(shape: str, dtype=torch.bfloat16, vocab_size: int | None = None, device: str = "cuda"):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    kw = dict(SHAPES[shape])
    if vocab_size:
        kw["vocab_size"] = vocab_size
    config = Qwen2Config(**kw, max_position_embeddings=8192, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    # the 14B made in its own dtype: in fp32 first (59 GB) and then copied it would not fit an 80 GB card
    if shape == "qwen2.5-14b":
        torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(config).to(dtype)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def copy_bandwidth() -> float:
    """Device memory bandwidth in bytes/s from a 2 GiB device-to-device copy (read + write counted)."""
    src = torch.empty(2**30, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    nbytes = 2 * src.numel() * src.element_size()
    del src, dst
    torch.cuda.empty_cache()
    return nbytes / statistics.median(times)


def cuda_time(fn, repeats: int = 5, warmup: int = 2) -> tuple[float, float]:
    """Median seconds of ``fn()`` and peak memory in GiB above what was allocated before it."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    return statistics.median(times), peak


def graph_ms(run, replays: int = 50, repeats: int = 5, warmups: int = 3, settle: int = 5) -> float:
    """ms per replay of a CUDA graph capturing ``run()`` once (median of ``repeats`` timings of ``replays`` replays),
    after ``warmups`` calls on a side stream (Triton compiles and tunes there, outside the capture) and ``settle``
    untimed replays."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(warmups):
            run()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        run()
    for _ in range(settle):
        graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / replays)
    del graph
    return statistics.median(times)


def save(name: str, payload: dict, out_dir: str | Path = Path(__file__).parent / "results") -> Path:
    path = Path(out_dir) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    print(json.dumps(payload, indent=2))
    return path


class StepClock(TrainerCallback):
    """Records the wall time of each optimizer step (end to end, CUDA-synchronised) in ``durations``; with ``path``,
    the main process also appends each step as a JSON line there (one line per step, so it survives a crash)."""

    def __init__(self, path: str | Path | None = None):
        self.durations: list[float] = []
        self.ends: list[float] = []  # perf_counter at each step's end
        self.path = Path(path) if path else None
        self._last = None

    @staticmethod
    def _sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_train_begin(self, args, state, control, **kwargs):
        self._sync()
        self._last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        now = time.perf_counter()
        self.durations.append(now - self._last)
        self.ends.append(now)
        if self.path is not None and state.is_world_process_zero:
            peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
            with self.path.open("a") as fh:
                fh.write(json.dumps({"step": state.global_step, "seconds": now - self._last,
                                     "peak_gpu_gib": peak}) + "\n")
        self._last = now
