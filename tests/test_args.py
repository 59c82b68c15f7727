"""The one parser of every verb (sdgrpo.args): YAML under the command line, positional and repeated lists, one-line
errors, help."""

from __future__ import annotations

import pytest

from sdgrpo.args import parse_args
from sdgrpo.cli import VERBS
from sdgrpo.cli import main as cli_main
from sdgrpo.config import tiny_model_recipe
from sdgrpo.data import PrepareConfig
from sdgrpo.errors import UserError
from sdgrpo.generate import GenerateConfig

PretrainConfig = tiny_model_recipe().PretrainConfig


def test_yaml_replaces_defaults_and_the_command_line_replaces_yaml(tmp_path):
    (tmp_path / "p.yaml").write_text("data_dir: books\nmax_steps: 7\nlearning_rate: 0.01\ncompile: true\n")
    (cfg,) = parse_args(["--config", str(tmp_path / "p.yaml"), "--max_steps", "9"], (PretrainConfig,), "p")
    assert (cfg.data_dir, cfg.max_steps, cfg.learning_rate, cfg.compile, cfg.seq_len) == ("books", 9, 0.01, True, 256)


def test_what_the_machine_decides_wins_and_a_refused_wish_is_logged(tmp_path, caplog):
    (tmp_path / "p.yaml").write_text("compile: true\n")
    machine = {"compile": False, "batch_size": 8, "not_a_field_here": 1}
    (cfg,) = parse_args(["--seed", "4"], (PretrainConfig,), "p", machine=machine)
    assert (cfg.compile, cfg.batch_size, cfg.seed) == (False, 8, 4) and not caplog.records
    (cfg,) = parse_args(["--config", str(tmp_path / "p.yaml")], (PretrainConfig,), "p", machine=machine)
    assert cfg.compile is False
    assert [r.getMessage() for r in caplog.records] == ["compile True is not possible on this machine: using False"]


def test_the_machine_step_sees_the_parsed_values():
    """sdgrpo train's machine step fits the generation batch to what was asked before TRL's check would refuse it."""
    from sdgrpo.config import parse_train_args
    from sdgrpo.runtime import fit_generation_batch

    train_cfg, _ = parse_train_args(["--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "4",
                                     "--num_generations", "8"])
    assert (train_cfg.steps_per_generation, train_cfg.generation_batch_size) == (8, 8)
    seen = []
    parse_args(["--seed", "9"], (PretrainConfig,), "p", machine=lambda values: seen.append(values) or {})
    assert seen[0]["seed"] == 9 and seen[0]["seq_len"] == 256
    assert fit_generation_batch({"num_generations": 8, "per_device_train_batch_size": 4,
                                 "gradient_accumulation_steps": 2, "generation_batch_size": None,
                                 "steps_per_generation": None}) == {}


def test_positional_words_anywhere_and_repeated_list_options():
    (cfg,) = parse_args(["a.txt", "books", "--output", "out", "c.txt", "--max_prompts", "5"], (PrepareConfig,),
                        "sdgrpo prepare", positional="inputs")
    assert (cfg.inputs, cfg.output, cfg.max_prompts) == (["a.txt", "books", "c.txt"], "out", 5)
    (cfg,) = parse_args(["--prompt", "In the beginning", "--seed", "2", "--prompt", "And", "Then"], (GenerateConfig,),
                        "sdgrpo generate")
    assert (cfg.prompt, cfg.seed) == (["In the beginning", "And", "Then"], 2)


