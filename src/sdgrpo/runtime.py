"""The runtime decisions, made from the machine and the launch rather than from the config: what the machine forces
before a training config is built (:func:`machine_settings`: CPU and fp32 without a GPU, the generation batch fitted
to the world size), and the generation defaults of ``sdgrpo train`` (:func:`resolve_runtime`). ``config.py`` keeps
the dataclasses."""

from __future__ import annotations

import logging
import math
import os

logger = logging.getLogger("sdgrpo.config")


def machine_settings(values: dict) -> dict:
    """What the machine decides before a training config is built, from the parsed ``values`` (TRL's and
    transformers' checks in ``__post_init__`` need it): without a GPU, train on CPU in fp32, whatever was asked; and
    the generation batch fitted to the world size (:func:`fit_generation_batch`). The parsers apply these over the
    parsed values. The rest of the runtime detection is :func:`resolve_runtime`'s, the first step of
    ``sdgrpo train``."""
    out = {} if _has_cuda() else {"use_cpu": True, "bf16": False, "fp16": False}
    return {**out, **fit_generation_batch(values)}


def fit_generation_batch(values: dict) -> dict:
    """``steps_per_generation`` that makes the generation batch hold whole groups of ``num_generations`` completions,
    when neither it nor ``generation_batch_size`` was given ({} otherwise, and for configs without generations).

    TRL's generation batch is ``per_device_train_batch_size x processes x steps_per_generation`` (by default
    ``gradient_accumulation_steps``). The original recipe's 1 x 4 with 8 generations would not divide; then one
    generation batch is spread over several optimizer steps instead of failing TRL's check.
    """
    generations = values.get("num_generations")
    if not generations or values.get("generation_batch_size") is not None or values.get("steps_per_generation"):
        return {}
    # The distributed state does not exist yet here; accelerate and torchrun set WORLD_SIZE.
    per_step = values["per_device_train_batch_size"] * int(os.environ.get("WORLD_SIZE", "1"))
    steps = values["gradient_accumulation_steps"]
    if (per_step * steps) % generations == 0:
        return {}
    lcm = math.lcm(per_step * steps, generations)
    logger.info("num_generations %d does not divide the batch %d x %d; steps_per_generation set to %d (one generation "
                "batch of %d completions serves %d optimizer steps)", generations, per_step, steps, lcm // per_step,
                lcm, lcm // (per_step * steps))
    return {"steps_per_generation": lcm // per_step}


def resolve_runtime(cfg):
    """Runtime detection, the first step of ``sdgrpo train``: how the run is launched (one process, DDP, FSDP1/2,
    DeepSpeed: accelerate exports ``ACCELERATE_USE_FSDP``, ``FSDP_VERSION``, ``ACCELERATE_USE_DEEPSPEED``) and on
    what (GPU or CPU) decide the generation defaults that were left open: the decoding engine
    (``--generation_engine``), compiled decoding (``--generation_compile``) and, with it, the static cache. Both are
    off where the weights are gathered again at every decoding step (DeepSpeed, FSDP without the weights held).
    Returns ``cfg``, changed in place."""
    regathered = weights_regathered(vars(cfg))
    if cfg.generation_engine is None:
        cfg.generation_engine = engine_decodes(vars(cfg))
    if cfg.generation_compile is None:
        cfg.generation_compile = default_generation_compile(cfg.backend, not cfg.use_cpu and _has_cuda(), regathered,
                                                            cfg.use_vllm, cfg.cache_implementation,
                                                            cfg.generation_engine)
    if cfg.generation_compile and cfg.cache_implementation is None:
        cfg.cache_implementation = "static"
    return cfg


def weights_regathered(values: dict) -> bool:
    """Whether the launch gathers the weights again at every decoding step: DeepSpeed, or FSDP without the weights
    held for generation (``values``: the parsed options or a config's ``vars``)."""
    fsdp = bool(values.get("fsdp")) or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    deepspeed = bool(values.get("deepspeed")) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    # Held weights, hook-free decoding: FSDP2 only (accelerate launch exports FSDP_VERSION); FSDP1 unmeasured.
    held = (os.environ.get("FSDP_VERSION") == "2" and values.get("fsdp_gather_for_generation", True)
            and values.get("fsdp_skip_hooks_in_generation", True))
    return deepspeed or (fsdp and not held)


def engine_decodes(values: dict) -> bool:
    """Whether sdgrpo's decoding engine draws the rollouts: ``--generation_engine`` where given, else on unless vLLM
    generates or the weights are regathered (:func:`weights_regathered`). Unsloth's model too: 8x its own
    generation (README, docs/gpu.md)."""
    if values.get("generation_engine") is not None:
        return bool(values["generation_engine"])
    return not values.get("use_vllm") and not weights_regathered(values)


def default_generation_compile(backend: str, on_gpu: bool, regathered: bool, use_vllm: bool,
                               cache_implementation: str | None, engine: bool = False) -> bool:
    """Compiled static-cache decoding by default where it was measured to help.

    Measured on H100s: 2.9x faster GRPO steps than the dynamic cache on one GPU
    (benchmarks/results/bench_step_qwen2.5-0.5b_h100_2026-11-26.json), and under FSDP2 with the weights held gathered
    and FSDP's hooks off for generation, 5,840 against 2,136 completion tokens/s on two GPUs
    (bench_multigpu_qwen2.5-1.5b_h100x2_2026-11-26_hookless*.json). Off on CPU (not compiled there), with vLLM and
    with Unsloth's own generation (under Unsloth it is on only where the ``engine`` decodes), and where the weights
    are ``regathered`` during generation: DeepSpeed (not measured) and FSDP with --fsdp_gather_for_generation or
    --fsdp_skip_hooks_in_generation off (a graph break at every module).
    """
    return ((backend == "hf" or engine) and on_gpu and not regathered and not use_vllm
            and cache_implementation in (None, "static"))


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
