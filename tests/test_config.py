"""Every shipped YAML parses; YAML then command line; sdgrpo's defaults; the original recipe's batch settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdgrpo.config import TINY_MODEL, parse_train_args
from sdgrpo.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
# Every shipped training config: configs/<model>/<recipe>.yaml (accelerate/ holds accelerate's launcher configs).
RECIPES = sorted(p for p in (ROOT / "configs").rglob("*") if p.suffix in (".yaml", ".yml")
                 and "accelerate" not in p.relative_to(ROOT / "configs").parts)
MACHINE = {"use_cpu", "bf16", "fp16"}  # what sdgrpo.runtime.machine_settings decides on a machine without a GPU


def test_configs_are_model_folders_of_recipes():
    """One scheme: configs/<model>/<recipe>.yaml, nothing at the top; every recipe is found by the test below."""
    top = sorted(p.name for p in (ROOT / "configs").iterdir() if p.is_file())
    assert top == [], f"YAML at the top of configs/: {top}; move it to configs/<model>/<recipe>.yaml"
    assert len(RECIPES) >= 15 and all(len(p.relative_to(ROOT / "configs").parts) == 2 for p in RECIPES)


def _same(parsed, value) -> bool:
    parsed = getattr(parsed, "value", parsed)  # transformers' enums
    if value == "none":  # transformers' report_to: none is no loggers
        return parsed in ([], "none")
    if isinstance(value, list) and not isinstance(parsed, list):
        return value == [parsed]
    return parsed == value


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.relative_to(ROOT / "configs").as_posix())
def test_shipped_config_parses_with_its_command(path):
    """Each recipe opens with the exact command that runs it (its verb, its own path), and that whole command line
    goes through the verb's real parser; every YAML key reaches its config with its value, except where the command
    line replaces it or this machine decides it (no GPU: CPU, fp32)."""
    import shlex

    import yaml

    from sdgrpo.config import parse_sft_args

    first = path.read_text().splitlines()[0]
    assert first.startswith("# sdgrpo "), f"{path}: the first line must be the command that runs it, not {first!r}"
    words = shlex.split(first[2:])
    verb, argv = words[1], words[2:]
    rel = path.relative_to(ROOT).as_posix()
    assert verb in ("train", "sft") and argv[argv.index("--config") + 1] == rel, first
    argv[argv.index("--config") + 1] = str(path)  # the command runs from the repository's root
    train_cfg, model_cfg = (parse_train_args if verb == "train" else parse_sft_args)(argv)
    given = {a[2:] for a in argv if a.startswith("--")}
    for key, value in yaml.safe_load(path.read_text()).items():
        target = model_cfg if hasattr(model_cfg, key) and not hasattr(train_cfg, key) else train_cfg
        assert hasattr(target, key), key
        if key in given or key in MACHINE:
            continue
        if key == "model_name_or_path" and value is None:
            assert model_cfg.model_name_or_path == TINY_MODEL
        else:
            assert _same(getattr(target, key), value), (key, getattr(target, key), value)


def test_defaults_and_overrides(tmp_path):
    train_cfg, model_cfg = parse_train_args([])
    assert train_cfg.beta == 0.04 and train_cfg.num_generations == 8 and train_cfg.max_prompt_length == 512
    assert model_cfg.lora_r == 16 and model_cfg.use_peft and model_cfg.model_name_or_path == TINY_MODEL
    assert train_cfg.trust_remote_code is False
    cfg = tmp_path / "x.yaml"
    cfg.write_text("learning_rate: 3.0e-4\nbeta: 0.1\nlora_r: 8\n")
    train_cfg, model_cfg = parse_train_args(["--config", str(cfg), "--learning_rate", "1e-5"])
    assert train_cfg.learning_rate == 1e-5 and train_cfg.beta == 0.1 and model_cfg.lora_r == 8


def test_original_recipe_batch_settings_work():
    train_cfg, _ = parse_train_args(["--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "4",
                                     "--num_generations", "8"])
    assert train_cfg.generation_batch_size == 8 and train_cfg.steps_per_generation == 8
    assert train_cfg.generation_batch_size % train_cfg.num_generations == 0


@pytest.mark.parametrize("yaml_text, message", [
    ("learning_rat: 1e-5\n", r"unknown option\(s\) learning_rat \(did you mean learning_rate\?\)"),
    ("- a\n- b\n", "must be a YAML mapping"),
    ("a: [\n", "not valid YAML"),
    ("num_generations: 1\n", "at least 2 completions"),
    ("backend: tpu\n", "bad.yaml: --backend must be one of hf, unsloth, not 'tpu'"),
])
def test_bad_config_is_one_clear_error(tmp_path, yaml_text, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml_text)
    with pytest.raises(UserError, match=message):
        parse_train_args(["--config", str(cfg)])


ACCELERATE = sorted((Path(__file__).resolve().parents[1] / "configs" / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.name)
def test_shipped_accelerate_configs_parse(path):
    import yaml

    cfg = yaml.safe_load(path.read_text())
    assert cfg["distributed_type"] in {"MULTI_GPU", "FSDP", "DEEPSPEED"} and cfg["num_processes"] >= 2
    if cfg["distributed_type"] == "DEEPSPEED":
        assert cfg["deepspeed_config"]["zero_stage"] in (2, 3)
    assert cfg["mixed_precision"] == "bf16" and cfg["use_cpu"] is False


def test_compiled_generation_default(monkeypatch):
    """On for --backend hf on a GPU (one process, DDP, FSDP2 with the weights held and FSDP's hooks off for
    generation), with a static cache; off on CPU, vLLM, DeepSpeed, FSDP re-gathering the weights and Unsloth's own
    generation. The decoding engine's default follows the same launches (on for CPU too, uncompiled), on either
    backend."""
    from sdgrpo.runtime import default_generation_compile as default
    from sdgrpo.runtime import resolve_runtime

    cpu, model = parse_train_args([])  # this machine has no GPU
    assert cpu.generation_compile is None  # left open until the runtime is known
    resolve_runtime(cpu)
    assert cpu.generation_compile is False and cpu.cache_implementation is None and model.dtype == "auto"
    assert default("hf", True, False, False, None) is True
    assert default("hf", False, False, False, None) is False
    assert default("unsloth", True, False, False, None) is False  # Unsloth's own generation
    assert default("unsloth", True, False, False, None, engine=True) is True  # Unsloth's model through the engine
    assert default("hf", True, True, False, None) is False  # weights re-gathered (DeepSpeed, FSDP per step)
    assert default("hf", True, False, True, None) is False  # vLLM
    assert default("hf", True, False, False, "dynamic") is False
    on = resolve_runtime(parse_train_args(["--generation_compile", "true"])[0])
    assert on.generation_compile is True and on.cache_implementation == "static"

    # The whole config on a (pretended) GPU, launched the way accelerate launch marks FSDP and DeepSpeed.
    import sdgrpo.runtime

    monkeypatch.setattr(sdgrpo.runtime, "_has_cuda", lambda: True)
    gpu = ["--output_dir", "/tmp/unused", "--bf16", "false"]
    fsdp2 = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
    for env, extra, expected in [({}, [], True), (fsdp2, [], True),
                                 (fsdp2, ["--fsdp_skip_hooks_in_generation", "false"], False),
                                 (fsdp2, ["--fsdp_gather_for_generation", "false"], False),
                                 ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, [], False),
                                 ({"ACCELERATE_USE_DEEPSPEED": "true"}, [], False)]:
        for key in ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "ACCELERATE_USE_DEEPSPEED"):
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        cfg = resolve_runtime(parse_train_args(gpu + extra)[0])
        assert not cfg.use_cpu and cfg.generation_compile is expected, (env, extra)
        assert cfg.generation_engine is expected, (env, extra)  # the engine where the weights stay put
        assert cfg.cache_implementation == ("static" if expected else None)
    for key in ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(key, raising=False)
    for extra, engine in [([], True), (["--generation_engine", "false"], False)]:  # Unsloth's model on a GPU
        cfg = resolve_runtime(parse_train_args(gpu + ["--backend", "unsloth", *extra])[0])
        assert cfg.generation_engine is engine and cfg.generation_compile is engine, extra
        assert cfg.cache_implementation == ("static" if engine else None), extra


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the no-GPU fallback")
def test_without_a_gpu_mixed_precision_is_turned_off():
    """Without a GPU sdgrpo trains on CPU in fp32: neither TRL's bf16 default nor a requested fp16 survives."""
    train_cfg, _ = parse_train_args(["--output_dir", "/tmp/unused", "--fp16", "true"])
    assert train_cfg.use_cpu and not train_cfg.bf16 and not train_cfg.fp16
