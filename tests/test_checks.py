"""The checks before any work (sdgrpo.checks): the one table of option rules walked through the real CLI parser, the
combinations refused up front, what a model's own files allow."""

from __future__ import annotations

import dataclasses
import inspect
import typing

import pytest

from sdgrpo.checks import OPTIONS, UNCHECKED, rules_for
from sdgrpo.cli import main as cli_main
from sdgrpo.config import SDGRPOConfig, SDModelConfig, SDSFTConfig, tiny_model_recipe
from sdgrpo.data import PrepareConfig
from sdgrpo.demo import DemoConfig
from sdgrpo.evaluate import EvalConfig
from sdgrpo.export import ExportConfig
from sdgrpo.generate import GenerateConfig

# Every verb's config classes, and the option naming what it writes.
VERB_CLASSES = {
    "prepare": ((PrepareConfig,), "output"), "train": ((SDGRPOConfig, SDModelConfig), "output_dir"),
    "sft": ((SDSFTConfig, SDModelConfig), "output_dir"), "eval": ((EvalConfig,), "output"),
    "export": ((ExportConfig,), "output"), "generate": ((GenerateConfig,), "output"),
    "demo": ((DemoConfig,), "output"), "pretrain": ((tiny_model_recipe().PretrainConfig,), "output_dir"),
}
CASES = [(verb, name, rule.bad) for verb, (classes, _) in VERB_CLASSES.items()
         for name, rule in rules_for(classes).items()]


def _numeric(tp) -> bool:
    """int, float, their Optional forms and lists of them (not bool)."""
    args = typing.get_args(tp)
    if args:
        return any(_numeric(a) for a in args if a is not type(None))
    return tp in (int, float)


def test_every_numeric_option_has_a_rule_or_a_reason():
    """The table covers every int and float option of every verb (or says why not), and names no option that no verb
    has."""
    fields = set()
    for classes, _ in VERB_CLASSES.values():
        hints = {}
        for cls in classes:
            hints.update(typing.get_type_hints(cls))
        ruled = rules_for(classes)
        for cls in classes:
            for f in dataclasses.fields(cls):
                fields.add(f.name)
                if f.init and _numeric(hints[f.name]):
                    assert f.name in ruled or f.name in UNCHECKED, f"{cls.__name__}.{f.name} has no rule"
    assert not {key.split(".")[-1] for key in OPTIONS} - fields
    assert not set(UNCHECKED) - fields


