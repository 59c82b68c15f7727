"""Teacher rewards against an independent computation: `teacher_nll` and `distill`, same and other tokenizers."""

from __future__ import annotations

import pytest
import torch

from conftest import make_llama, reference_logps
from sdgrpo.errors import UserError
from sdgrpo.rewards import DistillReward, TeacherNLLReward, build_reward


@pytest.fixture(scope="module")
def setup(tiny_tokenizer):
    teacher, student = make_llama(tiny_tokenizer, seed=11, layers=3), make_llama(tiny_tokenizer, seed=12)
    g = torch.Generator().manual_seed(0)
    prompts = [[tiny_tokenizer.bos_token_id] + torch.randint(2, 512, (n,), generator=g).tolist() for n in (4, 9, 2)]
    comps = [torch.randint(2, 512, (n,), generator=g).tolist() for n in (6, 1, 12)]
    comps[1].append(tiny_tokenizer.eos_token_id)
    return teacher, student, prompts, comps


def test_teacher_nll_scores_sampled_ids_directly(tiny_tokenizer, setup):
    teacher, _, prompts, comps = setup
    reward = TeacherNLLReward(teacher, tiny_tokenizer)
    got = reward(prompts=[""] * 3, completions=[""] * 3, completion_ids=comps, prompt_ids=prompts)
    want = [reference_logps(teacher, p, c).mean().item() for p, c in zip(prompts, comps)]
    assert got == pytest.approx(want, abs=1e-5)


def test_distill_is_teacher_minus_policy_per_token(tiny_tokenizer, setup):
    teacher, student, prompts, comps = setup
    reward = DistillReward(teacher, tiny_tokenizer, policy=student)
    got = reward(prompts=[""] * 3, completions=[""] * 3, completion_ids=comps, prompt_ids=prompts)
    want = [(reference_logps(teacher, p, c) - reference_logps(student, p, c)).mean().item()
            for p, c in zip(prompts, comps)]
    assert got == pytest.approx(want, abs=1e-5)
    # At the fixed point (policy == teacher) the reward is exactly zero.
    same = DistillReward(teacher, tiny_tokenizer, policy=teacher)
    assert same(prompts=[""] * 3, completions=[""] * 3, completion_ids=comps, prompt_ids=prompts) == pytest.approx(
        [0.0] * 3, abs=1e-6)


def test_distill_scores_only_the_rows_the_trainer_could_not(tiny_tokenizer, setup):
    """policy_per_token_logps with a None row (Unsloth's packing could not score it): that row gets the reward's own
    policy pass, the others are taken as given."""
    teacher, student, prompts, comps = setup
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
    from sdgrpo.pretrain import train_tokenizer

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


