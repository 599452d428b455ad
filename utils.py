"""What the three experiments share: arguments, device choice, the trainer for BPTT / D-RTRL /
ES-D-RTRL, orbax checkpoints, the run folder (config, metrics, summary, plots) and the epoch loop.

jax, brainstate and brainscale are imported inside the functions that need them, so that `--help` and
argument errors answer at once, before several seconds of imports.
"""
from __future__ import annotations

import argparse
import dataclasses
import csv
import datetime
import json
import math
import os
import sys
import time
from typing import Callable, Iterable, Optional

METHODS = ('bptt', 'diag', 'expsm_diag')
METHOD_NAMES = {'bptt': 'BPTT', 'diag': 'D-RTRL', 'expsm_diag': 'ES-D-RTRL'}
VJP_METHODS = {'t': 'single-step', 't_minus_1': 'multi-step'}
# The surrogate gradients of models.SURROGATES, named here so that building a parser imports no jax.
SURROGATE_NAMES = ('arctan', 'gaussian', 'multi_gaussian', 'piecewise_quadratic', 'relu', 'sigmoid', 'slayer')


class UserError(Exception):
    """Bad input: reported as one line (exit code 2), never as a traceback."""


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------


def decay_or_rank(text: str):
    """--etrace_decay: a float in (0, 1) is a decay; an integer >= 1 is a rank r (decay (r-1)/(r+1))."""
    try:
        value = float(text)
    except ValueError:
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
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f'must be >= 0, got {value}')
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a number, got {text!r}')
    if not value > 0:
        raise argparse.ArgumentTypeError(f'must be > 0, got {value}')
    return value


