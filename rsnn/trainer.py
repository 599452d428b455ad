"""One training step of a brainstate network for BPTT, D-RTRL or ES-D-RTRL: the optimizer, the learning-rate
schedules and the Trainer with the gradient path of each method.

brainscale 0.1.0 is adapted here, where it is first used for training (every change: brainscale_adapter.py).
"""
from __future__ import annotations

from typing import Iterable

import brainscale
import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rsnn import brainscale_adapter
from rsnn.rules import chunks as chunked_traces
from rsnn import recurrence
import utils
from rsnn import methods
from utils import VJP_METHODS, UserError, batch_error, devices_name

brainscale_adapter.adapt_brainscale()


def make_optimizer(name: str, lr, grad_clip: float):
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
    milestones = [int(m) for m in milestones]
    if not milestones:
        return lr
    return optax.piecewise_constant_schedule(lr, {m * batches_per_epoch: factor for m in milestones})


def cosine_schedule(lr: float, total_steps: int, final_fraction: float = 0.01):
    """lr decaying along a half cosine to lr * final_fraction after total_steps updates."""
    return optax.cosine_decay_schedule(lr, max(int(total_steps), 1), alpha=final_fraction)


def path_key(path) -> str:
    return '/'.join(str(p) for p in path)


def check_trace_chunk(trace_chunk, model, method: str, vjp_time: str, several_devices: bool = False) -> int:
    """The K of --trace_chunk for this run: K > 1 needs an online method on one of the repository's networks
    with --vjp_time t and the D-RTRL trace fix (brainscale_adapter), on one device; else only 1 (brainscale
    step by step). `None` means the measured default (utils.DEFAULT_TRACE_CHUNK) where K > 1 works, else 1."""
    why_not = None
    if method == 'bptt':
        why_not = 'BPTT has no traces'
    elif vjp_time != 't':
        why_not = '--vjp_time t_minus_1 is brainscale-only'
    elif not chunked_traces.supports(model):
        why_not = f'{type(model).__name__} is not one of the networks chunked_traces.py knows'
    elif method == 'diag' and not brainscale_adapter.drtrl_fix_active():
        why_not = "brainscale's own D-RTRL trace rescaling is on"
    elif several_devices:  # not yet measured nor tested split over devices (docs/chunked-traces.md)
        why_not = 'the chunked traces run on one device only'
    if trace_chunk is None:
        return 1 if why_not else utils.DEFAULT_TRACE_CHUNK
    if int(trace_chunk) < 1:
        raise UserError(f'--trace_chunk must be >= 1, got {trace_chunk}')
    if int(trace_chunk) > 1 and why_not and method != 'bptt':
        raise UserError(f'--trace_chunk {trace_chunk} needs the chunked traces, but {why_not}; use --trace_chunk 1')
    return 1 if method == 'bptt' else int(trace_chunk)


