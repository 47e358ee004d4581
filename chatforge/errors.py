"""Errors caused by the user's input. The CLI prints them as one line (no traceback) and exits non-zero."""


class UserError(Exception):
    """Bad input: the message names the file, line or field and what was expected."""
