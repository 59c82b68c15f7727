"""The decoding engine: sampling for GRPO rollouts, eval, demo and generate, with the model's weights read once per
token and nothing else in the way.

What it does, against ``transformers``' ``generate`` with the same settings:

- **Static KV cache**, sized to the batch and to the prompt + completion length rounded up to ``length_bucket`` (at
  least ``reserve``), kept between calls (reset, not reallocated) and grown only when a call does not fit, so that a
  training run whose prompts vary in length allocates it (and compiles the step for it) once, not once per length:
  the trainer reserves its longest prompt + the completion length.
- **One decoding step** (the forward of one token per row; temperature, top-k, top-p and min-p sampling as TRL's
  generation config asks; the minimum length; EOS handling; writing the token into the output and advancing the
  positions), compiled with ``torch.compile`` and captured as one CUDA graph on a GPU that reads and advances its
  own state in place, so each token costs one graph replay and no other host work; eager on CPU (the same code,
  step by step). The host synchronises only every ``check_every`` tokens, to see whether every row has finished.
- **Generation copies** of the LoRA-wrapped weights where they fit the budget (budget.py): LoRA folded (folded.py),
  or a quantised base's 16-bit or int4 copies (quantised.py, int4.py); else LoRA decodes unmerged.

Tokens are chosen as ``generate`` chooses them (sampling.py); what the engine does not do goes to ``generate``
(support.py). Private coupling (pinned in tests/test_private_api.py): :func:`serving` shadows ``model.generate`` on
the instance for the duration of TRL's ``_generate`` (TRL 1.15 calls ``unwrapped_model.generate(**inputs,
generation_config=...)`` there).
"""

from __future__ import annotations

import contextlib
import logging
import time
import weakref
from dataclasses import astuple

import torch

from sdgrpo.engine.attention import grouped_attention
from sdgrpo.engine.budget import WEIGHTS, _ModeChoice
from sdgrpo.engine.folded import Folded, StackedA
from sdgrpo.engine.int4 import INT4_KERNELS
from sdgrpo.engine.originals import originals_put_back
from sdgrpo.engine.quantised import Quantised, _quantisable_lora_layers
from sdgrpo.engine.sampling import Decoded, Sampling, choose, scaled
from sdgrpo.engine.support import _inner, dropout_in_rollouts, sampling_from, unsupported
from sdgrpo.scoring import eval_mode

logger = logging.getLogger("sdgrpo.engine")  # the package's logger: its lines read as before the engine was split


class _State:
    """What one decoding step reads and advances in place, at fixed addresses (a captured CUDA graph replays on
    them): the attention mask over the cache, the last token, positions, the step counter, the finished flags, the
    completion's tokens and log-probs so far, and the EOS ids."""

    def __init__(self, batch: int, length: int, new: int, device, mask_dtype, eos: tuple[int, ...], pad: int):
        def zeros(*shape, dtype=torch.long):
            return torch.zeros(*shape, dtype=dtype, device=device)

        self.mask, self.token, self.position = zeros(batch, length, dtype=mask_dtype), zeros(batch), zeros(batch)
        self.cache_position, self.step, self.finished = zeros(1), zeros(()), zeros(batch, dtype=torch.bool)
        self.tokens, self.logps = torch.full((batch, new), pad, dtype=torch.long, device=device), \
            zeros(batch, new, dtype=torch.float32)
        self.slogps = zeros(batch, new, dtype=torch.float32)  # at the call's temperature
        self.eos = torch.tensor(eos, dtype=torch.long, device=device)


class _Clock:
    """Wall-clock laps, each ended by a device synchronisation on a GPU (one per phase of a call, not per token)."""

    def __init__(self, device):
        self.device, self.last = device, time.perf_counter()

    def lap(self) -> float:
        if self.device is not None:
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        lap, self.last = now - self.last, now
        return lap


