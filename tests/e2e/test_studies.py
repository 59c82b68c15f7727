"""Reduced runs of the study scripts' training arms (studies/), so that a TRL or sdgrpo change that breaks them
fails in CI rather than in a 90-minute study."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS, STUDIES = ROOT / "benchmarks", ROOT / "studies"  # common.py; the studies


def load(name: str):
    import sys

    sys.path.insert(0, str(BENCHMARKS))
    sys.path.insert(0, str(STUDIES))
    spec = importlib.util.spec_from_file_location(name, STUDIES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_domain_study_sdft_arm_trains_and_saves_an_adapter(tmp_path, prepared, tiny_model_dir):
    """TRL's experimental SDFTTrainer with the true continuation as privileged context: a 1-second budget still
    takes at least one step and leaves a LoRA adapter whose B matrices moved."""
    from safetensors.torch import load_file

    study = load("domain_study")
    info = study.run_sdft(prepared, tmp_path / "sdft", str(tiny_model_dir), 1e-3, budget=1.0)
    assert info["steps"] >= 1
    config = json.loads((tmp_path / "sdft" / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["peft_type"] == "LORA"
    weights = load_file(tmp_path / "sdft" / "adapter_model.safetensors")
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)


def test_domain_study_sft_arm_stops_after_the_steps_it_is_given(tmp_path, prepared, tiny_model_dir):
    """An arm of --sft_trajectory trains exactly its own number of steps, whatever --steps the other arms have."""
    study = load("domain_study")
    study.STEPS = 50
    info = study.run_sft(prepared, tmp_path / "sft", str(tiny_model_dir), 1e-3, budget=float("inf"), steps=2)
    assert info["steps"] == 2 and (tmp_path / "sft" / "adapter_model.safetensors").is_file()


def test_domain_study_names_each_teachers_arms_and_waits_for_its_sft_arm(tmp_path):
    """With two teachers, the first teacher's distill arms keep their names; the second's are named after the SFT arm
    that teaches them; both repeat over the seeds, each after its teacher's arm; the figure tells them apart."""
    import argparse

    study = load("domain_study")
    study.STEPS = 10
    args = argparse.Namespace(budget_s=None, arms="base,sft,distill_token,distill_topk", seeds="0,1",
                              seed_arms="distill_token,distill_topk", sft_lrs="1e-4,1e-3", teacher_lr="1e-3,1e-4",
                              topk=20, distill_lr="3e-4", context_distill_lrs="3e-4", sdft_lrs="3e-4",
                              sft_trajectory="1e-4:25,50", trajectory=None, kl_weights="0.5", replay_shares="0.25",
                              replay_lr="1e-4", replay_samples="512")
    arms = study.arms_of(args, tmp_path, tmp_path, "model")
    needs = {name: need for name, (_, need) in arms.items()}
    assert needs == {"base": None, "sft@1e-4": None, "sft@1e-3": None, "sft@1e-4@25": None, "sft@1e-4@50": None,
                     "distill<-sft@token": "sft@1e-3", "distill<-sft@token#s1": "sft@1e-3",
                     "distill<-sft@topk": "sft@1e-3", "distill<-sft@topk#s1": "sft@1e-3",
                     "distill<-sft@1e-4@token": "sft@1e-4", "distill<-sft@1e-4@token#s1": "sft@1e-4",
                     "distill<-sft@1e-4@topk": "sft@1e-4", "distill<-sft@1e-4@topk#s1": "sft@1e-4"}
    assert [study.kind_of(n) for n in ("distill<-sft@token#s1", "distill<-sft@1e-4@token", "context_distill@1e-3#s2")
            ] == ["distill<-sft@token", "distill<-sft@1e-4@token", "context_distill"]


