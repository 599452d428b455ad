"""Runs of a task script as child processes, for the reproduction scripts (scripts/reproduce_*.py): the
state of a run folder, and one run (started or resumed) with its summary and the child's peak memory.

A folder is never deleted here: a run stopped before its first checkpoint is started over by the task
script itself, which removes only the files it writes (run_folder.prepare_run_dir) and refuses a folder that
holds anything else.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys

import utils

from rsnn import run_folder


def run_folder_state(run_dir: str) -> str:
    """'finished' (summary.json written), 'interrupted' (a checkpoint, no summary) or 'new'."""
    if os.path.exists(os.path.join(run_dir, 'summary.json')):
        return 'finished'
    last = os.path.join(run_dir, 'checkpoints', 'last')
    if os.path.isdir(last) and any(name.isdigit() for name in os.listdir(last)):
        return 'interrupted'
    return 'new'


def run_task(script: str, argv: list, run_dir: str, log_path: str, cwd: str) -> dict:
    """Run `script argv` (its output appended to log_path), wait for it, and return the summary.json it
    wrote into run_dir with the child's peak RSS ('peak_rss_mb', from wait4) added."""
    cmd = [sys.executable, script] + argv
    print('$', ' '.join(shlex.quote(c) for c in cmd[1:]), flush=True)
    with open(log_path, 'a') as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f'run failed (exit {code}); see {log_path}')
    summary = run_folder.read_summary(run_dir)
    if not summary:
        raise RuntimeError(f'{run_dir} holds no readable summary.json after the run; see {log_path}')
    summary['peak_rss_mb'] = usage.ru_maxrss / 1024.  # KiB on Linux
    return summary