def base_parser(description: str, experiment: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.set_defaults(experiment=experiment)
    g = p.add_argument_group('learning algorithm')
    g.add_argument('--method', choices=METHODS, default='expsm_diag',
                   help='bptt = BPTT (exact, memory grows with T); diag = D-RTRL (brainscale '
                        'ParamDimVjpAlgorithm); expsm_diag = ES-D-RTRL (brainscale IODimVjpAlgorithm)')
    g.add_argument('--etrace_decay', type=decay_or_rank, default=0.99,
                   help='ES-D-RTRL smoothing: a decay in (0,1), or an integer rank r (decay (r-1)/(r+1))')
    g.add_argument('--vjp_time', choices=sorted(VJP_METHODS), default='t',
                   help="online VJP: t = brainscale 'single-step', t_minus_1 = 'multi-step'")
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
                   help=f'run folder (default results/{experiment}/<exp_name>/<method>-<timestamp>)')
    g.add_argument('--resume', default=None, metavar='RUN_DIR',
                   help='continue the run saved in RUN_DIR from its last checkpoint')
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
    once more, so the flags given on the command line win.
    """
    argv = list(argv)
    args = parser.parse_args(argv)
    defaults = {}
    if getattr(args, 'preset', None):
        defaults.update(presets[args.preset])
    run_dir = getattr(args, 'resume', None)
    if run_dir:
        saved = args_from_checkpoint(run_dir)
        defaults.update({k: v for k, v in saved.items() if k in vars(args) and k != 'resume'})
    if defaults:
        parser.set_defaults(**defaults)
        args = parser.parse_args(argv)
    if run_dir:
        if has_checkpoint(run_dir):
            args.resume = args.out_dir = run_dir
        else:  # interrupted before its first checkpoint: nothing to continue from
            print(f'note: {run_dir} has no checkpoint yet (stopped before its first epoch ended); '
                  f'starting it over in place with its saved configuration', file=sys.stderr, flush=True)
            args.resume, args.out_dir = None, run_dir
    return args


def has_checkpoint(run_dir: str) -> bool:
    """A completed checkpoint step in RUN_DIR/checkpoints/last (orbax renames a step's temporary
    folder to the bare step number when it is complete)."""
    last = os.path.join(run_dir, 'checkpoints', 'last')
    return os.path.isdir(last) and any(name.isdigit() for name in os.listdir(last))


def prepare_run_dir(args) -> str:
    """The run folder; refuses to write over an earlier run unless resuming it."""
    run_dir = args.resume or args.out_dir or default_run_dir(args)
    if not args.resume and os.path.isdir(os.path.join(run_dir, 'checkpoints')):
        if has_checkpoint(run_dir):
            raise UserError(f'{run_dir} already holds a run; continue it with --resume {run_dir} '
                            f'or choose another --out_dir')
        # a run stopped before its first checkpoint left only an empty start: begin again in place
        import shutil
        shutil.rmtree(os.path.join(run_dir, 'checkpoints'))
        for name in ('metrics.csv', 'summary.json', 'learning_curves.png', 'grad_fidelity.csv'):
            if os.path.exists(os.path.join(run_dir, name)):
                os.remove(os.path.join(run_dir, name))
        print(f'note: {run_dir} holds a run stopped before its first checkpoint; starting over there',
              file=sys.stderr, flush=True)
    os.makedirs(run_dir, exist_ok=True)
    return run_dir


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
# Trainer
# --------------------------------------------------------------------------------------------


def make_optimizer(name: str, lr, grad_clip: float):
    import optax
    if name == 'adam':
        opt = optax.adam(lr)
    elif name == 'sgd':
        opt = optax.sgd(lr)
    elif name == 'momentum':
        opt = optax.sgd(lr, momentum=0.9)
    else:
        raise UserError(f'unknown --optimizer {name!r}; choose adam, sgd or momentum')
    return optax.chain(optax.clip_by_global_norm(grad_clip), opt)


def step_schedule(lr: float, milestones: Iterable[int], batches_per_epoch: int, factor: float = 0.1):
    """lr times `factor` at each milestone epoch."""
    import optax
    milestones = [int(m) for m in milestones]
    if not milestones:
        return lr
    return optax.piecewise_constant_schedule(lr, {m * batches_per_epoch: factor for m in milestones})


def cosine_schedule(lr: float, total_steps: int, final_fraction: float = 0.01):
    """lr decaying along a half cosine to lr * final_fraction after total_steps updates."""
    import optax
    return optax.cosine_decay_schedule(lr, max(int(total_steps), 1), alpha=final_fraction)


def path_key(path) -> str:
    return '/'.join(str(p) for p in path)


class Trainer:
    """One training step of a brainstate network for BPTT, D-RTRL or ES-D-RTRL.

    A batch is xs (T, B, n_in), labels (B,), sample_mask (B,) and step_weights (T,). The loss is
    sum_t w_t * mean_b CE(readout_t, label) (samples with mask 0 are padding); accuracy is the argmax of
    the w-weighted average readout. BPTT differentiates that loss through a scan over time; the online
    methods run one step at a time through brainscale and sum the per-step gradients, inside one
    compiled function per batch.

    `devices` (a list of several jax devices) trains data parallel: a mesh with one axis 'batch'; the
    inputs, labels and mask, and every per-sample state (neuron states, eligibility traces: leading axis
    = batch) are split along the batch axis (NamedSharding, with_sharding_constraint after each reset),
    weights and optimizer state replicated; XLA (GSPMD) inserts the reductions of the loss and gradients.
    """

    def __init__(self, model, method: str, n_in: int, batch_size: int, *, optimizer='adam', lr=1e-3,
                 grad_clip=1.0, etrace_decay=0.99, vjp_time='t', loss='cel', weight_L2=0., devices=None):
        __import__('brainscale_adapter').adapt_brainscale()  # every change to brainscale 0.1.0: brainscale_adapter.py
        import brainscale
        import brainstate
        import jax.numpy as jnp
        if method not in METHODS:
            raise UserError(f'unknown --method {method!r}; choose one of {", ".join(METHODS)}')
        if loss not in ('cel', 'mse'):
            raise UserError(f"unknown --loss {loss!r}; choose cel or mse")
        self.model, self.method, self.batch_size, self.loss = model, method, batch_size, loss
        self.weight_L2 = weight_L2
        self.mesh = None
        if devices is not None and len(devices) > 1:
            import jax
            import numpy as np
            if batch_size % len(devices):
                raise UserError(batch_error(batch_size, len(devices), devices_name(devices)))
            self.mesh = jax.sharding.Mesh(np.array(devices), ('batch',))
        brainstate.nn.init_all_states(model, batch_size)
        self.params = model.states(brainstate.ParamState)
        self.algo = None
        if method != 'bptt':
            mode = brainstate.mixin.Batching()
            if method == 'diag':
                self.algo = brainscale.ParamDimVjpAlgorithm(model, mode=mode, vjp_method=VJP_METHODS[vjp_time])
            else:
                self.algo = brainscale.IODimVjpAlgorithm(model, decay_or_rank=etrace_decay, mode=mode,
                                                         vjp_method=VJP_METHODS[vjp_time])
            self.algo.compile_graph(jnp.zeros((batch_size, n_in), jnp.float32))
        self.tx = make_optimizer(optimizer, lr, grad_clip)
        self.opt_state = self.tx.init(self.param_values())
        self._train = brainstate.transform.jit(self._train_step)
        self._grads_jit = brainstate.transform.jit(self._loss_and_grads)
        self._eval = brainstate.transform.jit(self._eval_step)
        self._bptt_grads_jit = None
        self.place()

    # -- several devices ----------------------------------------------------------------------------
    def _sharding(self, *spec):
        import jax
        return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(*spec))

    def weights_sharding(self):
        """Where the weights live: replicated over the mesh, or the one device of the run."""
        import jax
        if self.mesh is not None:
            return self._sharding()
        return jax.sharding.SingleDeviceSharding(jax.config.jax_default_device or jax.devices()[0])

    def _state_sharding(self, value):
        """A per-sample state (leading axis = batch) is split across the devices; anything else replicated."""
        batched = getattr(value, 'ndim', 0) >= 1 and value.shape[0] == self.batch_size
        return self._sharding('batch') if batched else self._sharding()

    def sample_states(self, with_algo: bool = True) -> list:
        """Every state that is not a weight: the neurons' states and (online methods) the eligibility traces."""
        import brainstate
        node = self.algo if (with_algo and self.algo is not None) else self.model
        return [s for s in node.states().values() if not isinstance(s, brainstate.ParamState)]

    def _put(self, value, sharding):
        """A host value as a global array (each process gives the slices of its own devices)."""
        import jax
        import numpy as np
        value = np.asarray(value)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    def place(self):
        """Several devices: weights and optimizer state on every device, per-sample states split along the
        batch axis (at the start and after a checkpoint restore). One device: nothing to do."""
        if self.mesh is None:
            return
        import jax
        for s in self.params.values():
            s.value = jax.tree.map(lambda v: self._put(v, self._sharding()), s.value)
        self.opt_state = jax.tree.map(lambda v: self._put(v, self._sharding()), self.opt_state)
        for s in self.sample_states():
            s.value = jax.tree.map(lambda v: self._put(v, self._state_sharding(v)) if hasattr(v, 'shape') else v,
                                   s.value)

    def _constrain_states(self, with_algo: bool = True):
        """Inside a step, after a reset: keep the per-sample states split along the batch axis."""
        if self.mesh is None:
            return
        import jax
        for s in self.sample_states(with_algo):
            s.value = jax.tree.map(lambda v: jax.lax.with_sharding_constraint(v, self._state_sharding(v))
                                   if hasattr(v, 'shape') else v, s.value)

    def _replicated(self, tree):
        if self.mesh is None:
            return tree
        import jax
        return jax.lax.with_sharding_constraint(tree, self._sharding())

    def _device_batch(self, xs, labels, mask, ws):
        """The batch as the step's arguments: on several devices xs (T, B, ...) split along B."""
        if self.mesh is None:
            return xs, labels, mask, ws
        return (self._put(xs, self._sharding(None, 'batch')), self._put(labels, self._sharding('batch')),
                self._put(mask, self._sharding('batch')), self._put(ws, self._sharding()))

    # -- parameters ---------------------------------------------------------------------------
    def param_values(self) -> dict:
        return {path_key(k): s.value for k, s in self.params.items()}

    def set_param_values(self, values: dict):
        for k, s in self.params.items():
            s.value = values[path_key(k)]

    # -- loss -----------------------------------------------------------------------------------
    def _step_loss(self, out, labels, mask, w):
        import jax
        import jax.numpy as jnp
        if self.loss == 'cel':
            per_sample = -jnp.take_along_axis(jax.nn.log_softmax(out, -1), labels[:, None], -1)[:, 0]
        else:
            per_sample = jnp.mean((out - jax.nn.one_hot(labels, out.shape[-1])) ** 2, -1)
        return w * jnp.sum(mask * per_sample) / jnp.maximum(jnp.sum(mask), 1.)

    def _summaries(self, step_losses, weighted_outs, labels, mask, ws):
        import jax.numpy as jnp
        avg_out = weighted_outs.sum(0) / jnp.maximum(ws.sum(), 1e-12)
        correct = jnp.sum(mask * (jnp.argmax(avg_out, -1) == labels))
        return step_losses.sum(), correct / jnp.maximum(jnp.sum(mask), 1.)

    def _reset(self, batch, with_algo: bool = True):
        import brainstate
        brainstate.nn.reset_all_states(self.model, batch)
        if with_algo and self.algo is not None:
            self.algo.reset_state()
        self._constrain_states(with_algo)

    def _loss_and_grads(self, xs, labels, mask, ws, method=None):
        """The summed gradient, loss and accuracy of one batch by the trainer's method (or `method='bptt'`:
        BPTT's gradient from the same weights and initial states, for --check_grad)."""
        method = method or self.method
        if self.mesh is not None and method != 'bptt':
            import brainscale_adapter  # its D-RTRL gradient read must slice each device's part of the batch
            with brainscale_adapter.batch_shards(self.mesh):
                return self._loss_and_grads_traced(xs, labels, mask, ws, method)
        return self._loss_and_grads_traced(xs, labels, mask, ws, method)

    def _loss_and_grads_traced(self, xs, labels, mask, ws, method):
        xs = xs.astype('float32')
        self._reset(xs.shape[1], with_algo=method != 'bptt')
        grads, losses, wouts = GRADIENT_PATHS[method](self, xs, labels, mask, ws)
        loss, acc = self._summaries(losses, wouts, labels, mask, ws)
        return {path_key(k): g for k, g in grads.items()}, loss, acc

    def _forward_step(self, labels, mask):
        """One step of the plain forward pass: x_t, w_t -> (loss_t, w_t * readout_t)."""
        def step(x, w):
            out = self.model(x)
            return self._step_loss(out, labels, mask, w), w * out
        return step

    def _train_step(self, opt_state, xs, labels, mask, ws):
        import jax
        import jax.numpy as jnp
        import optax
        grads, loss, acc = self._loss_and_grads(xs, labels, mask, ws)
        values = self.param_values()
        if self.weight_L2:
            grads = jax.tree.map(lambda g, p: g + self.weight_L2 * p, grads, values)
        grad_norm = optax.global_norm(grads)
        updates, new_opt_state = self.tx.update(grads, opt_state, values)
        new_values = self._replicated(optax.apply_updates(values, updates))
        new_opt_state = self._replicated(new_opt_state)
        # A finite loss can still come with an infinite gradient norm, and then the clipped update is
        # NaN: refuse such an update inside the step (parameters and optimizer state stay as they were)
        # and report it, so that non-finite weights are never evaluated or saved.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        for leaf in jax.tree.leaves(new_values):
            finite = finite & jnp.all(jnp.isfinite(leaf))
        keep = lambda new, old: jnp.where(finite, new, old)
        self.set_param_values(jax.tree.map(keep, new_values, values))
        opt_state = jax.tree.map(keep, new_opt_state, opt_state)
        return opt_state, loss, acc, grad_norm, finite

    def _eval_step(self, xs, labels, mask, ws):
        import brainstate
        import jax.numpy as jnp
        xs = xs.astype(jnp.float32)
        brainstate.nn.reset_all_states(self.model, xs.shape[1])
        self._constrain_states(with_algo=False)

        forward = self._forward_step(labels, mask)

        def step(x, w):
            loss, wout = forward(x, w)
            # mean spikes per neuron of each layer over the real (unmasked) samples: the firing rates
            spikes = self.model.layer_spikes() if hasattr(self.model, 'layer_spikes') else []
            rates = [jnp.sum(mask * s.reshape(s.shape[0], -1).mean(-1)) / jnp.maximum(mask.sum(), 1.)
                     for s in spikes]
            return loss, wout, jnp.asarray(rates, jnp.float32).reshape(-1)

        losses, wouts, rates = brainstate.transform.for_loop(step, xs, ws)
        return (*self._summaries(losses, wouts, labels, mask, ws), rates.mean(0))

    # -- public -------------------------------------------------------------------------------
    def pad(self, xs, labels):
        """Pad a short batch to batch_size with masked samples (one compiled shape for all batches)."""
        import numpy as np
        n = xs.shape[1]
        mask = np.zeros(self.batch_size, np.float32)
        mask[:n] = 1.
        if n < self.batch_size:
            xs = np.concatenate([xs, np.zeros((xs.shape[0], self.batch_size - n) + xs.shape[2:], xs.dtype)], 1)
            labels = np.concatenate([labels, np.zeros(self.batch_size - n, labels.dtype)])
        elif n > self.batch_size:
            raise ValueError(f'batch of {n} > batch_size {self.batch_size}')
        return xs, labels, mask

    def train_step(self, xs, labels, ws):
        """One optimizer update; returns (loss, accuracy, gradient norm before clipping) as floats.

        An update whose loss, gradient norm or new parameters are not all finite is not applied (the
        parameters and optimizer state stay as they were) and `self.last_update_finite` becomes False."""
        xs, labels, mask = self.pad(xs, labels)
        self.opt_state, loss, acc, gnorm, finite = self._train(self.opt_state, *self._device_batch(xs, labels, mask, ws))
        self.last_update_finite = bool(finite)
        return float(loss), float(acc), float(gnorm)

    def gradients(self, xs, labels, ws) -> dict:
        """The summed gradient of one batch, without an update (for tests and diagnostics)."""
        xs, labels, mask = self.pad(xs, labels)
        grads, _, _ = self._grads_jit(*self._device_batch(xs, labels, mask, ws))
        return grads

    def loss_and_gradients(self, xs, labels, ws):
        """(loss, accuracy, summed gradient) of one batch, without an update."""
        xs, labels, mask = self.pad(xs, labels)
        grads, loss, acc = self._grads_jit(*self._device_batch(xs, labels, mask, ws))
        return float(loss), float(acc), grads

    def bptt_gradients(self, xs, labels, ws) -> dict:
        """BPTT's summed gradient of one batch from the same weights and initial states, whatever the
        trainer's method (the reference of --check_grad); the online trainer's compiled step and states
        are left as they are (every step resets the states)."""
        import brainstate
        if self._bptt_grads_jit is None:
            self._bptt_grads_jit = brainstate.transform.jit(
                lambda xs, labels, mask, ws: self._loss_and_grads(xs, labels, mask, ws, method='bptt'))
        xs, labels, mask = self.pad(xs, labels)
        grads, _, _ = self._bptt_grads_jit(*self._device_batch(xs, labels, mask, ws))
        return grads

    def evaluate(self, xs, labels, ws):
        """(loss, accuracy, number of samples) of one batch, forward only."""
        n = xs.shape[1]
        xs, labels, mask = self.pad(xs, labels)
        loss, acc, rates = self._eval(*self._device_batch(xs, labels, mask, ws))
        import numpy as np
        total, count = getattr(self, '_rate_sum', (0., 0))
        self._rate_sum = (total + np.asarray(rates, np.float64) * n, count + n)
        return float(loss), float(acc), n

    def pop_eval_rates(self) -> list:
        """Each layer's mean firing rate (spikes per neuron per step) over the batches evaluated since the
        last call."""
        total, count = getattr(self, '_rate_sum', (0., 0))
        self._rate_sum = (0., 0)
        return [float(r) for r in (total / count if count else [])]