class Trainer:
    """One training step of a brainstate network for BPTT, D-RTRL or ES-D-RTRL.

    A batch is xs (T, B, n_in), labels (B,), sample_mask (B,) and step_weights (T,). The loss is
    sum_t w_t * mean_b CE(readout_t, label) (samples with mask 0 are padding); accuracy is the argmax of
    the w-weighted average readout. BPTT differentiates that loss through a scan over time; the online
    methods run one step at a time through brainscale and sum the per-step gradients, inside one
    compiled function per batch, or, with `trace_chunk` K > 1, K steps at a time through
    chunked_traces.py (the same gradient; the repository's networks only).

    `devices` (a list of several jax devices) trains data parallel: a mesh with one axis 'batch'; the
    inputs, labels and mask, and every per-sample state (neuron states, eligibility traces: leading axis
    = batch) are split along the batch axis (NamedSharding, with_sharding_constraint after each reset),
    weights and optimizer state replicated; XLA (GSPMD) inserts the reductions of the loss and gradients.
    """

    def __init__(self, model, method: str, n_in: int, batch_size: int, *, optimizer='adam', lr=1e-3,
                 grad_clip=1.0, etrace_decay=0.99, vjp_time='t', loss='cel', weight_L2=0., devices=None,
                 trace_chunk: int = 1):
        if method not in methods.TABLE:
            raise UserError(str(methods.UnknownMethod(f'unknown --method {method!r}; choose one of '
                                                      f'{", ".join(methods.names())}')))
        if loss not in ('cel', 'mse'):
            raise UserError(f"unknown --loss {loss!r}; choose cel or mse")
        self.model, self.method, self.batch_size, self.loss = model, method, batch_size, loss
        self.weight_L2 = weight_L2
        self.mesh = None
        if devices is not None and len(devices) > 1:
            if batch_size % len(devices):
                raise UserError(batch_error(batch_size, len(devices), devices_name(devices)))
            self.mesh = jax.sharding.Mesh(np.array(devices), ('batch',))
        brainstate.nn.init_all_states(model, batch_size)
        self.params = model.states(brainstate.ParamState)
        self.algo = None
        self.trace_chunk = check_trace_chunk(trace_chunk, model, method, vjp_time, self.mesh is not None)
        self.etrace_decay = chunked_traces.decay_of(etrace_decay)
        self.chunked = self.trace_chunk > 1  # online gradients through chunked_traces.py, not brainscale's algorithm
        if method != 'bptt' and not self.chunked:
            mode = brainstate.mixin.Batching()
            if method == 'diag':
                self.algo = brainscale.ParamDimVjpAlgorithm(model, mode=mode, vjp_method=VJP_METHODS[vjp_time])
            else:
                self.algo = brainscale.IODimVjpAlgorithm(model, decay_or_rank=etrace_decay, mode=mode,
                                                         vjp_method=VJP_METHODS[vjp_time])
            self.algo.compile_graph(jnp.zeros((batch_size, n_in), jnp.float32))
        self.tx = make_optimizer(optimizer, lr, grad_clip)
        self.opt_state = self.tx.init(self.param_values())
        self.update_fn = brainstate.transform.jit(self._train_step)  # the compiled update (the memory script lowers it)
        self._grads_jit = {}  # method -> compiled gradient of one batch
        self._eval = brainstate.transform.jit(self._eval_step)
        self.place()

    # -- several devices ----------------------------------------------------------------------------
    def _sharding(self, *spec):
        return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(*spec))

    def weights_sharding(self):
        """Where the weights live: replicated over the mesh, or the one device of the run."""
        if self.mesh is not None:
            return self._sharding()
        return jax.sharding.SingleDeviceSharding(jax.config.jax_default_device or jax.devices()[0])

    def _state_sharding(self, value):
        """A per-sample state (leading axis = batch) is split across the devices; anything else replicated."""
        batched = getattr(value, 'ndim', 0) >= 1 and value.shape[0] == self.batch_size
        return self._sharding('batch') if batched else self._sharding()

    def sample_states(self, with_algo: bool = True) -> list:
        """Every state that is not a weight: the neurons' states and (online methods) the eligibility traces."""
        node = self.algo if (with_algo and self.algo is not None) else self.model
        return [s for s in node.states().values() if not isinstance(s, brainstate.ParamState)]

    def _put(self, value, sharding):
        """A host value as a global array (each process gives the slices of its own devices)."""
        value = np.asarray(value)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    def place(self):
        """Several devices: weights and optimizer state on every device, per-sample states split along the
        batch axis (at the start and after a checkpoint restore). One device: nothing to do."""
        if self.mesh is None:
            return
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
        for s in self.sample_states(with_algo):
            s.value = jax.tree.map(lambda v: jax.lax.with_sharding_constraint(v, self._state_sharding(v))
                                   if hasattr(v, 'shape') else v, s.value)

    def _replicated(self, tree):
        if self.mesh is None:
            return tree
        return jax.lax.with_sharding_constraint(tree, self._sharding())

    def device_batch(self, xs, labels, mask, ws):
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
        if self.loss == 'cel':
            per_sample = -jnp.take_along_axis(jax.nn.log_softmax(out, -1), labels[:, None], -1)[:, 0]
        else:
            per_sample = jnp.mean((out - jax.nn.one_hot(labels, out.shape[-1])) ** 2, -1)
        return w * jnp.sum(mask * per_sample) / jnp.maximum(jnp.sum(mask), 1.)

    def _summaries(self, step_losses, weighted_outs, labels, mask, ws):
        avg_out = weighted_outs.sum(0) / jnp.maximum(ws.sum(), 1e-12)
        correct = jnp.sum(mask * (jnp.argmax(avg_out, -1) == labels))
        return step_losses.sum(), correct / jnp.maximum(jnp.sum(mask), 1.)

    def _reset(self, batch, with_algo: bool = True):
        brainstate.nn.reset_all_states(self.model, batch)
        if with_algo and self.algo is not None:
            self.algo.reset_state()
        self._constrain_states(with_algo)

    def _loss_and_grads(self, xs, labels, mask, ws, method=None):
        """The summed gradient, loss and accuracy of one batch by the trainer's method (or `method='bptt'`:
        BPTT's gradient from the same weights and initial states, for --check_grad)."""
        method = method or self.method
        if self.mesh is None:
            return self._loss_and_grads_traced(xs, labels, mask, ws, method)
        # the batch split over the devices: brainscale_adapter's D-RTRL gradient read must slice each
        # device's part of it, and recurrence.py's products must keep it split
        with brainscale_adapter.batch_shards(self.mesh), recurrence.batch_split_over_devices():
            return self._loss_and_grads_traced(xs, labels, mask, ws, method)

    def _loss_and_grads_traced(self, xs, labels, mask, ws, method):
        xs = xs.astype('float32')
        self._reset(xs.shape[1], with_algo=method != 'bptt')
        if method == 'bptt':
            path = self._bptt_gradients
        else:
            path = self._chunked_gradients if self.chunked else self._online_gradients
        grads, losses, wouts = path(xs, labels, mask, ws)
        loss, acc = self._summaries(losses, wouts, labels, mask, ws)
        return {path_key(k): g for k, g in grads.items()}, loss, acc

    def _bptt_gradients(self, xs, labels, mask, ws):
        """BPTT: brainstate's grad of sum_t w_t loss_t through the whole sequence (layer after layer when the
        model has run_sequence: the input products of all steps out of the time loop). Returns the weight
        gradients, the per-step losses (T,) and the weighted readouts (T, B, n_out)."""
        def sequence_loss():
            if hasattr(self.model, 'run_sequence'):
                outs = self.model.run_sequence(xs)
                losses = jax.vmap(lambda o, w: self._step_loss(o, labels, mask, w))(outs, ws)
                wouts = ws[:, None, None] * outs
            else:
                losses, wouts = brainstate.transform.for_loop(self._forward_step(labels, mask), xs, ws)
            return losses.sum(), (losses, wouts)

        grads, _, (losses, wouts) = brainstate.transform.grad(
            sequence_loss, self.params, return_value=True, has_aux=True)()
        return grads, losses, wouts

    def _online_gradients(self, xs, labels, mask, ws):
        """D-RTRL / ES-D-RTRL: one step at a time through the brainscale algorithm (which updates the
        eligibility traces and turns them into this step's weight gradient); the per-step gradients, losses
        and weighted readouts are summed as they come (running sums: memory constant in T). Returns the
        weight gradients, the summed loss (1,) and the summed weighted readout (1, B, n_out)."""
        def step(acc, inp):
            x, w = inp

            def step_loss():
                out = self.algo(x)
                return self._step_loss(out, labels, mask, w), out

            g, loss, out = brainstate.transform.grad(step_loss, self.params, return_value=True, has_aux=True)()
            return jax.tree.map(jnp.add, acc, (g, loss, w * out)), None

        out = brainstate.transform.StatefulFunction(self.model).get_out_shapes(xs[0])[0]
        zeros = jax.tree.map(jnp.zeros_like, ({k: s.value for k, s in self.params.items()},
                                              jnp.zeros(()), jnp.zeros(out.shape, out.dtype)))
        (grads, loss_sum, wout_sum), _ = brainstate.transform.scan(step, zeros, (xs, ws))
        return grads, loss_sum[None], wout_sum[None]

    def _chunked_gradients(self, xs, labels, mask, ws):
        """D-RTRL / ES-D-RTRL, trace_chunk steps at a time (chunked_traces.py): brainscale's gradient without
        brainscale's per-step loop. Returns what _online_gradients returns."""
        grads, loss_sum, wout_sum = chunked_traces.chunked_online_gradients(
            self.model, self.method, self.etrace_decay, self.trace_chunk, xs, ws,
            lambda out, w: self._step_loss(out, labels, mask, w))
        return {k: grads[s] for k, s in self.params.items()}, loss_sum[None], wout_sum[None]

    def _forward_step(self, labels, mask):
        """One step of the plain forward pass: x_t, w_t -> (loss_t, w_t * readout_t)."""
        def step(x, w):
            out = self.model(x)
            return self._step_loss(out, labels, mask, w), w * out
        return step

    def _train_step(self, opt_state, xs, labels, mask, ws):
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
        self.opt_state, loss, acc, gnorm, finite = self.update_fn(self.opt_state, *self.device_batch(xs, labels, mask, ws))
        self.last_update_finite = bool(finite)
        return float(loss), float(acc), float(gnorm)

    def gradients(self, xs, labels, ws, method: str = None) -> dict:
        """The summed gradient of one batch, without an update: by the trainer's method, or by `method`
        ('bptt': BPTT's gradient from the same weights and initial states, the reference of --check_grad;
        the trainer's own compiled step and states are left as they are, every step resets the states)."""
        return self.loss_and_gradients(xs, labels, ws, method)[2]

    def loss_and_gradients(self, xs, labels, ws, method: str = None):
        """(loss, accuracy, summed gradient) of one batch, without an update."""
        method = method or self.method
        if method not in self._grads_jit:
            self._grads_jit[method] = brainstate.transform.jit(
                lambda xs, labels, mask, ws: self._loss_and_grads(xs, labels, mask, ws, method=method))
        xs, labels, mask = self.pad(xs, labels)
        grads, loss, acc = self._grads_jit[method](*self.device_batch(xs, labels, mask, ws))
        return float(loss), float(acc), grads

    def evaluate(self, xs, labels, ws):
        """(loss, accuracy, number of samples) of one batch, forward only."""
        n = xs.shape[1]
        xs, labels, mask = self.pad(xs, labels)
        loss, acc, rates = self._eval(*self.device_batch(xs, labels, mask, ws))
        total, count = getattr(self, '_rate_sum', (0., 0))
        self._rate_sum = (total + np.asarray(rates, np.float64) * n, count + n)
        return float(loss), float(acc), n

    def pop_eval_rates(self) -> list:
        """Each layer's mean firing rate (spikes per neuron per step) over the batches evaluated since the
        last call."""
        total, count = getattr(self, '_rate_sum', (0., 0))
        self._rate_sum = (0., 0)
        return [float(r) for r in (total / count if count else [])]