def test_distill_study_dense_arm_trains_and_saves_an_adapter(tmp_path, tiny_model_dir, tiny_tokenizer):
    """The dense on-policy distillation arm runs three steps on the student's own samples and saves a LoRA adapter
    whose B matrices moved."""
    from safetensors.torch import load_file

    from conftest import make_llama

    study = load("distill_study")
    teacher = make_llama(tiny_tokenizer, seed=31)
    prompts = ["And the LORD said unto Moses", "In the beginning"]
    study.dense_distill(str(tiny_model_dir), teacher, tiny_tokenizer, prompts, tmp_path / "dense", steps=3, lr=1e-2)
    weights = load_file(tmp_path / "dense" / "adapter_model.safetensors")
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)


def test_domain_study_forgetting_arms_are_named_by_their_parameter_and_wait_for_their_teacher(tmp_path):
    """The forgetting arms: sft_kl@W, sft_replay@S and distill_replay@S, each over the seeds; distill_replay waits
    for its teacher's sft arm; each share and weight is its own kind in the figure."""
    import argparse

    study = load("domain_study")
    study.STEPS = 10
    args = argparse.Namespace(budget_s=None, arms="base,sft,sft_kl,sft_replay,distill_replay", seeds="0,1",
                              seed_arms="sft_replay,distill_replay", sft_lrs="1e-4", teacher_lr="1e-4", topk=20,
                              distill_lr="3e-4", context_distill_lrs="3e-4", sdft_lrs="3e-4", sft_trajectory=None,
                              trajectory="1e-4:50", kl_weights="0.2,0.5", replay_shares="0.25,0.5", replay_lr="1e-4",
                              replay_samples="64")
    needs = {name: need for name, (_, need) in study.arms_of(args, tmp_path, tmp_path, "model").items()}
    assert needs == {"base": None, "sft@1e-4": None, "sft_kl@0.2": None, "sft_kl@0.5": None,
                     "sft_replay@0.25": None, "sft_replay@0.25#s1": None, "sft_replay@0.5": None,
                     "sft_replay@0.5#s1": None, "distill_replay@0.25": "sft@1e-4",
                     "distill_replay@0.25#s1": "sft@1e-4", "distill_replay@0.5": "sft@1e-4",
                     "distill_replay@0.5#s1": "sft@1e-4"}
    assert [study.kind_of(n) for n in ("sft_replay@0.25#s1", "distill_replay@0.5", "sft_kl@0.2")] == [
        "sft_replay@0.25", "distill_replay@0.5", "sft_kl@0.2"]


def test_domain_study_sampler_arms_distill_the_same_teacher_with_each_samplers_options(tmp_path, monkeypatch):
    """The quality gate's arms: distill<-sft@token@S for each sampler S over the seeds, waiting for the first
    teacher's sft arm, trained as distill_token (--advantage token, the teacher's adapter) plus S's options; each
    sampler its own kind in the figure."""
    import argparse

    study = load("domain_study")
    study.STEPS = 10
    args = argparse.Namespace(budget_s=None, arms="base,sft,distill_token,distill_sampler", seeds="0,1",
                              seed_arms="distill_token,distill_sampler", sft_lrs="1e-4", teacher_lr="1e-4", topk=20,
                              distill_lr="3e-4", context_distill_lrs="3e-4", sdft_lrs="3e-4", sft_trajectory=None,
                              trajectory=None, kl_weights="0.5", replay_shares="0.25", replay_lr="1e-4",
                              replay_samples="64", samplers="generate,int4,spg4")
    arms = study.arms_of(args, tmp_path, tmp_path, "model")
    assert {name: need for name, (_, need) in arms.items()} == {
        "base": None, "sft@1e-4": None, "distill<-sft@token": "sft@1e-4", "distill<-sft@token#s1": "sft@1e-4",
        **{f"distill<-sft@token@{s}{seed}": "sft@1e-4" for s in ("generate", "int4", "spg4") for seed in ("", "#s1")}}
    seen = []
    monkeypatch.setattr(study, "run_grpo", lambda argv, budget: seen.append(argv) or {"steps": 10})
    arms["distill<-sft@token@spg4#s1"][0]()
    arms["distill<-sft@token@generate"][0]()
    for argv, extra in zip(seen, (["--steps_per_generation", "4"], ["--generation_engine", "false"])):
        assert argv[-len(extra):] == extra and argv[argv.index("--advantage") + 1] == "token"
        assert argv[argv.index("--teacher_adapter") + 1] == str(tmp_path / "sft@1e-4")
    assert study.kind_of("distill<-sft@token@int4#s1") == "distill<-sft@token@int4"