# --------------------------------------------------------------------------------------------
# Checkpoints and the run folder
# --------------------------------------------------------------------------------------------


def bptt_gradients(trainer: Trainer, xs, labels, mask, ws):
    """BPTT: brainstate's grad of sum_t w_t loss_t through the whole sequence (layer after layer when the
    model has run_sequence: the input products of all steps out of the time loop). Returns the weight
    gradients, the per-step losses (T,) and the weighted readouts (T, B, n_out)."""
    import brainstate
    import jax

    def sequence_loss():
        if hasattr(trainer.model, 'run_sequence'):
            outs = trainer.model.run_sequence(xs)
            losses = jax.vmap(lambda o, w: trainer._step_loss(o, labels, mask, w))(outs, ws)
            wouts = ws[:, None, None] * outs
        else:
            losses, wouts = brainstate.transform.for_loop(trainer._forward_step(labels, mask), xs, ws)
        return losses.sum(), (losses, wouts)

    grads, _, (losses, wouts) = brainstate.transform.grad(
        sequence_loss, trainer.params, return_value=True, has_aux=True)()
    return grads, losses, wouts


def online_gradients(trainer: Trainer, xs, labels, mask, ws):
    """D-RTRL / ES-D-RTRL: one step at a time through the brainscale algorithm (which updates the
    eligibility traces and turns them into this step's weight gradient); the per-step gradients, losses
    and weighted readouts are summed as they come (running sums: memory constant in T). Returns the
    weight gradients, the summed loss (1,) and the summed weighted readout (1, B, n_out)."""
    import brainstate
    import jax
    import jax.numpy as jnp

    def step(acc, inp):
        x, w = inp

        def step_loss():
            out = trainer.algo(x)
            return trainer._step_loss(out, labels, mask, w), out

        g, loss, out = brainstate.transform.grad(step_loss, trainer.params, return_value=True, has_aux=True)()
        return jax.tree.map(jnp.add, acc, (g, loss, w * out)), None

    out = brainstate.transform.StatefulFunction(trainer.model).get_out_shapes(xs[0])[0]
    zeros = jax.tree.map(jnp.zeros_like, ({k: s.value for k, s in trainer.params.items()},
                                          jnp.zeros(()), jnp.zeros(out.shape, out.dtype)))
    (grads, loss_sum, wout_sum), _ = brainstate.transform.scan(step, zeros, (xs, ws))
    return grads, loss_sum[None], wout_sum[None]


