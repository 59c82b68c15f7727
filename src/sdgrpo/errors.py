"""The one exception type that the CLI turns into a single line on stderr and exit code 2, and its parsers."""

import argparse
import dataclasses
import typing


class UserError(Exception):
    """Bad input from the user: the message says what is wrong, where, and what to do."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad argument raises :class:`UserError` (one line, exit 2) instead of printing usage."""

    def error(self, message: str):
        raise UserError(f"{message} (see `{self.prog} --help`)")


def _flag(text: str) -> bool:
    return text.lower() in ("1", "true", "yes")


def parser_from_dataclass(cls, prog: str, description: str, skip: tuple[str, ...] = ()) -> ArgumentParser:
    """One ``--field`` option per bool/int/float/str field of dataclass ``cls`` (``X | None`` counts as ``X``)."""
    hints = typing.get_type_hints(cls)
    parser = ArgumentParser(prog=prog, description=description)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind = hints[f.name]
        kind = next((a for a in typing.get_args(kind) if a is not type(None)), kind)
        if kind not in (bool, int, float, str):
            continue  # dicts and lists are not command-line options
        parser.add_argument(f"--{f.name}", type=_flag if kind is bool else kind, default=f.default)
    return parser
