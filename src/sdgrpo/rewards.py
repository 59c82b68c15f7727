"""Reward functions with TRL's signature, registered by name.

``self_nll``: the mean (or summed) natural-log probability of the sampled completion ids under the frozen base model
(the policy with its LoRA adapters disabled) at temperature 1. Higher is better; the maximum is 0.

An empty completion (no token ids at all, not even EOS) gets ``None``: TRL turns it into NaN and leaves it out of
the group baseline with zero advantage, so it can never be the best reward. A completion of just EOS is scored
like any other: log p(EOS | prompt).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sdgrpo.scoring import adapters_disabled, aggregate, completion_logprobs, leading_special, pad_id, truncate_prompt  # noqa: F401

logger = logging.getLogger(__name__)

AGGREGATIONS = ("mean", "sum")


def tokenize_prompts(tokenizer, prompts: list, max_prompt_length: int | None) -> list[list[int]]:
    """Prompt ids as sdgrpo's trainer makes them from plain-text prompts (special tokens added, then the last
    ``max_prompt_length`` kept after the leading special tokens): the fallback when the trainer passes no
    ``prompt_ids``. Chat prompts are refused rather than scored as other ids."""
    if any(not isinstance(p, str) for p in prompts):
        raise ValueError("chat-format prompts need the trainer's prompt_ids (sdgrpo's trainer passes them); "
                         "this reward cannot re-create the chat template's ids")
    ids = tokenizer(text=list(prompts), add_special_tokens=True)["input_ids"]
    if max_prompt_length is None:
        return ids
    special = set(tokenizer.all_special_ids)
    return [truncate_prompt(x, max_prompt_length, special) for x in ids]


class SelfNLLReward:
    """TRL reward: likelihood of each sampled completion under the adapter-disabled model.

    Called by TRL as ``reward(prompts=..., completions=..., completion_ids=..., **kwargs)``. The prompt token ids
    come from the ``prompt_ids`` keyword when the trainer passes it (``sdgrpo``'s trainer does); otherwise the
    prompts are tokenized the way TRL tokenizes plain-text prompts. When the trainer also passes
    ``ref_per_token_logps`` (the reference pass of the KL term, computed at temperature 1), those are used and no
    forward pass runs.
    """

    __name__ = "self_nll"

    def __init__(self, model, tokenizer, aggregation: str = "mean", token_budget: int = 16384,
                 score_with: str = "base", max_prompt_length: int | None = None):
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, not {aggregation!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.aggregation = aggregation
        self.token_budget = token_budget
        self.score_with = score_with  # "policy" keeps the adapters on: the self-rewarding failure mode
        self.max_prompt_length = max_prompt_length
        self.forward_passes = 0  # own scoring passes run; stays 0 on the reuse path

    def _prompt_ids(self, prompts: list[str]) -> list[list[int]]:
        return tokenize_prompts(self.tokenizer, prompts, self.max_prompt_length)

    def token_logprobs(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[torch.Tensor]:
        self.forward_passes += 1
        pad = pad_id(self.tokenizer)
        context = adapters_disabled(self.model) if self.score_with == "base" else contextlib.nullcontext()
        with context:
            return completion_logprobs(self.model, prompt_ids, completion_ids, pad_token_id=pad,
                                       token_budget=self.token_budget)

    def __call__(self, prompts, completions, completion_ids, prompt_ids=None, ref_per_token_logps=None, **kwargs):
        if prompt_ids is None:
            prompt_ids = self._prompt_ids(prompts)
        if ref_per_token_logps is not None and self.score_with == "base":
            reused = [None if r is None else r[: len(c)] for r, c in zip(ref_per_token_logps, completion_ids)]
            token_logps = fill_rows(reused, lambda rows: self.token_logprobs([prompt_ids[i] for i in rows],
                                                                             [completion_ids[i] for i in rows]))
        else:
            token_logps = self.token_logprobs(prompt_ids, completion_ids)
        return [aggregate(lp.float(), self.aggregation) for lp in token_logps]


def same_vocabulary(a, b) -> bool:
    """Whether two tokenizers map every token to the same id (then sampled ids can be scored directly)."""
    return a.get_vocab() == b.get_vocab()


class TeacherNLLReward:
    """TRL reward: mean (or summed) log-probability of each completion under a separate frozen teacher.

    ``r = (1/T) sum_t log q(y_t | x, y_<t)``. Fixed point: the mode-seeking sharpening of the *teacher*.
    With the student's tokenizer, the sampled ids are scored directly. With another tokenizer the call is refused
    unless ``retokenize=True``: then the prompt text and the completion text are tokenized separately by the
    teacher's tokenizer (EOS appended when one was sampled), an approximation at the boundary.
    """

    __name__ = "teacher_nll"

    def __init__(self, teacher, tokenizer, teacher_tokenizer=None, aggregation: str = "mean",
                 token_budget: int = 16384, retokenize: bool = False, max_prompt_length: int | None = None):
        from sdgrpo.errors import UserError

        self.teacher, self.tokenizer = teacher, tokenizer
        self.teacher_tokenizer = teacher_tokenizer or tokenizer
        self.aggregation, self.token_budget = aggregation, token_budget
        self.max_prompt_length = max_prompt_length
        self.model = None  # the policy, bound by the trainer (for the per-token advantage's policy pass)
        self.policy_passes = 0
        self.direct = same_vocabulary(self.tokenizer, self.teacher_tokenizer)
        if not self.direct and not retokenize:
            raise UserError("the teacher's tokenizer differs from the student's; pass --teacher_retokenize true to "
                            "score the decoded text with the teacher's tokenizer (approximate at the boundary)")

    def _teacher_ids(self, prompts, completion_ids, prompt_ids):
        if self.direct:
            if prompt_ids is None:
                prompt_ids = tokenize_prompts(self.tokenizer, prompts, self.max_prompt_length)
            return prompt_ids, completion_ids
        eos = self.tokenizer.eos_token_id
        texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        t_prompts = tokenize_prompts(self.teacher_tokenizer, prompts, self.max_prompt_length)
        t_comps = self.teacher_tokenizer(text=texts, add_special_tokens=False)["input_ids"]
        t_eos = self.teacher_tokenizer.eos_token_id
        t_comps = [c + ([t_eos] if ids and ids[-1] == eos else []) for c, ids in zip(t_comps, completion_ids)]
        return t_prompts, t_comps

    def teacher_logprobs(self, prompts, completion_ids, prompt_ids=None, replay=None) -> list[torch.Tensor]:
        """The teacher's per-token log-probs (and with ``topk`` its top-K, kept in ``token_topk``); rows flagged in
        ``replay`` (self-replay, ``sdgrpo.replay``) are scored by the base instead: the policy with its adapters off."""
        t_prompts, t_comps = self._teacher_ids(prompts, completion_ids, prompt_ids)
        pad = pad_id(self.teacher_tokenizer)

        def score(model, rows):
            out = completion_logprobs(model, [t_prompts[i] for i in rows], [t_comps[i] for i in rows],
                                      pad_token_id=pad, token_budget=self.token_budget, topk=self.topk)
            return list(zip(*out)) if self.topk else [(lp, None) for lp in out]

        own = [i for i, flag in enumerate(replay or ()) if flag]
        given: list = [None] * len(t_comps)
        if own:
            with adapters_disabled(self.model):
                for i, row in zip(own, score(self.model, own)):
                    given[i] = row
        scored = fill_rows(given, lambda rows: score(self.teacher, rows))
        if self.topk:
            self.token_topk = [top for _, top in scored]
        return [lp for lp, _ in scored]

    token_level = False  # set by the trainer under --advantage token: keep each token's teacher - policy term
    token_terms: list[torch.Tensor] | None = None  # the last call's, one detached CPU tensor per completion
    topk = 0  # set by the trainer under --distill_topk K: keep the teacher's top-K log-probs and ids per token
    token_topk: list[tuple] | None = None  # the last call's, one ([n, K] log-probs, [n, K] ids) per completion

    def __call__(self, prompts, completions, completion_ids, prompt_ids=None, policy_per_token_logps=None,
                 **kwargs):
        if self.token_level and prompt_ids is None:
            prompt_ids = tokenize_prompts(self.tokenizer, prompts, self.max_prompt_length)
        teacher = self.teacher_logprobs(prompts, completion_ids, prompt_ids, kwargs.get("replay"))
        if self.token_level:
            policy = policy_logprobs(self, prompt_ids, completion_ids, policy_per_token_logps)
            self.token_terms = [q - p for q, p in zip(teacher, policy)]
        return [aggregate(lp, self.aggregation) for lp in teacher]


class DistillReward(TeacherNLLReward):
    """TRL reward: ``r = (1/T) sum_t [log q_teacher(y_t) - log p_policy(y_t)]``, on-policy reverse-KL distillation.

    Maximising its expectation minimises KL(p_policy || q_teacher): the fixed point is the teacher itself, not a
    sharpened copy. Needs the teacher's tokenizer (no re-tokenization: the per-token difference needs the same ids).
    Rows of the dataset's ``replay`` column (self-replay, ``--replay_share``) take the base (the policy with its
    adapters off) as their teacher.
    The policy's log-probs come from the trainer's own policy pass when TRL made one before the rewards (its "old"
    log-probs, when generation and optimisation steps are misaligned, at temperature 1; with LoRA dropout > 0 that
    pass is in training mode), else from a pass of the live policy (adapters on, eval mode) at temperature 1.
    """

    __name__ = "distill"

    def __init__(self, teacher, tokenizer, teacher_tokenizer=None, policy=None, **options):
        options.pop("retokenize", None)  # its policy pass needs the policy's own ids: it never retokenizes
        super().__init__(teacher, tokenizer, teacher_tokenizer, retokenize=False, **options)
        self.model = policy  # bound to the trainer's model once it exists
        self.policy_passes = 0  # own policy passes; 0 when the trainer's pass was reused

    def __call__(self, prompts, completions, completion_ids, prompt_ids=None, policy_per_token_logps=None,
                 **kwargs):
        if prompt_ids is None:
            prompt_ids = tokenize_prompts(self.tokenizer, prompts, self.max_prompt_length)
        teacher = self.teacher_logprobs(prompts, completion_ids, prompt_ids, kwargs.get("replay"))
        policy = policy_logprobs(self, prompt_ids, completion_ids, policy_per_token_logps)
        self.token_terms = [q - p for q, p in zip(teacher, policy)]
        return [aggregate(t, "mean") for t in self.token_terms]


class ContextDistillReward:
    """TRL reward: self-distillation with the true text as privileged context.

    The teacher is the frozen base (the policy with its adapters disabled) shown the prompt's true continuation first,
    as if it had just read the passage: ``[BOS] continuation "\n\n" prompt``. The student is the policy, shown the
    prompt alone. ``r = (1/T) sum_t [log q_base(y_t | continuation, prompt, y_<t) - log p_policy(y_t | prompt, y_<t)]``:
    maximising it minimises KL(p_policy || q_base(. | continuation)), so the fixed point is the base that has read the
    text, without the text. It reads the ``continuation`` column that ``sdgrpo prepare`` writes (TRL passes dataset
    columns to rewards). It needs a model that uses its context (in-context copying); the policy's log-probs come from
    the trainer's pass where TRL made one, else from an own pass.
    """

    __name__ = "context_distill"

    def __init__(self, model, tokenizer, aggregation: str = "mean", token_budget: int = 16384,
                 max_prompt_length: int | None = None, separator: str = "\n\n"):
        self.model, self.tokenizer = model, tokenizer
        self.aggregation, self.token_budget = aggregation, token_budget
        self.max_prompt_length = max_prompt_length
        self.separator = separator
        self.teacher_passes = self.policy_passes = 0
        self.token_terms: list[torch.Tensor] | None = None  # the last call's teacher - policy, per token
        self.topk = 0  # as TeacherNLLReward's
        self.token_topk: list[tuple] | None = None

    def teacher_prompts(self, prompt_ids: list[list[int]], continuations: list[str]) -> list[list[int]]:
        """Each prompt's ids with its continuation (and the separator) placed after its leading special tokens."""
        special = set(self.tokenizer.all_special_ids)
        context = self.tokenizer([c + self.separator for c in continuations], add_special_tokens=False)["input_ids"]
        out = []
        for ids, ctx in zip(prompt_ids, context):
            lead = leading_special(ids, special)
            out.append(list(ids[:lead]) + ctx + list(ids[lead:]))
        return out

    def __call__(self, prompts, completions, completion_ids, prompt_ids=None, policy_per_token_logps=None,
                 continuation=None, **kwargs):
        if continuation is None:
            from sdgrpo.errors import UserError

            raise UserError("reward 'context_distill' needs the dataset's 'continuation' column (the true text after "
                            "each prompt); make the data with `sdgrpo prepare`")
        if prompt_ids is None:
            prompt_ids = tokenize_prompts(self.tokenizer, prompts, self.max_prompt_length)
        pad = pad_id(self.tokenizer)
        self.teacher_passes += 1
        with adapters_disabled(self.model):
            teacher = completion_logprobs(self.model, self.teacher_prompts(prompt_ids, continuation), completion_ids,
                                          pad_token_id=pad, token_budget=self.token_budget, topk=self.topk)
        if self.topk:
            teacher, self.token_topk = teacher
        policy = policy_logprobs(self, prompt_ids, completion_ids, policy_per_token_logps)
        self.token_terms = [q - p for q, p in zip(teacher, policy)]
        return [aggregate(t, self.aggregation) for t in self.token_terms]


