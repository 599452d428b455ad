"""Everything a run folder is, for both protocols: what identifies it (the marker) and who writes it (the
lock), the flags a resume reads from it (config.json), the run log (config.json, metrics.csv, batches.csv,
summary.json), orbax checkpoints ({params, opt_state, epoch, rng_key} + a protocol's extra state + JSON meta,
checksummed, with the fallback past a damaged step), the learning-curve figure and the gradient-fidelity
file of --check_grad.

Imports no jax at module level (jax, brainstate and orbax where a checkpoint is written or read), so that the
task scripts prepare and lock their folder and answer a bad --resume at once. Works on any object with the
Trainer's `param_values()`, `set_param_values()`, `opt_state`, `weights_sharding()` and `place()`; imports
nothing of the training code.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import hashlib
import json
import logging
import os
import sys
from typing import Optional

import numpy as np

from rsnn.datasets import DATASETS
from rsnn import methods
from rsnn.distributed import distributed_started, is_main_process, sync_processes
from rsnn.errors import UserError
from rsnn.files import append_csv_row, json_value, read_csv, write_json


# --------------------------------------------------------------------------------------------
# The folder: what identifies it, its lock, and what may be deleted
# --------------------------------------------------------------------------------------------

RUN_MARKER = '.brainscale-run'          # written into every run folder this repository creates
RUN_LOCK = '.brainscale-run.lock'       # flock()ed by the process that trains in the folder
# the files a run writes (besides config.json and checkpoints/): the only ones a start over deletes
RUN_FILES = ('metrics.csv', 'batches.csv', 'summary.json', 'learning_curves.png', 'grad_fidelity.csv')


def has_checkpoint(run_dir: str) -> bool:
    """A completed checkpoint step in RUN_DIR/checkpoints/last (orbax renames a step's temporary
    folder to the bare step number when it is complete)."""
    last = os.path.join(run_dir, 'checkpoints', 'last')
    return os.path.isdir(last) and any(name.isdigit() for name in os.listdir(last))


def is_run_folder(run_dir: str) -> bool:
    """A folder this repository created for a run: it holds RUN_MARKER, or (runs made before the marker
    existed) a checkpoint and a config.json with the fields this repository writes."""
    if os.path.isfile(os.path.join(run_dir, RUN_MARKER)):
        return True
    if not has_checkpoint(run_dir):
        return False
    try:
        with open(os.path.join(run_dir, 'config.json')) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and {'run_dir', 'experiment', 'method', 'n_params'} <= set(config)


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


def listdir(path: str) -> list:
    return os.listdir(path) if os.path.isdir(path) else []


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


def newest_checkpoint(run_dir: str) -> Optional[int]:
    last = os.path.join(run_dir, 'checkpoints', 'last')
    steps = [int(n) for n in listdir(last) if n.isdigit()]
    return max(steps) if steps else None


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


def parse_args(parser: argparse.ArgumentParser, argv, presets: Optional[dict] = None) -> argparse.Namespace:
    """Parse argv with this precedence: flags on the command line > the saved config of --resume RUN_DIR
    > the values of --preset NAME (presets[NAME]) > the parser's defaults.

    A first parse (which also answers --help and rejects bad flags) finds --preset and --resume; the
    preset and the saved config then become the parser's defaults (`set_defaults`) and argv is parsed
    once more, so the flags given on the command line win. A resume may change only RESUME_MAY_CHANGE.
    """
    argv = list(argv)
    args = parser.parse_args(argv)
    defaults = {}
    if getattr(args, 'preset', None):
        defaults.update(presets[args.preset])
    run_dir = getattr(args, 'resume', None)
    saved = {}
    if run_dir:
        saved = args_from_checkpoint(run_dir, parser)
        defaults.update({k: v for k, v in saved.items() if k in vars(args) and k not in NOT_FROM_SAVED})
    if defaults:
        parser.set_defaults(**defaults)
        args = parser.parse_args(argv)
    if run_dir:
        check_resume_overrides(args, saved, run_dir)
        if has_checkpoint(run_dir):
            args.resume = args.out_dir = run_dir
        else:  # interrupted before its first checkpoint: nothing to continue from; prepare_run_dir starts it
            args.resume, args.out_dir = None, run_dir  # over in place with its saved configuration
    return args


# Flags a resume never takes from the saved config.json: how this start is launched, not what the run is
# (a run trained with --distributed resumes on one process unless --distributed is given again).
NOT_FROM_SAVED = {'resume', 'distributed'}

# What a --resume may change: how long and where it trains (--stream_trials: a stream run goes on), how it shows progress, the learning-rate
# schedule and the batching. Everything else (method, network, task, data, seed, optimizer) is part of
# what the checkpoint means, and changing it is refused.
RESUME_MAY_CHANGE = {'epochs', 'lr', 'lr_schedule', 'lr_milestones', 'grad_clip', 'batch_size', 'batches_per_epoch',
                     'eval_batches', 'n_test_trials', 'acc_th', 'acc_th_window', 'devices', 'distributed',
                     'n_data_worker', 'no_progress', 'check_grad', 'check_grad_every', 'data_dir', 'cache_dir',
                     'exp_name', 'preset', 'stream_trials', 'eval_every_trials'}


def check_resume_overrides(args, saved: dict, run_dir: str):
    """One error line when a flag given with --resume changes what the checkpoint means, or names another
    run folder (--out_dir)."""
    out_dir = getattr(args, 'out_dir', None)
    if out_dir and out_dir != saved.get('out_dir') and os.path.realpath(out_dir) != os.path.realpath(run_dir):
        raise UserError(f'--resume {run_dir} --out_dir {out_dir}: a resumed run stays in its own folder; '
                        f'drop --out_dir (or copy {run_dir} to {out_dir} and resume the copy)')
    changed = [k for k, v in saved.items() if k in vars(args) and k not in RESUME_MAY_CHANGE | {'resume', 'out_dir'}
               and json_value(getattr(args, k)) != json_value(v)]
    if changed:
        k = changed[0]
        raise UserError(f'--resume {run_dir}: --{k} {getattr(args, k)} differs from the run\'s {saved[k]}; '
                        f'{", ".join("--" + c for c in changed)} cannot change in a resumed run (the checkpoint '
                        f'was trained with them); start a new run with another --out_dir instead')


def args_from_checkpoint(run_dir: str, parser: Optional[argparse.ArgumentParser] = None) -> dict:
    """The saved configuration of the run in RUN_DIR (config.json), after checking that the folder is a run
    of this repository, of this script (parser), and that every saved value passes its flag's check."""
    path = os.path.join(run_dir, 'config.json')
    if not os.path.isdir(run_dir):
        raise UserError(f'--resume {run_dir}: no checkpoint there (no such folder); give the folder of an earlier run')
    if not is_run_folder(run_dir):
        raise UserError(f'--resume {run_dir}: not a run folder of this repository (no {RUN_MARKER} and no '
                        f'checkpoint of ours); nothing there was changed')
    check_no_stray_steps(os.path.join(run_dir, 'checkpoints'), run_dir)
    if not os.path.exists(path) and checkpoint_config(run_dir) is not None:
        step, saved = checkpoint_config(run_dir)
        if parser is not None:
            check_saved_values(saved, parser, f'{run_dir}/checkpoints/last/{step}')
        print(f'note: {path} is missing; the configuration is taken from checkpoint last/{step} (it is written '
              f'back there when the run goes on)', file=sys.stderr, flush=True)
        return saved
    if not os.path.exists(path) and has_checkpoint(run_dir):
        raise UserError(f'--resume {run_dir}: config.json is missing and no checkpoint there holds a readable '
                        f'configuration; the run cannot be resumed: start a new run with another --out_dir')
    if not os.path.exists(path):
        if os.path.isdir(os.path.join(run_dir, 'checkpoints')):
            raise UserError(f'--resume {run_dir}: no checkpoint and no config.json there (stopped while '
                            f'starting); start it again with its flags and --out_dir {run_dir}')
        raise UserError(f'--resume {run_dir}: no checkpoint there (expected {run_dir}/config.json and '
                        f'{run_dir}/checkpoints/last); give the folder of an earlier run')
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f'--resume {run_dir}: {path} is not readable JSON ({str(e).splitlines()[0]}); '
                        f'repair it or start a new run')
    if not isinstance(saved, dict):
        raise UserError(f'--resume {run_dir}: {path} holds no configuration (a JSON object); repair it')
    if parser is not None:
        check_saved_values(saved, parser, path)
        check_config_matches_checkpoint(saved, run_dir, parser)
    return saved