@pytest.mark.parametrize("verb, name, bad", CASES, ids=[f"{v}-{n}" for v, n, _ in CASES])
def test_a_bad_value_is_one_line_before_anything_is_written(verb, name, bad, tmp_path, capsys):
    """`sdgrpo VERB --option BAD`: exit 2, one line naming the option and the rule, nothing written."""
    out = tmp_path / ("out.jsonl" if verb == "generate" else "out")
    value = [str(v) for v in bad] if isinstance(bad, list) else [str(bad)]
    assert cli_main([verb, f"--{VERB_CLASSES[verb][1]}", str(out), f"--{name}", *value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"sdgrpo {verb}: error: command line: --{name} must be "), err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("option, value", [("temperature", "inf"), ("max_grad_norm", "nan"),
                                           ("generation_memory_gib", "inf")])
def test_numbers_must_be_finite(option, value):
    from sdgrpo.config import parse_train_args
    from sdgrpo.errors import UserError

    with pytest.raises(UserError, match=rf"^command line: --{option} must be a finite number, not {value}$"):
        parse_train_args([f"--{option}", value])


def test_choices_and_the_yaml_file_are_named(tmp_path):
    from sdgrpo.config import parse_train_args
    from sdgrpo.errors import UserError

    (tmp_path / "c.yaml").write_text("loss_type: dapoo\n")
    with pytest.raises(UserError) as err:
        parse_train_args(["--config", str(tmp_path / "c.yaml")])
    assert str(err.value) == (f"{tmp_path / 'c.yaml'}: --loss_type must be one of grpo, dr_grpo, dapo, bnpo, cispo, "
                              "sapo, luspo, vespo, not 'dapoo'")
    # every listed choice parses, and values of either case for the auto/true/false switches
    for choice in ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo"):
        assert parse_train_args(["--loss_type", choice])[0].loss_type == choice
    assert parse_train_args(["--rollout_correction", "True"])[0].rollout_correction == "true"


def test_the_choices_of_trls_modes_are_the_ones_trl_branches_on():
    """The table lists TRL's modes by hand (TRL refuses a typo only when training reaches it): each listed value is a
    string TRL's GRPO trainer or its vLLM generation compares with (trl 1.15, pinned)."""
    import trl.generation.vllm_generation
    import trl.trainer.grpo_trainer

    source = inspect.getsource(trl.trainer.grpo_trainer) + inspect.getsource(trl.generation.vllm_generation)
    for name in ("loss_type", "scale_rewards", "importance_sampling_level", "multi_objective_aggregation",
                 "vllm_mode", "vllm_importance_sampling_mode"):
        choices = OPTIONS.get(f"GRPOConfig.{name}", OPTIONS.get(name)).describe().removeprefix("one of ").split(", ")
        for choice in choices:
            assert f'"{choice}"' in source, (name, choice)


def test_repetition_penalty_is_refused_with_the_engine_and_served_by_generate():
    """The decoding engine does not implement a repetition penalty (engine.support.UNSUPPORTED: such calls would all
    fall back to transformers' generate): refused while the engine decodes, kept with --generation_engine false or
    vLLM."""
    from sdgrpo.config import parse_train_args
    from sdgrpo.engine import UNSUPPORTED
    from sdgrpo.errors import UserError

    assert "repetition_penalty" in UNSUPPORTED  # lift the refusal once the engine applies it
    with pytest.raises(UserError, match=r"^command line: --repetition_penalty 1.2: the decoding engine does not "
                                        r"apply a repetition penalty .* pass --generation_engine false"):
        parse_train_args(["--repetition_penalty", "1.2"])
    with pytest.raises(UserError, match="--repetition_penalty 0.8"):
        parse_train_args(["--repetition_penalty", "0.8", "--generation_engine", "true"])
    cfg, _ = parse_train_args(["--repetition_penalty", "1.2", "--generation_engine", "false"])
    assert cfg.repetition_penalty == 1.2 and cfg.generation_engine is False
    assert parse_train_args(["--repetition_penalty", "1.0"])[0].repetition_penalty == 1.0



def test_offloading_is_refused_where_it_would_do_nothing():
    """--offload_activations true offloads the checkpointed layers' inputs of --backend hf: with Unsloth (its own
    offloaded checkpointing) or without gradient checkpointing it would do nothing, so one line says so; auto and the
    hf backend with checkpointing pass."""
    from sdgrpo.config import parse_train_args
    from sdgrpo.errors import UserError

    with pytest.raises(UserError, match=r"^command line: --offload_activations true with --backend unsloth: Unsloth "
                                        r"offloads with its own"):
        parse_train_args(["--offload_activations", "true", "--backend", "unsloth"])
    with pytest.raises(UserError, match="--offload_activations true with --gradient_checkpointing false"):
        parse_train_args(["--offload_activations", "true", "--gradient_checkpointing", "false"])
    assert parse_train_args(["--offload_activations", "true"])[0].offload_activations == "true"
    assert parse_train_args(["--backend", "unsloth"])[0].offload_activations == "auto"


def test_tile_mlp_takes_auto_true_or_false():
    from sdgrpo.config import parse_train_args
    from sdgrpo.errors import UserError

    with pytest.raises(UserError, match=r"^command line: --tile_mlp must be one of auto, true, false, not 'yes'$"):
        parse_train_args(["--tile_mlp", "yes"])
    assert parse_train_args([])[0].tile_mlp == "auto"
    assert parse_train_args(["--tile_mlp", "true", "--backend", "unsloth"])[0].tile_mlp == "true"

# --- what the model's own files allow (--generation_memory_gib, adapters, vocabulary, positions) --------------------
def _one_error_line(capsys, verb: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"sdgrpo {verb}: error: "), err
    return err[0]


def test_a_generation_memory_budget_below_the_cache_is_refused_with_the_smallest_value(tmp_path, capsys,
                                                                                       tiny_model_dir, prepared):
    """The decoding engine's KV cache for the settings, from the model's config.json: 2 (keys, values) x layers x rows
    x kv heads x head dim x positions x 4 bytes (fp32 on CPU), rows = per_device_train_batch_size x
    steps_per_generation, positions = max_prompt_length + max_completion_length rounded up to 64. The prepared prompts
    reach 24 tokens: the engine would refuse the budget at the first generation, after the run's files are written."""
    import json
    import math

    import torch
    from transformers import AutoModelForCausalLM

    from sdgrpo.config import parse_train_args
    from sdgrpo.engine import DecodeEngine, cache_bytes
    from sdgrpo.errors import UserError

    config = json.loads((tiny_model_dir / "config.json").read_text())
    layers, kv = config["num_hidden_layers"], config["num_key_value_heads"]
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    rows, length = 4 * 2, 64  # 4 rows a step x 2 steps per generation; 24 + 40 positions (rounded up to 64)
    need = 2 * layers * rows * kv * head_dim * length * 4
    smallest = math.ceil(need / 2**30 * 1e6) / 1e6  # three significant digits (need is 2.4e-4 GiB), rounded up
    assert 1e-4 < need / 2**30 < 1e-3
    capsys.readouterr()
    args = ["--model_name_or_path", str(tiny_model_dir), "--dataset_path", str(prepared), "--max_steps", "1",
            "--per_device_train_batch_size", "4", "--num_generations", "4", "--steps_per_generation", "2",
            "--max_prompt_length", "24", "--max_completion_length", "40", "--report_to", "none"]
    out = tmp_path / "run"
    assert cli_main(["train", *args, "--output_dir", str(out), "--generation_memory_gib", "0.0002"]) == 2
    line = _one_error_line(capsys, "train")
    assert (f"--generation_memory_gib 0.0002: decoding 8 rows of 64 positions (max_prompt_length 24 + "
            f"max_completion_length 40, rounded up to 64) needs {need / 2**30:.3g} GiB for the KV cache alone; pass "
            f"--generation_memory_gib {smallest:g} or more") in line
    assert not out.exists()
    # the smallest value passes, and it is what the engine itself asks of the loaded model at its first call
    from sdgrpo.checks import check_generation_memory
    from sdgrpo.modeling import model_config

    train_cfg, model_cfg = parse_train_args([*args, "--generation_memory_gib", f"{smallest:g}"])
    check_generation_memory(train_cfg, model_cfg, model_config(str(tiny_model_dir)))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert cache_bytes(model, rows, length) == need
    DecodeEngine(memory_budget_gib=smallest)._decide_mode(model, rows, length, "cpu")
    with pytest.raises(UserError, match="decoding 8 rows of 64 positions needs .* for its cache alone"):
        DecodeEngine(memory_budget_gib=smallest - 1e-6)._decide_mode(model, rows, length, "cpu")
    # not checked where the engine does not decode (the budget is then unused)
    train_cfg, model_cfg = parse_train_args([*args, "--generation_memory_gib", "0.0002", "--generation_engine",
                                             "false"])
    check_generation_memory(train_cfg, model_cfg, model_config(str(tiny_model_dir)))


def _adapter(base_dir, out, **lora):
    """A LoRA adapter (r 4, B non-zero) saved for the model in ``base_dir``, as `sdgrpo train` saves one."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(r=4, **lora))
    peft.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def other_models(tmp_path_factory, tiny_tokenizer):
    """Models the tiny random one's adapters do not fit: narrower (hidden 32), deeper (3 layers), and a GPT-2."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from conftest import make_llama

    root = tmp_path_factory.mktemp("other-models")
    for name, model in (("narrow", make_llama(tiny_tokenizer, hidden=32)), ("deep", make_llama(tiny_tokenizer,
                                                                                                 layers=3)),
                        ("gpt2", GPT2LMHeadModel(GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=32, n_layer=1,
                                                            n_head=2, n_positions=128)))):
        model.save_pretrained(root / name)
        tiny_tokenizer.save_pretrained(root / name)
    return root