# How each --method computes a batch's gradient (Trainer._loss_and_grads looks it up once per trace).
GRADIENT_PATHS = {'bptt': bptt_gradients, 'diag': online_gradients, 'expsm_diag': online_gradients}


def rng_key_data(key):
    """The raw uint32 data of a PRNG key: brainstate >= 0.5 holds a typed key (dtype key<fry>), which
    cannot become a numpy array; older brainstate holds the raw uint32 array already."""
    import jax
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    return key


def rng_key_like(data, like):
    """`data` (raw key data) in the form of `like` (typed key or raw array)."""
    import jax
    if jax.dtypes.issubdtype(like.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(jax.numpy.asarray(data), impl=jax.random.key_impl(like))
    return data


class Checkpoints:
    """Orbax checkpoints of {params, opt_state, epoch, rng_key} + JSON meta in RUN_DIR/checkpoints/{last,best}.

    Orbax writes each step to a temporary folder and renames it when complete, and `last` keeps the two
    newest steps, so a process killed while saving still leaves a usable earlier checkpoint.
    """

    def __init__(self, run_dir: str):
        import orbax.checkpoint as ocp
        self.ocp = ocp
        root = os.path.abspath(os.path.join(run_dir, 'checkpoints'))
        self.last = ocp.CheckpointManager(os.path.join(root, 'last'),
                                          options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
        self.best = ocp.CheckpointManager(os.path.join(root, 'best'),
                                          options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))

    def save(self, trainer: Trainer, epoch: int, meta: dict, best: bool):
        import numpy as np
        import brainstate
        state = {'params': trainer.param_values(), 'opt_state': trainer.opt_state,
                 'epoch': np.asarray(epoch, np.int32),
                 # brainstate's global key (weight init, any stochastic layer); the data streams are
                 # seeded by (seed, epoch, batch) and need nothing else to continue identically
                 'rng_key': np.asarray(rng_key_data(brainstate.random.DEFAULT.value))}
        args = self.ocp.args.Composite(state=self.ocp.args.StandardSave(state),
                                       meta=self.ocp.args.JsonSave(meta))
        if not params_finite(trainer):
            raise RuntimeError(f'refusing to save non-finite weights as epoch {epoch}')
        managers = [self.last] + ([self.best] if best else [])
        for m in managers:
            m.save(epoch, args=args, force=True)
        for m in managers:
            m.wait_until_finished()

    def latest_epoch(self) -> Optional[int]:
        return self.last.latest_step()

    def restore(self, trainer: Trainer, which: str = 'last'):
        """Load params and optimizer state into `trainer`; returns (epoch, meta)."""
        import jax
        manager = self.last if which == 'last' else self.best
        step = manager.latest_step()
        if step is None:
            raise UserError(f'no checkpoint in {manager.directory}')
        import brainstate
        target = {'params': trainer.param_values(), 'opt_state': trainer.opt_state,
                  'epoch': jax.numpy.asarray(0, jax.numpy.int32),
                  'rng_key': jax.numpy.asarray(rng_key_data(brainstate.random.DEFAULT.value))}
        # restored onto this run's devices (replicated there), whichever devices saved the checkpoint
        where = trainer.weights_sharding()
        abstract = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=where), target)
        restored = manager.restore(step, args=self.ocp.args.Composite(
            state=self.ocp.args.StandardRestore(abstract), meta=self.ocp.args.JsonRestore()))
        trainer.set_param_values(restored['state']['params'])
        trainer.opt_state = restored['state']['opt_state']
        trainer.place()  # on the devices of this run, whichever devices saved it
        brainstate.random.DEFAULT.value = rng_key_like(restored['state']['rng_key'], brainstate.random.DEFAULT.value)
        return int(restored['state']['epoch']), dict(restored['meta'])

    def close(self):
        self.last.close()
        self.best.close()


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
        """Drop rows newer than the checkpoint we resume from (written after it, then interrupted)."""
        rows = [r for r in self.read_metrics() if r['epoch'] <= epoch]
        if os.path.exists(self.metrics_path):
            os.remove(self.metrics_path)
        for r in rows:
            self.append(r)
        batch_rows = [r for r in read_csv(self.batches_path) if int(r['epoch']) <= epoch]
        if os.path.exists(self.batches_path):
            os.remove(self.batches_path)
        for r in batch_rows:
            self.append_batch(r)

    def append_batch(self, row: dict):
        """One training batch (not synced: a crash loses at most the rows of the last epoch, which the
        resume drops anyway)."""
        append_csv_row(self.batches_path, row, sync=False)

    def append(self, row: dict):
        append_csv_row(self.metrics_path, row, sync=True)

    def write_summary(self, summary: dict):
        write_json(os.path.join(self.run_dir, 'summary.json'), summary)


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
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)


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
        ax.set_ylabel(f"cosine({METHOD_NAMES.get(fidelity[0]['method'], '')} gradient, BPTT gradient)")
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
    fig.savefig(path, dpi=100)
    plt.close(fig)