def policy_logprobs(reward, prompt_ids, completion_ids, given) -> list[torch.Tensor]:
    """The policy's per-token log-probs: the trainer's pass where it passed one (``given``, temperature 1), else an
    own pass of ``reward.model`` with its adapters on (eval mode, temperature 1)."""
    given = given or [None] * len(completion_ids)
    given = [None if r is None else r[: len(c)].float().cpu() for r, c in zip(given, completion_ids)]
    pad = pad_id(reward.tokenizer)

    def own(rows):
        reward.policy_passes += 1
        return completion_logprobs(reward.model, [prompt_ids[i] for i in rows], [completion_ids[i] for i in rows],
                                   pad_token_id=pad, token_budget=reward.token_budget)

    return fill_rows(given, own)


def fill_rows(given: list, score: Callable[[list[int]], list]) -> list:
    """``given`` with its None rows replaced by ``score(indices of those rows)`` (one call, or none if none)."""
    missing = [i for i, row in enumerate(given) if row is None]
    if not missing:
        return given
    out = list(given)
    for i, row in zip(missing, score(missing)):
        out[i] = row
    return out


@dataclass(frozen=True)
class RewardEntry:
    """One reward of the registry: how to make it from (model, tokenizer, teacher, teacher tokenizer, options), the
    options it takes (the others that `sdgrpo train` passes are left out for it), and whether it needs a teacher."""

    make: Callable[..., Callable]
    options: tuple[str, ...]
    needs_teacher: bool = False


