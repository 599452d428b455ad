"""The run folder itself, for both protocols: the folder a run trains in (a new one, a resumed one, or one
shared by the processes of a --distributed run), its lock (one process per folder), what a start over may
delete, the empty folder left by a refused run, and the one line of an interrupted run.

The rest of what a run folder is lives beside it, and its names are importable from here as before:
rsnn/run_marker.py (the marker, has_checkpoint, read_summary), rsnn/resume.py (parse_args: the flags of a
run and of a --resume), rsnn/checkpoints.py (orbax checkpoints), rsnn/run_log.py (config.json, metrics.csv,
batches.csv, summary.json, the figure, grad_fidelity.csv), rsnn/write_failures.py (a full disk in one line).

Imports no jax at module level, so that the task scripts prepare and lock their folder and answer a bad
--resume at once; imports nothing of the training code.
"""
from __future__ import annotations

import datetime
import os
import sys

from rsnn.distributed import distributed_started, is_main_process, sync_processes
from rsnn.errors import UserError
from rsnn.files import write_json
# the names of the modules beside this one, importable from here (callers use run_folder.X)
from rsnn.run_marker import (RUN_FILES, RUN_LOCK, RUN_MARKER, has_checkpoint, is_run_folder, listdir,
                             newest_checkpoint, read_summary)
from rsnn.resume import (NOT_FROM_SAVED, RESUME_MAY_CHANGE, args_from_checkpoint, check_config_matches_checkpoint,
                         check_resume_overrides, check_saved_values, checkpoint_config, parse_args)
from rsnn.checkpoints import (Checkpoints, check_no_stray_steps, quiet_orbax, rng_key_data, rng_key_like,
                              state_checksum, values_finite)
from rsnn.run_log import (GRAD_FIDELITY_FIELDS, GRAD_FIDELITY_FILE, OtherProcessRunLog, RunLog, epoch_of,
                          plot_learning_curves, read_grad_fidelity, rewrite_csv, run_log, write_grad_fidelity)
from rsnn.write_failures import WRITE_FAILURES, write_failure, write_failure_message

__all__ = [
    # this module
    'prepare_run_dir', 'prepare_shared_run_dir', 'prepare_own_run_dir', 'lock_run_dir', 'release_run_dir',
    'default_run_dir', 'claim_default_run_dir', 'escapes', 'check_inside_results', 'remove_if_unused',
    'interruption_message',
    # re-exported
    'RUN_FILES', 'RUN_LOCK', 'RUN_MARKER', 'has_checkpoint', 'is_run_folder', 'listdir', 'newest_checkpoint',
    'read_summary', 'NOT_FROM_SAVED', 'RESUME_MAY_CHANGE', 'args_from_checkpoint', 'check_config_matches_checkpoint',
    'check_resume_overrides', 'check_saved_values', 'checkpoint_config', 'parse_args', 'Checkpoints',
    'check_no_stray_steps', 'quiet_orbax', 'rng_key_data', 'rng_key_like', 'state_checksum', 'values_finite',
    'GRAD_FIDELITY_FIELDS', 'GRAD_FIDELITY_FILE', 'OtherProcessRunLog', 'RunLog', 'epoch_of',
    'plot_learning_curves', 'read_grad_fidelity', 'rewrite_csv', 'run_log', 'write_grad_fidelity',
    'WRITE_FAILURES', 'write_failure', 'write_failure_message',
]

# --------------------------------------------------------------------------------------------
# The folder: where it is, its lock, and what may be deleted
# --------------------------------------------------------------------------------------------


def prepare_run_dir(args) -> str:
    """The run folder, locked by this process until it ends. A fresh start refuses a folder that holds a
    run (resume it instead) or files this repository did not write; a run of ours stopped before its
    first checkpoint is started over: only its RUN_FILES and checkpoints/ are deleted."""
    if distributed_started():
        return prepare_shared_run_dir(args)
    return prepare_own_run_dir(args)


