"""The checks before any work (sdgrpo.checks): the one table of option rules walked through the real CLI parser, the
combinations refused up front, what a model's own files allow."""

from __future__ import annotations

import dataclasses
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


def test_repetition_penalty_is_refused_with_the_engine_and_served_by_generate():
    """The decoding engine does not implement a repetition penalty (engine.UNSUPPORTED: such calls would all fall back
    to transformers' generate): refused while the engine decodes, kept with --generation_engine false or vLLM."""
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
