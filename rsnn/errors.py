"""The one-line error of the repository: bad input reported as one line (exit code 2), never as a
traceback. Imports nothing."""


class UserError(Exception):
    """Bad input: reported as one line (exit code 2), never as a traceback.

    last_words: after the line, nothing else is printed to stderr (a failed checkpoint write: orbax's
    writer threads then die at interpreter exit with "Event loop is closed" tracebacks)."""

    def __init__(self, *args, last_words: bool = False):
        super().__init__(*args)
        self.last_words = last_words