def checkpoint_config(run_dir: str):
    """(step, config) of the newest step of checkpoints/last whose JSON meta is readable and holds the
    configuration the step was written under; None when there is none. Reads the meta file orbax writes
    (<step>/meta/metadata) directly: no jax."""
    last = os.path.join(run_dir, 'checkpoints', 'last')
    for step in sorted((int(n) for n in listdir(last) if n.isdigit()), reverse=True):
        try:
            with open(os.path.join(last, str(step), 'meta', 'metadata')) as f:
                meta = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict) and isinstance(meta.get('config'), dict):
            return step, meta['config']
    return None


def check_config_matches_checkpoint(saved: dict, run_dir: str, parser: argparse.ArgumentParser):
    """config.json against the configuration its newest checkpoint was written under: a flag that shapes
    the state (method, sizes, model, data, seed, optimizer: everything a resume may not change) that differs
    means config.json was edited, and is refused in one line naming the field and both values; the run is
    never continued as another run."""
    found = checkpoint_config(run_dir)
    if found is None:
        return
    step, written = found
    flags = {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings}
    for key, flag in flags.items():
        if key in RESUME_MAY_CHANGE or key in ('resume', 'out_dir', 'help') or key not in written:
            continue
        if json_value(saved.get(key)) != json_value(written[key]):
            raise UserError(f'--resume {run_dir}: config.json has {key} = {json.dumps(saved.get(key))} but checkpoint '
                            f'last/{step} was trained with {json.dumps(written[key])}; config.json was changed after '
                            f'the run: set "{key}": {json.dumps(written[key])} there again (or delete config.json: '
                            f'it is then recovered from the checkpoint), or start a new run for another {flag}')


