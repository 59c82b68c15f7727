"""Time per GRPO step on the GPU, split into generation, reward scoring and the rest (policy/reference passes).

Variants (each in its own process, since importing Unsloth patches TRL for the whole process):
  trl_plain         bare TRL GRPOTrainer + PEFT LoRA, TRL's defaults, the original recipe's reward (one forward
                    per completion)
  sdgrpo_hf         `sdgrpo train --backend hf` with its defaults: rollouts by sdgrpo's decoding engine
  sdgrpo_hf_4bit    the same on a 4-bit base (--load_in_4bit true: bitsandbytes NF4, QLoRA; its defaults: 16-bit
                    generation copies of the dequantised base + LoRA where they fit, else int4 copies)
  sdgrpo_hf_4bit_int4  the same with int4 generation copies (--generation_weights int4)
  sdgrpo_hf_model   the same with --generation_weights model (no int4 copies: LoRA folded in 16 bits where that
                    fits the memory, else unmerged)
  sdgrpo_hf_cudnn   the same with cuDNN among SDPA's kernels (--cudnn_attention true; PyTorch's default)
  sdgrpo_hf_generate  the same with transformers' generate instead (--generation_engine false; on a GPU that is
                    a static cache and transformers' compiled decoding step, the default before the engine)
  sdgrpo_hf_static  generate with cache_implementation=static, not compiled
  sdgrpo_hf_compile generate with a static cache and transformers' compiled decoding (--generation_compile true)
  sdgrpo_hf_cb      TRL's transformers continuous batching (use_transformers_continuous_batching)
  unsloth_bare      Unsloth model + Unsloth-patched GRPOTrainer, the original recipe's reward
  sdgrpo_unsloth    `sdgrpo train --backend unsloth` with its defaults (since 2026-12-06: rollouts by sdgrpo's
                    engine, the reward read from Unsloth's KL pass; before, Unsloth's generation and an own pass)
  ..._4bit          the same with the base loaded in 4 bits (NF4; Unsloth's own loading)
  sdgrpo_unsloth_4bit_engine  the same with --generation_engine true (the default now; named so in earlier results)
  ..._reuse         the same with --reuse_reference_logprobs true (the default now)
  sdgrpo_unsloth_4bit_generate  Unsloth's own generation (--generation_engine false)
Options after a variant's name, joined by '+': ``tinygemm`` / ``gemlite`` (--generation_int4_kernel), ``spgN``
(--steps_per_generation N: N optimizer steps per generation of N x G rows; the first N steps are the warm-up and
BENCH_STEPS - 1 whole generation cycles are timed, their mean per optimizer step reported as ``cycle_mean_s``),
``capN`` (this variant's process capped at N GiB, overriding BENCH_CAP_GIB), ``lenN`` (N completion tokens), ``mbN``
(N rows a backward, G/N micro-batches a step: the same G rows a generation and an optimizer step), ``offload``
(--offload_activations true: checkpointed layer inputs in CPU memory), ``tile`` (--tile_mlp true: the MLP over tiles of
tokens), ``plain`` (both false; without either option they are auto: on where the plan needs them), ``model``
(--generation_weights model: the base decoded as it is, no generation copies), ``expand`` (the variant's process
with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True: PyTorch's allocator grows segments in place, against
fragmentation; sdgrpo's variants have it by default since 2026-12-07, as the CLI sets it), ``noexpand`` (an sdgrpo
variant without it, as before), ``release`` (--hold_generation_copies false: the generation copies freed between
generations), ``chunkN`` (a refresh quantises N Mi elements at a time: sdgrpo.engine.quantised.INT4_CHUNK, 16 by
default; the 7B's refresh ran 532 chunks, 0.30 s), ``profile`` (the first timed generation's engine call under
torch.profiler: its top operators by device and by host time, OUT_DIR/profile_<variant>.log), ``sliceN`` (gemlite
multiplies more than N rows N at a time: sdgrpo.engine.int4.GEMLITE_PREFILL_SLICE, 1,024 by default; 0 whole),
``torchpack`` (a refresh quantises and packs gemlite's copies with torch operations, not engine/int4_pack.py's
Triton kernel: sdgrpo.engine.int4.TRITON_PACK false), ``shippedcfg`` (gemlite's own kernel configurations only, not
sdgrpo's tuned ones: sdgrpo.engine.gemlite_tuned.ENABLED false), ``stepsN`` (N optimizer steps for this variant, not
BENCH_STEPS; with 1 that step is timed with what it compiles: for a peak of a slow variant), ``memsites`` (the
allocator's trace recorded with Python stacks from the model's loading on, its peak's blocks summed by the code that
allocated them: OUT_DIR/memsites_<variant>.log, benchmarks/memsites.py; slower; with full stacks it stopped a tiled
backward with a SystemError on one H100, 2026-12-08), ``memblocks`` (no recording: the allocated blocks by size before
and after each loss forward, OUT_DIR/memblocks_<variant>.log), e.g.
``sdgrpo_hf_4bit+spg4+cap16``.
Model: Qwen2.5 shapes with random bf16 weights and a 32k vocabulary (BENCH_VOCAB=real: the shape's own, 151,936 or
152,064, where memory is the question: logits dominate); G=8 completions of 512 tokens, prompts of ~128 tokens, LoRA
r 16 on all linear projections, beta 0.04. 1 warm-up step, then BENCH_STEPS-1 (default 3) timed steps (medians). A
step's time is the wall time between consecutive optimizer-step ends (CUDA-synchronised), so it includes generation
wherever a trainer does it. BENCH_CAP_GIB=24 caps each variant's process at 24 GiB
(``torch.cuda.set_per_process_memory_fraction``), as on a 24 GB card. Each variant runs in its own process, its
log in OUT_DIR/bench_step_<variant>.stderr.log; BENCH_VARIANT_SECONDS stops one that runs longer (its row records it).
Usage: python benchmarks/bench_step.py OUT_DIR [shape] [variant ...]
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VARIANTS = ["trl_plain", "sdgrpo_hf", "sdgrpo_hf_4bit", "sdgrpo_hf_4bit_int4", "sdgrpo_hf_model", "sdgrpo_hf_cudnn",
            "sdgrpo_hf_generate", "sdgrpo_hf_static", "sdgrpo_hf_compile", "sdgrpo_hf_cb", "unsloth_bare",
            "sdgrpo_unsloth", "unsloth_bare_4bit", "sdgrpo_unsloth_4bit", "sdgrpo_unsloth_4bit_engine",
            "sdgrpo_unsloth_4bit_engine_reuse", "sdgrpo_unsloth_4bit_generate"]
STEPS, WARMUP, G, COMPLETION, PROMPT = int(os.environ.get("BENCH_STEPS", 4)), 1, 8, 512, 128
VARIANT_SECONDS = float(os.environ["BENCH_VARIANT_SECONDS"]) if os.environ.get("BENCH_VARIANT_SECONDS") else None
CAP_GIB = float(os.environ["BENCH_CAP_GIB"]) if os.environ.get("BENCH_CAP_GIB") else None


def vocab_for(shape: str) -> int:
    from common import SHAPES

    return SHAPES[shape]["vocab_size"] if os.environ.get("BENCH_VOCAB") == "real" else 32768


def make_assets(work: Path, shape: str) -> tuple[Path, Path]:
    """A random model folder of the shape (32k or its real vocabulary) and a prompt dataset, made once."""
    import torch
    from datasets import Dataset, DatasetDict

    sys.path.insert(0, str(HERE))
    from common import random_model

    from sdgrpo.config import TINY_MODEL
    from sdgrpo.modeling import load_tokenizer

    vocab = vocab_for(shape)
    model_dir, data_dir = work / f"{shape}-{vocab}", work / "prompts"
    tok = load_tokenizer(TINY_MODEL)
    if not (model_dir / "config.json").exists():  # a folder left by a save that failed is made again
        model = random_model(shape, vocab_size=vocab)
        model.config.bos_token_id, model.config.eos_token_id = tok.bos_token_id, tok.eos_token_id
        model.config.pad_token_id = tok.pad_token_id
        model.save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        del model
        torch.cuda.empty_cache()
    if not data_dir.exists():
        source = HERE.parent / ".gpu_data" / "gutenberg" / "alice.txt"
        if not source.exists():  # without the corpus: the repository's own test text (any text serves random weights)
            source = HERE.parent / "tests" / "data" / "kjv" / "genesis.txt"
        text = source.read_text(encoding="utf-8-sig")
        ids = tok(text, add_special_tokens=False)["input_ids"]
        prompts = [tok.decode(ids[i : i + PROMPT]) for i in range(0, PROMPT * 64, PROMPT)]
        DatasetDict({"train": Dataset.from_dict({"prompt": prompts})}).save_to_disk(str(data_dir))
    return model_dir, data_dir


class CudaMemory:
    """The allocator's counters that :class:`Timer` reads: allocated and reserved bytes now and at their peaks."""

    def __init__(self):
        import torch

        self.cuda = torch.cuda

    def now(self) -> tuple[int, int]:
        return self.cuda.memory_allocated(), self.cuda.memory_reserved()

    def peak(self) -> tuple[int, int]:
        return self.cuda.max_memory_allocated(), self.cuda.max_memory_reserved()

    def reset(self) -> None:
        self.cuda.reset_peak_memory_stats()

    def synchronize(self) -> None:
        self.cuda.synchronize()