def test_an_adapter_made_for_another_model_is_one_line_before_loading(tmp_path, capsys, tiny_model_dir, prepared,
                                                                      other_models):
    """eval, generate, export and train's --teacher_adapter compare the adapter's tensors with the layers of the model
    it goes on (its config.json on the meta device): another width, more layers, another architecture."""
    from sdgrpo.errors import UserError

    narrow = _adapter(other_models / "narrow", tmp_path / "narrow-adapter", target_modules="all-linear")
    base, out = str(tiny_model_dir), tmp_path / "out"
    for verb, args in (("eval", ["--adapter", narrow, "--model_name_or_path", base, "--data", prepared, "--output",
                                 out, "--max_prompts", "2", "--samples", "2", "--max_new_tokens", "4"]),
                       ("generate", ["--adapter", narrow, "--model_name_or_path", base, "--prompt", "In the",
                                     "--max_new_tokens", "4"]),
                       ("export", ["--adapter", narrow, "--model_name_or_path", base, "--output", out]),
                       ("train", ["--teacher_adapter", narrow, "--reward", "distill", "--model_name_or_path", base,
                                  "--dataset_path", prepared, "--output_dir", out, "--max_steps", "1"])):
        capsys.readouterr()
        assert cli_main([verb, *map(str, args)]) == 2, verb
        line = _one_error_line(capsys, verb)
        option = "--teacher_adapter" if verb == "train" else "--adapter"
        assert f"{option} {narrow}: made for another model than {base} (its LoRA on " in line, line
        assert not out.exists(), verb  # eval leaves no empty folder behind

    from sdgrpo.modeling import check_adapter

    deep = _adapter(other_models / "deep", tmp_path / "deep-adapter", target_modules=["q_proj", "v_proj"])
    gpt2 = _adapter(other_models / "gpt2", tmp_path / "gpt2-adapter", target_modules=["c_attn"], fan_in_fan_out=True)
    fits = _adapter(tiny_model_dir, tmp_path / "fits", target_modules="all-linear", modules_to_save=["lm_head"])
    check_adapter(str(fits), base)  # the model it was made for: no complaint
    # (tensors in the file's order: the first layer's MLP comes first)
    for adapter, why in ((narrow, "its LoRA on model.layers.0.mlp.down_proj takes inputs of 64, this model's "
                                  "layer 128"),
                         (deep, "it has LoRA weights for model.layers.2.self_attn.q_proj, which this model does not "
                                "have"),
                         (gpt2, "it has LoRA weights for transformer.h.0.attn.c_attn, which this model does not "
                                "have")):
        with pytest.raises(UserError) as err:
            check_adapter(str(adapter), base)
        assert str(err.value) == (f"--adapter {adapter}: made for another model than {base} ({why}; its base was "
                                  f"{adapter_base_of(adapter)}); pass the model it was trained on as "
                                  "--model_name_or_path")


