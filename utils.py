"""What every part of the repository needs and nothing that trains: the one-line error (UserError), the
name lists (surrogates, models; the methods are the table of rsnn/methods.py), the flag validators and the
shared parser, device choice, the memory check and CSV/JSON writing.

It imports nothing of the project but the table of methods and no jax at module level (jax only inside the
device functions), so that `--help` and argument errors answer at once, before several seconds of imports.
What a run folder is (marker, lock, the resume's config, checkpoints) is rsnn/run_folder.py; the Trainer is
rsnn/trainer.py, the loop rsnn/train_loop.py.
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
# --trace_chunk: the largest K (the K measured fastest here, docs/chunked-traces.md) and the default, `auto`:
# the largest power of two K <= DEFAULT_TRACE_CHUNK whose K-step buffers (estimated by auto_trace_chunk)
# fit a memory budget, so that the chunks' speed never costs more memory than the rule's own state
# (docs/memory-and-speed.md#trace_chunk-auto).
DEFAULT_TRACE_CHUNK = 64
AUTO_CHUNK_BUDGET_MB = 192.      # ES-D-RTRL: the K-step buffers of auto at most this;
AUTO_CHUNK_TRACE_FRACTION = 0.3  # D-RTRL: at most this fraction of its traces (its step <= 1.3 x step by step's)
AUTO_CHUNK_FLOOR_MB = 32.        # ... but never less than this (small networks keep K = 64)
BUFFER_FLOATS_PER_STEP = 3       # floats per input and per hidden state and sample that a chunk keeps per step


def auto_trace_chunk(method: str, relations, batch: int) -> int:
    """The K of `--trace_chunk auto` for an online method on a network whose weight relations are
    `relations` [(n_in, n_out, S), ...] (layers..., readout), per device batch `batch`. The chunk keeps per
    step, per sample, about BUFFER_FLOATS_PER_STEP floats per input and per hidden state of every relation
    (the inputs, previous states, weight outputs, D, df, L, ...; measured against XLA's analysis in
    docs/memory-and-speed.md); K is the largest power of two <= DEFAULT_TRACE_CHUNK whose buffers fit
    AUTO_CHUNK_BUDGET_MB (ES-D-RTRL) or AUTO_CHUNK_TRACE_FRACTION of the traces (D-RTRL, at least
    AUTO_CHUNK_FLOOR_MB: its traces dominate its step anyway, and fewer, longer chunks stream them less).
    No jax: the memory command's parent calls it too."""
    per_step = 4. * BUFFER_FLOATS_PER_STEP * batch * sum(n_in + n_out * S for n_in, n_out, S in relations)
    budget = AUTO_CHUNK_BUDGET_MB * 2 ** 20
    if method == 'diag':
        traces = 4. * batch * sum((n_in + 1) * n_out * S for n_in, n_out, S in relations)
        budget = max(AUTO_CHUNK_FLOOR_MB * 2 ** 20, AUTO_CHUNK_TRACE_FRACTION * traces)
    K = 1
    while 2 * K <= DEFAULT_TRACE_CHUNK and 2 * K * per_step <= budget:
        K *= 2
    return K