class Timer:
    """Wraps trainer methods at class level and records (start, wall time) per call (CUDA-synchronised), and each
    call's peak allocated bytes (``peaks``): the allocator's peak is reset as a wrapped call starts, so the counter
    measures that call alone; what it had counted is folded first into every call still open and into the run's own
    peak (:meth:`peak`: allocated and reserved, what ``max_memory_allocated`` would have said without the resets)."""

    def __init__(self, memory=None):
        self.records: dict[str, list[tuple[float, float]]] = {}
        self.peaks: dict[str, list[int]] = {}
        self.memory = memory
        self._open: list[list[int]] = []  # the peak so far of every wrapped call in progress, outermost first
        self._run = [0, 0]  # the run's peak allocated and reserved bytes, from the counters folded so far

    def _fold(self) -> None:
        allocated, reserved = self.memory.peak()
        self._run = [max(self._run[0], allocated), max(self._run[1], reserved)]
        for frame in self._open:
            frame[0] = max(frame[0], allocated)

    def peak(self) -> tuple[int, int]:
        """The run's peak (allocated, reserved) bytes, the resets of wrapped calls included."""
        if self.memory is not None:
            self._fold()
        return self._run[0], self._run[1]

    def wrap(self, cls, name: str, label: str):
        original = getattr(cls, name)
        if getattr(original, "_bench_wrapped", False):
            return
        if self.memory is None:
            self.memory = CudaMemory()

        @functools.wraps(original)
        def timed(obj, *args, **kwargs):
            self.memory.synchronize()
            self._fold()
            self.memory.reset()
            self._open.append([self.memory.now()[0]])
            t0 = time.perf_counter()
            try:
                out = original(obj, *args, **kwargs)
                self.memory.synchronize()
            finally:
                self._fold()
                frame = self._open.pop()
            self.records.setdefault(label, []).append((t0, time.perf_counter() - t0))
            self.peaks.setdefault(label, []).append(frame[0])
            return out

        timed._bench_wrapped = True
        setattr(cls, name, timed)

    def peak_gib(self) -> dict[str, float]:
        """The highest peak allocated (GiB) of any call of each label."""
        return {label: max(values) / 2**30 for label, values in self.peaks.items() if values}

    def per_step(self, ends: list[float]) -> list[dict[str, float]]:
        """Seconds per label summed within each optimizer step (the calls that started before that step's end)."""
        steps = []
        for i, end in enumerate(ends):
            start = ends[i - 1] if i else float("-inf")
            steps.append({label: sum(d for t0, d in calls if start < t0 <= end)
                          for label, calls in self.records.items()})
        return steps


