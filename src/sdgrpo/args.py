"""The one YAML + command-line parser of every verb: ``[--config FILE] [--key value ...]`` into dataclasses.

YAML values replace a field's default and command-line values replace YAML. Every value, from the file or the command
line, goes through transformers' ``HfArgumentParser`` (the parser TRL's scripts use), so a mistyped value is refused
with the option's name, and a bad option or value is one line (:class:`UserError`), never argparse's usage and exit.
``--help`` lists the options sdgrpo adds or changes first, in the groups of :data:`HELP_GROUPS`, and TRL's and
transformers' inherited ones after them under their own heading. Light at import: transformers is imported when a
verb parses.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
import re
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


# A value that starts with "-" and reads as a number. argparse (Python 3.12) takes "-1e-4" for an option (its own test
# for negative numbers wants a decimal point) and says "expected one argument"; written "--name=-1e-4" it is a value.
_NEGATIVE = re.compile(r"-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|-inf|-nan")


def _attach_negative_values(argv: list[str]) -> list[str]:
    """``--name -1e-4`` as ``--name=-1e-4``: a negative number after an option is that option's value."""
    out: list[str] = []
    for token in argv:
        if out and out[-1].startswith("--") and out[-1] != "--" and "=" not in out[-1] and _NEGATIVE.fullmatch(token):
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def _check_known(keys, where: str, classes: tuple, prog: str) -> None:
    known = field_names(*classes)
    unknown = [k for k in keys if k not in known]
    flag = next((k for k in unknown if k in ("resume", "start_over")), None)  # cli.RUN_FLAGS, read before parsing
    if flag:
        raise UserError(f"{where}: --{flag} is a bare flag of the command line (`{prog} ... --{flag}`): no value, "
                        "and not in a config file")
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


# `--help`: sdgrpo's options (the fields sdgrpo's dataclasses declare, new or with a changed default or meaning), in
# these groups and this order; one of sdgrpo's in none of them is listed under "other sdgrpo options". An inherited
# option named here is one whose meaning sdgrpo changes (log_level debug: the full metric dicts on the terminal) or
# one every run sets (max_steps, in the first group with what a run needs).
HELP_GROUPS = {
    "the run": ("model_name_or_path", "dataset_path", "output_dir", "reward", "max_steps"),
    "data": ("max_train_prompts", "max_prompt_length", "max_length"),
    "reward": ("reward_aggregation", "reward_token_budget", "score_with", "beta", "advantage",
               "sequence_advantage_weight", "distill_topk", "distill_topk_weight", "teacher_model_name_or_path",
               "teacher_adapter", "teacher_load_in_4bit", "teacher_retokenize", "kd_weight",
               "reuse_reference_logprobs"),
    "model and LoRA": ("use_peft", "dtype", "lora_target_modules", "backend", "cudnn_attention",
                       "learning_rate", "disable_dropout"),
    "engine (rollouts)": ("generation_engine", "generation_compile", "generation_weights", "generation_int4_kernel",
                          "rollout_correction", "rollout_correction_mode", "max_completion_length",
                          "min_completion_length"),
    "memory": ("dry_run", "gpu_memory_gib", "memory_check", "generation_memory_gib", "offload_activations",
               "tile_mlp", "fsdp_gather_for_generation", "fsdp_skip_hooks_in_generation"),
    "collapse guard and held-out text": ("collapse_guard", "guard_max_seq_rep_increase", "guard_max_distinct2_drop",
                                         "guard_min_length_fraction", "guard_max_heldout_increase", "guard_patience",
                                         "heldout_eval_steps", "heldout_eval_prompts", "keep_best_heldout"),
    "run folder and logging": ("save_steps", "logging_steps", "report_to", "log_level"),
}
INHERITED = "inherited from TRL and transformers"  # the heading of the options sdgrpo leaves as they are
# what sdgrpo adds to the help of an inherited option it gives another meaning
HELP_NOTES = {"max_steps": "sdgrpo: without it a run lasts --num_train_epochs passes over the prompts (3 by default).",
              "log_level": "sdgrpo: debug or detail prints each logging step's whole metric record instead of its "
                           "compact line, and keeps every library's progress bar (sdgrpo.progress)."}


def declared_by_sdgrpo(classes: tuple) -> set[str]:
    """The fields of ``classes`` that a dataclass of sdgrpo declares: its own options and those whose default or help
    it changes (the rest are TRL's and transformers' as they define them)."""
    import inspect

    return {f.name for cls in classes for f in dataclasses.fields(cls) if f.init
            and any(f.name in inspect.get_annotations(c) for c in cls.__mro__
                    if c.__module__.split(".")[0] == "sdgrpo")}


def _group_help(parser, classes: tuple) -> None:
    """Regroup ``parser``'s options for ``--help`` (see :data:`HELP_GROUPS`) where ``classes`` extend TRL's or
    transformers' dataclasses (a verb whose options are all sdgrpo's keeps one list); parsing does not read the
    groups."""
    owners = sorted({c.__name__ for cls in classes for c in cls.__mro__[1:]
                     if c.__module__.split(".")[0] in ("trl", "transformers") and dataclasses.is_dataclass(c)
                     and not c.__name__.startswith("_")})
    if not owners:
        return
    ours = declared_by_sdgrpo(classes)
    inherited = {f.name for cls in classes for f in dataclasses.fields(cls) if f.init} - ours
    named = {name for names in HELP_GROUPS.values() for name in names}
    groups = {title: parser.add_argument_group(f"sdgrpo: {title}") for title in HELP_GROUPS}
    other = parser.add_argument_group("other sdgrpo options")
    base = parser.add_argument_group(f"{INHERITED} ({', '.join(owners)}): their own meanings and defaults")
    if "output_dir" in ours:
        groups["the run"].description = (
            "--config FILE.yaml reads options from a YAML file (the command line overrides it). --resume continues "
            "the run in --output_dir from its last checkpoint, --start_over moves it aside: both bare flags, on the "
            "command line only.")
    # argparse keeps each group's options in ``_group_actions`` and the groups in ``_action_groups``, which its help
    # formatter reads (private names of the standard library, unchanged since Python 3.2): moving an option between
    # groups changes the help only.
    for action in list(parser._optionals._group_actions):
        dest = action.dest
        if dest == "help":
            continue
        target = (next((groups[t] for t, names in HELP_GROUPS.items() if dest in names), None)
                  if dest in ours or (dest in named and dest in inherited) else None)
        if target is None:
            target = base if dest in inherited else other
        if dest in HELP_NOTES and action.help and HELP_NOTES[dest] not in action.help:
            action.help = f"{action.help} {HELP_NOTES[dest]}"
        parser._optionals._group_actions.remove(action)
        target._group_actions.append(action)
    # sdgrpo's groups in HELP_GROUPS' order, each option in that order too; the inherited ones keep TRL's order
    for title, group in groups.items():
        order = {name: i for i, name in enumerate(HELP_GROUPS[title])}
        group._group_actions.sort(key=lambda a: order.get(a.dest, len(order)))
    parser._action_groups = [g for g in parser._action_groups if g._group_actions or g is parser._optionals]


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
        parser = _parser(classes, prog, description, positional)
        parser.usage = f"{prog} [--config FILE.yaml] [--OPTION VALUE ...]" + (f" [{positional.upper()} ...]"
                                                                              if positional else "")
        _group_help(parser, classes)
        parser.print_help()
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
    yaml_argv, argv = _attach_negative_values(yaml_argv), _attach_negative_values(argv)
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
