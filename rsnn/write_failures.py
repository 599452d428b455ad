"""A write that failed in the middle of a run (disk full, read-only, permission): recognised as such, and
said in one line with what the run folder keeps and how to go on."""
from __future__ import annotations

import os
from typing import Optional

from rsnn.run_marker import newest_checkpoint

# what the operating system says when a write fails for want of space or permission (as OSError, or inside
# the text of orbax's and tensorstore's errors, which carry os_error_code)
WRITE_FAILURES = ('No space left', 'File too large', 'Read-only file system', 'Permission denied',
                  'Disk quota exceeded', 'os_error_code')


def write_failure(error: BaseException) -> Optional[str]:
    """The operating system's reason when `error` is a failed write (disk full, read-only, permission), else
    None."""
    import re
    if isinstance(error, OSError) and error.errno is not None:
        return error.strerror or os.strerror(error.errno)
    text = str(error)
    code = re.search(r"os_error_code='?(\d+)", text)
    if code:
        return os.strerror(int(code.group(1)))
    return next((w for w in WRITE_FAILURES if w in text), None)


def write_failure_message(run_dir: str, error: BaseException, what: str) -> str:
    """One line for a write that failed in the middle of a run: the path, the reason, what is kept, what to do."""
    path = getattr(error, 'filename', None) or what
    step = newest_checkpoint(run_dir)
    kept = (f'{run_dir} keeps its checkpoint of epoch {step} (and the log rows up to it); free space or make '
            f'it writable, then --resume {run_dir}' if step is not None else
            f'no checkpoint was complete yet, nothing trained was kept; free space or make it writable, then '
            f'--resume {run_dir} starts it over')
    return f'cannot write {path}: {write_failure(error)}; {kept}'