class DecodeEngine(_ModeChoice):
    """Batched decoding with a static cache and one (compiled) step function; see the module docstring.

    ``compile``: compile the step and capture it as a CUDA graph (default: on a GPU).
    ``check_every``: tokens between checks that every row has finished (the only host synchronisation).
    ``compile_mode``: torch.compile's mode for the step (``max-autotune-no-cudagraphs`` also tunes the matrix
    kernels for the decoding batch, at a longer first call; the engine captures the CUDA graph itself).
    ``grouped_attention``: decode with :func:`grouped_sdpa` (exact; on one H100, 1.5B shape, 8 x 512 tokens: 1.49 s
    against 1.66 s with transformers' copies, same run). Off: transformers' SDPA function as the model has it.
    ``reserve``: cache positions (prompt + completion) to allocate at the least. A compiled step is compiled again
    for each new cache length (on one H100, 1.5B shape: ~30 s), so a caller that knows its longest call reserves it.
    ``fuse_projections``: decode each sibling group of LoRA-wrapped projections (q, k, v; gate, up) with one matmul
    over stacked generation copies (see :class:`Folded`, :class:`Quantised`), or, decoding unmerged, with their A
    matrices stacked (:class:`StackedA`).
    ``memory_budget_gib``: what generation may take beyond the memory already allocated (the fold's copies and the
    cache); default: decided from the device (:func:`generation_room`). LoRA is folded only where its copies fit the
    budget; otherwise the LoRA layers decode unmerged (PEFT's own forward, inside the same step and graph), which
    costs no memory. Decided once per model (``mode``: ``folded``, ``dequantised``, ``int4``, ``unmerged``, or
    ``plain`` with nothing to fold), logged in one line.
    ``hold_copies`` false: a quantised base's int4 or 16-bit copies are freed after each call and made again by the
    next (:class:`Quantised`'s ``hold``), leaving their memory to training between calls; the budget still counts
    them (the mode is decided as if held).
    ``generation_weights``: ``model`` decodes the model's own weights (LoRA folded in their dtype, or unmerged);
    ``int4`` decodes int4 copies of base + LoRA (:class:`Quantised`; mode ``int4``) wherever the layers allow;
    ``auto`` folds in the model's dtype where that fits the budget; a quantised (bitsandbytes) base gets 16-bit
    copies of its dequantised weights + LoRA where they fit (mode ``dequantised``), else int4 copies where those
    fit; anything else decodes unmerged. (A 16-bit base is not given int4 copies by ``auto``: on one
    H200, Qwen2.5-7B shape, 8 rows, PyTorch's int4 kernel decoded at 7.79 ms a token against 7.88 ms unmerged and
    5.36 ms folded, for a sampler 30x further from the policy; ``benchmarks/results/bench_generate_qwen2.5-7b_h200_
    2026-12-03_int4.json``.)
    """

    def __init__(self, compile: bool | None = None, check_every: int = 16, length_bucket: int = 64,
                 compile_mode: str = "default", grouped_attention: bool = True, reserve: int = 0,
                 fuse_projections: bool = True, memory_budget_gib: float | None = None,
                 generation_weights: str = "auto", int4_kernel: str = "auto", hold_copies: bool = True):
        if generation_weights not in WEIGHTS:
            raise ValueError(f"generation_weights {generation_weights!r} is not one of {list(WEIGHTS)}")
        if int4_kernel not in INT4_KERNELS:
            raise ValueError(f"int4_kernel {int4_kernel!r} is not one of {list(INT4_KERNELS)}")
        self.compile = compile
        self.memory_budget_gib = memory_budget_gib
        self.generation_weights = generation_weights
        self.int4_kernel = int4_kernel  # as asked; the kernel in use is self.quantised.kernel once a mode is decided
        self.quantised = Quantised(fuse=fuse_projections, hold=hold_copies)
        # 16-bit copies of a dequantised quantised base
        self.dense = Quantised(fuse=fuse_projections, bits=16, hold=hold_copies)
        self.stacked = StackedA()
        self.fuse_projections = fuse_projections
        self.mode: str | None = None
        self._mode_for = None  # weakref to the model the mode was decided for
        self._decided: tuple[int, int] | None = None  # (cache bytes, copies bytes) the mode was decided with
        self.record: list[Decoded] | None = None  # set to a list to collect every call's Decoded
        self.reserve = reserve
        self.grouped_attention = grouped_attention
        self.compile_mode = compile_mode
        self.check_every = check_every
        self.length_bucket = length_bucket
        self.fold = Folded(fuse=fuse_projections)
        self.calls = 0  # decoding calls served (a fallback to generate is not counted)
        self.fallbacks = 0
        self.setups = 0  # static caches made (a new batch size, length bucket, model or dtype)
        self.captures = 0  # CUDA graphs captured
        self._told: set[str] = set()  # fallback reasons already logged
        self._key = None
        self._model = None  # weakref to the model the cache and step were made for
        self._length = 0
        self._cache = None
        self._step = None
        self._state: tuple | None = None  # (key, _State)
        self._graph: tuple | None = None  # (key, torch.cuda.CUDAGraph or None where capture failed)
        # the last call's wall time by phase (device-synchronised): the generation copies' refresh, the cache set-up
        # and prefill (with a compile and capture where one happened), and the token steps, with their number
        self.timing: dict[str, float] = {}
        self.timings: list[dict] | None = None  # set to a list to collect every call's timing

    # the whole decoding step: forward of one token per row, then the choice
    def _decode_step(self, model, cache, mask, token, position, cache_position, step, finished, s, eos):
        logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=position[:, None],
                       past_key_values=cache, cache_position=cache_position, use_cache=True).logits[:, -1]
        return choose(logits, s, step, eos, finished)

    def _advance(self, model, st: _State, s: Sampling) -> None:
        """One step on the state, in place: the next token of every row, written at column ``st.step``."""
        token, logp, slogp, finished = self._step(model, self._cache, st.mask, st.token, st.position,
                                                  st.cache_position, st.step, st.finished, s, st.eos)
        column = st.step.view(1)
        st.tokens.index_copy_(1, column, token[:, None])
        st.logps.index_copy_(1, column, logp[:, None])
        if scaled(s):  # otherwise ``logprobs`` are the sampling log-probs, and slogps is not read
            st.slogps.index_copy_(1, column, slogp[:, None])
        st.token.copy_(token)
        st.finished.copy_(finished)
        st.position.add_(1)
        st.cache_position.add_(1)
        st.step.add_(1)

    def _setup(self, model, batch: int, length: int, device, on_gpu: bool) -> int:
        """Reset the static cache, or make one (and a step function) if none fits; returns the cache's length.

        The cache only grows: a call that fits the current one reuses it (the unused tail is masked off by the
        cache positions), so prompts of varying lengths do not recompile the step, which a new length would."""
        from transformers import StaticCache

        key = (batch, str(device), next(model.parameters()).dtype)
        same_model = self._model is not None and self._model() is model
        if not same_model or key != self._key or length > self._length:
            self._key, self._length, self._model = key, length, weakref.ref(model)
            self._graph = None
            self.setups += 1
            self._cache = StaticCache(config=model.config, max_cache_len=length)
            step = self._decode_step
            if self.compile if self.compile is not None else on_gpu:
                step = torch.compile(step, mode=self.compile_mode, fullgraph=False, dynamic=False)
            self._step = step
        else:
            self._cache.reset()
        return self._length

    def _prefill(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, st: _State, s: Sampling):
        """The prompts' forward into the cache, the first token, and the state set for step 1."""
        prompt_len = input_ids.size(1)
        st.mask.fill_(1)
        st.mask[:, :prompt_len] = attention_mask
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=input_ids, attention_mask=st.mask, position_ids=positions, past_key_values=self._cache,
                    cache_position=torch.arange(prompt_len, device=input_ids.device), use_cache=True,
                    logits_to_keep=1)
        st.step.zero_()
        st.finished.zero_()
        token, logp, slogp, finished = choose(out.logits[:, -1], s, st.step, st.eos, st.finished)
        st.tokens.fill_(s.pad_token_id)
        st.logps.zero_()
        st.slogps.zero_()
        st.tokens[:, 0], st.logps[:, 0], st.slogps[:, 0] = token, logp, slogp
        st.token.copy_(token)
        st.finished.copy_(finished)
        st.position.copy_(positions[:, -1] + 1)
        st.cache_position.fill_(prompt_len)
        st.step.fill_(1)

    def _capture(self, model, st: _State, s: Sampling):
        """The step as a CUDA graph (after warm-up runs that compile it), or None if it cannot be captured.

        cuBLAS workspaces are cleared before and after, as inductor's own captures do (``clear_cublas_manager``):
        PyTorch keeps one per (handle, stream) until cleared, so the warm-up's side stream and the capture each left
        one behind (32 MiB on an H100): a second call of an engine that frees its copies held 32 MiB more than the
        first (one H100, 2026-12-07); recaptures would have added one per stream of PyTorch's pool of 32."""
        from torch._inductor.cudagraph_trees import clear_cublas_manager

        try:
            with clear_cublas_manager():
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(3):
                        self._advance(model, st, s)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    self._advance(model, st, s)
            self.captures += 1
            return graph
        except Exception as e:  # noqa: BLE001 - a model whose step cannot be captured still decodes, step by step
            logger.warning("decoding step not captured as a CUDA graph (%s: %s); decoding step by step",
                           type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            return None

    @torch.no_grad()
    def decode(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, s: Sampling) -> Decoded:
        """Sample (or choose greedily) up to ``s.max_new_tokens`` tokens after each left-padded prompt row."""
        self.calls += 1
        device = input_ids.device
        batch, prompt_len = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        length = -(-max(prompt_len + s.max_new_tokens, self.reserve) // self.length_bucket) * self.length_bucket
        inner = _inner(model)
        on_gpu = torch.device(device).type == "cuda"
        if not self._fits_again(model, batch, length, device):
            self._release_copies()
        mode = self._decide_mode(model, batch, length, device)
        clock = _Clock(device if on_gpu else None)
        copies = (self.fold(model) if mode == "folded" else
                  self.quantised(model, _quantisable_lora_layers(model, 4, self.quantised.kernel))
                  if mode == "int4" else self.dense(model, _quantisable_lora_layers(model, 16))
                  if mode == "dequantised" else self.stacked(model) if mode == "unmerged" and self.fuse_projections
                  else contextlib.nullcontext())
        # Eval mode: in train mode with gradient checkpointing on (TRL's default, and the Trainer's mode while it
        # generates), transformers' layers drop the KV cache, which one-token steps cannot do without.
        with copies, originals_put_back(inner), eval_mode(inner), \
                grouped_attention(inner, self.grouped_attention):
            refresh_s = clock.lap()
            length = self._setup(inner, batch, length, device, on_gpu)
            key = (batch, length, s.max_new_tokens, str(device), attention_mask.dtype, s.eos_token_ids, s.pad_token_id)
            if self._state is None or self._state[0] != key:
                self._state = (key, _State(batch, length, s.max_new_tokens, device, attention_mask.dtype,
                                           s.eos_token_ids, s.pad_token_id))
            st = self._state[1]
            rng = torch.cuda.get_rng_state(device) if on_gpu else None
            self._prefill(inner, input_ids, attention_mask, st, s)
            graph = None
            if on_gpu and self._step is not self._decode_step and s.max_new_tokens > 4:
                # the graph replays on fixed addresses: the cache (made anew only with a new _key or length), the
                # state (made anew only with a new key) and the weights (folded copies included)
                graph_key = (self._key, key, astuple(s), tuple(p.data_ptr() for p in inner.parameters()))
                if self._graph is None or self._graph[0] != graph_key:
                    self._graph = (graph_key, self._capture(inner, st, s))
                    # the warm-up steps wrote into the cache and the state and drew random numbers: start again
                    self._cache.reset()
                    torch.cuda.set_rng_state(rng, device)
                    self._prefill(inner, input_ids, attention_mask, st, s)
                graph = self._graph[1]
            prefill_s = clock.lap()
            ran = s.max_new_tokens
            for t in range(1, s.max_new_tokens):
                if t % self.check_every == 0 and bool(st.finished.all()):
                    ran = t
                    break
                if graph is not None:
                    graph.replay()
                else:
                    self._advance(inner, st, s)
            self.timing = {"refresh_s": refresh_s, "prefill_s": prefill_s, "decode_s": clock.lap(), "steps": ran - 1}
            if self.timings is not None:
                self.timings.append(self.timing)
            tokens, logps = st.tokens[:, :ran], st.logps[:, :ran]
            # generate stops at the step where the last row ends: keep the columns up to there
            if st.eos.numel():
                ends = torch.isin(tokens, st.eos)
                never = torch.full(ends.shape[:1], ran, dtype=torch.long, device=device)
                last = torch.where(ends.any(1), ends.int().argmax(1) + 1, never)
                ran = int(last.max())
            out = Decoded(torch.cat([input_ids, tokens[:, :ran]], dim=1), logps[:, :ran].clone(),
                          st.slogps[:, :ran].clone() if scaled(s) else None)
            if self.record is not None:
                self.record.append(out)
            return out

    def generate(self, model, input_ids=None, attention_mask=None, generation_config=None, **kwargs):
        """``model.generate``'s contract (prompt + completion ids, pad after EOS) through the engine, or through
        ``generate`` itself for what the engine does not do."""
        s = sampling_from(model, generation_config, **kwargs)
        reason = ("settings the engine does not implement" if s is None or input_ids is None else unsupported(model)
                  or ("dropout in train mode" if dropout_in_rollouts(model) else None))
        if reason is not None:
            self.fallbacks += 1
            if reason not in self._told:
                self._told.add(reason)
                logger.info("decoding engine: %s; this call goes to transformers' generate", reason)
            return type(model).generate(model, input_ids=input_ids, attention_mask=attention_mask,
                                        generation_config=generation_config, **kwargs)
        return self.decode(model, input_ids, attention_mask, s).sequences


@contextlib.contextmanager
def serving(model, engine: DecodeEngine):
    """``model.generate`` answered by ``engine`` for the duration (an instance attribute over the class method, or
    over the instance's own: Unsloth sets one, which is put back as it was)."""
    had_own, own = "generate" in vars(model), vars(model).get("generate")
    model.generate = lambda *args, **kwargs: engine.generate(model, *args, **kwargs)
    try:
        yield engine
    finally:
        del model.generate
        if had_own:
            model.generate = own
