"""The self-NLL reward against an independent computation: one unpadded forward per sequence, log_softmax, gather."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model

from conftest import make_llama, reference_logps, with_lora
from sdgrpo.errors import UserError
from sdgrpo.rewards import DistillReward, SelfNLLReward, TeacherNLLReward, build_reward, self_nll


@pytest.fixture(scope="module")
def lora_model(tiny_tokenizer):
    """A PEFT model whose adapters are non-zero, so scoring with them enabled would give other numbers."""
    return with_lora(make_llama(tiny_tokenizer, seed=3), 0.5, seed=5)


def test_reward_disables_adapters_and_scores_eos(tiny_tokenizer, cases, lora_model):
    prompts, completions = cases
    reward = self_nll(lora_model, tiny_tokenizer, token_budget=64)
    got = reward(prompts=["unused"] * len(prompts), completions=["unused"] * len(prompts),
                 completion_ids=completions, prompt_ids=prompts)
    with lora_model.disable_adapter():
        want = [reference_logps(lora_model, p, c).mean().item() if c else None for p, c in zip(prompts, completions)]
    with_adapters = [reference_logps(lora_model, p, c).mean().item() for p, c in zip(prompts[:3], completions[:3])]
    for g, w in zip(got, want):
        if w is None:
            assert g is None
        else:
            assert g == pytest.approx(w, abs=1e-5)
    # The adapters change the numbers, so a reward that forgot to disable them would fail above.
    assert all(abs(a - b) > 1e-3 for a, b in zip(got[:3], with_adapters))
    # The EOS-only completion is scored like any other: its reward is log p(EOS | prompt) under the base.
    assert completions[6] == [tiny_tokenizer.eos_token_id]
    with lora_model.disable_adapter(), torch.no_grad():
        logits = lora_model(input_ids=torch.tensor([prompts[6]])).logits[0, -1].double()
    assert got[6] == pytest.approx(torch.log_softmax(logits, -1)[tiny_tokenizer.eos_token_id].item(), abs=1e-5)


def test_sum_aggregation_and_empty_completion(tiny_tokenizer, cases):
    model = make_llama(tiny_tokenizer, seed=2)
    prompts, completions = cases
    prompts, completions = prompts + [prompts[0]], completions + [[]]  # and a completion with no token at all
    reward = SelfNLLReward(model, tiny_tokenizer, aggregation="sum")
    got = reward(prompts=[""] * len(prompts), completions=[""] * len(prompts), completion_ids=completions,
                 prompt_ids=prompts)
    assert got[-1] is None
    for p, c, g in zip(prompts, completions, got):
        if not c:
            assert g is None  # TRL makes it NaN: excluded from the group baseline, never the best reward
        else:
            assert g == pytest.approx(reference_logps(model, p, c).sum().item(), abs=1e-4)
    assert max(g for g in got if g is not None) < 0


def test_plain_model_and_text_prompts_tokenized_like_trl(tiny_tokenizer):
    model = make_llama(tiny_tokenizer, seed=4)
    prompts = ["First Citizen:\nBefore we proceed", "All:\nSpeak, speak."]
    comp = [tiny_tokenizer(" any further, hear me", add_special_tokens=False)["input_ids"],
            tiny_tokenizer(" Resolved.", add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]]
    reward = SelfNLLReward(model, tiny_tokenizer)
    got = reward(prompts=prompts, completions=["", ""], completion_ids=comp)
    for text, c, g in zip(prompts, comp, got):
        ids = tiny_tokenizer(text)["input_ids"]
        assert ids[0] == tiny_tokenizer.bos_token_id
        assert g == pytest.approx(reference_logps(model, ids, c).mean().item(), abs=1e-5)
    assert reward.forward_passes == 1


def test_reuse_path_runs_no_forward(tiny_tokenizer):
    class NoForward(torch.nn.Module):
        def forward(self, *a, **k):
            raise AssertionError("the reuse path must not run the model")

    reward = SelfNLLReward(NoForward(), tiny_tokenizer)
    ref = torch.tensor([[-1.0, -2.0, -3.0, 0.0], [-0.5, 0.0, 0.0, 0.0]])  # right-padded like TRL's
    got = reward(prompts=["", ""], completions=["", ""], completion_ids=[[5, 6, 7], [0]], ref_per_token_logps=ref)
    assert got == [pytest.approx(-2.0), pytest.approx(-0.5)]
    assert reward.forward_passes == 0


def test_non_finite_reward_is_none(tiny_tokenizer):
    reward = SelfNLLReward(None, tiny_tokenizer)
    ref = torch.tensor([[-math.inf, -1.0], [float("nan"), 0.0]])
    assert reward(prompts=["", ""], completions=["", ""], completion_ids=[[1, 2], [3]],
                  ref_per_token_logps=ref) == [None, None]


def test_unsloth_left_packed_layout_maps_back_to_completion_columns(tiny_tokenizer, cases):
    """Unsloth's log-prob tensors are of left-packed rows, (B, C + max_left_pad); completion_columns undoes that.

    The packed tensor is built the way Unsloth builds it (every pad-id token of a row moved to its end, a
    right-padded forward, the last C + max_left_pad target positions); the result must equal one unpadded forward
    per sequence. A row whose completion holds a sampled pad token cannot be mapped back and is marked.
    """
    from sdgrpo.grpo_trainer import completion_columns

    model = make_llama(tiny_tokenizer, seed=5).double()
    pad = tiny_tokenizer.pad_token_id
    prompts, completions = cases
    completions = [list(c) for c in completions]
    completions[3][4] = pad  # a pad token sampled inside a completion
    completions[5][6] = pad  # the same, masked out of attention (as a mask made from ids != pad has it)
    P, C = max(map(len, prompts)), max(map(len, completions))
    rows = [[pad] * (P - len(p)) + p + c + [pad] * (C - len(c)) for p, c in zip(prompts, completions)]
    mask = torch.tensor([[0] * (P - len(p)) + [1] * (len(p) + len(c)) + [0] * (C - len(c))
                         for p, c in zip(prompts, completions)])
    mask[5, P + 6] = 0
    ids = torch.tensor(rows)  # TRL's layout: left-padded prompts, right-padded completions
    packed = torch.gather(ids, 1, torch.argsort(ids != pad, dim=1, descending=True, stable=True))
    max_left_pad = int((ids[:, :P] == pad).sum(1).max())
    W = C + max_left_pad
    with torch.no_grad():
        logits = model(input_ids=packed, attention_mask=(packed != pad).long()).logits
    logps = torch.log_softmax(logits[:, -(W + 1) : -1], dim=-1).gather(-1, packed[:, -W:, None]).squeeze(-1)
    assert logps.shape == (len(rows), C + max_left_pad) and max_left_pad > 0

    columns, ok = completion_columns(logps, ids, mask, C, pad, left_packed=True)
    assert columns.shape == (len(rows), C)
    assert ok.tolist() == [i not in (3, 5) for i in range(len(rows))]
    for i, (p, c) in enumerate(zip(prompts, completions)):
        want = reference_logps(model, p, c)
        if i not in (3, 5):
            assert columns[i, : len(c)].tolist() == pytest.approx(want.tolist(), abs=1e-9)
        else:  # the packed row is another sequence: its values are wrong from the pad on
            at = 4 if i == 3 else 6
            assert columns[i, at : len(c)].tolist() != pytest.approx(want[at:].tolist(), abs=1e-3)
    # TRL's own layout passes through unchanged; an unknown width is refused.
    same, ok = completion_columns(logps[:, :C], ids, mask, C, pad)
    assert torch.equal(same, logps[:, :C]) and ok.all()
    assert completion_columns(logps[:, :-1], ids, mask, C, pad) == (None, None)
    assert completion_columns(logps[:, :-1], ids, mask, C, pad, left_packed=True) == (None, None)


def test_rows_the_trainer_could_not_score_are_scored_by_the_reward(tiny_tokenizer, cases):
    """ref_per_token_logps with None rows: those rows get the reward's own pass, the others are taken as given."""
    model = make_llama(tiny_tokenizer, seed=6)
    prompts, completions = cases
    reward = SelfNLLReward(model, tiny_tokenizer)
    given = [torch.full((len(c),), -1.0) if i % 2 else None for i, c in enumerate(completions)]
    got = reward(prompts=None, completions=None, completion_ids=completions, prompt_ids=prompts,
                 ref_per_token_logps=given)
    assert reward.forward_passes == 1
    for i, (p, c) in enumerate(zip(prompts, completions)):
        if i % 2:
            assert got[i] == (-1.0 if c else None)
        else:
            want = reference_logps(model, p, c).mean().item() if c else None
            assert got[i] == (pytest.approx(want, abs=1e-5) if c else None)


