"""The one-line error of the repository: bad input reported as one line (exit code 2), never as a
traceback. Imports nothing."""


class UserError(Exception):
    """Bad input: reported as one line (exit code 2), never as a traceback."""