def prepare_shared_run_dir(args) -> str:
    """A --distributed run: one folder for every process, named by --out_dir (or --resume); process 0
    alone prepares, locks and writes it, the others wait until it has."""
    run_dir = args.resume or args.out_dir
    if not run_dir:
        raise UserError('--distributed needs --out_dir: one run folder, on a file system every host reaches')
    if is_main_process():
        prepare_own_run_dir(args)
    sync_processes('run folder prepared')
    return run_dir


def prepare_own_run_dir(args) -> str:
    run_dir = args.resume or args.out_dir or claim_default_run_dir(args)
    check_inside_results(args, run_dir)
    if not os.path.exists(run_dir):
        _created_here.add(os.path.abspath(run_dir))  # removed again if the run ends having written nothing
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise UserError(f'--out_dir {run_dir} is a file, not a folder; give a new or empty folder')
    ours = os.path.isdir(run_dir) and is_run_folder(run_dir)
    if not args.resume and not ours and set(listdir(run_dir)) - {RUN_LOCK}:
        raise UserError(f'--out_dir {run_dir} holds files that this repository did not write for a run (no '
                        f'{RUN_MARKER} there); nothing was changed: give a new or empty folder')
    try:
        os.makedirs(run_dir, exist_ok=True)
        lock_run_dir(run_dir)
    except OSError as e:
        if args.resume:  # a resumed run stays in its folder: --out_dir is no way out
            raise UserError(f'cannot write the run folder {run_dir}: {e.strerror or e}; nothing was changed: a '
                            f'resumed run writes in its own folder: make it writable, or copy it to a writable '
                            f'place and --resume the copy')
        raise UserError(f'cannot write the run folder {run_dir}: {e.strerror or e}; give a writable --out_dir')
    if not args.resume and has_checkpoint(run_dir):
        raise UserError(f'{run_dir} already holds a run; continue it with --resume {run_dir} '
                        f'or choose another --out_dir')
    stale = [n for n in ('checkpoints',) + RUN_FILES if os.path.exists(os.path.join(run_dir, n))]
    if not args.resume and stale:  # ours (checked above), stopped before its first checkpoint
        import shutil
        for name in stale:
            path = os.path.join(run_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        print(f'note: {run_dir} holds a run stopped before its first checkpoint; starting it over there with '
              f'its configuration (removed {", ".join(stale)})', file=sys.stderr, flush=True)
    if not os.path.exists(os.path.join(run_dir, RUN_MARKER)):
        write_json(os.path.join(run_dir, RUN_MARKER), dict(
            written_by='BrainScale experiments (this repository); marks a run folder that its scripts may '
                       'resume and clean', experiment=getattr(args, 'experiment', None),
            created=datetime.datetime.now().isoformat(timespec='seconds')))
    from rsnn import interrupts
    interrupts.set_describe(lambda signum: interruption_message(run_dir, signum))
    return run_dir


_held_lock = None  # the open lock file of the run folder this process trains in


def lock_run_dir(run_dir: str):
    """An exclusive flock on RUN_DIR/RUN_LOCK, held until this process ends (the OS releases it when the
    process dies, kill -9 included) or it prepares another run folder; another holder -> one error line."""
    import fcntl
    import socket
    global _held_lock
    release_run_dir()
    f = open(os.path.join(run_dir, RUN_LOCK), 'a+')
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or 'another process'
        f.close()
        raise UserError(f'{run_dir} is in use by {holder}; two processes must not write one run folder: wait '
                        f'for it to end (then --resume {run_dir}) or give another --out_dir')
    f.seek(0)
    f.truncate()
    f.write(f'process {os.getpid()} on {socket.gethostname()} since '
            f'{datetime.datetime.now().isoformat(timespec="seconds")}\n')
    f.flush()
    _held_lock = f


def release_run_dir():
    global _held_lock
    if _held_lock is not None:
        path = os.path.dirname(_held_lock.name)
        _held_lock.close()  # closing the file releases the flock
        _held_lock = None
        remove_if_unused(path)




def default_run_dir(args) -> str:
    stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
    return os.path.join('results', args.experiment, args.exp_name, f'{args.method}-{stamp}')


# --------------------------------------------------------------------------------------------
# Where a run may be, and what is left when it ends having written nothing
# --------------------------------------------------------------------------------------------

_created_here = set()  # absolute paths of the run folders this process created


def claim_default_run_dir(args) -> str:
    """default_run_dir, made by this process alone: two runs started in the same second get two folders
    (`<method>-<timestamp>`, then `-2`, `-3`, ...; os.mkdir fails for the second of two that race)."""
    base = default_run_dir(args)
    try:
        os.makedirs(os.path.dirname(base), exist_ok=True)
    except OSError as e:
        raise UserError(f'cannot create {os.path.dirname(base)}: {e.strerror or e}; give a writable --out_dir')
    for n in range(1, 1000):
        candidate = base if n == 1 else f'{base}-{n}'
        try:
            os.mkdir(candidate)
        except FileExistsError:
            continue
        except OSError as e:
            raise UserError(f'cannot create the run folder {candidate}: {e.strerror or e}; give a writable --out_dir')
        _created_here.add(os.path.abspath(candidate))
        return candidate
    raise UserError(f'{base} and 998 more folders of that name exist; give --out_dir')


def escapes(path: str) -> bool:
    """A relative path that leads out of the folder it is relative to ('..', 'a/../../b')."""
    return not os.path.isabs(path) and os.path.normpath(path).split(os.sep)[0] == '..'


def check_inside_results(args, run_dir: str):
    """An --out_dir that climbs out of the current folder with '..' is refused (an absolute path says where
    it means to go, and is taken as given); --exp_name is checked by its flag (rsnn.cli.exp_name_arg)."""
    out_dir = getattr(args, 'out_dir', None)
    if out_dir and not args.resume and escapes(out_dir):
        raise UserError(f"--out_dir {out_dir} leads out of the current folder ('..'); give it as an absolute path "
                        f'({os.path.abspath(out_dir)}) if that is where the run belongs')


def remove_if_unused(run_dir: str):
    """Remove a run folder this process created when it holds nothing but the marker and the lock (the run
    was refused, or interrupted, before writing anything): no empty run folders are left behind."""
    path = os.path.abspath(run_dir)
    if path not in _created_here or not os.path.isdir(path):
        return
    if not set(listdir(path)) <= {RUN_MARKER, RUN_LOCK, RUN_MARKER + '.tmp'}:
        return
    try:
        for name in listdir(path):
            os.remove(os.path.join(path, name))
        os.rmdir(path)
    except OSError:
        return
    _created_here.discard(path)


# what the operating system says when a write fails for want of space or permission (as OSError, or inside
# the text of orbax's and tensorstore's errors, which carry os_error_code)

def interruption_message(run_dir: str, signum: int) -> str:
    """The one line of a run stopped by SIGINT / SIGTERM: the real run folder and what it keeps."""
    import signal
    name = signal.Signals(signum).name
    step = newest_checkpoint(run_dir)
    if not os.path.isdir(run_dir):
        return f'interrupted ({name}) before the run wrote anything; nothing was kept (its empty folder {run_dir} was removed)'
    if step is not None:
        return f'interrupted ({name}): {run_dir} keeps its checkpoint of epoch {step}; continue with --resume {run_dir}'
    if os.path.exists(os.path.join(run_dir, 'config.json')):
        return (f'interrupted ({name}) before the first checkpoint of {run_dir}: nothing trained was kept; '
                f'--resume {run_dir} starts it over with its configuration')
    return (f'interrupted ({name}) before {run_dir} had a configuration or a checkpoint: nothing was kept; start it '
            f'again with its flags and --out_dir {run_dir}')