def test_kl_to_base_is_the_mean_kl_per_token_of_the_general_text(tiny_tokenizer):
    """Against whole-text logits in fp64: the mean over the first N tokens of KL(model || base) over the vocabulary;
    0 for the base itself."""
    import torch

    from conftest import make_llama

    study = load("domain_study")
    model, base = make_llama(tiny_tokenizer, seed=1), make_llama(tiny_tokenizer, seed=2)
    texts = ["In the beginning God created the heaven and the earth. " * 4, "And the earth was without form."]
    got = study.kl_to_base(model, base, tiny_tokenizer, texts, max_tokens=60, seq_len=16)
    total = count = 0.0
    for text in texts:
        ids = tiny_tokenizer(text)["input_ids"]
        for start in range(0, len(ids), 16):
            window = torch.tensor([ids[start : start + min(16, 60 - int(count))]])
            with torch.no_grad():
                p = torch.log_softmax(model(input_ids=window).logits[0].double(), -1)
                q = torch.log_softmax(base(input_ids=window).logits[0].double(), -1)
            total += (p.exp() * (p - q)).sum().item()
            count += window.size(1)
            if count >= 60:
                break
        if count >= 60:
            break
    assert count == 60 and got == pytest.approx(total / count, rel=1e-4) and got > 0.01
    assert study.kl_to_base(base, base, tiny_tokenizer, texts, max_tokens=60, seq_len=16) == pytest.approx(0, abs=1e-7)


@pytest.mark.slow
def test_domain_study_smoke_of_the_forgetting_arms(tmp_path, corpus):
    """The study script end to end on the shipped model, two steps an arm: the base, SFT with its trajectory, the
    KL-penalty and replay arms, distillation with and without replay; every arm has both measures of forgetting and
    the figure is drawn. The arms' work folder elsewhere (STUDY_WORK, as the GPU scripts set it): the study makes its
    --out folder itself."""
    import os
    import shutil
    import subprocess
    import sys

    general = tmp_path / "general"
    general.mkdir()
    (general / "genesis.txt").write_text((corpus / "genesis.txt").read_text()[:40_000])
    shutil.copy(corpus / "ruth.txt", tmp_path / "heldout.txt")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(STUDIES / "domain_study.py"), "--domain_train", str(corpus / "jonah.txt"),
                        str(corpus / "esther.txt"), "--domain_heldout", str(tmp_path / "heldout.txt"), "--out",
                        str(out), "--general_data", str(general), "--steps", "2", "--arms",
                        "base,sft,sft_kl,sft_replay,distill_token,distill_replay", "--sft_lrs", "1e-4",
                        "--teacher_lr", "1e-4", "--trajectory", "1e-4:1", "--replay_shares", "0.5",
                        "--replay_samples", "8", "--kl_tokens", "256", "--eval_prompts", "2"],
                       capture_output=True, text=True, timeout=1800, cwd=ROOT,
                       env={**os.environ, "STUDY_WORK": str(tmp_path / "work")})
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "work" / "arms").is_dir() and not (out / "work").exists()
    result = json.loads((out / "domain_study.json").read_text())
    assert set(result["arms"]) == {"base", "sft@1e-4", "sft_kl@0.5", "sft_replay@0.5", "distill<-sft@token",
                                   "distill_replay@0.5"}
    assert all(arm["general_kl"] >= 0 for arm in result["arms"].values()) and "failed" not in result
    assert result["arms"]["base"]["general_kl"] == pytest.approx(0, abs=1e-6)
    assert [p["step"] for p in result["arms"]["sft@1e-4"]["trajectory"]] == [1, 2]
    assert all(arm["steps"] == 2 for name, arm in result["arms"].items() if name != "base")
    assert result["arms"]["distill_replay@0.5"]["teacher"] == "sft@1e-4"
    assert (out / "domain_study.png").stat().st_size > 0