GRAD_FIDELITY_FILE = 'grad_fidelity.csv'
GRAD_FIDELITY_FIELDS = ['epoch', 'method', 'weight', 'shape', 'cosine', 'norm_ratio', 'sign_agreement']


def grad_fidelity(trainer: Trainer, xs, labels, ws) -> list:
    """Each weight's gradient on one batch by the trainer's online method against BPTT's, from the same
    weights and initial states: rows of weight name, shape, cosine, norm ratio (online / BPTT) and sign
    agreement (the fraction of the elements where BPTT's gradient is not 0 that have its sign)."""
    import jax
    import numpy as np
    online = jax.tree_util.tree_flatten_with_path(trainer.gradients(xs, labels, ws))[0]
    reference = jax.tree.leaves(trainer.bptt_gradients(xs, labels, ws))
    rows = []
    for (path, g), r in zip(online, reference):
        shape = np.shape(g)
        g, r = np.asarray(g, np.float64).ravel(), np.asarray(r, np.float64).ravel()
        ng, nr = np.linalg.norm(g), np.linalg.norm(r)
        nz = r != 0
        rows.append(dict(method=trainer.method,
                         weight='/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path),
                         shape='x'.join(str(d) for d in shape),
                         cosine=float(np.clip(g @ r / (ng * nr), -1, 1)) if ng > 0 and nr > 0 else float('nan'),
                         norm_ratio=float(ng / nr) if nr > 0 else float('nan'),
                         sign_agreement=float(np.mean(np.sign(g[nz]) == np.sign(r[nz]))) if nz.any() else float('nan')))
    return rows