def check_saved_values(saved: dict, parser: argparse.ArgumentParser, path: str):
    """Each saved value as its flag would take it: a config.json edited by hand (or another script's)
    is refused in one line instead of training with a value the parser refuses."""
    datasets = [a.choices for a in parser._actions if a.dest == 'dataset']
    if datasets and 'dataset' in saved and saved['dataset'] not in datasets[0]:
        script = (DATASETS[saved['dataset']].script if saved.get('dataset') in DATASETS else 'the script that started it')
        raise UserError(f'{os.path.dirname(path) or "."} is a run of --dataset {saved.get("dataset")}, which this '
                        f'script does not train; resume it with {script}')
    for action in parser._actions:
        if action.dest not in saved or action.dest in ('help', 'resume') or not action.option_strings:
            continue
        flag, value = action.option_strings[0], saved[action.dest]
        if value is None:
            if action.default is None:
                continue
            problem = 'has no value'
        elif action.choices is not None and value not in action.choices:
            problem = f'is not one of {", ".join(map(str, action.choices))}'
        elif isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            problem = None if isinstance(value, bool) else 'is not true or false'
        elif action.type is not None:
            text = ','.join(map(str, value)) if isinstance(value, list) else str(value)
            try:
                action.type(text)
                problem = None
            except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
                problem = f'is refused ({e})'
        else:
            problem = None
        if problem:
            raise UserError(f'{path}: {flag} {value!r} {problem}; correct it there or start a new run')


def read_summary(run_dir: str) -> dict:
    path = os.path.join(run_dir, 'summary.json')
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)




# --------------------------------------------------------------------------------------------
# Checkpoints and the run log
# --------------------------------------------------------------------------------------------

