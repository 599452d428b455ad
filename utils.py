"""What every part of the repository needs and nothing that trains: the one-line error (UserError), the
name lists (methods, surrogates, models), the flag validators and the shared parser, the run folder, device
choice, and CSV/JSON writing.

It imports nothing of the project but the table of methods (rsnn/methods.py) and no jax at module level (jax only inside the device functions), so
that `--help` and argument errors answer at once, before several seconds of imports. The training code is
in training.py (the Trainer), train_loop.py (the epoch loop) and checkpoints.py (what a run writes).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import sys
from typing import Callable, Optional

from rsnn import methods

VJP_METHODS = {'t': 'single-step', 't_minus_1': 'multi-step'}
# The surrogate gradients of models.SURROGATES, named here so that building a parser imports no jax.
SURROGATE_NAMES = ('arctan', 'gaussian', 'multi_gaussian', 'piecewise_quadratic', 'relu', 'sigmoid', 'slayer')
# The recurrent layers of the image networks (models.SpikingStack); the --model choices.
MODEL_NAMES = ('lif-delta', 'alif-delta', 'lif-exp-cu')
# --trace_chunk's default: the online methods' traces this many steps at a time, the K measured fastest
# here (chunked_traces.py; docs/chunked-traces.md).
DEFAULT_TRACE_CHUNK = 64


class UserError(Exception):
    """Bad input: reported as one line (exit code 2), never as a traceback."""


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------


def finite_float(text: str) -> float:
    """A number that is not NaN or infinite (float() accepts 'nan' and 'inf')."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f'expected a number, got {text!r}')
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f'expected a finite number, got {text!r}')
    return value


def decay_or_rank(text: str):
    """--etrace_decay: a float in (0, 1) is a decay; an integer >= 1 is a rank r (decay (r-1)/(r+1))."""
    try:
        value = finite_float(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f'expected a decay in (0, 1) or an integer rank >= 1, got {text!r}')
    if value >= 1 and value == int(value):
        return int(value)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f'expected a decay in (0, 1) or an integer rank >= 1, got {text!r}')
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a positive integer, got {text!r}')
    if value <= 0:
        raise argparse.ArgumentTypeError(f'must be > 0, got {value}')
    return value


def nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected an integer >= 0, got {text!r}')
    if value < 0:
        raise argparse.ArgumentTypeError(f'must be >= 0, got {value}')
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f'must be > 0, got {value}')
    return value


def nonneg_float(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f'must be >= 0, got {value}')
    return value


def rule_options(args) -> dict:
    """The rules' own options (rsnn/rules/base.py RuleOptions.extra) from the parsed flags."""
    return dict(eprop_kappa=getattr(args, 'eprop_kappa', None),
                eprop_feedback=getattr(args, 'eprop_feedback', None) or 'symmetric',
                seed=int(getattr(args, 'seed', 0) or 0))


