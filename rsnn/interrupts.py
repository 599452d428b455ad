"""Ctrl-C (SIGINT) and SIGTERM that always stop a run, within seconds, wherever they land.

Python raises KeyboardInterrupt wherever the main thread happens to be when the signal's handler runs; when
that is inside a garbage-collector callback (jax registers one, `_xla_gc_callback`), the exception is printed
as "Exception ignored in ..." and lost, and the run trains on. Here:

- the first signal raises `Interrupted` (a KeyboardInterrupt) at once AND records itself; `check()`, called
  by the training loop between updates and around evaluation, raises it again if it was lost;
- inside `deferred()` (a checkpoint being written) the first signal is only recorded and raised when the
  write is complete;
- a second signal, or the main thread still running GRACE_S seconds after the first (busy in a long
  compile, where no Python handler can run), ends the process at once (os._exit) with one line:
  checkpoints are written to a temporary folder and renamed when complete, so this is as safe as kill -9.

`install(describe)` is called once by the command-line entry (rsnn.cli.cli_main): tests that call a script's
main() in-process keep Python's default KeyboardInterrupt. No jax here.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from typing import Callable, Optional

GRACE_S = 10.   # seconds the run has, after the first signal, to stop by itself before it is ended at once

_requested: Optional[int] = None   # the signal received, if any
_deferring = 0                     # > 0 inside deferred()
_describe: Callable[[int], str] = lambda signum: f'interrupted ({signal.Signals(signum).name})'
_installed = False


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM: the run stops at once (or after the checkpoint being written)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def exit_code(signum: int) -> int:
    return 128 + int(signum)   # 130 for SIGINT, 143 for SIGTERM: what a shell reports for a killed process


def _handler(signum, frame):
    global _requested
    if _requested is not None:
        hard_exit(signum, 'a second signal')
    _requested = signum
    if not _deferring and not _swallowing(frame):
        raise Interrupted(signum)


def _swallowing(frame) -> bool:
    """Whether an exception raised at `frame` would be printed as 'Exception ignored' and lost: inside a
    garbage-collector callback (jax's _xla_gc_callback) or a __del__. The signal is then raised by the next
    check() instead."""
    import gc
    callbacks = {getattr(cb, '__code__', None) for cb in gc.callbacks}
    while frame is not None:
        if frame.f_code in callbacks or frame.f_code.co_name in ('__del__', '_xla_gc_callback'):
            return True
        frame = frame.f_back
    return False


def check():
    """Raise Interrupted if a signal arrived (its first KeyboardInterrupt may have been swallowed)."""
    if _requested is not None and not _deferring:
        raise Interrupted(_requested)


def requested() -> Optional[int]:
    return _requested


@contextlib.contextmanager
def deferred():
    """A signal inside this block is raised when the block is complete (a checkpoint being written)."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
    check()


def describe(signum: int) -> str:
    try:
        return _describe(signum)
    except Exception:  # the message must never stop the exit
        return f'interrupted ({signal.Signals(signum).name})'


_exiting = threading.Lock()     # held by the one caller of hard_exit that writes the line and ends the process


def hard_exit(signum: int, why: str):
    """Write the one line and end the process now. The handler (main thread), the watcher thread and its
    timer may all get here at once: the first writes and exits, any other waits for the exit."""
    if not _exiting.acquire(blocking=False):
        while True:
            time.sleep(1.)
    line = describe(signum)
    os.write(2, f'{line} (ended at once: {why})\n'.encode())
    os._exit(exit_code(signum))


def _watch(read_fd: int):
    """A thread that sees every signal even while the main thread is inside C code (a compile): a second
    signal, or GRACE_S seconds after the first, ends the process."""
    seen = 0
    while True:
        try:
            data = os.read(read_fd, 16)
        except OSError:
            return
        if not data:
            return
        for byte in data:
            if byte not in (signal.SIGINT, signal.SIGTERM):
                continue
            seen += 1
            if seen >= 2:
                hard_exit(byte, 'a second signal')
            timer = threading.Timer(GRACE_S, hard_exit, (byte, f'still running {GRACE_S:g} s after the signal'))
            timer.daemon = True
            timer.start()


def install(describe: Optional[Callable[[int], str]] = None):
    """SIGINT and SIGTERM handled as the module docstring says; `describe(signum)` gives the line printed on a
    hard exit. Call from the main thread."""
    global _describe, _installed
    if describe is not None:
        _describe = describe
    if _installed:
        return
    signal.signal(signal.SIGINT, _handler)
    signal.signal(signal.SIGTERM, _handler)
    try:
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        threading.Thread(target=_watch, args=(read_fd,), daemon=True, name='interrupt-watch').start()
    except (ValueError, OSError):  # not the main thread, or no pipes: the handler alone
        pass
    _installed = True


def reassert():
    """Install the handlers again (where install() was called): a library imported later (jax's, when it
    was imported before install) may have set SIGINT back to what the process started with."""
    if _installed:
        signal.signal(signal.SIGINT, _handler)
        signal.signal(signal.SIGTERM, _handler)


def set_describe(describe: Callable[[int], str]):
    global _describe
    _describe = describe