@pytest.mark.parametrize("argv, message", [
    (["--max_step", "3"], "command line: unknown option(s) max_step (did you mean max_steps?)"),
    (["--max_steps", "three"], "argument --max_steps/--max-steps: invalid int value: 'three'"),
    (["--config"], "--config needs a YAML file path"),
    (["--config", "missing.yaml"], "missing.yaml: config file not found"),
    (["--seq_len", "64", "stray"], "unexpected argument(s) stray"),
])
def test_bad_arguments_are_one_user_error(argv, message):
    with pytest.raises(UserError) as err:
        parse_args(argv, (PretrainConfig,), "sdgrpo pretrain")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_yaml_names_the_file(tmp_path):
    (tmp_path / "p.yaml").write_text("seq_len: [1, 2\n")
    with pytest.raises(UserError, match="p.yaml: not valid YAML"):
        parse_args(["--config", str(tmp_path / "p.yaml")], (PretrainConfig,), "p")
    (tmp_path / "p.yaml").write_text("seq_lenn: 64\n")
    with pytest.raises(UserError, match=r"p.yaml: unknown option\(s\) seq_lenn \(did you mean seq_len\?\)"):
        parse_args(["--config", str(tmp_path / "p.yaml")], (PretrainConfig,), "p")


@pytest.mark.parametrize("content, message", [
    (b"seq_len: 64\nseed: \xe9\n", "p.yaml: not valid UTF-8 (byte 18); re-save it as UTF-8"),
    ("\ufeffseq_len: 64\n".encode("utf-16"), "p.yaml: looks like UTF-16 text"),
    (b"- seq_len\n- 64\n", "p.yaml: must be a YAML mapping of option: value, one per line (it is a YAML list)"),
    (b"seq_len 64\n", "p.yaml: must be a YAML mapping of option: value, one per line (it is a YAML str)"),
    (b"env: HF_HOME\nseq_len: 64\n", "p.yaml: env must be a mapping of VARIABLE: value, not a str"),
    (b"64: seq_len\n", "p.yaml: unknown option(s) 64"),
])
def test_a_config_file_that_is_not_a_utf8_mapping_is_one_line(tmp_path, content, message):
    (tmp_path / "p.yaml").write_bytes(content)
    with pytest.raises(UserError) as err:
        parse_args(["--config", str(tmp_path / "p.yaml")], (PretrainConfig,), "p")
    assert str(err.value).startswith(f"{tmp_path}/{message}") and "\n" not in str(err.value)


OPTION = {"prepare": "--max_prompts", "train": "--beta", "sft": "--heldout_eval_steps", "eval": "--temperatures",
          "export": "--max_delta", "generate": "--num_samples", "demo": "--baseline_temperatures",
          "pretrain": "--repeat_fraction"}


@pytest.mark.parametrize("verb", list(VERBS))
def test_every_verb_prints_its_options(verb, capsys):
    assert cli_main([verb, "--help"]) == 0
    out = capsys.readouterr().out
    assert f"usage: sdgrpo {verb}" in out and OPTION[verb] in out


@pytest.mark.parametrize("verb, first", [
    ("train", ("--model_name_or_path", "--dataset_path", "--output_dir", "--reward", "--max_steps")),
    ("sft", ("--model_name_or_path", "--dataset_path", "--output_dir", "--max_steps", "--teacher_model_name_or_path"))])
def test_help_leads_with_sdgrpos_options_and_lists_every_option_once(verb, first):
    """`sdgrpo train --help` (and sft's): sdgrpo's options, grouped, on the first screen; every option of the verb
    listed exactly once; TRL's and transformers' own after all of sdgrpo's, under their heading."""
    import dataclasses
    import re

    from conftest import run_cli
    from sdgrpo.args import INHERITED, declared_by_sdgrpo
    from sdgrpo.config import SDGRPOConfig, SDModelConfig, SDSFTConfig

    classes = (SDGRPOConfig if verb == "train" else SDSFTConfig, SDModelConfig)
    r = run_cli(verb, "--help", env={"COLUMNS": "100"})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"usage: sdgrpo {verb} [--config FILE.yaml]") and len(lines[0]) <= 100
    screen = "\n".join(lines[:40])
    for option in first:
        assert re.search(rf"^  {option}\b", screen, re.M), (option, screen)
    assert "sdgrpo: the run:" in screen and "sdgrpo: reward:" in screen
    assert all(flag in " ".join(screen.split()) for flag in ("--config FILE.yaml reads", "--resume continues",
                                                             "--start_over moves it aside: both bare flags"))
    heading = next(i for i, line in enumerate(lines) if line.startswith(INHERITED))
    where = {}
    for f in (f for cls in classes for f in dataclasses.fields(cls) if f.init):
        at = [i for i, line in enumerate(lines) if re.match(rf"  --{f.name}( |,|$)", line)]
        assert len(at) == 1, (f.name, at)
        where[f.name] = at[0]
    ours = declared_by_sdgrpo(classes)
    assert ours and all(where[name] < heading for name in ours)
    assert all(where[name] > heading for name in where.keys() - ours - {"log_level", "max_steps"})
    assert where["per_device_train_batch_size"] > heading > where["learning_rate"]


