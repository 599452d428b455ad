"""Runs of a task script as child processes, for the reproduction scripts (scripts/reproduce_*.py): the
state of a run folder, and one run (started or resumed) with its summary and the child's peak memory; and
what ended a child process (an out-of-memory, a kill), for the memory command's workers.

A folder is never deleted here: a run stopped before its first checkpoint is started over by the task
script itself, which removes only the files it writes (run_folder.prepare_run_dir) and refuses a folder that
holds anything else.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys

from rsnn.files import write_json

from rsnn import run_folder


def run_folder_state(run_dir: str) -> str:
    """'finished' (summary.json written), 'interrupted' (a checkpoint, no summary) or 'new'."""
    if os.path.exists(os.path.join(run_dir, 'summary.json')):
        return 'finished'
    last = os.path.join(run_dir, 'checkpoints', 'last')
    if os.path.isdir(last) and any(name.isdigit() for name in os.listdir(last)):
        return 'interrupted'
    return 'new'


def die_with_parent():
    """For Popen(preexec_fn=...): the child gets SIGKILL when its parent dies (Linux prctl PR_SET_PDEATHSIG;
    nothing elsewhere), so a killed benchmark worker leaves no run behind that holds its run folder's lock."""
    import ctypes
    import signal
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_task(script: str, argv: list, run_dir: str, log_path: str, cwd: str, preexec_fn=None) -> dict:
    """Run `script argv` (its output appended to log_path), wait for it, and return the summary.json it
    wrote into run_dir with the child's peak RSS ('peak_rss_mb', from wait4) added. preexec_fn: Popen's
    (die_with_parent: the child dies with this process)."""
    cmd = [sys.executable, script] + argv
    sys.stdout.write('$ ' + ' '.join(shlex.quote(c) for c in cmd[1:]) + '\n')  # one write: runs side by side
    sys.stdout.flush()                                                          # do not interleave their lines
    with open(log_path, 'a') as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, preexec_fn=preexec_fn)
        _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f'run failed (exit {code}); see {log_path}')
    summary = run_folder.read_summary(run_dir)
    if not summary:
        raise RuntimeError(f'{run_dir} holds no readable summary.json after the run; see {log_path}')
    summary['peak_rss_mb'] = usage.ru_maxrss / 1024.  # KiB on Linux
    return summary



def run_or_resume(script: str, flags: list, run_dir: str, log_path: str, cwd: str, preexec_fn=None) -> dict:
    """One run of `script flags` in run_dir: a finished folder's summary as it is, an interrupted one resumed
    (`--resume run_dir`), a new one started. The summary gets 'command', the command that made the run (the
    flags as given, never the resume line), and is written back. A run stopped at a non-finite value
    (stopped_because 'nan') is a finished run."""
    state = run_folder_state(run_dir)
    if state == 'finished':
        return run_folder.read_summary(run_dir)
    argv = ['--resume', run_dir, '--no_progress'] if state == 'interrupted' else list(flags) + ['--out_dir', run_dir]
    try:
        summary = run_task(script, argv, run_dir, log_path, cwd, preexec_fn)
    except RuntimeError:
        # a run stopped by a non-finite loss or weight exits 1 after writing its summary: a result, not a crash
        summary = run_folder.read_summary(run_dir)
        if not summary or summary.get('stopped_because') != 'nan':
            raise
    summary['command'] = f'python {os.path.basename(script)} ' + ' '.join(shlex.quote(c) for c in flags)
    write_json(os.path.join(run_dir, 'summary.json'), summary)
    return summary

# What ended a child process: the memory command's workers


def classify_failure(text: str) -> str:
    """'OOM' for out-of-memory messages, else 'error'."""
    low = text.lower()
    keys = ('resource_exhausted', 'out of memory', 'memoryerror', 'cannot allocate memory', 'bad_alloc',
            'failed to allocate')  # not a bare 'oom': 'room' and 'zoom' are no out-of-memory errors
    return 'OOM' if any(k in low for k in keys) else 'error'


def one_line(text: str, limit: int = 300) -> str:
    lines = [l.strip() for l in str(text).strip().splitlines() if l.strip()]
    for l in reversed(lines):  # the last line that says what happened
        if not l.startswith(('File ', 'Traceback', '^', '~')) and 'site-packages' not in l:
            return l[:limit]
    return (lines[-1] if lines else '')[:limit]


def oom_kills():
    """The kernel's count of OOM kills so far (/proc/vmstat oom_kill, Linux >= 4.13; memory-cgroup kills
    included), or None where the system does not say."""
    try:
        with open('/proc/vmstat') as f:
            for line in f:
                if line.startswith('oom_kill '):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def killed_row(sig: int, oom_before, oom_after) -> dict:
    """The row of a worker that a signal ended: 'OOM' only when the kernel's OOM-kill count rose meanwhile;
    a kill by the user (or another process) is 'killed'."""
    if sig == 9 and oom_before is not None and oom_after is not None and oom_after > oom_before:
        return dict(status='OOM', reason='killed by the kernel OOM killer (/proc/vmstat oom_kill rose)')
    if sig == 9 and oom_before is not None and oom_after is not None:
        return dict(status='killed', reason='killed by SIGKILL from outside, not by the OOM killer '
                                            '(/proc/vmstat oom_kill unchanged)')
    if sig == 9:
        return dict(status='killed', reason='killed by SIGKILL (the OOM killer or a user: this system does not '
                                            'say which)')
    return dict(status='killed', reason=f'killed by signal {sig}')
