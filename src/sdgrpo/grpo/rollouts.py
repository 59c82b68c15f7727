"""Prompts and generation: the sampler's order, prompt truncation, and rollouts through sdgrpo's decoding engine
(``--generation_engine``, engine/), which answers TRL's ``unwrapped_model.generate`` call inside ``_generate``."""

from __future__ import annotations

import logging
from contextlib import nullcontext

from sdgrpo.engine import MODES, serving
from sdgrpo.fsdp import gathered_weights
from sdgrpo.scoring import truncate_prompt

# The logger of the module these hooks came from: users' log filters and tests name "sdgrpo.grpo_trainer".
logger = logging.getLogger("sdgrpo.grpo_trainer")


class RolloutMixin:
    """Shadows TRL 1.15's ``_get_train_sampler``, ``_tokenize_prompts`` and ``_generate``.

    Guarantees: every generation batch gets its share of self-replay prompts (``--replay_share``); prompts keep
    their last ``max_prompt_length`` tokens after the leading special tokens; ``_generate`` returns TRL's tuple,
    decoded by the engine where there is one (under FSDP inside ``gathered_weights`` where asked), with the engine's
    log-probs of the sampled tokens in its fifth place where the rollouts are corrected (and in
    ``_sampling_rows``), the prompt ids kept for the rewards (``_prompt_ids``), and ``engine/*`` metrics logged.
    Turns ``rollout_correction`` on at the first int4 generation under ``--rollout_correction auto``.
    """

    def longest_prompt(self, limit: int = 100_000, chunk: int = 1024) -> int:
        """Tokens in the longest of the first ``limit`` training prompts, tokenized as the trainer tokenizes them
        for generation (template and ``max_prompt_length`` included); 0 for a dataset that has no length."""
        data = self.train_dataset
        if (data is None or not hasattr(data, "__len__") or "prompt" not in (getattr(data, "column_names", None) or [])
                or getattr(self, "environment_factories", None) is not None):
            return 0
        longest = 0
        for start in range(0, min(len(data), limit), chunk):
            prompts = data[start:min(start + chunk, limit)]["prompt"]
            longest = max(longest, max(map(len, self._tokenize_prompts(prompts)[0]), default=0))
        return longest

    def _get_train_sampler(self, dataset=None):
        # --replay_share: TRL's repetition over an order that gives every generation batch its share of replay
        # prompts (sdgrpo.replay)
        from sdgrpo.replay import repeat_sampler

        return repeat_sampler(super()._get_train_sampler(dataset), self.train_dataset if dataset is None else dataset,
                              getattr(self.args, "replay_share", 0.0), self.args.seed)

    def _tokenize_prompts(self, prompts: list):
        prompt_ids, *rest = super()._tokenize_prompts(prompts)
        if self.max_prompt_length is not None:
            special = set(self.processing_class.all_special_ids)
            prompt_ids = [truncate_prompt(ids, self.max_prompt_length, special) for ids in prompt_ids]
        return (prompt_ids, *rest)

    def _generate(self, prompts: list):
        gather = (self.is_fsdp_enabled and getattr(self.args, "fsdp_gather_for_generation", False)
                  and not self.use_vllm)
        skip_hooks = getattr(self.args, "fsdp_skip_hooks_in_generation", True)
        engine = self.engine if (self.engine is not None and not self.use_vllm) else None
        if engine is not None:
            engine.record, engine.timings = [], []
        with (gathered_weights(self.model_wrapped, skip_hooks) if gather else nullcontext(),
              serving(self.accelerator.unwrap_model(self.model), engine) if engine else nullcontext()):
            out = super()._generate(prompts)
        self._prompt_ids = [list(ids) for ids in out[0]]
        if engine is not None:  # running totals: a capture or a new cache in a late step shows up here
            mode = "train" if self.model.training else "eval"
            for key in ("calls", "fallbacks", "setups", "captures"):
                self._metrics[mode][f"engine/{key}"].append(getattr(engine, key))
            self._metrics[mode]["engine/mode"].append(MODES.get(engine.mode, 0.0))
            if engine.timings:  # this generation's calls, by phase (bench_step reads them)
                for key in ("refresh_s", "prefill_s", "decode_s"):
                    self._metrics[mode][f"engine/{key}"].append(sum(t[key] for t in engine.timings))
                steps = sum(t["steps"] for t in engine.timings)
                self._metrics[mode]["engine/decode_ms_per_step"].append(
                    1000 * sum(t["decode_s"] for t in engine.timings) / max(steps, 1))
            setting = getattr(self.args, "rollout_correction", "false")
            if engine.mode == "int4" and not getattr(self, "_told_int4", False):
                self._told_int4 = True
                if not self.rollout_correction and setting == "auto":
                    self.rollout_correction = True
                if self.rollout_correction:
                    logger.info("rollouts from int4 copies corrected by importance sampling (%s, ratio clipped to "
                                "[%s, %s]; --rollout_correction_mode)", self.correction_mode(),
                                self.vllm_importance_sampling_clip_min or 0, self.vllm_importance_sampling_clip_max)
            decoded, engine.record = engine.record, None
            if self.rollout_correction and not out[4]:  # None from TRL; Unsloth's rewrite may give an empty list
                out = (*out[:4], self._sampling_logps(decoded, out[1]), *out[5:])
            self._sampling_rows = out[4] if self.rollout_correction else None
            if self.rollout_correction and not out[4] and not getattr(self, "_told_uncorrected", False):
                self._told_uncorrected = True
                logger.warning("rollout correction: no sampler log-probs for this generation (%d engine calls for "
                               "%d completions; %d went to generate); these rollouts are not corrected",
                               len(decoded or []), len(out[1]), engine.fallbacks)
        return out

    def _sampling_logps(self, decoded: list, completion_ids: list) -> list | None:
        """The engine's log-probs of each completion's tokens at the trainer's temperature, rows in TRL's order
        (the calls' rows, concatenated), as TRL's ``_generate`` returns vLLM's; None where the rows do not match
        (a call that went to generate)."""
        rows = [row for d in decoded for row in (d.logprobs if d.sampling_logprobs is None else d.sampling_logprobs)]
        if len(rows) != len(completion_ids) or any(len(c) > r.numel() for r, c in zip(rows, completion_ids)):
            return None
        return [r[: len(c)].tolist() for r, c in zip(rows, completion_ids)]