def test_teacher_nll_scores_sampled_ids_directly(tiny_tokenizer, teacher_student_batch):
    teacher, _, prompts, comps = teacher_student_batch
    reward = TeacherNLLReward(teacher, tiny_tokenizer)
    got = reward(prompts=[""] * 3, completions=[""] * 3, completion_ids=comps, prompt_ids=prompts)
    want = [reference_logps(teacher, p, c).mean().item() for p, c in zip(prompts, comps)]
    assert got == pytest.approx(want, abs=1e-5)


def test_distill_is_teacher_minus_policy_per_token(tiny_tokenizer, teacher_student_batch):
    teacher, student, prompts, comps = teacher_student_batch
    reward = DistillReward(teacher, tiny_tokenizer, policy=student)
    got = reward(prompts=[""] * 3, completions=[""] * 3, completion_ids=comps, prompt_ids=prompts)
    want = [(reference_logps(teacher, p, c) - reference_logps(student, p, c)).mean().item()
            for p, c in zip(prompts, comps)]
    assert got == pytest.approx(want, abs=1e-5)
    # At the fixed point (policy == teacher) the reward is exactly zero.
    same = DistillReward(teacher, tiny_tokenizer, policy=teacher)
    assert same(prompts=[""] * 3, completions=[""] * 3, completion_ids=comps, prompt_ids=prompts) == pytest.approx(
        [0.0] * 3, abs=1e-6)