class TritonEvents:
    """Counts Triton's kernel compilations (``knobs.runtime.jit_cache_hook``: called before a kernel's specialisation
    is compiled or loaded, once per process; chained to a hook already set) and autotuning runs (an
    ``Autotuner.run`` after which its cache holds a new key: Triton 3.6 has no autotuning hook), with the seconds
    they benchmarked; the names of the kernels compiled since the last snapshot. A Triton kernel is compiled again
    for every new specialisation (its integer arguments' divisibility by 16, its constexpr heuristics), and gemlite's
    are autotuned per bucket of rows: a prefill whose rows (batch x prompt length) fall in a new bucket pays for it in
    that step. Inactive (zeros) where Triton is missing."""

    def __init__(self):
        self.compiles = self.autotunes = 0
        self.autotune_s = 0.0
        self.names: list[str] = []
        try:
            from triton import knobs
            from triton.runtime.autotuner import Autotuner
        except Exception:  # no Triton here (CPU), or one without knobs
            return
        previous_jit, run = knobs.runtime.jit_cache_hook, Autotuner.run

        def on_jit(**kwargs):
            if not kwargs.get("already_compiled", False):
                self.compiles += 1
                self.names.append(str(getattr(kwargs.get("fn"), "name", kwargs.get("repr", "?")))[:60])
            return previous_jit(**kwargs) if previous_jit else None

        def counted_run(tuner, *args, **kwargs):
            known = len(tuner.cache)
            try:
                return run(tuner, *args, **kwargs)
            finally:
                if len(tuner.cache) > known:
                    self.autotunes += 1
                    self.autotune_s += float(getattr(tuner, "bench_time", 0.0) or 0.0)

        knobs.runtime.jit_cache_hook, Autotuner.run = on_jit, counted_run

    def snapshot(self) -> dict:
        names, self.names = sorted(set(self.names)), []
        return {"triton_compiles": self.compiles, "triton_autotunes": self.autotunes,
                "triton_autotune_s": self.autotune_s, "triton_kernels": names}