def adapter_base_of(adapter) -> str:
    import json

    return json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]


def test_an_embedding_smaller_than_the_tokenizer_is_refused(tmp_path, capsys, tiny_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tiny_tokenizer) - 12, hidden_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, intermediate_size=64))
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    capsys.readouterr()
    assert cli_main(["generate", "--model_name_or_path", str(tmp_path / "m"), "--prompt", "In the beginning"]) == 2
    line = _one_error_line(capsys, "generate")
    assert line.endswith(f"--model_name_or_path {tmp_path / 'm'}: its embedding has 500 rows but its tokenizer has "
                         "512 tokens, so ids from 500 on would index past it; resize it (model.resize_token_embeddings"
                         "(len(tokenizer)), then save_pretrained) or pass the tokenizer it was trained with")


def test_generation_past_the_position_limit_is_refused_before_loading(tmp_path, capsys, tiny_model_dir,
                                                                      tiny_tokenizer, prepared):
    """The random tiny model takes 512 positions: the longest prompt's tokens + --max_new_tokens may not pass them."""
    prompt = "In the beginning God created the heaven and the earth."
    n = len(tiny_tokenizer(prompt)["input_ids"])
    assert cli_main(["generate", "--model_name_or_path", str(tiny_model_dir), "--prompt", "And", "--prompt", prompt,
                     "--max_new_tokens", str(513 - n)]) == 2
    assert _one_error_line(capsys, "generate").endswith(
        f"the longest prompt ({n} tokens) and --max_new_tokens {513 - n} make 513 positions, past {tiny_model_dir}'s "
        "limit of 512 (max_position_embeddings); lower them")
    out = tmp_path / "eval"
    assert cli_main(["eval", "--model_name_or_path", str(tiny_model_dir), "--data", str(prepared), "--output",
                     str(out), "--max_prompts", "3", "--samples", "2", "--max_new_tokens", "500"]) == 2
    assert "--max_new_tokens 500 make" in _one_error_line(capsys, "eval") and not out.exists()
    assert cli_main(["train", "--model_name_or_path", str(tiny_model_dir), "--dataset_path", str(prepared),
                     "--output_dir", str(out), "--max_completion_length", "512"]) == 2
    assert _one_error_line(capsys, "train").endswith(
        f"a 1-token prompt and --max_completion_length 512 make 513 positions, past {tiny_model_dir}'s limit of 512 "
        "(max_position_embeddings); lower them")
    assert not out.exists()