def trace_chunk_arg(text):
    """--trace_chunk: 'auto' or a positive integer K."""
    if str(text).strip().lower() == 'auto':
        return 'auto'
    return positive_int(text)


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
    """--etrace_decay: a float in (0, 1) is a decay; an integer >= 2 is a rank r (decay (r-1)/(r+1)). Rank 1
    would be decay 0 (no smoothing: the traces vanish every step) and 1 (or 1.0) reads as rank 1: both are
    refused, as is any value that is not a decay strictly between 0 and 1 once converted."""
    expected = f'expected a decay strictly between 0 and 1 (such as 0.9) or an integer rank >= 2, got {text!r}'
    try:
        value = finite_float(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(expected)
    if value == 1:
        raise argparse.ArgumentTypeError(f'{text!r} is rank 1, which is decay 0 (the traces forgotten every step); '
                                         f'{expected[0].lower() + expected[1:]}')
    if value >= 2 and value == int(value):
        return int(value)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(expected)
    return value


def exp_name_arg(text: str) -> str:
    """--exp_name: a folder name under results/<experiment>/; one that leads out of it ('..', '../../x') is
    refused, an absolute path is taken as given."""
    text = str(text)
    if not text.strip():
        raise argparse.ArgumentTypeError('expected a name, got an empty one')
    if not os.path.isabs(text) and os.path.normpath(text).split(os.sep)[0] == '..':
        raise argparse.ArgumentTypeError(f"{text!r} leads out of results/<experiment>/ ('..'); give a name "
                                         f'without .., or an absolute --out_dir')
    return text


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
                drtrl_readout_filter=int(getattr(args, 'drtrl_readout_filter', 0) or 0),
                uoro_per_sample=int(getattr(args, 'uoro_per_sample', 0) or 0),
                fptt_alpha=getattr(args, 'fptt_alpha', None), fptt_window=getattr(args, 'fptt_window', None),
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
                   help='ES-D-RTRL smoothing: a decay strictly in (0,1), or an integer rank r >= 2 (decay (r-1)/(r+1))')
    g.add_argument('--vjp_time', choices=sorted(VJP_METHODS), default='t',
                   help="online VJP: t = brainscale 'single-step', t_minus_1 = 'multi-step'")
    g.add_argument('--trace_chunk', type=trace_chunk_arg, default=None, metavar='K',
                   help='online methods: the eligibility traces K time steps at a time, with the same gradient '
                        '(docs/chunked-traces.md); 1 = brainscale step by step (the least memory); auto = the '
                        f'largest power of two K <= {DEFAULT_TRACE_CHUNK} whose K-step buffers fit '
                        f'{AUTO_CHUNK_BUDGET_MB:g} MB (ES-D-RTRL) or {AUTO_CHUNK_TRACE_FRACTION:g} x the traces (D-RTRL); '
                        'default (None): auto for the networks of this repository with --vjp_time t on one '
                        'device, else 1')
    g.add_argument('--eprop_kappa', type=float, default=None,
                   help="e-prop: the low-pass filter of the eligibility traces, in [0, 1); default (None): the "
                        "readout's decay exp(-dt/tau_o); 0 with symmetric feedback = D-RTRL for one layer")
    g.add_argument('--eprop_feedback', choices=('symmetric', 'random'), default='symmetric',
                   help="e-prop: the readout error reaches the neurons through the readout weight (symmetric) "
                        "or a fixed random matrix of its shape and scale (random)")
    g.add_argument('--drtrl_readout_filter', type=int, choices=(0, 1), default=0,
                   help="D-RTRL: 1 = low-pass filter each layer trace with the readout's decay, adding the path "
                        "through the leaky readout that brainscale's D-RTRL drops (2x the layer traces; chunked "
                        "path only); 0 = the paper's algorithm")
    g.add_argument('--uoro_per_sample', type=int, choices=(0, 1), default=0,
                   help='UORO: 1 = one rank-1 estimate per sample (one theta~ per sample: O(B P) memory, the '
                        'variance averaged over the batch); 0 = one estimate for the whole batch (O(P))')
    g.add_argument('--fptt_alpha', type=nonneg_float, default=0.1,
                   help='FPTT: alpha of the dynamic regulariser (alpha/2)|theta - theta_bar|^2 - <theta, lambda> (0: plain windowed TBPTT)')
    g.add_argument('--fptt_window', type=positive_int, default=methods.FPTT_WINDOW, metavar='K',
                   help='FPTT on trials: steps per window, one update per window, states carried (on a stream: --update_every)')
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
                        'JAX_NUM_PROCESSES, JAX_PROCESS_ID); use with --devices all and one --out_dir every '
                        'host reaches (process 0 writes it). Not saved with the run: a resume runs on one '
                        'process unless given again (docs/devices.md)')
    g.add_argument('--n_data_worker', type=nonneg_int, default=0,
                   help='torch DataLoader worker processes preparing batches (0 = in the main process)')
    g.add_argument('--exp_name', type=exp_name_arg, default='default',
                   help="experiment name; part of the run folder (a name that leads out of results/ with '..' is refused)")
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


def json_value(value):
    return json.loads(json.dumps(value, default=str))


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
    """Run `main(argv)`; a UserError becomes one line on stderr and exit code 2; SIGINT (Ctrl-C) and SIGTERM
    stop it (rsnn/interrupts.py) with the one line the script set (interrupts.set_describe: the run folder and
    what it keeps) and exit code 130 / 143."""
    import signal
    from rsnn import interrupts
    interrupts.install()
    try:
        code = main(sys.argv[1:])
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        code = 2
    except KeyboardInterrupt as e:
        signum = getattr(e, 'signum', signal.SIGINT)
        print(interrupts.describe(signum), file=sys.stderr, flush=True)
        code = interrupts.exit_code(signum)
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


DISTRIBUTED_ENV = ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES')  # set by hand for several processes


