"""The command lines' shared parts: the flag validators, the parser every task script starts from, the
rules' own options from the flags, and cli_main (a UserError as one line, Ctrl-C with what the run keeps).
Imports no jax, so that `--help` and argument errors answer at once."""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Callable

from rsnn import methods
from rsnn.chunk_policy import AUTO_CHUNK_BUDGET_MB, AUTO_CHUNK_TRACE_FRACTION, DEFAULT_TRACE_CHUNK
from rsnn.errors import UserError
from rsnn.methods import VJP_METHODS


def trace_chunk_arg(text):
    """--trace_chunk: 'auto' or a positive integer K."""
    if str(text).strip().lower() == 'auto':
        return 'auto'
    return positive_int(text)


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
                seed=int(getattr(args, 'seed', 0) or 0), trace_reset_every_steps=reset_steps(args))


def reset_steps(args):
    """--trace_reset_every H ms as steps of --dt (at least 1), or None (never)."""
    H = getattr(args, 'trace_reset_every', None)
    return None if H is None else max(1, int(round(H / float(getattr(args, 'dt', 1.) or 1.))))


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
    g.add_argument('--trace_reset_every', type=positive_float, default=None, metavar='H',
                   help='diag, expsm_diag, eprop, ottt, snap1: zero the eligibility traces every H ms of stream '
                        '(of the trial on trials), states untouched (an ablation of the trace\'s horizon); default: never')
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


def silence_stderr():
    """Send what is still printed to stderr (by threads, at interpreter exit) to /dev/null."""
    import os
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    sys.stderr = open(os.devnull, 'w')


def cli_main(main: Callable[[list], int]):
    """Run `main(argv)`; a UserError becomes one line on stderr and exit code 2; SIGINT (Ctrl-C) and SIGTERM
    stop it (rsnn/interrupts.py) with the one line the script set (interrupts.set_describe: the run folder and
    what it keeps) and exit code 130 / 143."""
    import signal
    from rsnn import errors, interrupts
    interrupts.install()
    errors.entering_cli()
    try:
        code = main(sys.argv[1:])
    except UserError as e:
        print(f'error: {e}', file=errors.line_stream(), flush=True)
        if e.last_words:
            silence_stderr()
        code = 2
    except KeyboardInterrupt as e:
        signum = getattr(e, 'signum', signal.SIGINT)
        print(interrupts.describe(signum), file=sys.stderr, flush=True)
        code = interrupts.exit_code(signum)
    sys.exit(code)