def test_generate_refuses_an_output_file_in_a_missing_folder(tmp_path, capsys):
    target = tmp_path / "no-such-folder" / "samples.jsonl"
    assert cli_main(["generate", "--prompt", "In the", "--output", str(target)]) == 2
    assert _one_error_line(capsys, "generate").endswith(
        f"--output {target}: there is no folder {target.parent} to write it in; create it first")
    assert list(tmp_path.iterdir()) == []


def test_a_hub_name_that_cannot_load_here_is_one_line_at_once(tmp_path, monkeypatch, caplog):
    """A hub name with the Hub unreachable and nothing in the cache: one line, exit 2, in seconds and before the
    output folder exists (before, huggingface_hub retried for over a minute, a "Retrying in 8s" line each). Cached,
    it goes on (with a warning naming HF_HUB_OFFLINE); with HF_HUB_OFFLINE set it is not probed."""
    import time

    from huggingface_hub import constants

    from conftest import run_cli
    from sdgrpo.modeling import hub_problem

    text = tmp_path / "text"
    text.mkdir()
    (text / "a.txt").write_text("Some words of text. " * 20)
    proxies = ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")  # a proxy would skip the probe
    for name in proxies:
        monkeypatch.delenv(name, raising=False)
    env = {"HF_HUB_OFFLINE": "", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf"),
           **dict.fromkeys(proxies, "")}
    start = time.monotonic()
    r = run_cli("train", "--model_name_or_path", "someone/some-model", "--dataset_path", text, "--output_dir",
                tmp_path / "out", env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "Retrying" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].endswith(
        "--model_name_or_path someone/some-model: not a local folder, and the Hugging Face Hub (http://127.0.0.1:9) "
        "cannot be reached from here (Connection refused) to download it; pass a local model folder "
        "(save_pretrained, or a download made where the Hub is reachable)"), r.stderr[-600:]
    assert time.monotonic() - start < 60 and not (tmp_path / "out").exists()

    cache = tmp_path / "cache"
    snapshot = cache / "models--someone--cached" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (cache / "models--someone--cached" / "refs").mkdir()
    (cache / "models--someone--cached" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    with caplog.at_level("WARNING", logger="sdgrpo.modeling"):
        assert hub_problem("someone/cached") is None
    assert "HF_HUB_OFFLINE=1" in caplog.text
    assert "cannot be reached" in hub_problem("someone/elsewhere")
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:abc")  # malformed: huggingface_hub says so itself
    assert hub_problem("someone/elsewhere") is None
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    import socket

    def slow(*args, **kwargs):  # answers after the probe stopped waiting (its thread ends quietly, later)
        __import__("time").sleep(5)
        raise TimeoutError("timed out")

    monkeypatch.setattr(socket, "create_connection", slow)
    assert hub_problem("someone/elsewhere", timeout=0.2) is None  # not known in time: not refused
    monkeypatch.undo()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    for name in proxies:
        monkeypatch.delenv(name, raising=False)
    tok = cache / "models--someone--tokenizer" / "snapshots" / ("0" * 40)  # a tokenizer only (prepare --model)
    tok.mkdir(parents=True)
    (tok / "tokenizer.json").write_text("{}")
    (cache / "models--someone--tokenizer" / "refs").mkdir()
    (cache / "models--someone--tokenizer" / "refs" / "main").write_text("0" * 40)
    assert hub_problem("someone/tokenizer") is None
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.example:3128")  # the Hub may be reachable through it
    assert hub_problem("someone/elsewhere") is None
    monkeypatch.delenv("HTTP_PROXY")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hub_problem("someone/elsewhere") is None


def test_a_missing_teacher_and_a_folder_that_is_no_model_are_refused_before_the_text_is_prepared(tmp_path,
                                                                                                 tiny_model_dir):
    """`--reward distill` without a teacher, and a teacher folder without config.json: one line, exit 2, before the
    run folder (and its prepared copy of the text) exists; before, the text was prepared and the base loaded
    first."""
    from conftest import run_cli

    text = tmp_path / "text"
    text.mkdir()
    (text / "a.txt").write_text("Some words of text. " * 40)
    empty = tmp_path / "empty"
    empty.mkdir()
    for verb, extra, line in (
            ("train", ["--reward", "distill"], "--reward distill needs a teacher: pass --teacher_adapter"),
            ("train", ["--reward", "teacher_nll"], "--reward teacher_nll needs a teacher"),
            ("sft", ["--teacher_model_name_or_path", empty],
             f"--teacher_model_name_or_path {empty}: not a model folder (no config.json)")):
        out = tmp_path / f"out-{verb}-{len(line)}"
        r = run_cli(verb, "--model_name_or_path", tiny_model_dir, "--dataset_path", text, "--output_dir", out,
                    "--max_steps", 1, *extra)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert line in r.stderr.strip().splitlines()[-1], r.stderr[-600:]
        assert not out.exists()


@pytest.mark.parametrize("verb", ["train", "sft"])
@pytest.mark.parametrize("logger, says", [("tensorbord", "not a logger transformers knows; pass one of "),
                                          ("swanlab", "its package is not installed here")])
def test_a_logger_unknown_or_not_installed_is_one_line_before_the_text_is_prepared(verb, logger, says, tmp_path,
                                                                                   capsys, corpus):
    """`--report_to` is checked with transformers' own lists before any work: a typo, or a logger whose package this
    machine lacks, is one line and exit 2, and the run folder is not made (transformers raised only when the trainer
    was built, after the text was prepared and the model loaded: a traceback, exit 1)."""
    from transformers.integrations import get_available_reporting_integrations

    assert "swanlab" not in get_available_reporting_integrations()  # what the second case stands for
    out = tmp_path / "out"
    assert cli_main([verb, "--dataset_path", str(corpus), "--output_dir", str(out), "--report_to", logger]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"sdgrpo {verb}: error: --report_to {logger}: {says}"), err
    assert not out.exists()