@pytest.mark.parametrize("verb", ["prepare", "eval", "export", "generate", "demo"])
def test_every_option_of_sdgrpos_own_verbs_says_what_it_does(verb):
    """`sdgrpo VERB --help` for the verbs whose options are all sdgrpo's: every option has a line of help, none is
    a bare name."""
    import re

    from conftest import run_cli

    r = run_cli(verb, "--help", env={"COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    text = r.stdout.split("show this help message and exit", 1)[1]
    entries = re.split(r"\n(?=  --\w)", text)[1:]  # an option's lines, up to the next option
    bare = [entry.split()[0] for entry in entries if "(default:" not in entry]  # argparse shows it with help only
    assert len(entries) >= 6 and not bare, bare


def test_a_negative_number_after_an_option_is_its_value(tmp_path):
    """`--learning_rate -1e-4` (and `learning_rate: -1.0e-5` in YAML) reach the option's own check; argparse took
    "-1e-4" for an option and said "expected one argument" before."""
    from sdgrpo.config import parse_train_args
    from sdgrpo.errors import UserError

    for argv in (["--learning_rate", "-1e-4"], ["--learning_rate=-1e-4"]):
        with pytest.raises(UserError, match=r"--learning_rate must be above 0, not -0.0001$"):
            parse_train_args(argv)
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: -1.0e-5\n")
    with pytest.raises(UserError, match=r"c.yaml: --learning_rate must be above 0, not -1e-05$"):
        parse_train_args(["--config", str(path)])
    from sdgrpo.args import _attach_negative_values

    assert _attach_negative_values(["--beta", "-1", "--", "-2", "--x=-3", "--y", "-inf", "--z", "-abc"]) == [
        "--beta=-1", "--", "-2", "--x=-3", "--y=-inf", "--z", "-abc"]
    cfg, _ = parse_train_args(["--temperature", "0.7", "--learning_rate", "2e-4"])
    assert (cfg.temperature, cfg.learning_rate) == (0.7, 2e-4)


def test_python_dash_m_sdgrpo_is_the_command(tmp_path):
    """`python -m sdgrpo` runs the CLI (it said "No module named sdgrpo.__main__"), exit codes included."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "sdgrpo", "train", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--reward" in r.stdout, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "sdgrpo", "train", "--max_steps", "0"], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    assert r.returncode == 2 and "--max_steps must be" in r.stderr.strip().splitlines()[-1], r.stderr[-2000:]


@pytest.mark.parametrize("verb", ["train", "sft"])
def test_resume_and_start_over_with_a_value_or_in_a_config_say_they_are_bare_flags(verb, tmp_path, capsys):
    """`--resume=true` or `resume: true` in a YAML file was "unknown option(s) resume": the flags exist, as bare
    words of the command line; the line says so, exit 2, nothing written."""
    (tmp_path / "c.yaml").write_text("start_over: true\n")
    for argv, where, flag in ((["--resume=true"], "command line", "resume"),
                              (["--config", str(tmp_path / "c.yaml")], str(tmp_path / "c.yaml"), "start_over")):
        assert cli_main([verb, "--output_dir", str(tmp_path / "out"), *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"sdgrpo {verb}: error: {where}: --{flag} is a bare flag of the command line "
                       f"(`sdgrpo {verb} ... --{flag}`): no value, and not in a config file"], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


def test_version_is_printed(capsys):
    from sdgrpo import __version__

    assert cli_main(["--version"]) == 0
    assert capsys.readouterr().out == f"sdgrpo {__version__}\n" and __version__