def read_grad_fidelity(path: str) -> list:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [dict(r, epoch=int(r['epoch']), cosine=float(r['cosine']), norm_ratio=float(r['norm_ratio']),
                     sign_agreement=float(r['sign_agreement'])) for r in csv.DictReader(f)]


def write_grad_fidelity(path: str, rows: list, append: bool = True):
    new = not (append and os.path.exists(path))
    with open(path, 'w' if new else 'a', newline='') as f:
        w = csv.DictWriter(f, fieldnames=GRAD_FIDELITY_FIELDS)
        if new:
            w.writeheader()
        w.writerows(rows)


def grad_check_every(args) -> int:
    """Epochs between gradient checks (0 = none): --check_grad_every N, or 1 with --check_grad alone."""
    every = getattr(args, 'check_grad_every', None)
    if every is None and getattr(args, 'check_grad', False):
        every = 1
    return every or 0


def args_from_checkpoint(run_dir: str) -> dict:
    path = os.path.join(run_dir, 'config.json')
    if not os.path.exists(path):
        if os.path.isdir(os.path.join(run_dir, 'checkpoints')):
            raise UserError(f'--resume {run_dir}: no checkpoint and no config.json there (stopped while '
                            f'starting); start it again with its flags and --out_dir {run_dir}')
        raise UserError(f'--resume {run_dir}: no checkpoint there (expected {run_dir}/config.json and '
                        f'{run_dir}/checkpoints/last); give the folder of an earlier run')
    with open(path) as f:
        return json.load(f)


# --------------------------------------------------------------------------------------------
# The epoch loop
# --------------------------------------------------------------------------------------------


