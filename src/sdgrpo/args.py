"""The one YAML + command-line parser of every verb: ``[--config FILE] [--key value ...]`` into dataclasses.

YAML values replace a field's default and command-line values replace YAML. Every value, from the file or the command
line, goes through transformers' ``HfArgumentParser`` (the parser TRL's scripts use), so a mistyped value is refused
with the option's name, and a bad option or value is one line (:class:`UserError`), never argparse's usage and exit.
Light at import: transformers is imported when a verb parses.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
from pathlib import Path

import yaml

from sdgrpo.checks import check_options
from sdgrpo.errors import UserError

logger = logging.getLogger(__name__)


def field_names(*classes) -> list[str]:
    """The init fields of ``classes``, in order: the options a verb takes."""
    return [f.name for cls in classes for f in dataclasses.fields(cls) if f.init]


def _yaml_to_argv(data: dict) -> list[str]:
    """YAML values as command-line tokens, so that argparse checks their types like typed options."""
    argv: list[str] = []
    for key, value in data.items():
        if value is None:
            continue
        if isinstance(value, bool):
            argv += [f"--{key}", str(value).lower()]
        elif isinstance(value, list):
            argv += [f"--{key}", *(str(v) for v in value)]
        elif isinstance(value, dict):
            argv += [f"--{key}", json.dumps(value)]
        else:
            argv += [f"--{key}", str(value)]
    return argv


def _check_known(keys, where: str, classes: tuple, prog: str) -> None:
    known = field_names(*classes)
    unknown = [k for k in keys if k not in known]
    if unknown:
        hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, known, 1)) else k
                 for k in unknown]
        raise UserError(f"{where}: unknown option(s) {', '.join(hints)}; `{prog} --help` lists them")


def load_yaml(path_text: str, classes: tuple, prog: str) -> dict:
    """A YAML mapping of option: value, checked against ``classes``; an ``env:`` mapping is exported first."""
    from sdgrpo.textio import TextDecodeError, read_text_file

    path = Path(path_text)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(read_text_file(path))
    except TextDecodeError as err:
        raise UserError(str(err)) from None
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({err})".replace("\n", " ")) from None
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a YAML {type(data).__name__}"
        raise UserError(f"{path}: must be a YAML mapping of option: value, one per line (it is {kind})")
    env = data.pop("env", None) or {}
    if not isinstance(env, dict):
        raise UserError(f"{path}: env must be a mapping of VARIABLE: value, not a {type(env).__name__}")
    for key, value in env.items():
        os.environ[str(key)] = str(value)
    _check_known([str(k) for k in data], str(path), classes, prog)
    return data


def _merge_repeated(argv: list[str], lists: set[str]) -> list[str]:
    """``--prompt a --prompt b`` as ``--prompt a b`` for list fields (argparse would keep only the last)."""
    out: list[str] = []
    at: dict[str, int] = {}  # list option -> index in out after its last value
    i = 0
    while i < len(argv):
        name = argv[i][2:] if argv[i].startswith("--") else None
        j = i + 1
        while j < len(argv) and not argv[j].startswith("--"):
            j += 1
        if name in lists and name in at:
            out[at[name]:at[name]] = argv[i + 1 : j]
            for key in at:
                if at[key] > at[name]:
                    at[key] += j - i - 1
            at[name] += j - i - 1
        else:
            out += argv[i:j]
            if name in lists:
                at[name] = len(out)
        i = j
    return out


def _parser(classes: tuple, prog: str, description: str, positional: str | None):
    from transformers import HfArgumentParser

    parser = HfArgumentParser(classes, prog=prog, description=description)
    if positional:
        # The list field may also be given as leading words (`sdgrpo prepare a.txt books/ --output data`).
        for action in parser._actions:
            if action.dest == positional:
                action.required = False
        parser.add_argument("_positional", nargs="*", metavar=positional.upper(), help=f"same as --{positional}")
    return parser


def parse_args(argv: list[str], classes: tuple, prog: str, description: str = "",
               positional: str | None = None, machine=None) -> tuple:
    """``[--config FILE] [--key value ...]`` into one instance of each dataclass in ``classes`` (see the module).

    ``positional``: the name of a list field that also takes the words that are not options (prepare's inputs).
    ``machine``: values that replace whatever the defaults, the file or the command line say, for the fields that
    ``classes`` have, or a function of the parsed values that returns them: what the machine decides
    (:func:`sdgrpo.runtime.machine_settings`); a replaced value that was asked for is logged.
    ``-h``/``--help`` prints every option with its help and raises ``SystemExit(0)``.
    """
    argv = list(argv)
    if any(a in ("-h", "--help") for a in argv):
        _parser(classes, prog, description, positional).print_help()
        raise SystemExit(0)
    yaml_argv: list[str] = []
    source = "command line"
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise UserError("--config needs a YAML file path")
        source = argv[i + 1]
        yaml_argv = _yaml_to_argv(load_yaml(argv[i + 1], classes, prog))
        del argv[i : i + 2]
    _check_known([a[2:].split("=")[0] for a in argv if a.startswith("--")], "command line", classes, prog)
    lists = {f.name for cls in classes for f in dataclasses.fields(cls)
             if f.init and str(f.type).startswith(("list", "List", "typing.List"))}
    argv = _merge_repeated(argv, lists)
    parser = _parser(classes, prog, description, positional)

    def error(message: str):
        raise UserError(f"{source if yaml_argv else 'command line'}: {message} (see `{prog} --help`)")

    parser.error = error  # one line instead of argparse's usage text and exit
    try:
        namespace, extra = parser.parse_known_args(args=yaml_argv + argv)
    except ValueError as err:
        raise UserError(str(err).splitlines()[0]) from None
    if positional:
        # Words argparse left over (after an option's value) are positional too.
        words = getattr(namespace, "_positional", []) + [w for w in extra if not w.startswith("-")]
        extra = [w for w in extra if w.startswith("-")]
        delattr(namespace, "_positional")
        if words:
            setattr(namespace, positional, [*(getattr(namespace, positional) or []), *words])
    if extra:
        error(f"unexpected argument(s) {' '.join(extra)}")
    # What was asked is checked before the machine's step, which reads it (sdgrpo.checks.OPTIONS).
    check_options(vars(namespace), classes, source)
    asked = {a[2:].split("=")[0] for a in yaml_argv + argv if a.startswith("--")}
    overrides = machine(dict(vars(namespace))) if callable(machine) else (machine or {})
    for key, value in overrides.items():
        if hasattr(namespace, key):
            if key in asked and getattr(namespace, key) != value:
                logger.warning("%s %s is not possible on this machine: using %s", key, getattr(namespace, key), value)
            setattr(namespace, key, value)
    out = []
    for cls in classes:
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        values = {k: v for k, v in vars(namespace).items() if k in names}
        try:
            out.append(cls(**values))
        except (ValueError, TypeError) as err:
            raise UserError(f"{source}: {str(err).splitlines()[0]}") from None
    return tuple(out)