def rng_key_data(key):
    import jax
    """The raw uint32 data of a PRNG key: brainstate >= 0.5 holds a typed key (dtype key<fry>), which
    cannot become a numpy array; older brainstate holds the raw uint32 array already."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    return key


def rng_key_like(data, like):
    import jax
    """`data` (raw key data) in the form of `like` (typed key or raw array)."""
    if jax.dtypes.issubdtype(like.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(jax.numpy.asarray(data), impl=jax.random.key_impl(like))
    return data


class quiet_orbax:
    """`with quiet_orbax():` orbax's own ERROR log lines for a damaged file are kept out of the output: the
    one warning line about the damaged checkpoint is ours."""

    def __enter__(self):
        self.logger = logging.getLogger('absl')
        self.level = self.logger.level
        self.logger.setLevel(logging.CRITICAL)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)


class Checkpoints:
    """Orbax checkpoints of {params, opt_state, epoch, rng_key} (+ rule_state where the rule keeps state with the
    optimizer: FPTT) + JSON meta in RUN_DIR/checkpoints/{last,best}.

    Orbax writes each step to a temporary folder and renames it when complete, and `last` keeps the two
    newest steps, so a process killed while saving still leaves a usable earlier checkpoint.
    """

    def __init__(self, run_dir: str):
        root = os.path.abspath(os.path.join(run_dir, 'checkpoints'))
        check_no_stray_steps(root, run_dir)
        with quiet_orbax():
            self._open(root)

    def _open(self, root: str):
        import orbax.checkpoint as ocp
        self.last = ocp.CheckpointManager(os.path.join(root, 'last'),
                                          options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
        self.best = ocp.CheckpointManager(os.path.join(root, 'best'),
                                          options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))

    def save(self, trainer, epoch: int, meta: dict, best: bool, extra: dict = None):
        import brainstate
        import orbax.checkpoint as ocp
        """`extra`: arrays the protocol needs to go on (a stream: its states and traces, the chunk index,
        the partial test-period sums), saved and checksummed with the rest."""
        state = {'params': trainer.param_values(), 'opt_state': trainer.opt_state,
                 'epoch': np.asarray(epoch, np.int32),
                 # brainstate's global key (weight init, any stochastic layer); the data streams are
                 # seeded by (seed, epoch, batch) and need nothing else to continue identically
                 'rng_key': np.asarray(rng_key_data(brainstate.random.DEFAULT.value))}
        # what the rule keeps with the optimizer (FPTT's lambda, theta_bar): absent for the other rules
        rule_state = getattr(trainer, 'rule_state_values', dict)()
        if rule_state:
            state['rule_state'] = rule_state
        if extra is not None:
            state['extra'] = extra
        if not values_finite(trainer.param_values()):
            raise RuntimeError(f'refusing to save non-finite weights as epoch {epoch}')
        # a checksum of the arrays as saved: a resume verifies what it reads against it
        meta = dict(meta, state_sha256=state_checksum(state))
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                       meta=ocp.args.JsonSave(meta))
        managers = [self.last] + ([self.best] if best else [])
        import contextlib
        import io
        held = io.StringIO()  # what orbax's and tensorstore's threads print while writing (nothing, unless it fails)
        try:
            with quiet_orbax(), contextlib.redirect_stderr(held):
                try:
                    # one after the other, never sharing a barrier: on several processes, `last` and `best`
                    # saving the same step at once stopped orbax with "Barrier _async_write_complete.1 is
                    # already ongoing" (docs/devices.md, "Several hosts")
                    for m in managers:
                        m.save(epoch, args=args, force=True)
                        m.wait_until_finished()
                except Exception as e:
                    if write_failure(e) is None:
                        raise
                    # the run ends here: orbax's other writer threads fail the same way and would log it at exit
                    logging.getLogger('absl').setLevel(logging.CRITICAL)
                    for m in managers:
                        try:
                            m.wait_until_finished()
                        except Exception:
                            pass
                    run_dir = os.path.dirname(os.path.dirname(str(self.last.directory)))
                    raise UserError(write_failure_message(run_dir, e, f'the checkpoint of epoch {epoch} in '
                                                                      f'{os.path.dirname(str(self.last.directory))}'))
        except UserError:
            raise
        except BaseException:
            sys.stderr.write(held.getvalue())
            raise
        sys.stderr.write(held.getvalue())

    def restore(self, trainer, which: str = 'last', extra: dict = None):
        """Load params and optimizer state into `trainer` from the newest step that restores and matches
        its checksum, newest first; returns (epoch, meta). A damaged newer step is set aside (moved to
        checkpoints/damaged/) with one warning line, and steps newer than the one restored are dropped,
        since their epochs will be trained again. `extra` (what save was given, as targets of the right
        shapes) is updated in place with the restored values."""
        with quiet_orbax():
            return self._restore(trainer, which, extra)

    def _restore(self, trainer, which: str, extra: dict):
        import brainstate
        manager = self.last if which == 'last' else self.best
        steps = sorted(manager.all_steps(), reverse=True)
        if not steps:
            raise UserError(f'no checkpoint in {manager.directory}')
        damaged = []
        for step in steps:
            restored, problem = self.read_step(manager, trainer, step, extra)
            if problem is None:
                break
            damaged.append(step)
            print(f'warning: checkpoint {which}/{step} is damaged ({problem}); trying an older one',
                  file=sys.stderr, flush=True)
        else:
            raise UserError(f'no checkpoint in {manager.directory} restores and matches its checksum (steps '
                            f'{", ".join(map(str, steps))}); the run cannot be resumed: start a new one')
        if damaged:
            print(f'resuming from checkpoint {which}/{step}, the newest one that restores and verifies',
                  file=sys.stderr, flush=True)
        self.set_aside(damaged, step)
        trainer.set_param_values(restored['state']['params'])
        trainer.opt_state = restored['state']['opt_state']
        if 'rule_state' in restored['state']:
            trainer.set_rule_state_values(restored['state']['rule_state'])
        trainer.place()  # on the devices of this run, whichever devices saved it
        brainstate.random.DEFAULT.value = rng_key_like(restored['state']['rng_key'], brainstate.random.DEFAULT.value)
        if extra is not None:
            extra.update(restored['state']['extra'])
        return int(restored['state']['epoch']), dict(restored['meta'])

    @staticmethod
    def read_step(manager, trainer, step: int, extra: dict = None):
        import brainstate
        import jax
        import orbax.checkpoint as ocp
        """(restored, None), or (None, what is wrong) for a step whose files are damaged."""
        target = {'params': trainer.param_values(), 'opt_state': trainer.opt_state,
                  'epoch': np.asarray(0, np.int32),
                  'rng_key': np.asarray(rng_key_data(brainstate.random.DEFAULT.value))}
        rule_state = getattr(trainer, 'rule_state_values', dict)()
        if rule_state:
            target['rule_state'] = rule_state
        if extra is not None:
            target['extra'] = extra
        # restored onto this run's devices (replicated there), whichever devices saved the checkpoint
        where = trainer.weights_sharding()
        abstract = jax.tree.map(lambda v: jax.ShapeDtypeStruct(np.shape(v), v.dtype if hasattr(v, 'dtype') else np.asarray(v).dtype,
                                                       sharding=where),
                                target)
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        except Exception as e:  # truncated or emptied files fail in orbax, tensorstore or json, each its own way
            return None, f'{type(e).__name__}: {(str(e).strip().splitlines() or [""])[0][:200]}'

        expected = (restored['meta'] or {}).get('state_sha256')
        if not isinstance(restored['meta'], dict) or 'epoch' not in restored['state']:
            return None, 'its metadata is missing'
        if expected and state_checksum(restored['state']) != expected:
            return None, 'its arrays differ from the checksum saved with them'
        return restored, None

    def set_aside(self, damaged: list, restored_step: int):
        """Move damaged steps to checkpoints/damaged/ (kept for inspection, never read again) and delete
        the steps newer than the restored one in last/ and best/ (this run's own files: their epochs are
        trained again)."""
        if is_main_process():
            self._set_aside(damaged, restored_step)
        sync_processes('checkpoints set aside')
        for manager in (self.last, self.best):
            manager.reload()

    def _set_aside(self, damaged: list, restored_step: int):
        import shutil
        root = os.path.dirname(str(self.last.directory))
        for step in damaged:
            target = os.path.join(root, 'damaged', f'last-{step}')
            while os.path.exists(target):
                target += '+'
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(os.path.join(str(self.last.directory), str(step)), target)
        for manager in (self.last, self.best):
            for step in manager.all_steps():
                if step > restored_step and os.path.isdir(os.path.join(str(manager.directory), str(step))):
                    shutil.rmtree(os.path.join(str(manager.directory), str(step)))

    def close(self):
        with quiet_orbax():  # after a failed write orbax logs each thread's traceback again: ours is one line
            self.last.close()
            self.best.close()


def check_no_stray_steps(root: str, run_dir: str):
    """A file named like a checkpoint step (checkpoints/last/3 that is not a folder) was not written by a run:
    orbax would take it for a step, overwrite it or set it aside. Refused in one line before anything is read
    or written."""
    for which in ('last', 'best'):
        folder = os.path.join(root, which)
        for name in sorted(listdir(folder)):
            if name.isdigit() and not os.path.isdir(os.path.join(folder, name)):
                raise UserError(f'{os.path.join(folder, name)} is named like a checkpoint but is not one (a file, '
                                f'not a step folder); nothing was changed: move it out of {folder}, then start '
                                f'again (--resume {run_dir})')


class RunLog:
    """config.json, metrics.csv (one row per epoch, flushed), batches.csv (one row per training batch)
    and summary.json of a run folder."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.metrics_path = os.path.join(run_dir, 'metrics.csv')
        self.batches_path = os.path.join(run_dir, 'batches.csv')
        self.fields = None

    def write_config(self, config: dict):
        os.makedirs(self.run_dir, exist_ok=True)
        write_json(os.path.join(self.run_dir, 'config.json'), config)

    def read_metrics(self) -> list:
        if not os.path.exists(self.metrics_path):
            return []
        with open(self.metrics_path) as f:
            return [{k: float(v) if k != 'epoch' else int(v) for k, v in row.items()} for row in csv.DictReader(f)]

    def truncate_after(self, epoch: int):
        """Drop rows newer than the checkpoint we resume from (written after it, then interrupted). Each
        file is rewritten whole into a temporary file and renamed over the old one, so a kill at any moment
        leaves either the old rows or the new ones."""
        for path in (self.metrics_path, self.batches_path):
            rows = read_csv(path)
            kept = [r for r in rows if epoch_of(r) is not None and epoch_of(r) <= epoch]
            if len(kept) < len(rows):
                rewrite_csv(path, kept)

    def append_batch(self, row: dict):
        """One training batch (not synced: a crash loses at most the rows of the last epoch, which the
        resume drops anyway)."""
        append_csv_row(self.batches_path, row, sync=False)

    def append(self, row: dict):
        append_csv_row(self.metrics_path, row, sync=True)

    def write_summary(self, summary: dict):
        write_json(os.path.join(self.run_dir, 'summary.json'), summary)