def fit(args, trainer: Trainer, run_dir: str, train_batches: Callable[[int], Iterable],
        test_batches: Callable[[], Iterable], step_weights, *, acc_th: Optional[float] = None,
        smooth: int = 20, extra_config: Optional[dict] = None) -> dict:
    """Train for args.epochs epochs (or until the smoothed training accuracy reaches acc_th).

    train_batches(epoch) yields (xs, labels) numpy batches; test_batches() the held-out ones.
    Writes config.json, metrics.csv, learning_curves.png, checkpoints and summary.json into run_dir.
    """
    import numpy as np
    from tqdm import tqdm

    log = RunLog(run_dir)
    config = dict(vars(args), run_dir=run_dir, **(extra_config or {}))
    check_every = grad_check_every(args)
    if check_every and args.method == 'bptt':
        print('note: --check_grad compares an online method with BPTT; with --method bptt there is nothing to '
              'compare (no grad_fidelity.csv)', file=sys.stderr, flush=True)
        check_every = 0
    fidelity_path = os.path.join(run_dir, GRAD_FIDELITY_FILE)
    check_batch = []

    def check_gradients(epoch):
        """--check_grad: the online gradient against BPTT's on the first test batch, one row per weight."""
        if not check_batch:
            check_batch.append(next(iter(test_batches())))
        xs, labels = check_batch[0]
        rows = [dict(r, epoch=epoch) for r in grad_fidelity(trainer, np.asarray(xs), np.asarray(labels), step_weights)]
        write_grad_fidelity(fidelity_path, rows)
        worst = min(rows, key=lambda r: r['cosine'] if math.isfinite(r['cosine']) else 2.)
        print(f"gradient check, epoch {epoch}: cosine with BPTT {min(r['cosine'] for r in rows):.4f} "
              f"({worst['weight']}) to {max(r['cosine'] for r in rows):.4f}, norm ratio "
              f"{min(r['norm_ratio'] for r in rows):.3g} to {max(r['norm_ratio'] for r in rows):.3g} "
              f"({fidelity_path})", flush=True)
    ckpt = None
    start_epoch, best_test_acc, recent = 1, -1.0, []
    seconds_before = 0.
    try:
        ckpt = Checkpoints(run_dir)
        if args.resume:
            done, meta = ckpt.restore(trainer)
            finished = finished_because(meta, done, args.epochs)
            if finished:
                print(f'{run_dir} is finished ({finished}); nothing to train. '
                      f'Its results are in {run_dir}/summary.json'
                      + ('' if meta.get('stopped_because') == 'acc_th' else
                         f'; give --epochs N > {done} to train it further'), flush=True)
                summary = read_summary(run_dir)
                summary.setdefault('stopped_because', meta.get('stopped_because') or 'epochs')
                return dict(summary, finished=True)
            start_epoch = done + 1
            best_test_acc = meta.get('best_test_acc', -1.0)
            recent = list(meta.get('recent_train_acc', []))
            seconds_before = meta.get('seconds', 0.)
            log.truncate_after(done)
            kept = [r for r in read_grad_fidelity(fidelity_path) if r['epoch'] <= done]
            if kept or os.path.exists(fidelity_path):
                write_grad_fidelity(fidelity_path, kept, append=False)
            print(f'resumed {run_dir} after epoch {done}')
        # the configuration the run goes on with (a resume's overrides included): a later --resume reads it
        log.write_config(config)
        if check_every and start_epoch == 1:
            check_gradients(0)  # the initial weights
        stopped = 'epochs'
        t0 = time.time()
        metrics = log.read_metrics()
        # optimizer updates so far, the last `smooth` batch accuracies (acc_th), the compiling step's time
        progress = Progress(batches_done=int(metrics[-1].get('batches', 0)) if metrics else 0, recent=recent)
        train_loss = train_acc = float('nan')
        epoch = start_epoch - 1
        for epoch in range(start_epoch, args.epochs + 1):
            ep_t0 = time.time()
            batches = train_batches(epoch)
            bar = tqdm(total=len(batches) if hasattr(batches, '__len__') else None,
                       desc=f'epoch {epoch}/{args.epochs} [{args.method}]', disable=args.no_progress,
                       leave=False, dynamic_ncols=True)
            ep = train_epoch(trainer, batches, step_weights, log, progress, epoch=epoch, acc_th=acc_th,
                             smooth=smooth, bar=bar)
            bar.close()
            stopped = ep.stopped or 'epochs'
            losses, accs, gnorms, sizes = ep.losses, ep.accs, ep.gnorms, ep.sizes
            wait_s, step_s, timed_steps = ep.wait_s, ep.step_s, ep.timed_steps
            if stopped != 'nan' and not params_finite(trainer):
                stopped = 'nan'
            if stopped == 'nan':
                print(f'epoch {epoch}: the loss, the gradient norm or the weights became NaN or infinite; '
                      f'stopping (the last good checkpoint is kept)')
                epoch -= 1
                break
            n_batches = max(len(losses), 1)
            # per-sample means over the epoch, like test_loss and test_acc: batches weighted by their size
            train_loss = float(np.average(losses, weights=sizes)) if losses else float('nan')
            train_acc = float(np.average(accs, weights=sizes)) if accs else float('nan')
            trainer.pop_eval_rates()
            test_loss, test_acc = evaluate(trainer, test_batches(), step_weights)
            rates = trainer.pop_eval_rates()
            is_best = test_acc > best_test_acc
            best_test_acc = max(best_test_acc, test_acc)
            row = dict(epoch=epoch, batches=progress.batches_done, train_loss=train_loss, train_acc=train_acc, test_loss=test_loss,
                       test_acc=test_acc, grad_norm=float(np.mean(gnorms)) if gnorms else float('nan'),
                       seconds=time.time() - ep_t0, data_wait_s_per_batch=wait_s / n_batches,
                       step_s_per_batch=step_s / timed_steps if timed_steps else float('nan'),
                       **{f'rate_layer{i}': r for i, r in enumerate(rates)})
            if epoch == 1:
                warning = silence_warning(rates, losses, getattr(getattr(trainer.model, 'out', None), 'n_out', 0),
                                          getattr(trainer, 'loss', 'cel'))
                if warning:
                    print(warning, flush=True)
            log.append(row)
            metrics.append(row)
            if check_every and epoch % check_every == 0:
                check_gradients(epoch)
            meta = dict(best_test_acc=best_test_acc, recent_train_acc=progress.recent,
                        seconds=seconds_before + time.time() - t0, config=config,
                        stopped_because=stopped if stopped == 'acc_th' else None, epochs=args.epochs)
            ckpt.save(trainer, epoch, meta, best=is_best)
            print(f'epoch {epoch}: train loss {train_loss:.4f} acc {train_acc:.3f} | test loss {test_loss:.4f} '
                  f'acc {test_acc:.3f} | {row["step_s_per_batch"]:.3f} s/batch step, '
                  f'{row["data_wait_s_per_batch"]:.3f} s/batch data', flush=True)
            if stopped == 'acc_th':
                print(f'smoothed training accuracy {np.mean(progress.recent):.3f} >= acc_th {acc_th}: stopping')
                break
        plot_learning_curves(metrics, os.path.join(run_dir, 'learning_curves.png'),
                             f'{args.experiment} {METHOD_NAMES[args.method]}')
        last = metrics[-1] if metrics else {}
        summary = dict(method=args.method, epochs_run=int(last.get('epoch', 0)),
                       batches_run=int(last.get('batches', 0)),
                       train_acc=last.get('train_acc'), test_acc=last.get('test_acc'),
                       best_test_acc=best_test_acc if best_test_acc >= 0 else None,
                       smoothed_train_acc=float(np.mean(progress.recent)) if progress.recent else None,
                       stopped_because=stopped, seconds=seconds_before + time.time() - t0,
                       compile_and_first_step_s=progress.first_step_s,
                       step_s_per_batch=last.get('step_s_per_batch'), peak_rss_mb=peak_rss_mb(), run_dir=run_dir)
        log.write_summary(summary)
        return summary
    finally:
        if ckpt is not None:
            ckpt.close()