def base_parser(description: str, experiment: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.set_defaults(experiment=experiment)
    g = p.add_argument_group('learning algorithm')
    g.add_argument('--method', choices=methods.names(), default='expsm_diag',
                   help='the learning rule (rsnn/methods.py): ' + '; '.join(
                       f'{m.name} = {m.title} ({m.memory_order})' for m in methods.TABLE.values()))
    g.add_argument('--etrace_decay', type=decay_or_rank, default=0.99,
                   help='ES-D-RTRL smoothing: a decay in (0,1), or an integer rank r (decay (r-1)/(r+1))')
    g.add_argument('--vjp_time', choices=sorted(VJP_METHODS), default='t',
                   help="online VJP: t = brainscale 'single-step', t_minus_1 = 'multi-step'")
    g.add_argument('--trace_chunk', type=positive_int, default=None, metavar='K',
                   help='online methods: the eligibility traces K time steps at a time, with the same gradient '
                        '(docs/chunked-traces.md); 1 = brainscale step by step; default (None): '
                        f'{DEFAULT_TRACE_CHUNK} for the networks of this repository with --vjp_time t on one '
                        'device, else 1')
    g.add_argument('--eprop_kappa', type=float, default=None,
                   help="e-prop: the low-pass filter of the eligibility traces, in [0, 1); default (None): the "
                        "readout's decay exp(-dt/tau_o); 0 with symmetric feedback = D-RTRL for one layer")
    g.add_argument('--eprop_feedback', choices=('symmetric', 'random'), default='symmetric',
                   help="e-prop: the readout error reaches the neurons through the readout weight (symmetric) "
                        "or a fixed random matrix of its shape and scale (random)")
    g.add_argument('--optimizer', choices=('adam', 'sgd', 'momentum'), default='adam',
                   help='optax optimizer (standard Adam; momentum = SGD with momentum 0.9)')
    g.add_argument('--lr', type=positive_float, default=1e-3, help='learning rate')
    g.add_argument('--grad_clip', type=positive_float, default=1.0, help='global gradient-norm clip')
    g = p.add_argument_group('run')
    g.add_argument('--epochs', '--epoch', dest='epochs', type=positive_int, default=10,
                   help='maximum number of epochs (--epoch is the same flag)')
    g.add_argument('--batch_size', type=positive_int, default=128, help='trials/samples per batch')
    g.add_argument('--seed', type=int, default=0, help='seed of the weights and the data order')
    g.add_argument('--devices', default='0',
                   help="accelerator index to run on, or 'cpu'; an index that does not exist gives "
                        'a warning and the run goes on on the device that exists. A comma list (0,1,2,3) '
                        "or 'all' trains data parallel on several devices (the batch split across them; "
                        'CPU devices where there is no accelerator)')
    g.add_argument('--distributed', action='store_true',
                   help='several hosts: call jax.distributed.initialize() first (a TPU pod slice or a '
                        'SLURM/Open MPI cluster detect themselves; else set JAX_COORDINATOR_ADDRESS, '
                        'JAX_NUM_PROCESSES, JAX_PROCESS_ID); use with --devices all')
    g.add_argument('--n_data_worker', type=nonneg_int, default=0,
                   help='torch DataLoader worker processes preparing batches (0 = in the main process)')
    g.add_argument('--exp_name', default='default', help='experiment name; part of the run folder')
    g.add_argument('--out_dir', default=None,
                   help=f'run folder (default results/{experiment}/<exp_name>/<method>-<timestamp>): a new or empty '
                        'folder, or a run of this repository stopped before its first checkpoint')
    g.add_argument('--resume', default=None, metavar='RUN_DIR',
                   help='continue the run saved in RUN_DIR from its newest checkpoint that verifies; flags given '
                        'with it may change only the schedule, batching and devices (docs/run-folders.md)')
    g.add_argument('--no_progress', action='store_true', help='hide the progress bars')
    g = p.add_argument_group('gradient fidelity')
    g.add_argument('--check_grad', action='store_true',
                   help='before training and after every --check_grad_every epochs, compare the online '
                        "method's gradient of each weight with BPTT's on the first test batch (same weights, "
                        'same initial states): cosine, norm ratio, sign agreement in grad_fidelity.csv')
    g.add_argument('--check_grad_every', type=positive_int, default=None, metavar='N',
                   help='epochs between gradient checks (implies --check_grad; 1 when only --check_grad is given)')
    return p


def default_run_dir(args) -> str:
    stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
    return os.path.join('results', args.experiment, args.exp_name, f'{args.method}-{stamp}')


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
        defaults.update({k: v for k, v in saved.items() if k in vars(args) and k != 'resume'})
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


def json_value(value):
    return json.loads(json.dumps(value, default=str))


# --------------------------------------------------------------------------------------------
# The run folder: what identifies it, its lock, and what may be deleted
# --------------------------------------------------------------------------------------------

RUN_MARKER = '.brainscale-run'          # written into every run folder this repository creates
RUN_LOCK = '.brainscale-run.lock'       # flock()ed by the process that trains in the folder
# the files a run writes (besides config.json and checkpoints/): the only ones a start over deletes
RUN_FILES = ('metrics.csv', 'batches.csv', 'summary.json', 'learning_curves.png', 'grad_fidelity.csv')
# each dataset's script, to name it when a run is resumed with the other one
SCRIPT_OF_DATASET = {'dms': 'task-rsnn-long-term-dependency.py', 'nmnist': 'task-image-classification.py',
                     'shd': 'task-image-classification.py'}


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
    run_dir = args.resume or args.out_dir or default_run_dir(args)
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
        _held_lock.close()  # closing the file releases the flock
        _held_lock = None


def available_memory_bytes() -> Optional[int]:
    """Memory available to a new allocation (Linux MemAvailable; else the physical memory; None if unknown)."""
    try:
        with open('/proc/meminfo') as f:
            for line in f:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(parts: list):
    """parts: (flag, value, estimated bytes, what needs them); one error line for the first part that needs
    more memory than is available, before anything is allocated."""
    available = available_memory_bytes()
    if available is None:
        return
    for flag, value, need, what in parts:
        if need > available:
            raise UserError(f'{flag} {value}: {what} needs about {need / 2 ** 30:,.1f} GiB, more than the '
                            f'{available / 2 ** 30:,.1f} GiB of memory available here; lower {flag}')


def cli_main(main: Callable[[list], int]):
    """Run `main(argv)`; a UserError becomes one line on stderr and exit code 2."""
    try:
        code = main(sys.argv[1:])
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print('interrupted: the last checkpoint is kept; continue with --resume RUN_DIR', file=sys.stderr)
        code = 130
    sys.exit(code)


# --------------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------------


def device_name(device) -> str:
    return f'{device.platform}:{device.id}'


def select_device(spec: str):
    """Make the requested device jax's default and return it; one warning line when it is absent."""
    import jax
    spec = str(spec).strip().lower()
    if spec == 'cpu':
        device = jax.devices('cpu')[0]
    else:
        try:
            index = int(spec)
        except ValueError:
            raise UserError(f"--devices must be an accelerator index (0, 1, ...) or 'cpu', got {spec!r}")
        accelerators = [d for d in jax.devices() if d.platform != 'cpu']
        if 0 <= index < len(accelerators):
            device = accelerators[index]
        else:
            device = accelerators[0] if accelerators else jax.devices('cpu')[0]
            have = ', '.join(device_name(d) for d in accelerators) or 'no accelerator'
            print(f'warning: --devices {index} not found ({have}); running on {device_name(device)}',
                  file=sys.stderr, flush=True)
    jax.config.update('jax_default_device', device)
    return device


def parse_devices(spec):
    """--devices without jax: 'cpu', an index N (one device), 'all', or a list of distinct indices."""
    text = str(spec).strip().lower()
    if text in ('cpu', 'all'):
        return text
    try:
        indices = [int(p) for p in text.split(',') if p.strip()]
    except ValueError:
        indices = []
    if not indices or len(set(indices)) != len(indices) or min(indices) < 0:
        raise UserError(f"--devices must be an index (0, 1, ...), a comma list of distinct indices (0,1,2,3), "
                        f"'all' or 'cpu', got {spec!r}")
    return indices[0] if len(indices) == 1 else indices


def check_batch_for_devices(batch_size: int, spec):
    """One error line when --batch_size does not divide by the number of devices a --devices list names
    (checked before anything is written; 'all' is checked by the Trainer once the devices are known)."""
    devices = parse_devices(spec)
    if isinstance(devices, list) and batch_size % len(devices):
        raise UserError(batch_error(batch_size, len(devices), spec))


def batch_error(batch_size: int, n: int, spec) -> str:
    lower, upper = batch_size // n * n, (batch_size // n + 1) * n
    options = ' or '.join(str(b) for b in (lower, upper) if b > 0)
    return (f'--batch_size {batch_size} does not divide by the {n} devices of --devices {spec}: every device '
            f'takes an equal part of the batch; use a multiple of {n} ({options})')


def init_distributed():
    """jax.distributed.initialize() for a multi-host run (once). TPU pods, SLURM and Open MPI are detected
    by jax; elsewhere JAX_COORDINATOR_ADDRESS (read by jax), JAX_NUM_PROCESSES and JAX_PROCESS_ID say
    who is who."""
    import jax
    if getattr(init_distributed, 'done', False):
        return
    kw = {}
    if os.environ.get('JAX_NUM_PROCESSES'):
        kw['num_processes'] = int(os.environ['JAX_NUM_PROCESSES'])
    if os.environ.get('JAX_PROCESS_ID'):
        kw['process_id'] = int(os.environ['JAX_PROCESS_ID'])
    try:
        jax.distributed.initialize(**kw)
    except (ValueError, RuntimeError) as e:
        raise UserError(f'--distributed: jax.distributed.initialize() failed ({str(e).splitlines()[0]}); '
                        f'set JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID')
    init_distributed.done = True


def select_devices(spec, distributed: bool = False) -> list:
    """The devices a run trains on. 'cpu' and a single index behave as select_device (one device, with
    a warning and a fall-back when the index is absent). A comma list of indices, or 'all', names several
    devices: the accelerators, or the CPU devices where there is none (XLA_FLAGS=
    --xla_force_host_platform_device_count=N gives N); an absent index is an error. The first local one
    becomes jax's default device."""
    parsed = parse_devices(spec)
    if distributed:
        init_distributed()
    if parsed == 'cpu' or isinstance(parsed, int):
        return [select_device(spec)]
    import jax
    accelerators = [d for d in jax.devices() if d.platform != 'cpu']
    pool = accelerators or jax.devices('cpu')
    if parsed == 'all':
        devices = pool
    else:
        missing = [i for i in parsed if i >= len(pool)]
        if missing:
            have = ', '.join(device_name(d) for d in pool)
            hint = (f'give indices below {len(pool)} or --devices all' if accelerators else
                    f'for {max(parsed) + 1} CPU devices set XLA_FLAGS=--xla_force_host_platform_device_count='
                    f'{max(parsed) + 1} before starting')
            raise UserError(f'--devices {spec}: there is no device {missing[0]} here ({have}); {hint}')
        devices = [pool[i] for i in parsed]
    local = [d for d in devices if d.process_index == jax.process_index()]
    jax.config.update('jax_default_device', local[0])
    return devices


def devices_name(devices) -> str:
    return ','.join(device_name(d) for d in devices)


# --------------------------------------------------------------------------------------------
# Files of the run folder
# --------------------------------------------------------------------------------------------


def append_csv_row(path: str, row: dict, sync: bool):
    """Append one row (a header first when the file is new); sync=True also forces it to disk."""
    new = not os.path.exists(path)
    with open(path, 'a', newline='') as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)
        if sync:
            f.flush()
            os.fsync(f.fileno())


