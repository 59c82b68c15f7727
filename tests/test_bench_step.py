"""benchmarks/bench_step.py's variant options (the GPU benchmark itself runs on the device machine)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_variant_options_and_the_childs_environment(monkeypatch):
    import bench_step

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    name, options = bench_step.variant_options(
        "sdgrpo_hf_4bit+gemlite+spg4+cap16+len2048+mb4+tile+expand+release+chunk64+slice1024+profile+torchpack+shippedcfg+steps1+memsites+memblocks")
    assert name == "sdgrpo_hf_4bit"
    assert options == {"kernel": "gemlite", "spg": 4, "cap": 16.0, "len": 2048, "mb": 4, "tile": True,
                       "expand": True, "release": True, "chunk": 64, "slice": 1024, "steps": 1,
                       "profile": True, "torchpack": True, "shippedcfg": True, "memsites": True,
                       "memblocks": True}
    assert bench_step.child_env("sdgrpo_hf_4bit+expand")["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    env = bench_step.child_env("sdgrpo_hf_4bit+cap16")  # sdgrpo's variants: the CLI's allocator settings
    assert env["BENCH_CHILD"] == "1" and env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert "PYTORCH_CUDA_ALLOC_CONF" not in bench_step.child_env("sdgrpo_hf_4bit+cap16+noexpand")
    assert "PYTORCH_CUDA_ALLOC_CONF" not in bench_step.child_env("unsloth_bare_4bit")
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")  # the user's own settings kept
    assert bench_step.child_env("sdgrpo_hf_4bit+expand")["PYTORCH_CUDA_ALLOC_CONF"] == \
        "max_split_size_mb:512,expandable_segments:True"
    assert bench_step.child_env("sdgrpo_hf_4bit")["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:512"
    with pytest.raises(ValueError, match="unknown option 'expanded'"):
        bench_step.variant_options("sdgrpo_hf_4bit+expanded")
    with pytest.raises(ValueError, match="unknown option 'steps0'"):
        bench_step.variant_options("sdgrpo_hf_4bit+steps0")


class FakeMemory:
    """An allocator's counters, driven by hand: allocated and reserved bytes, their peaks since the last reset."""

    def __init__(self):
        self.allocated = self.reserved = self.max_allocated = self.max_reserved = 0

    def alloc(self, n: int) -> None:
        self.allocated += n
        self.reserved = max(self.reserved, self.allocated)
        self.max_allocated = max(self.max_allocated, self.allocated)
        self.max_reserved = max(self.max_reserved, self.reserved)

    def now(self):
        return self.allocated, self.reserved

    def peak(self):
        return self.max_allocated, self.max_reserved

    def reset(self):
        self.max_allocated, self.max_reserved = self.allocated, self.reserved

    def synchronize(self):
        pass


def test_the_timer_gives_each_phase_its_own_peak_and_the_run_its_whole_peak():
    """Nested wrapped calls (training_step > prepare > generation, as GRPOTrainer's are): each label's peak is the
    highest allocated while one of its calls ran, though every call resets the allocator's counter; the run's peak is
    what the counter would have said without the resets, allocated and reserved."""
    import bench_step

    memory = FakeMemory()
    timer = bench_step.Timer(memory)

    class Trainer:
        def generate(self):
            memory.alloc(5)  # the copies' refresh: a transient 5 above 10
            memory.alloc(-5)

        def prepare(self):
            self.generate()
            memory.alloc(1)  # the batch kept

        def training_step(self):
            self.prepare()
            memory.alloc(7)  # the backward's activations
            memory.alloc(-7)
            memory.alloc(-1)

    timer.wrap(Trainer, "generate", "generation")
    timer.wrap(Trainer, "prepare", "prepare")
    timer.wrap(Trainer, "training_step", "training_step")
    memory.alloc(10)  # the model
    memory.alloc(20)  # loading's transient, before the run
    memory.alloc(-20)
    memory.reset()
    trainer = Trainer()
    trainer.training_step()
    memory.alloc(3)  # between steps
    memory.alloc(-3)
    trainer.training_step()
    assert timer.peaks == {"generation": [15, 15], "prepare": [15, 15], "training_step": [18, 18]}
    assert timer.peak() == (18, 30)  # the cache still holds what loading reserved
    assert timer.peak_gib() == {k: v / 2**30 for k, v in (("generation", 15), ("prepare", 15), ("training_step", 18))}
    assert [len(v) for v in timer.records.values()] == [2, 2, 2]