@dataclasses.dataclass
class Progress:
    """What the epochs of a run carry from one to the next."""
    batches_done: int = 0                  # optimizer updates so far (kept across a resume)
    recent: list = dataclasses.field(default_factory=list)  # the last batch accuracies (acc_th)
    first_step_s: Optional[float] = None   # the first step of this process: compilation included


@dataclasses.dataclass
class EpochStats:
    stopped: Optional[str] = None          # None, 'acc_th' or 'nan'
    losses: list = dataclasses.field(default_factory=list)
    accs: list = dataclasses.field(default_factory=list)
    gnorms: list = dataclasses.field(default_factory=list)
    sizes: list = dataclasses.field(default_factory=list)  # real samples per batch
    wait_s: float = 0.
    step_s: float = 0.
    timed_steps: int = 0


def train_epoch(trainer: Trainer, batches: Iterable, step_weights, log: RunLog, progress: Progress, *,
                epoch: int, acc_th: Optional[float], smooth: int, bar=None) -> EpochStats:
    """One epoch of optimizer updates: a batches.csv row per batch; stops early at a non-finite update
    ('nan') or when the mean accuracy of the last `smooth` batches reaches acc_th ('acc_th')."""
    import numpy as np
    ep = EpochStats()
    it = iter(batches)
    while True:
        tw = time.time()
        try:
            xs, labels = next(it)
        except StopIteration:
            break
        ts = time.time()
        ep.wait_s += ts - tw
        loss, acc, gnorm = trainer.train_step(np.asarray(xs), np.asarray(labels), step_weights)
        if progress.first_step_s is None:  # compilation happens here: keep it out of the per-batch time
            progress.first_step_s = time.time() - ts
        else:
            ep.step_s += time.time() - ts
            ep.timed_steps += 1
        if not math.isfinite(loss) or not getattr(trainer, 'last_update_finite', True):
            ep.stopped = 'nan'
            break
        ep.losses.append(loss)
        ep.accs.append(acc)
        ep.sizes.append(np.shape(labels)[0])  # real samples (a short batch is padded and masked)
        ep.gnorms.append(gnorm)
        progress.batches_done += 1
        log.append_batch(dict(epoch=epoch, batch=progress.batches_done, loss=loss, acc=acc, grad_norm=gnorm,
                              seconds=round(time.time() - ts, 4)))
        progress.recent = (progress.recent + [acc])[-smooth:]
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f'{loss:.4f}', acc=f'{acc:.3f}', acc_avg=f'{np.mean(progress.recent):.3f}')
        if acc_th is not None and len(progress.recent) == smooth and np.mean(progress.recent) >= acc_th:
            ep.stopped = 'acc_th'
            break
    return ep


SILENT_RATE = 1e-3


def silence_warning(rates: list, losses: list, n_classes: int, loss: str = 'cel') -> Optional[str]:
    """One line when a layer is (nearly) silent (< SILENT_RATE spikes per neuron per step at the first
    evaluation), or when the cross-entropy has stayed within 2 % of ln(n_classes) over the last batches of
    the first epoch (at least 20 batches); None otherwise."""
    silent = [(i, r) for i, r in enumerate(rates) if r < SILENT_RATE]
    if silent:
        i, r = silent[0]
        flag = '--ff_scale (input weights)' if i == 0 else '--rec_scale or --ff_scale'
        more = f' (layers {", ".join(str(j) for j, _ in silent)} are all below it)' if len(silent) > 1 else ''
        return (f'warning: layer {i} fires {r:.2e} spikes per neuron per step at the first evaluation '
                f'(< {SILENT_RATE:g}){more}: nothing reaches the readout; raise {flag}, or lower --V_th')
    if loss == 'cel' and n_classes > 1 and len(losses) >= 20:
        recent, chance = sum(losses[-10:]) / 10, math.log(n_classes)
        if abs(recent - chance) <= 0.02 * chance:
            return (f'warning: the training loss {recent:.4f} is still within 2 % of ln({n_classes}) = '
                    f'{chance:.4f} after the first epoch: the network has not learned; check --lr, '
                    f'--ff_scale / --rec_scale and the firing rates (rate_layer* in metrics.csv)')
    return None


def params_finite(trainer: Trainer) -> bool:
    """Every weight finite (checked on the host before a checkpoint is written)."""
    import jax
    import numpy as np
    return all(bool(np.all(np.isfinite(np.asarray(v)))) for v in jax.tree.leaves(trainer.param_values()))


def peak_rss_mb() -> Optional[float]:
    """The process's peak resident memory in MB (resource.getrusage; None where unavailable)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == 'darwin' else peak / 1024.  # bytes on macOS, KiB on Linux


def finished_because(meta: dict, done: int, epochs: int) -> Optional[str]:
    """Why a run whose last checkpoint is epoch `done` has nothing left to train, or None."""
    if meta.get('stopped_because') == 'acc_th':
        return f'it stopped at acc_th after epoch {done}'
    if done >= epochs:
        return f'it ran its last epoch, {done} of --epochs {epochs}'
    return None


def read_summary(run_dir: str) -> dict:
    path = os.path.join(run_dir, 'summary.json')
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def evaluate(trainer: Trainer, batches: Iterable, step_weights):
    total_loss = total_correct = total_n = 0.
    for xs, labels in batches:
        loss, acc, n = trainer.evaluate(xs, labels, step_weights)
        total_loss += loss * n
        total_correct += acc * n
        total_n += n
    if total_n == 0:
        return float('nan'), float('nan')
    return total_loss / total_n, total_correct / total_n