def wants_distributed(argv) -> bool:
    """--distributed on the command line, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES (> 1) set. Read
    from argv itself (no parsing), so that a task script can initialize before anything imports brainscale:
    braintools' initializers evaluate jnp at import, which starts a backend (jax 0.8)."""
    if any(a == '--distributed' for a in argv):
        return True
    n = os.environ.get('JAX_NUM_PROCESSES', '')
    return bool(os.environ.get('JAX_COORDINATOR_ADDRESS')) and (not n or n.strip() != '1')


def start_distributed(argv):
    """The task scripts' first line: jax.distributed.initialize() when wants_distributed(argv)."""
    if wants_distributed(argv):
        init_distributed()


def slurm_local_device_ids(env=None):
    """(local_device_ids for jax.distributed.initialize, a note or None) under SLURM. jax gives a process
    under SLURM only GPU number SLURM_LOCALID: right for one task per GPU, but one task per node would see
    1 of the node's GPUs. With one task on this node, every GPU of the node (SLURM_GPUS_ON_NODE, else
    CUDA_VISIBLE_DEVICES); JAX_LOCAL_DEVICE_IDS (a comma list) overrides both. (None, None): jax's choice."""
    env = os.environ if env is None else env
    given = env.get('JAX_LOCAL_DEVICE_IDS', '').strip()
    if given:
        try:
            return [int(v) for v in given.split(',') if v.strip()], None
        except ValueError:
            raise UserError(f'JAX_LOCAL_DEVICE_IDS={given!r}: give a comma list of device numbers (0,1,2,3)')
    if 'SLURM_JOB_ID' not in env or 'SLURM_LOCALID' not in env:
        return None, None
    per_node = (env.get('SLURM_NTASKS_PER_NODE') or env.get('SLURM_STEP_TASKS_PER_NODE')
                or env.get('SLURM_TASKS_PER_NODE') or '').split('(')[0].split(',')[0].strip()
    if per_node != '1':
        return None, (f'note: SLURM with {per_node or "several"} tasks per node: this process uses GPU '
                      f'{env["SLURM_LOCALID"]} of its node (SLURM_LOCALID; one task per GPU)')
    count = env.get('SLURM_GPUS_ON_NODE', '').strip()
    visible = [v for v in env.get('CUDA_VISIBLE_DEVICES', '').split(',') if v.strip()]
    n = int(count) if count.isdigit() else len(visible)
    if n < 1:
        return None, ('note: SLURM with one task per node, but neither SLURM_GPUS_ON_NODE nor '
                      'CUDA_VISIBLE_DEVICES says how many GPUs it has: jax gives this process one; set '
                      'JAX_LOCAL_DEVICE_IDS=0,1,... to use more')
    return list(range(n)), None


def init_distributed():
    """jax.distributed.initialize() for a multi-host run (once). TPU pods, SLURM and Open MPI are detected
    by jax; elsewhere JAX_COORDINATOR_ADDRESS (read by jax), JAX_NUM_PROCESSES and JAX_PROCESS_ID say
    who is who. Under SLURM with one task per node, the node's GPUs (slurm_local_device_ids)."""
    import jax
    if getattr(init_distributed, 'done', False):
        return
    kw = {}
    if os.environ.get('JAX_NUM_PROCESSES'):
        kw['num_processes'] = int(os.environ['JAX_NUM_PROCESSES'])
    if os.environ.get('JAX_PROCESS_ID'):
        kw['process_id'] = int(os.environ['JAX_PROCESS_ID'])
    ids, note = slurm_local_device_ids()
    if ids is not None:
        kw['local_device_ids'] = ids
    if note:
        print(note, file=sys.stderr, flush=True)
    try:
        jax.distributed.initialize(**kw)
    except (ValueError, RuntimeError) as e:
        raise UserError(f'--distributed: jax.distributed.initialize() failed ({str(e).splitlines()[0]}); '
                        f'set JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID')
    init_distributed.done = True


def distributed_started() -> bool:
    """jax.distributed was initialized by this process (init_distributed)."""
    return bool(getattr(init_distributed, 'done', False))


def is_main_process() -> bool:
    """False on the processes of a --distributed run other than process 0 (which alone writes the run
    folder). Imports no jax unless jax.distributed was initialized here."""
    if not distributed_started():
        return True
    import jax
    return jax.process_index() == 0


def sync_processes(name: str):
    """Every process of a --distributed run waits here for the others (nothing without one)."""
    if distributed_started():
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


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


def peak_rss_mb() -> Optional[float]:
    """The process's peak resident memory in MB (resource.getrusage; None where unavailable)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == 'darwin' else peak / 1024.  # bytes on macOS, KiB on Linux