class OtherProcessRunLog(RunLog):
    """The run log of a process other than 0 in a --distributed run: it writes nothing (process 0 writes
    the folder) and reads back only the rows it was given, never the files process 0 is writing."""

    def __init__(self, run_dir: str):
        super().__init__(run_dir)
        self.rows = []

    def write_config(self, config: dict):
        pass

    def read_metrics(self) -> list:
        return list(self.rows)

    def truncate_after(self, epoch: int):
        pass

    def append_batch(self, row: dict):
        pass

    def append(self, row: dict):
        self.rows.append(dict(row))

    def write_summary(self, summary: dict):
        pass


def run_log(run_dir: str) -> RunLog:
    """The run log this process keeps: process 0 (or the only one) writes the folder."""
    return RunLog(run_dir) if is_main_process() else OtherProcessRunLog(run_dir)


def epoch_of(row: dict) -> Optional[int]:
    """A CSV row's epoch, or None for a row cut short (a full disk) or not of this repository."""
    try:
        return int(row['epoch'])
    except (KeyError, TypeError, ValueError):
        return None


def rewrite_csv(path: str, rows: list):
    """Replace the rows of the CSV file at `path` (its header kept) atomically: tmp file, fsync, rename."""
    if not os.path.exists(path):
        return
    with open(path, newline='') as f:
        header = next(csv.reader(f), None)
    if header is None:
        return
    tmp = path + '.tmp'
    try:
        with open(tmp, 'w', newline='') as f:
            w = csv.DictWriter(f, fieldnames=header)
            w.writeheader()
            for row in rows:
                w.writerow(row)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