def test_the_cli_gives_cuda_expandable_segments_unless_the_user_configured_the_allocator(monkeypatch):
    """sdgrpo.cli.allocator_defaults: expandable segments where neither of PyTorch's allocator variables is set (the
    later slow steps of the 7B's 4-bit rows went with it); the user's own settings, under either name, untouched;
    and `sdgrpo` sets it in its own process before a command runs."""
    from sdgrpo import cli

    env = {}
    cli.allocator_defaults(env)
    assert env == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        env = {name: "max_split_size_mb:256"}
        cli.allocator_defaults(env)
        assert env == {name: "max_split_size_mb:256"}
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    seen = {}
    monkeypatch.setitem(cli.HANDLERS, "eval",
                        lambda rest: seen.update(conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF")) or 0)
    assert cli.main(["eval"]) == 0 and seen == {"conf": "expandable_segments:True"}


def test_triton_events_count_compilations_and_autotuning_per_step_and_chain_earlier_hooks(monkeypatch):
    """TritonEvents on Triton's own hook (a stand-in module with knobs.runtime.jit_cache_hook) and its autotuner (a
    stand-in Autotuner whose run fills its cache for a new key): a compilation counts once, a kernel already compiled
    and a run on a key already tuned do not; the seconds benchmarked add up; a hook set before it still runs and its
    answer is returned; a snapshot names the kernels since the last."""
    import types

    import bench_step

    seen = []

    class Autotuner:
        def __init__(self):
            self.cache, self.bench_time = {}, 0.0

        def run(self, key):
            if key not in self.cache:
                self.cache[key], self.bench_time = "best", 0.25
            return key

    runtime = types.SimpleNamespace(jit_cache_hook=lambda **kw: seen.append(kw["fn"].name) or False)
    triton = types.SimpleNamespace(knobs=types.SimpleNamespace(runtime=runtime))
    monkeypatch.setitem(sys.modules, "triton", triton)
    monkeypatch.setitem(sys.modules, "triton.runtime", types.SimpleNamespace())
    monkeypatch.setitem(sys.modules, "triton.runtime.autotuner", types.SimpleNamespace(Autotuner=Autotuner))
    events = bench_step.TritonEvents()
    kernel = types.SimpleNamespace(name="gemm_INT_kernel")
    assert runtime.jit_cache_hook(key="k", repr="r", fn=kernel, compile={}, is_manual_warmup=False,
                                  already_compiled=False) is False
    runtime.jit_cache_hook(key="k", repr="r", fn=kernel, compile={}, is_manual_warmup=False, already_compiled=True)
    tuner = Autotuner()
    assert [tuner.run(m) for m in (512, 512, 1024)] == [512, 512, 1024]
    assert seen == ["gemm_INT_kernel", "gemm_INT_kernel"]
    assert events.snapshot() == {"triton_compiles": 1, "triton_autotunes": 2, "triton_autotune_s": 0.5,
                                 "triton_kernels": ["gemm_INT_kernel"]}
    assert events.snapshot()["triton_kernels"] == []
    monkeypatch.setitem(sys.modules, "triton", None)  # no Triton: zeros
    assert bench_step.TritonEvents().snapshot() == {"triton_compiles": 0, "triton_autotunes": 0,
                                                    "triton_autotune_s": 0.0, "triton_kernels": []}


def test_the_profile_option_profiles_only_the_chosen_engine_call(tmp_path, monkeypatch, tiny_tokenizer):
    """``+profile``: the engine's second decode runs under torch.profiler and its operator table (the call's own
    timing first) is written; the first and third calls are not profiled, and every call returns what it would."""
    import bench_step

    from conftest import make_llama
    from sdgrpo.engine.decode import DecodeEngine

    monkeypatch.setattr(DecodeEngine, "decode", DecodeEngine.decode)  # put back after the test
    path = tmp_path / "profile.log"
    bench_step.profile_engine_call(2, path)
    model = make_llama(tiny_tokenizer, seed=1)
    enc = tiny_tokenizer(["a b c", "d e"], return_tensors="pt", padding=True, padding_side="left")
    kwargs = dict(do_sample=False, max_new_tokens=4, pad_token_id=tiny_tokenizer.pad_token_id)
    engine, plain = DecodeEngine(compile=False), DecodeEngine(compile=False)
    outs = []
    for call in (1, 2, 3):
        outs.append(engine.generate(model, **enc, **kwargs))
        assert path.exists() == (call == 2)
        if call == 2:
            text = path.read_text()
            path.unlink()
    assert text.startswith("engine call 2: {'refresh_s'") and "Self CPU" in text
    assert all(torch.equal(out, plain.generate(model, **enc, **kwargs)) for out in outs)


def test_engine_records_are_the_timed_generations_also_with_several_steps_a_generation(tmp_path):
    """A metrics file as ``--steps_per_generation 4`` writes it (a reward only on the steps that generate): the
    first generation (the warm-up) is left out, each later one's phases are listed, and the medians are theirs."""
    import json

    import bench_step

    lines = []
    for cycle, prefill in enumerate([9.0, 0.1, 1.5, 0.2]):
        lines.append({"step": 4 * cycle + 1, "reward": -1.0, "engine/mode": 2.0, "engine/refresh_s": 0.25,
                      "engine/prefill_s": prefill, "engine/decode_s": 3.0 + cycle})
        lines += [{"step": 4 * cycle + k, "loss": 0.1} for k in (2, 3, 4)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    logged, phases = bench_step.engine_records(path)
    assert [p["prefill_s"] for p in phases] == [0.1, 1.5, 0.2]
    assert phases[0] == {"refresh_s": 0.25, "prefill_s": 0.1, "decode_s": 4.0}
    assert logged["engine/prefill_s"] == 0.2 and logged["engine/decode_s"] == 5.0 and logged["engine/mode"] == 2.0
    assert logged["sampling/kl"] is None
    assert bench_step.engine_records(tmp_path / "none.jsonl") == ({}, [])


def test_memsites_finds_the_peak_and_sums_its_blocks_by_site():
    """A trace as torch.cuda.memory._snapshot() records it: the peak is where the bytes alive are highest (a block
    counted until its free completes), and its blocks are summed by the innermost frame outside torch."""
    import memsites

    def frames(file, line, name="forward"):
        return [{"filename": "/x/torch/nn/functional.py", "line": 1, "name": "linear"},
                {"filename": file, "line": line, "name": name}]

    weights, act, head = frames("/x/peft/lora.py", 7), frames("/x/sdgrpo/offload.py", 40, "pack"), frames(
        "/x/trl/utils.py", 9)
    trace = [
        {"action": "alloc", "addr": 1, "size": 100, "frames": weights},
        {"action": "alloc", "addr": 2, "size": 30, "frames": act},
        {"action": "alloc", "addr": 3, "size": 30, "frames": act},
        {"action": "free_requested", "addr": 2, "size": 30},  # still counted until the free completes
        {"action": "alloc", "addr": 4, "size": 50, "frames": head},  # the peak: 100 + 30 + 30 + 50 = 210
        {"action": "free_completed", "addr": 2, "size": 30},
        {"action": "free_completed", "addr": 99, "size": 500},  # allocated before recording: ignored
        {"action": "alloc", "addr": 5, "size": 20, "frames": head},  # 200: below the peak
    ]
    peak, at, live = memsites.replay(trace)
    assert (peak, at, sorted(live)) == (210, 4, [1, 2, 3, 4])
    assert memsites.replay(trace, stop=7)[0] == 200
    assert memsites.site(act) == "sdgrpo/offload.py:40 pack <- linear"
    assert memsites.site([{"filename": "/x/torch/utils/checkpoint.py", "line": 3, "name": "f"}]).startswith("(torch)")
    text = memsites.report({"device_traces": [trace]})
    assert text.splitlines()[0] == "peak 0.000 GiB allocated at event 4 of 8 (blocks alive: 4)"
    rows = [ln.split(None, 2) for ln in text.splitlines()[3:6]]
    assert [(r[1], r[2]) for r in rows] == [("1", "peft/lora.py:7 forward <- linear"),
                                            ("2", "sdgrpo/offload.py:40 pack <- linear"),
                                            ("1", "trl/utils.py:9 forward <- linear")]


def test_memblocks_sums_the_allocated_blocks_by_size():
    import memsites

    mib = 2**20
    segments = [{"blocks": [{"state": "active_allocated", "size": 125 * mib}] * 3
                 + [{"state": "inactive", "size": 900 * mib}]},
                {"blocks": [{"state": "active_allocated", "size": 300 * mib}]}]
    lines = memsites.blocks(segments, "after").splitlines()
    assert lines[0] == "after: 0.659 GiB in 4 blocks"
    assert lines[1].split() == ["125.00", "MiB", "x", "3", "=", "0.366", "GiB"]
    assert lines[2].split()[:4] == ["300.00", "MiB", "x", "1"]