def step_diagnostics():
    """A callback that records, per optimizer step, what can make eager passes slow between steps: Python's garbage
    collector (seconds, collections of the oldest generation), the CUDA caching allocator (device mallocs and frees,
    retries after a failed allocation), torch.compile (graphs compiled) and Triton (:class:`TritonEvents`)."""
    import gc

    import torch
    import torch._dynamo.utils as dynamo_utils
    from transformers import TrainerCallback

    class Diagnostics(TrainerCallback):
        def __init__(self):
            self.rows, self._gc, self._t0 = [], {"s": 0.0, "gen2": 0}, None
            self._triton = TritonEvents()
            gc.callbacks.append(self._on_gc)
            self._last = self._snapshot()

        def _on_gc(self, phase, info):
            if phase == "start":
                self._t0 = time.perf_counter()
            elif self._t0 is not None:
                self._gc["s"] += time.perf_counter() - self._t0
                self._gc["gen2"] += info.get("generation") == 2

        def _snapshot(self):
            m = torch.cuda.memory_stats()
            return {"gc_s": self._gc["s"], "gc_gen2": self._gc["gen2"], "device_mallocs": m.get("num_device_alloc", 0),
                    "device_frees": m.get("num_device_free", 0), "alloc_retries": m.get("num_alloc_retries", 0),
                    "graphs_compiled": dynamo_utils.counters["stats"]["unique_graphs"], **self._triton.snapshot()}

        def on_step_end(self, args, state, control, **kwargs):
            now = self._snapshot()
            self.rows.append({k: v if isinstance(v, list) else v - self._last[k] for k, v in now.items()})
            self._last = now

    return Diagnostics()


def original_recipe_reward(model, tokenizer):
    """The original recipe: re-tokenize prompt + completion, one forward each (kept for the baseline only)."""
    import torch

    def reward(prompts, completions, **kwargs):
        out = []
        with torch.no_grad():
            for p, c in zip(prompts, completions):
                ids = tokenizer(p + c, return_tensors="pt").input_ids.to(model.device)
                n = len(tokenizer(p).input_ids)
                logp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[0, n - 1 : -1]
                picked = logp.gather(-1, ids[0, n:, None])
                out.append(picked.mean().item() if picked.numel() else 0.0)
        return out

    reward.__name__ = "original_recipe_nll"
    return reward