def test_cli_trains_with_a_teacher(tmp_path, tiny_model_dir, tiny_tokenizer, corpus):
    import json
    import subprocess
    import sys

    teacher_dir = tmp_path / "teacher"
    make_llama(tiny_tokenizer, seed=21, layers=3).save_pretrained(teacher_dir)
    tiny_tokenizer.save_pretrained(teacher_dir)
    data = tmp_path / "data"
    r = subprocess.run([sys.executable, "-m", "sdgrpo.cli", "prepare", corpus / "ruth.txt",
                        "--output", data, "--model", tiny_model_dir, "--max_prompts", "40"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for reward in ("teacher_nll", "distill"):
        out = tmp_path / reward
        r = subprocess.run([sys.executable, "-m", "sdgrpo.cli", "train", "--model_name_or_path", tiny_model_dir,
                            "--teacher_model_name_or_path", teacher_dir, "--reward", reward, "--dataset_path", data,
                            "--output_dir", out, "--max_steps", "1", "--per_device_train_batch_size", "4",
                            "--num_generations", "4", "--max_completion_length", "8", "--report_to", "none"],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "teacher" in r.stderr and "MiB on cpu" in r.stderr
        row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
        assert f"rewards/{reward}/mean" in row
    if not torch.cuda.is_available():  # a 4-bit teacher needs a GPU: one line, exit 2
        r = subprocess.run([sys.executable, "-m", "sdgrpo.cli", "train", "--model_name_or_path", tiny_model_dir,
                            "--teacher_model_name_or_path", teacher_dir, "--teacher_load_in_4bit", "true",
                            "--reward", "teacher_nll", "--dataset_path", data, "--output_dir", tmp_path / "q4"],
                           capture_output=True, text=True)
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert r.stderr.strip().splitlines()[-1].endswith("4-bit loading needs a CUDA GPU (bitsandbytes); drop the "
                                                          "4-bit option")


def test_distill_reuses_the_trainers_policy_pass(tmp_path, tiny_model_dir, tiny_tokenizer, corpus):
    """With steps_per_generation > gradient_accumulation_steps TRL computes the policy's log-probs before the
    rewards; distill takes them instead of running its own pass, and they equal that pass (LoRA dropout 0)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import get_peft_config

    from sdgrpo.compat import ensure_trl_runs_without_triton
    from sdgrpo.config import parse_train_args
    from sdgrpo.scoring import completion_logprobs
    from sdgrpo.trainer import SelfDistillGRPOTrainer

    ensure_trl_runs_without_triton()
    teacher = make_llama(tiny_tokenizer, seed=31, layers=3)
    train_cfg, model_cfg = parse_train_args([
        "--output_dir", str(tmp_path), "--max_steps", "1", "--per_device_train_batch_size", "4",
        "--num_generations", "4", "--steps_per_generation", "2", "--max_completion_length", "6",
        "--report_to", "none", "--save_strategy", "no", "--lora_dropout", "0", "--reward", "distill"])
    seen = []

    class Recording(DistillReward):
        def __call__(self, *a, **kw):
            out = super().__call__(*a, **kw)
            seen.append((kw["prompt_ids"], kw["completion_ids"], out, kw.get("policy_per_token_logps")))
            return out

    reward = Recording(teacher, tiny_tokenizer, policy=None)
    text = (corpus / "ruth.txt").read_text(encoding="utf-8-sig")[1000:3000]
    data = Dataset.from_dict({"prompt": [text[i : i + 60] for i in range(0, 1600, 200)]})
    trainer = SelfDistillGRPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                     reward_funcs=[reward], args=train_cfg, train_dataset=data,
                                     processing_class=tiny_tokenizer, peft_config=get_peft_config(model_cfg))
    reward.model = trainer.model
    policy_before = {k: v.clone() for k, v in trainer.model.state_dict().items() if "lora" in k}
    trainer.train()
    assert seen and seen[0][3] is not None and reward.policy_passes == 0
    prompt_ids, completion_ids, out, _ = seen[0]
    trainer.model.load_state_dict(policy_before, strict=False)  # the policy as it was when it sampled
    own_policy = completion_logprobs(trainer.model, prompt_ids, completion_ids, pad_token_id=1)
    own_teacher = completion_logprobs(teacher, prompt_ids, completion_ids, pad_token_id=1)
    assert out == pytest.approx([(q - p).mean().item() for q, p in zip(own_teacher, own_policy)], abs=1e-4)


def test_context_distill_is_base_shown_the_text_minus_policy(tiny_tokenizer, setup):
    """Teacher: the base (adapters off) after BOS + continuation + blank line + the prompt's tokens; student: the
    policy (adapters on) after the prompt. Checked against one unpadded forward per sequence, built by hand."""
    from peft import LoraConfig, get_peft_model

    from sdgrpo.rewards import ContextDistillReward

    _, student, prompts, comps = setup
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


def test_teacher_adapter_is_merged_into_a_frozen_copy(tmp_path, tiny_model_dir, tiny_tokenizer, setup):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from sdgrpo.config import parse_train_args
    from sdgrpo.train import load_teacher

    _, _, prompts, comps = setup
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                          LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    peft.save_pretrained(tmp_path / "adapter")
    cfg, _ = parse_train_args(["--reward", "distill", "--teacher_adapter", str(tmp_path / "adapter")])
    teacher, _ = load_teacher(cfg, str(tiny_model_dir))
    assert not any(p.requires_grad for p in teacher.parameters()) and not hasattr(teacher, "peft_config")
    for p, c in zip(prompts, comps):  # the merged teacher scores as base + adapter does
        torch.testing.assert_close(reference_logps(teacher, p, c), reference_logps(peft, p, c), atol=1e-5, rtol=0)
    cfg, _ = parse_train_args(["--reward", "distill", "--teacher_adapter", str(tmp_path)])
    with pytest.raises(UserError, match="no adapter_config.json"):
        load_teacher(cfg, str(tiny_model_dir))
