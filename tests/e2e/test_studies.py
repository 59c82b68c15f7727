"""Reduced runs of the study scripts' training arms (studies/), so that a TRL or sdgrpo change that breaks them
fails in CI rather than in a 90-minute study."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

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
                              sft_trajectory="1e-4:25,50")
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