def variant_options(variant: str) -> tuple[str, dict]:
    """A variant's name and its '+' options: {"kernel": ..., "spg": N, "cap": GiB, "len": N, "mb": N,
    "offload": True, "tile": True, "plain": True, "model": True, "expand": True, "release": True, "steps": N,
    "chunk": N, "slice": N, "profile": True, "torchpack": True, "shippedcfg": True, "memsites": True,
    "memblocks": True}."""
    name, *extra = variant.split("+")
    options = {}
    for item in extra:
        if item in ("tinygemm", "gemlite"):
            options["kernel"] = item
        elif item in ("offload", "tile", "plain", "model", "expand", "noexpand", "release", "profile", "torchpack",
                      "shippedcfg", "memsites", "memblocks"):
            options[item] = True
        elif item[:5] == "steps" and item[5:].isdigit() and int(item[5:]) >= 1:
            options["steps"] = int(item[5:])
        elif item[:3] in ("spg", "cap", "len") and item[3:].replace(".", "", 1).isdigit():
            options[item[:3]] = float(item[3:]) if item[:3] == "cap" else int(item[3:])
        elif item[:2] == "mb" and item[2:].isdigit() and G % int(item[2:]) == 0:
            options["mb"] = int(item[2:])
        elif item[:5] in ("chunk", "slice") and item[5:].isdigit():
            options[item[:5]] = int(item[5:])
        else:
            raise ValueError(f"unknown option {item!r} of variant {variant!r}")
    return name, options


def child_env(variant: str) -> dict:
    """The environment of a variant's own process: this one's, marked as a child; for sdgrpo's variants the
    allocator's settings the CLI gives a run (``sdgrpo.cli.allocator_defaults``: expandable segments unless the user
    configured the allocator) unless ``noexpand``; with ``expand`` expandable segments for any variant (set before the
    child initialises CUDA, as the allocator requires)."""
    env = {**os.environ, "BENCH_CHILD": "1"}
    options = variant_options(variant)[1]
    if options.get("expand"):
        env["PYTORCH_CUDA_ALLOC_CONF"] = ",".join(filter(None, [env.get("PYTORCH_CUDA_ALLOC_CONF"),
                                                                 "expandable_segments:True"]))
    elif variant.startswith("sdgrpo") and not options.get("noexpand"):
        from sdgrpo.cli import allocator_defaults

        allocator_defaults(env)
    return env


def profile_engine_call(call: int, path: Path) -> None:
    """The engine's ``call``-th decode (1-based) run under torch.profiler, its operators' totals written to ``path``:
    the top 30 by device time and by host time (where a refresh, a prefill and the decoding's graph replays spend)."""
    import torch.profiler as tp

    from sdgrpo.engine.decode import DecodeEngine

    decode, seen = DecodeEngine.decode, [0]

    def profiled(self, *args, **kwargs):
        seen[0] += 1
        if seen[0] != call:
            return decode(self, *args, **kwargs)
        with tp.profile(activities=[tp.ProfilerActivity.CPU, tp.ProfilerActivity.CUDA]) as prof:
            out = decode(self, *args, **kwargs)
        table = prof.key_averages()
        path.write_text(f"engine call {call}: {self.timing}\n\n"
                        + table.table(sort_by="self_cuda_time_total", row_limit=30) + "\n\n"
                        + table.table(sort_by="self_cpu_time_total", row_limit=30) + "\n")
        return out

    DecodeEngine.decode = profiled


LOGGED = ("engine/mode", "sampling/sampling_logp_difference/mean", "sampling/kl",
          "sampling/importance_sampling_ratio/mean", "engine/refresh_s", "engine/prefill_s", "engine/decode_s",
          "engine/decode_ms_per_step", "engine/calls", "engine/fallbacks")


def engine_records(metrics_file: Path) -> tuple[dict, list[dict]]:
    """From sdgrpo's metrics file, the timed generations' records: the median of each of :data:`LOGGED` (the
    engine's mode and phases, the sampler-policy mismatch) and each generation's phases (refresh, prefill, decode),
    so that a slow one shows. A row per generation: only a step that generates logs a reward, so with
    ``--steps_per_generation N`` the warm-up's WARMUP x N steps are its first WARMUP rows. ({}, []) without the file."""
    if not metrics_file.exists():
        return {}, []
    rows = [json.loads(x) for x in metrics_file.read_text().splitlines() if '"reward"' in x][WARMUP:]
    logged = {}
    for key in LOGGED:
        values = [r[key] for r in rows if r.get(key) is not None]
        logged[key] = statistics.median(values) if values else None
    phases = ("engine/refresh_s", "engine/prefill_s", "engine/decode_s", "engine/decode_ms_per_step")
    return logged, [{k.split("/")[1]: r[k] for k in phases if r.get(k) is not None} for r in rows]