GRAD_FIDELITY_FILE = 'grad_fidelity.csv'
GRAD_FIDELITY_FIELDS = ['epoch', 'method', 'weight', 'shape', 'cosine', 'norm_ratio', 'sign_agreement']


def plot_learning_curves(metrics: list, path: str, title: str = ''):
    """loss and accuracy per epoch, train and test; with a grad_fidelity.csv next to `path`, a third
    panel: each weight's cosine between the online and the BPTT gradient over the epochs."""
    if not metrics:
        return
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    epochs = [r['epoch'] for r in metrics]
    fidelity = read_grad_fidelity(os.path.join(os.path.dirname(path) or '.', GRAD_FIDELITY_FILE))
    fig, axes = plt.subplots(1, 3 if fidelity else 2, figsize=(15 if fidelity else 10, 4))
    if fidelity:
        ax = axes[2]
        for weight in dict.fromkeys(r['weight'] for r in fidelity):
            rs = [r for r in fidelity if r['weight'] == weight]
            ax.plot([r['epoch'] for r in rs], [r['cosine'] for r in rs], marker='.', label=weight)
        ax.set_xlabel('epoch')
        ax.set_ylabel(f"cosine({methods.get(fidelity[0]['method']).title} gradient, BPTT gradient)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for key, ax in (('loss', axes[0]), ('acc', axes[1])):
        for split in ('train', 'test'):
            col = f'{split}_{key}'
            if col in metrics[0]:
                ax.plot(epochs, [r[col] for r in metrics], marker='.', label=split)
        ax.set_xlabel('epoch')
        ax.set_ylabel('accuracy' if key == 'acc' else 'loss')
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path + '.tmp.png'  # whole or not at all: a kill while drawing leaves the earlier figure
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def read_grad_fidelity(path: str) -> list:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [dict(r, epoch=int(r['epoch']), cosine=float(r['cosine']), norm_ratio=float(r['norm_ratio']),
                     sign_agreement=float(r['sign_agreement'])) for r in csv.DictReader(f)]


def write_grad_fidelity(path: str, rows: list, append: bool = True):
    if append and os.path.exists(path):
        with open(path, 'a', newline='') as f:
            csv.DictWriter(f, fieldnames=GRAD_FIDELITY_FIELDS).writerows(rows)
        return
    tmp = path + '.tmp'  # a new file or a rewrite on resume: whole, then renamed
    with open(tmp, 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=GRAD_FIDELITY_FIELDS)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def state_checksum(state) -> Optional[str]:
    import jax
    """sha256 of every array of a checkpoint's state (dtype, shape and bytes, in tree order); None where an
    array is split across hosts (orbax checks its own files there). A replicated array is read from this
    host's copy: the checksum of a run on several hosts is the one a single process computes."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(state):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            if not leaf.is_fully_replicated:
                return None
            leaf = leaf.addressable_data(0)
        a = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f'{a.dtype}{a.shape}'.encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def values_finite(values: dict) -> bool:
    import jax
    """Every weight finite (checked on the host before a checkpoint is written)."""
    return all(bool(np.all(np.isfinite(np.asarray(v)))) for v in jax.tree.leaves(values))
