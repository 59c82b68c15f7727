"""benchmarks/bench_step.py's variant options (the GPU benchmark itself runs on the device machine)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_variant_options_and_the_childs_environment(monkeypatch):
    import bench_step

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    name, options = bench_step.variant_options("sdgrpo_hf_4bit+gemlite+spg4+cap16+len2048+mb4+tile+expand")
    assert name == "sdgrpo_hf_4bit"
    assert options == {"kernel": "gemlite", "spg": 4, "cap": 16.0, "len": 2048, "mb": 4, "tile": True,
                       "expand": True}
    assert bench_step.child_env("sdgrpo_hf_4bit+expand")["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    env = bench_step.child_env("sdgrpo_hf_4bit+cap16")
    assert env["BENCH_CHILD"] == "1" and "PYTORCH_CUDA_ALLOC_CONF" not in env
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")  # the user's own settings kept
    assert bench_step.child_env("sdgrpo_hf_4bit+expand")["PYTORCH_CUDA_ALLOC_CONF"] == \
        "max_split_size_mb:512,expandable_segments:True"
    with pytest.raises(ValueError, match="unknown option 'expanded'"):
        bench_step.variant_options("sdgrpo_hf_4bit+expanded")
