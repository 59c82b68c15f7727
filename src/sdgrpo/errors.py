"""The one exception type that the CLI turns into a single line on stderr and exit code 2."""


class UserError(Exception):
    """Bad input from the user: the message says what is wrong, where, and what to do."""