def test_distill_scores_only_the_rows_the_trainer_could_not(tiny_tokenizer, teacher_student_batch):
    """policy_per_token_logps with a None row (Unsloth's packing could not score it): that row gets the reward's own
    policy pass, the others are taken as given."""
    teacher, student, prompts, comps = teacher_student_batch
    reward = DistillReward(teacher, tiny_tokenizer, policy=student)
    given = [torch.zeros(len(comps[0])), None, torch.zeros(len(comps[2]))]
    got = reward(prompts=[""] * 3, completions=[""] * 3, completion_ids=comps, prompt_ids=prompts,
                 policy_per_token_logps=given)
    assert reward.policy_passes == 1
    t = [reference_logps(teacher, p, c) for p, c in zip(prompts, comps)]
    want = [t[0].mean().item(), (t[1] - reference_logps(student, prompts[1], comps[1])).mean().item(),
            t[2].mean().item()]
    assert got == pytest.approx(want, abs=1e-5)


def test_other_tokenizer_refused_unless_retokenizing(tiny_tokenizer, corpus):
    from sdgrpo.config import tiny_model_recipe

    train_tokenizer = tiny_model_recipe().train_tokenizer

    other = train_tokenizer([(corpus / "ruth.txt").read_text(encoding="utf-8-sig")], 400)
    teacher = make_llama(other, seed=5)
    with pytest.raises(UserError, match="teacher's tokenizer differs"):
        TeacherNLLReward(teacher, tiny_tokenizer, other)
    with pytest.raises(UserError, match="teacher's tokenizer differs"):
        DistillReward(teacher, tiny_tokenizer, other, policy=teacher, retokenize=True)
    reward = TeacherNLLReward(teacher, tiny_tokenizer, other, retokenize=True)
    prompt, text = "Alice was beginning", " to get very tired"
    comp = tiny_tokenizer(text, add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    got = reward(prompts=[prompt], completions=[text], completion_ids=[comp])
    t_prompt = other(prompt)["input_ids"]
    t_comp = other(text, add_special_tokens=False)["input_ids"] + [other.eos_token_id]
    assert got[0] == pytest.approx(reference_logps(teacher, t_prompt, t_comp).mean().item(), abs=1e-5)


def test_registry_needs_a_teacher(tiny_tokenizer):
    with pytest.raises(UserError, match="needs --teacher_model_name_or_path"):
        build_reward("distill", None, tiny_tokenizer)
    with pytest.raises(UserError, match="unknown reward"):
        build_reward("nope", None, tiny_tokenizer)


def test_context_distill_is_base_shown_the_text_minus_policy(tiny_tokenizer, teacher_student_batch):
    """Teacher: the base (adapters off) after BOS + continuation + blank line + the prompt's tokens; student: the
    policy (adapters on) after the prompt. Checked against one unpadded forward per sequence, built by hand."""

    from sdgrpo.rewards import ContextDistillReward

    _, student, prompts, comps = teacher_student_batch
    policy = get_peft_model(make_llama(tiny_tokenizer, seed=12), LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    texts = ["And God said, Let there be light", "In the beginning", "Jonah rose up"]
    reward = ContextDistillReward(policy, tiny_tokenizer)
    got = reward(prompts=[""] * 3, completions=[""] * 3, completion_ids=comps, prompt_ids=prompts, continuation=texts)
    bos = tiny_tokenizer.bos_token_id
    want = []
    for p, c, text in zip(prompts, comps, texts):
        shown = [bos] + tiny_tokenizer(text + "\n\n", add_special_tokens=False)["input_ids"] + p[1:]
        with policy.disable_adapter():
            q = reference_logps(policy, shown, c)
        want.append((q - reference_logps(policy, p, c)).mean().item())
    assert got == pytest.approx(want, abs=1e-5)
    assert reward.teacher_passes == 1 and reward.policy_passes == 1
    # The context matters: the base without it (plain self-distillation) gives other numbers.
    with policy.disable_adapter():
        plain = [reference_logps(policy, p, c).mean().item()
                 for p, c in zip(prompts, comps)]
    student_logps = [reference_logps(policy, p, c).mean().item() for p, c in zip(prompts, comps)]
    assert all(abs(g - (b - s)) > 1e-3 for g, b, s in zip(got, plain, student_logps))
    with pytest.raises(UserError, match="needs the dataset's 'continuation' column"):
        reward(prompts=[""] * 3, completions=[""] * 3, completion_ids=comps, prompt_ids=prompts)


def test_the_registry_is_one_entry_per_reward(tiny_tokenizer, monkeypatch):
    """Every entry's options are parameters of what it makes (no constructor swallows unknown ones), build_reward
    hands an entry only its own options, and a new reward is one entry."""
    import inspect

    from sdgrpo import rewards

    made = {"self_nll": rewards.SelfNLLReward, "teacher_nll": rewards.TeacherNLLReward,
            "distill": rewards.TeacherNLLReward, "context_distill": rewards.ContextDistillReward}
    for name, entry in rewards.REWARDS.items():
        params = inspect.signature(made[name].__init__).parameters
        assert all(p.kind is not p.VAR_KEYWORD for p in params.values() if made[name] is not rewards.DistillReward)
        assert set(entry.options) <= set(params), name
    seen = {}
    monkeypatch.setitem(rewards.REWARDS, "length", rewards.RewardEntry(
        lambda model, tok, teacher, ttok, **o: seen.update(o) or (lambda **kw: []), ("aggregation",)))
    rewards.build_reward("length", None, tiny_tokenizer, aggregation="sum", score_with="base", retokenize=True)
    assert seen == {"aggregation": "sum"}
