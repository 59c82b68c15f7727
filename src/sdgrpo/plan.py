"""What a training run asks of a GPU's memory, estimated from the model's config.json and the options before
anything loads: ``sdgrpo train --dry_run`` prints it, and a run whose estimate is well above the memory it may use is
refused in one line naming the longest completion that fits and what makes room (never an out-of-memory traceback
in the middle of a step).

The parts, in bytes, for a decoder of the Llama / Qwen2 family (hidden H, intermediate I, L layers, KV heads x head
width = K, vocabulary V), LoRA of rank r on every linear projection, R training rows of T tokens (prompt +
completion), G rows decoded at a time:

- ``weights``: the model as loaded: every parameter in its dtype, or, with a 4-bit base, its linear projections at
  half a byte a weight plus an fp32 scale per block of 64 (bitsandbytes NF4 without double quantisation, as sdgrpo
  loads it) and the rest (embeddings, LM head, norms) in 16 bits;
- ``adapters``: r x (in + out) per projection, each fp32 parameter with its gradient and two Adam moments (16 bytes);
- ``generation``: the decoding engine's copies for the mode it will choose (16-bit copies of the LoRA-wrapped
  weights, int4 copies, or none) and its static cache (keys and values of G rows at T positions), both kept between
  generations, so they are held while training runs too;
- ``activations``: per training token, what gradient checkpointing keeps (each layer's input, L x H x 2), one layer's
  recomputed activations with their gradients in the backward (the MLP's 6 x I and the attention's 6 x H values, 2
  bytes each) and the fused LM head's fp32 gradient of its input (4 x H); times R x T. With the layer inputs offloaded
  to CPU memory (``--offload_activations``, sdgrpo.offload), the first term is off the card; with the MLP run over
  tiles of tokens (``--tile_mlp``, sdgrpo.tiling) the MLP's 6 x I is held for one tile (engine: TILE_TOKENS tokens;
  Unsloth's: H tokens) instead of every token, and every token keeps 4 x H while its layer's backward runs (the
  MLP's input and that input's gradient, 2 x H; measured, as much again, as the norm before the MLP computes in
  fp32: a 7B at 2,048 tokens peaked at 12.10 GiB, planned 11.63 without the 4 x H, 12.09 with);
  auto turns on what the run needs to fit, offloading first (it moves bytes; tiling recomputes the MLP once more);
- ``head``: TRL's fused LM head's tile (4,096 tokens x 32,768 vocabulary columns, 16-bit), the one part of the
  head that does not grow with tokens.

Checked against the peaks measured on one H100 (tests/test_plan.py reads benchmarks/results/): the Qwen2.5-7B shape
with a 4-bit base at 512 completion tokens, 16-bit copies 20.7 GiB, int4 copies 11.9 GiB, and with
``--generation_weights model`` at 512 / 1024 / 2048 tokens 8.5 / 10.6 / 15.0 GiB (2026-12-06), at 2,048 tokens with
the MLP tiled 12.1 GiB and the 14B shape under 16 GiB 13.3 GiB (2026-12-08); the estimate is within 10% of each, from
1% below to 5% above it. A run is refused where the estimate is above its cap: the one measured run so placed (int4
copies under 12 GiB, 12.3 estimated) ran out of memory in its first step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

GiB = 2**30
HEAD_TILE = 4096 * 32768 * 2  # TRL 1.15's fused head: TOKEN_CHUNK_SIZE x _CHUNKED_LOGPROB_CHUNK_SIZE, 16-bit
NF4_BLOCK = 64


@dataclass
class Plan:
    """The estimate of one run (bytes), and how it was made."""

    weights: int
    adapters: int
    copies: dict[str, int]  # engine mode -> bytes of its generation copies
    cache: int
    per_token: int  # activations per training token
    train_tokens: int  # training rows x (prompt + completion)
    layer_inputs: int = 0  # of per_token: the checkpointed layers' inputs, which offloading takes off the card
    offload: bool = False  # the layer inputs in CPU memory (--offload_activations)
    may_offload: bool = False  # --offload_activations auto could turn it on (decide_activations)
    mlp: int = 0  # of per_token: the recomputed layer's MLP activations, which tiling holds for one tile only
    tile: bool = False  # the MLP run over tiles of tile_tokens tokens (--tile_mlp)
    tiled_keep: int = 0  # what a token still costs a tiled layer's backward (the MLP's input, its gradient, ...)
    may_tile: bool = False  # --tile_mlp auto could turn it on (decide_activations)
    tile_tokens: int = 1024  # sdgrpo.tiling.TILE_TOKENS; Unsloth's tiles are H tokens
    head: int = HEAD_TILE
    mode: str = "unmerged"  # the engine mode the estimate assumes
    notes: list[str] = field(default_factory=list)

    def on_card_per_token(self, offload: bool | None = None, tile: bool | None = None) -> int:
        """Activation bytes a training token keeps on the card, with the layer inputs offloaded or not and the MLP
        tiled or not (default: as planned)."""
        offload = self.offload if offload is None else offload
        tile = self.tile if tile is None else tile
        return self.per_token - (self.layer_inputs if offload else 0) - (self.mlp - self.tiled_keep if tile else 0)

    def activations(self, tokens: int | None = None, offload: bool | None = None, tile: bool | None = None) -> int:
        """Activation bytes of a training pass over ``tokens`` (default: the plan's): per token, and one tile's MLP
        where tiled."""
        tokens = self.train_tokens if tokens is None else tokens
        tile = self.tile if tile is None else tile
        return (self.on_card_per_token(offload, tile) * tokens
                + (self.mlp * min(tokens, self.tile_tokens) if tile else 0))

    def peak(self, mode: str | None = None) -> int:
        mode = mode or self.mode
        return self.weights + self.adapters + self.copies.get(mode, 0) + self.cache + self.activations() + self.head

    def table(self, cap: float | None) -> str:
        """The plan as lines a person reads."""
        rows = [("model weights", self.weights), ("LoRA, gradients, Adam state", self.adapters),
                (f"generation copies ({self.mode})", self.copies.get(self.mode, 0)), ("KV cache", self.cache),
                (f"training activations ({self.train_tokens} tokens" + ("; inputs on CPU" if self.offload else "")
                 + (f"; MLP in tiles of {self.tile_tokens}" if self.tile else "") + ")", self.activations()),
                ("fused LM head tile", self.head), ("estimated peak", self.peak())]
        lines = [f"  {name:<50} {value / GiB:7.2f} GiB" for name, value in rows]
        if cap is not None:
            lines.append(f"  {'memory the run may use':<50} {cap / GiB:7.2f} GiB")
        return "\n".join(lines + [f"  {n}" for n in self.notes])


def _text(config):
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def projections(config) -> list[tuple[int, int]]:
    """(out, in) of every linear projection of one decoder layer (q, k, v, o, gate, up, down)."""
    c = _text(config)
    h, i = c.hidden_size, c.intermediate_size
    head = getattr(c, "head_dim", None) or h // c.num_attention_heads
    q = c.num_attention_heads * head
    kv = (getattr(c, "num_key_value_heads", None) or c.num_attention_heads) * head
    return [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]


def parameter_count(config) -> tuple[int, int]:
    """(weights of the layers' linear projections, every other parameter): embeddings, LM head (untied), norms and
    the attention biases where the family has them."""
    c = _text(config)
    linear = c.num_hidden_layers * sum(o * i for o, i in projections(config))
    bias = c.num_hidden_layers * sum(o for o, _ in projections(config)[:3]) if getattr(
        c, "attention_bias", c.model_type == "qwen2") else 0
    norms = c.num_hidden_layers * 2 * c.hidden_size + c.hidden_size
    embed = c.vocab_size * c.hidden_size * (1 if getattr(c, "tie_word_embeddings", False) else 2)
    return linear, embed + norms + bias


def cache_bytes(config, rows: int, positions: int, width: int = 2) -> int:
    """The engine's static cache (keys and values of every layer; engine.budget.cache_bytes's formula)."""
    c = _text(config)
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * rows * heads * dim * positions * width


def estimate(config, *, four_bit: bool, dtype_bytes: int = 2, lora_r: int = 16, train_rows: int,
             generate_rows: int, prompt: int, completion: int, generation_weights: str = "auto",
             int4_kernel: str = "tinygemm", cap: float | None = None, engine: bool = True,
             offload: bool = False, tile: bool = False) -> Plan:
    """The plan of a run (see the module docstring); the engine mode is the one the decoding engine would choose
    under ``cap`` (``_decide_mode`` in engine/budget.py on its first call: what the cap leaves after the resident
    model, less engine.budget.TRAINING_SHARE of it for training)."""
    from sdgrpo.engine import INT4_FIRST, TRAINING_SHARE, GemliteLinear, Int4Linear, gemlite_layout, int4_layout

    c = _text(config)
    linear, other = parameter_count(config)
    if four_bit:
        weights = linear // 2 + linear // NF4_BLOCK * 4 + other * 2
    else:
        weights = (linear + other) * dtype_bytes
    shapes = projections(config)
    adapters = c.num_hidden_layers * sum(lora_r * (o + i) for o, i in shapes) * 16
    positions = prompt + completion
    cache = cache_bytes(config, generate_rows, positions, dtype_bytes) if engine else 0
    # the engine's groups: q k v stacked, o, gate up stacked, down
    groups = [(shapes[0][0] + 2 * shapes[1][0], c.hidden_size), shapes[3], (2 * shapes[4][0], c.hidden_size), shapes[6]]
    int4 = 0
    for out, inp in groups:
        if int4_kernel == "gemlite":
            group = gemlite_layout(out, inp)
            int4 += GemliteLinear.nbytes(out, inp, group) if group else 2 * out * inp
        else:
            layout = int4_layout(out, inp)
            int4 += Int4Linear.nbytes(out, inp, layout[0]) if layout else 2 * out * inp
    copies = {"folded": linear * dtype_bytes, "dequantised": linear * 2, "int4": int4 * c.num_hidden_layers,
              "unmerged": 0}
    h, i = c.hidden_size, c.intermediate_size
    per_token = c.num_hidden_layers * h * 2 + (6 * i + 6 * h) * 2 + 4 * h
    plan = Plan(weights=weights, adapters=adapters, copies=copies, cache=cache, per_token=per_token,
                layer_inputs=c.num_hidden_layers * h * 2, offload=offload, mlp=6 * i * 2, tile=tile,
                tiled_keep=4 * h * 2,
                train_tokens=train_rows * positions)
    plan.mode = _engine_mode(plan, four_bit, generation_weights, int4_kernel, cap, engine,
                             INT4_FIRST, TRAINING_SHARE)
    return plan


def _engine_mode(plan: Plan, four_bit: bool, weights: str, kernel: str, cap, engine: bool, int4_first,
                 share) -> str:
    if not engine:
        return "unmerged"
    if weights == "int4":
        return "int4"
    budget = math.inf if cap is None else cap - plan.weights - plan.adapters - share * cap
    fits = {mode: plan.copies[mode] + plan.cache <= budget for mode in plan.copies}
    if not four_bit:
        return "folded" if weights != "int4" and fits["folded"] else "unmerged"
    if weights == "model":
        return "unmerged"
    if kernel in int4_first and fits["int4"]:
        return "int4"
    if fits["dequantised"]:
        return "dequantised"
    return "int4" if fits["int4"] else "unmerged"


def longest_completion(plan: Plan, cap: float, prompt: int, completion: int, train_rows: int,
                       generate_rows: int, config, dtype_bytes: int = 2, offload: bool | None = None,
                       tile: bool | None = None) -> int:
    """The longest completion (a multiple of 64 tokens, at most ``completion``) whose plan, in the same engine mode
    (and with the layer inputs offloaded where ``offload``, the MLP tiled where ``tile``; default: as planned), stays
    within ``cap``; 0 where none does."""
    best = 0
    for n in range(64, completion + 1, 64):
        tokens = train_rows * (prompt + n)
        cache = cache_bytes(config, generate_rows, prompt + n, dtype_bytes) if plan.cache else 0
        peak = plan.peak() - plan.activations() - plan.cache + plan.activations(tokens, offload, tile) + cache
        if peak <= cap:
            best = n
    return best


def for_run(train_cfg, model_cfg) -> tuple[Plan | None, float | None]:
    """(the plan of ``sdgrpo train`` with these options, the GPU memory it may use in bytes): ``--gpu_memory_gib``
    where given, else what the GPU has under the process's cap, else None (no GPU). The plan is None where the
    model's config.json cannot be read here (a hub name offline) or its family is not one the estimate knows."""
    import torch

    from sdgrpo.modeling import model_config, resolve_dtype

    cap = None
    if train_cfg.gpu_memory_gib is not None:
        cap = train_cfg.gpu_memory_gib * GiB
    elif torch.cuda.is_available() and not train_cfg.use_cpu:
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        cap = torch.cuda.get_per_process_memory_fraction(torch.cuda.current_device()) * total
    config = model_config(model_cfg.model_name_or_path, train_cfg.trust_remote_code)
    try:
        projections(config)
    except (AttributeError, TypeError):
        return None, cap
    # auto: bf16 on a GPU that has it; planned for a card elsewhere (--gpu_memory_gib without a GPU here), bf16
    here = torch.cuda.is_available() and not train_cfg.use_cpu
    dtype = (resolve_dtype(model_cfg.dtype, "cuda" if here else "cpu") if here or model_cfg.dtype not in (None, "auto")
             else torch.bfloat16)
    rows = train_cfg.per_device_train_batch_size
    lora = model_cfg.lora_r if model_cfg.use_peft else 0
    kernel = train_cfg.generation_int4_kernel
    if kernel == "auto":  # as the engine will choose on this GPU; planned for another card: tinygemm
        from sdgrpo.engine import auto_int4_kernel

        kernel = auto_int4_kernel()[0] if here else "tinygemm"
    plan = estimate(config, four_bit=bool(model_cfg.load_in_4bit), dtype_bytes=torch.finfo(dtype).bits // 8,
                    lora_r=lora, train_rows=rows, generate_rows=generation_rows(train_cfg),
                    prompt=train_cfg.max_prompt_length or 0, completion=train_cfg.max_completion_length or 0,
                    generation_weights=train_cfg.generation_weights, int4_kernel=kernel,
                    cap=cap, engine=bool(train_cfg.generation_engine),
                    offload=train_cfg.offload_activations == "true", tile=train_cfg.tile_mlp == "true")
    if getattr(train_cfg, "backend", "hf") == "unsloth":  # Unsloth's tiles (unsloth_zoo.tiled_mlp, "arctic")
        plan.tile_tokens = _text(config).hidden_size
    decide_activations(train_cfg, plan, cap)
    return plan, cap


def decide_activations(train_cfg, plan: Plan, cap: float | None) -> None:
    """``--offload_activations auto`` and ``--tile_mlp auto``: each off, unless the run fits its GPU memory (on a GPU
    or planned for one) only with it; offloading is tried first (--backend hf with gradient checkpointing), then
    tiling, then both. ``train_cfg`` and ``plan`` are set to what was chosen, with one line logged for each turned
    on. Where nothing fits, the plan keeps ``may_offload``/``may_tile`` so the refusal names what fits with them."""
    import logging

    auto_offload, auto_tile = train_cfg.offload_activations == "auto", train_cfg.tile_mlp == "auto"
    if auto_offload:
        train_cfg.offload_activations = "false"
    if auto_tile:
        train_cfg.tile_mlp = "false"
    if plan is None or cap is None or plan.peak() <= cap:
        return
    can_offload = auto_offload and getattr(train_cfg, "backend", "hf") == "hf" and train_cfg.gradient_checkpointing
    offload_options = [plan.offload] + ([True] if can_offload and not plan.offload else [])
    tile_options = [plan.tile] + ([True] if auto_tile and not plan.tile else [])
    choices = [(o, t) for t in tile_options for o in offload_options][1:]  # offloading first, then tiling, then both
    if not choices:
        return
    plan.may_offload, plan.may_tile = can_offload, auto_tile
    for offload, tile in choices:
        plan.offload, plan.tile = offload, tile
        if plan.peak() <= cap:
            break
    else:
        plan.offload, plan.tile = (train_cfg.offload_activations == "true", train_cfg.tile_mlp == "true")
        return
    log = logging.getLogger(__name__)
    if plan.offload and auto_offload:
        train_cfg.offload_activations = "true"
        log.info("activations offloaded (--offload_activations auto): the run fits %.1f GiB only with the "
                 "checkpointed layer inputs in CPU memory (%.2f GiB a step)", cap / GiB,
                 plan.layer_inputs * plan.train_tokens / GiB)
    if plan.tile and auto_tile:
        train_cfg.tile_mlp = "true"
        log.info("MLP tiled (--tile_mlp auto): the run fits %.1f GiB only with the MLP run over tiles of %d tokens "
                 "(%.2f GiB of activations instead of %.2f)", cap / GiB, plan.tile_tokens, plan.activations() / GiB,
                 plan.activations(tile=False) / GiB)


def check(train_cfg, model_cfg, plan: Plan | None, cap: float | None) -> None:
    """Raise :class:`UserError` where the plan's peak is above ``cap`` (``--memory_check false`` lets the run try),
    naming the longest completion that fits and the options that make room."""
    from sdgrpo.errors import UserError

    if plan is None or cap is None or not train_cfg.memory_check or plan.peak() <= cap:
        return
    prompt, completion = train_cfg.max_prompt_length or 0, train_cfg.max_completion_length or 0
    rows = train_cfg.per_device_train_batch_size
    # what fits with auto's offloading and tiling, which a shorter run gets
    longest = longest_completion(plan, cap, prompt, completion, rows, generation_rows(train_cfg),
                                 _config(train_cfg, model_cfg), offload=plan.offload or plan.may_offload,
                                 tile=plan.tile or plan.may_tile)
    room = []
    if rows % 2 == 0 and rows > 1:  # the same rows a generation and an optimizer step, half the activations
        room.append(f"--per_device_train_batch_size {rows // 2} --gradient_accumulation_steps "
                    f"{2 * train_cfg.gradient_accumulation_steps} (the same rows a step, half the activations)")
    if plan.mode in ("dequantised", "folded"):
        room.append("--generation_weights int4 (a quarter of the copies' memory)")
    if plan.mode == "int4":
        room.append("--generation_weights model (no copies)")
    if not model_cfg.load_in_4bit:
        room.append("--load_in_4bit true")
    if not (plan.tile or plan.may_tile):
        room.append("--tile_mlp true (the MLP over tiles of tokens)")
    fits = (f"--max_completion_length {longest} fits" if longest else "no completion length fits")
    raise UserError(f"this run needs about {plan.peak() / GiB:.1f} GiB of GPU memory ({plan.mode} generation, "
                    f"{rows} rows x {prompt}+{completion} tokens) and may use {cap / GiB:.1f} GiB: {fits}"
                    + (f"; or {', or '.join(room)}" if room else "")
                    + "; `sdgrpo train --dry_run` shows the parts (--memory_check false tries anyway)")


def generation_rows(train_cfg) -> int:
    """Rows one generation decodes: TRL's generation_batch_size (per_device_train_batch_size x steps_per_generation,
    which defaults to gradient_accumulation_steps; GRPOConfig.__post_init__ in TRL 1.15), or generation_batch_size
    (over all processes) where set."""
    if getattr(train_cfg, "generation_batch_size", None):
        return train_cfg.generation_batch_size // max(1, getattr(train_cfg, "world_size", 1))
    return train_cfg.per_device_train_batch_size * (train_cfg.steps_per_generation
                                                    or train_cfg.gradient_accumulation_steps or 1)


def _config(train_cfg, model_cfg):
    from sdgrpo.modeling import model_config

    return model_config(model_cfg.model_name_or_path, train_cfg.trust_remote_code)


def apply_cap(train_cfg) -> None:
    """``--gpu_memory_gib``: this process's CUDA memory capped there (``torch.cuda.set_per_process_memory_fraction``,
    which the decoding engine's budget reads too), as on a card of that size."""
    import torch

    if train_cfg.gpu_memory_gib is None or train_cfg.use_cpu or not torch.cuda.is_available():
        return
    device = torch.cuda.current_device()
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, train_cfg.gpu_memory_gib * GiB / total), device)