def blocks_around(cls, path: Path) -> None:
    """``cls.compute_loss`` wrapped: the allocated blocks by size (memsites.blocks) before the loss's forward, after
    it, and after the backward that follows (at the next call's start), appended to ``path``."""
    import torch
    from memsites import blocks

    inner = cls.compute_loss

    def compute_loss(self, *args, **kwargs):
        with path.open("a") as f:
            f.write(blocks(torch.cuda.memory_snapshot(), "before the loss forward (after the last backward)"))
            f.write(f"  peak so far {torch.cuda.max_memory_allocated() / 2**30:.3f} GiB\n")
        out = inner(self, *args, **kwargs)
        with path.open("a") as f:
            f.write(blocks(torch.cuda.memory_snapshot(), "after the loss forward"))
        return out

    cls.compute_loss = compute_loss


def run_variant(variant: str, model_dir: Path, data_dir: Path, out: Path, logs: Path) -> dict:
    import torch

    full, (variant, options) = variant, variant_options(variant)
    cap = options.get("cap", CAP_GIB)
    spg = options.get("spg", 1)
    steps = options.get("steps", STEPS)
    # the whole first generation cycle (it compiles); none where the variant runs one step (its time then includes
    # what the first step compiles: a peak for a slow variant, not a speed)
    warmup = WARMUP * spg if steps > 1 else 0
    completion = options.get("len", COMPLETION)
    unsloth = "unsloth" in variant
    four_bit = "_4bit" in variant
    if cap:
        torch.cuda.set_per_process_memory_fraction(cap * 2**30 / torch.cuda.get_device_properties(0).total_memory)
    if options.get("memsites"):  # every allocation from here on, with its Python stack: memsites.py reads them
        torch.cuda.memory._record_memory_history(context="alloc", max_entries=4_000_000, stacks="python")
    if unsloth:
        if variant.startswith("sdgrpo"):  # as `sdgrpo train` does: transformers' forwards, for the engine
            from sdgrpo.backends.unsloth import remember_transformers_forwards

            remember_transformers_forwards(str(model_dir), False)
        import unsloth  # noqa: F401  (before trl)
    import trl
    from datasets import load_from_disk

    timer = Timer()
    timer.wrap(trl.GRPOTrainer, "_generate", "generation")
    timer.wrap(trl.GRPOTrainer, "_calculate_rewards", "scoring")
    # finer: the batch's preparation (generation, reference and old-policy passes, rewards), the loss's forward
    # passes, and the whole training step (forward + backward; the optimizer step is what the step has beyond it)
    timer.wrap(trl.GRPOTrainer, "_generate_and_score_completions", "prepare")
    timer.wrap(trl.GRPOTrainer, "compute_loss", "loss_forward")
    timer.wrap(trl.GRPOTrainer, "training_step", "training_step")
    if options.get("memblocks"):
        blocks_around(trl.GRPOTrainer, logs / f"memblocks_{full}.log")
    from common import StepClock

    step_clock = StepClock()
    diagnostics = step_diagnostics()
    mb = options.get("mb", G)  # rows a backward; the same G rows a generation and an optimizer step
    common = dict(max_steps=steps * spg, per_device_train_batch_size=mb, gradient_accumulation_steps=G // mb,
                  num_generations=G,
                  max_completion_length=completion, beta=0.04, learning_rate=1e-5, bf16=True, report_to="none",
                  save_strategy="no", logging_steps=1)
    torch.cuda.reset_peak_memory_stats()
    if variant.startswith("sdgrpo"):
        import logging

        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True)  # as the CLI
        from sdgrpo.config import parse_train_args
        from sdgrpo.train import main

        argv = ["--model_name_or_path", str(model_dir), "--dataset_path", str(data_dir), "--output_dir",
                str(out / full), "--collapse_guard", "off", "--backend", "unsloth" if unsloth else "hf"]
        for k, v in common.items():
            argv += [f"--{k}", str(v)]
        if variant.endswith("_generate") or variant in ("sdgrpo_hf_static", "sdgrpo_hf_compile", "sdgrpo_hf_cb"):
            argv += ["--generation_engine", "false"]
        if variant in ("sdgrpo_hf_static", "sdgrpo_hf_compile"):
            argv += ["--cache_implementation", "static"]
        if variant == "sdgrpo_hf_static":
            argv += ["--generation_compile", "false"]
        if variant == "sdgrpo_hf_compile":
            argv += ["--generation_compile", "true"]
        if "_engine" in variant:  # Unsloth's model decoded by sdgrpo's engine, not Unsloth's generation
            argv += ["--generation_engine", "true", "--generation_compile", "true"]
        if variant.endswith("_reuse"):
            argv += ["--reuse_reference_logprobs", "true"]
        if variant.endswith("_int4"):
            argv += ["--generation_weights", "int4"]
        if variant == "sdgrpo_hf_model":
            argv += ["--generation_weights", "model"]
        if variant == "sdgrpo_hf_cudnn":
            argv += ["--cudnn_attention", "true"]
        if variant == "sdgrpo_hf_cb":
            argv += ["--use_transformers_continuous_batching", "true"]
        if four_bit:
            argv += ["--load_in_4bit", "true"]
        if "kernel" in options:
            argv += ["--generation_int4_kernel", options["kernel"]]
        if options.get("release"):
            argv += ["--hold_generation_copies", "false"]
        if "chunk" in options:  # a refresh's rows quantised at a time (benchmark only: the engine's constant)
            import sdgrpo.engine.quantised as quantised

            quantised.INT4_CHUNK = options["chunk"] << 20
        if "slice" in options:  # gemlite's prefill rows in slices (benchmark only: the engine's constant)
            import sdgrpo.engine.int4 as int4

            int4.GEMLITE_PREFILL_SLICE = options["slice"]
        if options.get("torchpack"):  # the refresh's torch quantiser instead of its Triton kernel (benchmark only)
            import sdgrpo.engine.int4 as int4

            int4.TRITON_PACK = False
        if options.get("shippedcfg"):  # gemlite's configurations only (benchmark only)
            import sdgrpo.engine.gemlite_tuned as gemlite_tuned

            gemlite_tuned.ENABLED = False
        if options.get("profile"):
            profile_engine_call(warmup // spg + 1, logs / f"profile_{full}.log")
        if spg > 1:
            argv += ["--steps_per_generation", str(spg)]
        if options.get("offload"):
            argv += ["--offload_activations", "true"]
        if options.get("tile"):
            argv += ["--tile_mlp", "true"]
        if options.get("model"):
            argv += ["--generation_weights", "model"]
        if options.get("plain"):
            argv += ["--offload_activations", "false", "--tile_mlp", "false"]
        train_cfg, model_cfg = parse_train_args(argv)
        main(train_cfg, model_cfg, callbacks=[step_clock, diagnostics], start_over=True)
    else:
        from peft import LoraConfig

        lora = dict(r=16, lora_alpha=32, lora_dropout=0.05)
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        if unsloth:
            from unsloth import FastLanguageModel

            model, tok = FastLanguageModel.from_pretrained(str(model_dir), max_seq_length=PROMPT + completion + 64,
                                                           load_in_4bit=four_bit,
                                                           dtype=None if four_bit else torch.bfloat16,
                                                           unsloth_tiled_mlp=bool(options.get("tile")))
            model = FastLanguageModel.get_peft_model(model, target_modules=targets, bias="none", **lora,
                                                     use_gradient_checkpointing="unsloth")
            peft_config = None
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda()
            tok = AutoTokenizer.from_pretrained(model_dir)
            peft_config = LoraConfig(target_modules=targets, task_type="CAUSAL_LM", **lora)
        from sdgrpo.compat import ensure_trl_runs_without_triton

        ensure_trl_runs_without_triton()
        trainer = trl.GRPOTrainer(model=model, reward_funcs=[original_recipe_reward(model, tok)],
                                  args=trl.GRPOConfig(output_dir=str(out / full), **common),
                                  train_dataset=load_from_disk(str(data_dir))["train"], processing_class=tok,
                                  peft_config=peft_config, callbacks=[step_clock, diagnostics])
        trainer.train()
    if options.get("memsites"):
        from memsites import report

        (logs / f"memsites_{full}.log").write_text(report(torch.cuda.memory._snapshot()))
        torch.cuda.memory._record_memory_history(enabled=None)
    per_step = timer.per_step(step_clock.ends)[warmup:]
    timed = {k: [row.get(k, 0.0) for row in per_step] for k in timer.records}
    timed["step"] = step_clock.durations[warmup:]
    med = {k: statistics.median(v) for k, v in timed.items() if v}
    import torch._dynamo.utils as dynamo_utils
    step = med.get("step", float("nan"))
    # the whole name: variants of one base name apart
    logged, engine_per_step = engine_records(out / full / "metrics.jsonl")
    cycles = len(timed["step"]) // spg  # whole generation cycles timed
    peak_allocated, peak_reserved = timer.peak()
    return {
        "variant": full, "memory_cap_gib": cap, "steps_per_generation": spg, "completion_tokens": completion,
        "steps_timed": len(timed["step"]), "step_times_s": timed["step"],
        "cycle_mean_s": sum(timed["step"][: cycles * spg]) / (cycles * spg) if cycles else None,
        "mismatch_mean": logged.get("sampling/sampling_logp_difference/mean"),
        "engine_mode": logged.get("engine/mode"), "logged": logged,
        "step_s": step, "generation_s": med.get("generation"), "scoring_s": med.get("scoring"),
        "policy_and_reference_s": step - med.get("generation", 0) - med.get("scoring", 0),
        "completion_tokens_per_s": (G * completion / (sum(timed["step"][: cycles * spg]) / (cycles * spg))
                                    if cycles else None),
        "peak_gpu_gib": peak_allocated / 2**30,
        # what the caching allocator held at most: above the peak by what fragmentation costs (the 14B under 16 GiB
        # ran out of memory with 1.58 GiB reserved but unallocated, 2026-12-07)
        "peak_reserved_gib": peak_reserved / 2**30,
        # where the peak is: the highest of each phase's calls (generation within prepare within training_step)
        "peak_by_phase_gib": timer.peak_gib(),
        "per_step_s": per_step, "medians_s": med, "per_step_diagnostics": diagnostics.rows[WARMUP:],
        "engine_per_step": engine_per_step,
        "dynamo_stats": {k: dict(v) for k, v in dynamo_utils.counters.items() if k in ("stats", "recompiles")},
    }


def main():
    out = Path(sys.argv[1] if len(sys.argv) > 1 else HERE / "results")
    shape = sys.argv[2] if len(sys.argv) > 2 else "qwen2.5-1.5b"
    variants = sys.argv[3:] or VARIANTS
    work = Path(os.environ.get("BENCH_WORK", "/tmp/bench_step"))
    if os.environ.get("BENCH_CHILD"):
        model_dir, data_dir = make_assets(work, shape)
        print("RESULT " + json.dumps(run_variant(variants[0], model_dir, data_dir, work, out)), flush=True)
        return
    sys.path.insert(0, str(HERE))
    from common import device_tag, header, save

    work.mkdir(parents=True, exist_ok=True)
    make_assets(work, shape)
    config = {"shape": shape, "vocab_size": vocab_for(shape), "weights": "random bf16", "G": G,
              "completion_tokens": COMPLETION, "prompt_tokens": PROMPT, "lora_r": 16, "beta": 0.04,
              "steps_timed": STEPS - WARMUP, "memory_cap_gib": CAP_GIB}
    head = header("bench_step", config)
    tag = f"{'_cap' + format(CAP_GIB, 'g') if CAP_GIB else ''}{os.environ.get('BENCH_TAG', '')}"
    results = []
    for variant in variants:
        t0 = time.time()
        log = Path(out) / f"bench_step_{variant}.stderr.log"  # the child's log, kept where it is cut short
        timed_out = False
        with log.open("w") as stderr:
            try:
                proc = subprocess.run([sys.executable, __file__, str(out), shape, variant], stdout=subprocess.PIPE,
                                      stderr=stderr, text=True, env=child_env(variant),
                                      timeout=VARIANT_SECONDS)
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            except subprocess.TimeoutExpired:
                lines, timed_out = [], True
        row = json.loads(lines[-1][7:]) if lines else {"variant": variant, "error": log.read_text()[-1500:]}
        if timed_out:
            row["error"] = f"timed out after {VARIANT_SECONDS} s (BENCH_VARIANT_SECONDS); " + row["error"]
        row["wall_s"] = time.time() - t0
        results.append(row)
        print(json.dumps(row), flush=True)
        # written after every variant, so that a run cut short keeps the rows it finished
        save(f"bench_step_{shape}_{device_tag()}_{head['date'][:10]}{tag}", {**head, "results": results}, out)


if __name__ == "__main__":
    main()
