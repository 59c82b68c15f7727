"""The one exception type that the CLI turns into a single line on stderr and exit code 2."""

import argparse


class UserError(Exception):
    """Bad input from the user: the message says what is wrong, where, and what to do."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad argument raises :class:`UserError` (one line, exit 2) instead of printing usage."""

    def error(self, message: str):
        raise UserError(f"{message} (see `{self.prog} --help`)")
