"""The one-line error of the repository: bad input reported as one line (exit code 2), never as a
traceback. Imports nothing but os and sys."""
import os
import sys


class UserError(Exception):
    """Bad input: reported as one line (exit code 2), never as a traceback.

    last_words: after the line, nothing else is printed to stderr (a failed checkpoint write: orbax's
    writer threads then die at interpreter exit with "Event loop is closed" tracebacks)."""

    def __init__(self, *args, last_words: bool = False):
        super().__init__(*args)
        self.last_words = last_words


class _LastWords:
    """Where the one line goes when stderr was silenced before it (see silence_until_exit)."""
    in_cli = False     # set by cli_main: this process ends with the line
    line_fd = None     # the original fd 2, kept while fd 2 points at /dev/null


def entering_cli():
    """cli_main's mark: a UserError ends this process, so stderr may be silenced until exit."""
    _LastWords.in_cli = True


def silence_until_exit():
    """Where the process is about to end with a UserError(last_words=True) whose cause keeps printing from
    other threads (orbax's writers print "Event loop is closed" tracebacks while the error unwinds, before
    the line is printed): fd 2 and sys.stderr go to /dev/null now, the original fd is kept for the line
    (line_stream). A no-op outside cli_main (a test calling main in-process keeps its stderr)."""
    if not _LastWords.in_cli or _LastWords.line_fd is not None:
        return
    sys.stderr.flush()
    _LastWords.line_fd = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    sys.stderr = open(os.devnull, 'w')


def line_stream():
    """Where cli_main prints the one line: the original stderr if silence_until_exit ran, else sys.stderr."""
    if _LastWords.line_fd is None:
        return sys.stderr
    return os.fdopen(_LastWords.line_fd, 'w', closefd=False)