def read_csv(path: str) -> list:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def write_json(path: str, obj):
    """Strict JSON (NaN and infinities become null), written whole and then renamed over `path`."""
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(finite_or_null(obj), f, indent=2, default=str, allow_nan=False)
    os.replace(tmp, path)


def finite_or_null(obj):
    if isinstance(obj, dict):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_null(v) for v in obj]
    if isinstance(obj, float) or type(obj).__name__.startswith('float'):  # numpy floats too
        value = float(obj)
        return value if math.isfinite(value) else None
    return obj


def args_from_checkpoint(run_dir: str, parser: Optional[argparse.ArgumentParser] = None) -> dict:
    """The saved configuration of the run in RUN_DIR (config.json), after checking that the folder is a run
    of this repository, of this script (parser), and that every saved value passes its flag's check."""
    path = os.path.join(run_dir, 'config.json')
    if not os.path.isdir(run_dir):
        raise UserError(f'--resume {run_dir}: no checkpoint there (no such folder); give the folder of an earlier run')
    if not is_run_folder(run_dir):
        raise UserError(f'--resume {run_dir}: not a run folder of this repository (no {RUN_MARKER} and no '
                        f'checkpoint of ours); nothing there was changed')
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
    return saved


def check_saved_values(saved: dict, parser: argparse.ArgumentParser, path: str):
    """Each saved value as its flag would take it: a config.json edited by hand (or another script's)
    is refused in one line instead of training with a value the parser refuses."""
    datasets = [a.choices for a in parser._actions if a.dest == 'dataset']
    if datasets and 'dataset' in saved and saved['dataset'] not in datasets[0]:
        script = SCRIPT_OF_DATASET.get(saved.get('dataset'), 'the script that started it')
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


def peak_rss_mb() -> Optional[float]:
    """The process's peak resident memory in MB (resource.getrusage; None where unavailable)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == 'darwin' else peak / 1024.  # bytes on macOS, KiB on Linux