COMMON_OPTIONS = ("aggregation", "token_budget", "max_prompt_length")
# Adding a reward is one entry here.
REWARDS: dict[str, RewardEntry] = {
    "self_nll": RewardEntry(lambda model, tok, teacher, ttok, **o: SelfNLLReward(model, tok, **o),
                            (*COMMON_OPTIONS, "score_with")),
    "teacher_nll": RewardEntry(lambda model, tok, teacher, ttok, **o: TeacherNLLReward(teacher, tok, ttok, **o),
                               (*COMMON_OPTIONS, "retokenize"), needs_teacher=True),
    "distill": RewardEntry(lambda model, tok, teacher, ttok, **o: DistillReward(teacher, tok, ttok, policy=model, **o),
                           COMMON_OPTIONS, needs_teacher=True),
    "context_distill": RewardEntry(lambda model, tok, teacher, ttok, **o: ContextDistillReward(model, tok, **o),
                                   COMMON_OPTIONS),
}


def self_nll(model, tokenizer, **options) -> SelfNLLReward:
    """The self-NLL reward for ``model`` (PEFT or plain); options: ``aggregation``, ``token_budget``."""
    return SelfNLLReward(model, tokenizer, **options)


def build_reward(name: str, model, tokenizer, teacher=None, teacher_tokenizer=None, **options):
    """A reward by registry name, given the options its entry takes; ``teacher_nll`` and ``distill`` need a
    ``teacher``."""
    from sdgrpo.errors import UserError

    entry = REWARDS.get(name)
    if entry is None:
        raise UserError(f"unknown reward {name!r}; choose one of {sorted(REWARDS)}")
    if entry.needs_teacher and teacher is None:
        raise UserError(f"reward {name!r} needs --teacher_model_name_or_path")
    return entry.make(model, tokenizer, teacher, teacher_tokenizer,
                      **{k: v for k, v in options.items() if k in entry.options})
