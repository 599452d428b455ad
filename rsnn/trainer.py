"""One training step of a brainstate network by any rule of the table of methods (rsnn/methods.py), for both
protocols: the optimizer, the learning-rate schedules and the Trainer.

- trials (`protocol='trials'`): a batch is xs (T, B, n_in), labels (B,), sample_mask (B,) and step weights
  (T,). Every batch starts from zero states and traces; one update per batch, or (a rule with
  `update_window()`: FPTT) one per window of the batch, the states carried from window to window. The loss is sum_t w_t * mean_b CE(readout_t,
  label) (samples with mask 0 are padding); accuracy is the argmax of the w-weighted average readout.
- stream (`protocol='stream'`): B endless streams cut into chunks (rsnn/dms_stream.py); one update per
  chunk, the neuron states and the rule's traces carried from one chunk to the next (never reset, unless
  the reset-per-trial control zeroes a stream's states at its trial starts). The loss of a step is
  sum_b w_tb CE(readout_tb, label_tb) / B; the readouts of every step go back to the host, which scores
  each trial (dms_stream.TrialScorer).

The same update for both: the rule's summed gradient (rsnn/rules/), + weight_L2, the global norm, optax
(clip, adam / sgd / momentum); an update that is not finite is refused. `devices` (several jax devices)
trains data parallel (rsnn/devices.py).
"""
from __future__ import annotations

from typing import Iterable

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rsnn import methods, recurrence
from rsnn.devices import Placement
from rsnn.rules.base import Objective, RuleOptions, path_key  # noqa: F401 (path_key: imported from here too)
from rsnn.errors import UserError

PROTOCOLS = ('trials', 'stream')


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


def trial_objective(labels, mask, loss: str) -> Objective:
    """The trial protocol's step loss: target_t = w_t (the step's weight)."""
    def step_loss(out, w):
        return w * jnp.sum(mask * per_sample_loss(out, labels, loss)) / jnp.maximum(jnp.sum(mask), 1.)
    return Objective(step_loss, lambda out, w: w * out)


def stream_objective(loss: str) -> Objective:
    """The stream's step loss: target_t = (label_t (B,), w_t (B,)); every stream's test period weighs as
    one trial."""
    def step_loss(out, target):
        label, w = target
        return jnp.sum(w * per_sample_loss(out, label, loss)) / out.shape[0]
    return Objective(step_loss, lambda out, target: target[1][:, None] * out)


def per_sample_loss(out, labels, loss: str):
    if loss == 'cel':
        return -jnp.take_along_axis(jax.nn.log_softmax(out, -1), labels[:, None], -1)[:, 0]
    return jnp.mean((out - jax.nn.one_hot(labels, out.shape[-1])) ** 2, -1)


class Trainer:
    """One training step of a brainstate network by the rule `method` (module docstring)."""

    def __init__(self, model, method: str, n_in: int, batch_size: int, *, optimizer='adam', lr=1e-3,
                 grad_clip=1.0, etrace_decay=0.99, vjp_time='t', loss='cel', weight_L2=0., devices=None,
                 trace_chunk=1, protocol: str = 'trials', reset_per_trial: bool = False,
                 rule_options: dict = None):
        if method not in methods.TABLE:
            raise UserError(str(methods.UnknownMethod(f'unknown --method {method!r}; choose one of '
                                                      f'{", ".join(methods.names())}')))
        if loss not in ('cel', 'mse'):
            raise UserError(f"unknown --loss {loss!r}; choose cel or mse")
        if protocol not in PROTOCOLS:
            raise UserError(f'unknown --protocol {protocol!r}; choose trials or stream')
        self.model, self.method, self.batch_size, self.loss = model, method, batch_size, loss
        self.weight_L2, self.protocol, self.reset_per_trial = weight_L2, protocol, bool(reset_per_trial)
        self.placement = Placement(devices, batch_size)
        self.mesh = self.placement.mesh
        if protocol == 'stream' and self.mesh is not None:
            raise UserError('--protocol stream runs on one device; give --devices 0 or cpu')
        if protocol == 'stream' and not methods.get(method).stream:
            raise UserError(f'--method {method} has no stream path (rsnn/methods.py); use --protocol trials')
        brainstate.nn.init_all_states(model, batch_size)
        self.params = model.states(brainstate.ParamState)
        self.rule_options = RuleOptions(batch_size=batch_size, n_in=n_in, etrace_decay=etrace_decay,
                                        vjp_time=vjp_time, trace_chunk=trace_chunk,
                                        several_devices=self.mesh is not None, stream=protocol == 'stream',
                                        step_hook=self.reset_per_trial, extra=dict(rule_options or {}))
        self.rule = methods.rule_class(method)(model, self.params, self.rule_options)
        self.trace_chunk = self.rule.trace_chunk
        self._rules = {method: self.rule}  # method -> rule (others: --check_grad's BPTT reference)
        self.tx = make_optimizer(optimizer, lr, grad_clip)
        self.opt_state = self.tx.init(self.param_values())
        self.update_fn = brainstate.transform.jit(self._train_step)  # the compiled update (the memory script lowers it)
        self._grads_jit = {}  # method -> compiled gradient of one batch
        self._eval = brainstate.transform.jit(self._eval_step)
        # the first call's arguments in the form the compiled update returns them (strongly typed): else
        # the first update compiles the step for weak-typed values and the second compiles it again
        self._canonicalize()
        if protocol == 'stream':
            self.update_fn = brainstate.transform.jit(self._stream_step)
            self._eval = brainstate.transform.jit(self._stream_eval)
        self.last_update_finite = True
        self.place()

    # -- states -------------------------------------------------------------------------------
    def sample_states(self, with_rule: bool = True) -> list:
        """Every state that is not a weight: the neurons' states and (with_rule) what the rule carries."""
        return list(self.named_states(with_rule).values())

    def named_states(self, with_rule: bool = True) -> dict:
        """name -> state of the neurons' states (by their path in the model) and, with_rule, of what the
        rule carries (its eligibility traces, by the rule's names): what a stream carries and checkpoints."""
        states = {'model/' + path_key(k): s for k, s in self.model.states().items()
                  if not isinstance(s, brainstate.ParamState)}
        if with_rule:
            states.update(self.rule.carried_states())
        return states

    def get_states(self, with_rule: bool = True) -> dict:
        return {k: s.value for k, s in self.named_states(with_rule).items()}

    def set_states(self, values: dict, with_rule: bool = True):
        for k, s in self.named_states(with_rule).items():
            s.value = values[k]

    def reset(self, batch: int = None, with_rule: bool = True):
        """Zero the neurons' states (and what the rule carries): before a batch of trials, a stream's start."""
        brainstate.nn.reset_all_states(self.model, batch or self.batch_size)
        if with_rule:
            self.rule.reset()
        self.placement.constrain(self.sample_states(with_rule))

    def mask_reset(self, reset, with_rule: bool = True):
        """Zero the states (and traces) of the streams where `reset` (B,) is true: a trial starts there."""
        B = self.batch_size
        for s in self.sample_states(with_rule):
            def zero(v):
                if getattr(v, 'ndim', 0) >= 1 and v.shape[0] == B:
                    return jnp.where(reset.reshape((B,) + (1,) * (v.ndim - 1)), jnp.zeros_like(v), v)
                return v
            s.value = jax.tree.map(zero, s.value)

    def _canonicalize(self):
        """Every state, weight and optimizer leaf as a committed, strongly typed jax array: the form a
        compiled update returns them in, so that the second update (of trials or of a stream) does not
        compile the step again."""
        strong = lambda v: v if isinstance(v, jax.ShapeDtypeStruct) else (  # an abstract state (the memory analysis)
            jnp.array(v, dtype=jnp.asarray(v).dtype) if hasattr(v, 'dtype') or isinstance(v, (int, float)) else v)
        for s in list(self.params.values()) + self.sample_states() + list(self.rule.optimizer_states().values()):
            s.value = jax.tree.map(strong, s.value)
        self.opt_state = jax.tree.map(strong, self.opt_state)

    def use_rule(self, rule):
        """Put `rule` (an instance built on this trainer's model and params: a reference form of a rule, in the
        tests and the braintrace cross-check) in the place of the trainer's own; the compiled gradients are
        dropped, so the next call compiles the new rule's (also after changing its attributes)."""
        self.rule = rule
        self._rules = {self.method: rule}
        self._grads_jit = {}
        return self

    def rule_state_values(self) -> dict:
        """name -> value of what the rule keeps with the optimizer (FPTT's lambda, theta_bar; {} for the
        others): saved in every checkpoint beside the optimizer state, restored by --resume."""
        return {k: s.value for k, s in self.rule.optimizer_states().items()}

    def set_rule_state_values(self, values: dict):
        for k, s in self.rule.optimizer_states().items():
            s.value = values[k]

    # -- several devices ----------------------------------------------------------------------------
    def weights_sharding(self):
        return self.placement.weights_sharding()

    def device_batch(self, xs, labels, mask, ws):
        """The batch as the compiled step's arguments (on several devices split along the batch axis)."""
        return self.placement.batch(xs, labels, mask, ws)

    def place(self):
        """Several devices: weights and optimizer state on every device, per-sample states split along the
        batch axis (at the start and after a checkpoint restore). One device: nothing to do."""
        self.opt_state = self.placement.place(self.params, self.opt_state, self.sample_states())

    # -- parameters ---------------------------------------------------------------------------
    def param_values(self) -> dict:
        return {path_key(k): s.value for k, s in self.params.items()}

    def set_param_values(self, values: dict):
        for k, s in self.params.items():
            s.value = values[path_key(k)]

    # -- the update (both protocols) ----------------------------------------------------------------
    def rule_for(self, method: str):
        """The rule of `method` on this trainer's model (another than the trainer's: --check_grad's BPTT)."""
        if method not in self._rules:
            opts = RuleOptions(**dict(vars(self.rule_options), trace_chunk=None, step_hook=False))
            self._rules[method] = methods.rule_class(method)(self.model, self.params, opts)
        return self._rules[method]

    def rule_gradients(self, xs, targets, objective, method=None, **kw):
        """The rule's Result with the gradients keyed by weight name."""
        if self.mesh is None:
            result = self.rule_for(method or self.method).gradients(xs, targets, objective, **kw)
        else:
            # the batch split over the devices: brainscale_adapter's D-RTRL gradient read must slice each
            # device's part of it, and recurrence.py's products must keep it split
            from rsnn import brainscale_adapter
            with brainscale_adapter.batch_shards(self.mesh), recurrence.batch_split_over_devices():
                result = self.rule_for(method or self.method).gradients(xs, targets, objective, **kw)
        result.grads = {path_key(k): g for k, g in result.grads.items()}
        # a layer frozen as a control (models.GIFExpLayer.freeze: only the readout learns) gets no gradient,
        # whatever the rule (a chunked rule forms its weight gradients from its traces directly)
        frozen = [name for name, layer in (('rec', getattr(self.model, 'rec', None)),) if getattr(layer, 'freeze', False)]
        if frozen:
            result.grads = {k: (jax.tree.map(jnp.zeros_like, g) if k.split('/')[0] in frozen else g)
                            for k, g in result.grads.items()}
        return result

    def _apply_update(self, opt_state, grads, loss, apply=True):
        values = self.param_values()
        grads = self.rule.adjust_gradients(grads, values)  # FPTT: + its regulariser's gradient; else as is
        if self.weight_L2:
            grads = jax.tree.map(lambda g, p: g + self.weight_L2 * p, grads, values)
        grad_norm = optax.global_norm(grads)
        updates, new_opt_state = self.tx.update(grads, opt_state, values)
        new_values = self.placement.replicated(optax.apply_updates(values, updates))
        new_opt_state = self.placement.replicated(new_opt_state)
        # A finite loss can still come with an infinite gradient norm, and then the clipped update is
        # NaN: refuse such an update inside the step (parameters and optimizer state stay as they were)
        # and report it, so that non-finite weights are never evaluated or saved.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        for leaf in jax.tree.leaves(new_values):
            finite = finite & jnp.all(jnp.isfinite(leaf))
        applied = finite & apply
        keep = lambda new, old: jnp.where(applied, new, old)
        self.set_param_values(jax.tree.map(keep, new_values, values))
        self.rule.after_update(self.param_values(), applied)  # FPTT: lambda and theta_bar; else nothing
        return jax.tree.map(keep, new_opt_state, opt_state), grad_norm, finite, applied

    # -- trials -------------------------------------------------------------------------------------
    def _loss_and_grads(self, xs, labels, mask, ws, method=None):
        """The summed gradient, loss and accuracy of one batch by the trainer's method (or `method='bptt'`:
        BPTT's gradient from the same weights and initial states, for --check_grad)."""
        self.reset(xs.shape[1])
        result = self.rule_gradients(xs.astype('float32'), ws, trial_objective(labels, mask, self.loss), method)
        return result.grads, result.loss, accuracy(result.wout, labels, mask)

    def _train_step(self, opt_state, xs, labels, mask, ws):
        K = self.rule.update_window()
        if K is not None and K < xs.shape[0]:
            return self._windowed_train_step(opt_state, xs, labels, mask, ws, K)
        grads, loss, acc = self._loss_and_grads(xs, labels, mask, ws)
        opt_state, grad_norm, finite, _ = self._apply_update(opt_state, grads, loss)
        return opt_state, loss, acc, grad_norm, finite

    def _windowed_train_step(self, opt_state, xs, labels, mask, ws, K: int):
        """In-sequence updates (FPTT on trials): the batch's T steps cut into windows of K (the last one
        shorter where K does not divide T), one update per window, the states carried from window to window
        (reset before the batch); a window without any loss weight is no update, as a stream's chunk without a
        test step. Returns the sums of the windows' losses, the accuracy of their summed readouts, the mean
        gradient norm of the windows updated and whether every window was finite."""
        T = xs.shape[0]
        self.reset(xs.shape[1])
        objective = trial_objective(labels, mask, self.loss)

        def window(opt_state, x, w):
            result = self.rule_gradients(x.astype(jnp.float32), w, objective)
            opt_state, grad_norm, finite, applied = self._apply_update(opt_state, result.grads, result.loss,
                                                                        apply=jnp.sum(w) > 0)
            return opt_state, (result.loss, result.wout, grad_norm, finite, applied)

        n = T // K
        opt_state, outs = brainstate.transform.scan(
            lambda o, inp: window(o, *inp), opt_state,
            (xs[:n * K].reshape((n, K) + xs.shape[1:]), ws[:n * K].reshape((n, K) + ws.shape[1:])))
        if n * K < T:
            opt_state, last = window(opt_state, xs[n * K:], ws[n * K:])
            outs = jax.tree.map(lambda a, b: jnp.concatenate([a, b[None]]), outs, last)
        losses, wouts, grad_norms, finite, applied = outs
        grad_norm = jnp.sum(jnp.where(applied, grad_norms, 0.)) / jnp.maximum(jnp.sum(applied), 1)
        return opt_state, losses.sum(), accuracy(wouts.sum(0), labels, mask), grad_norm, jnp.all(finite)

    def in_sequence_updates(self) -> bool:
        """Several optimizer updates per batch of trials (FPTT's windows): batches.csv and the summary count them."""
        return self.rule.update_window() is not None

    def updates_per_batch(self, T: int, ws) -> int:
        """Optimizer updates of one batch of T trial steps with step weights ws: 1, or with in-sequence
        updates (FPTT) the windows of the batch that hold a loss weight."""
        K = self.rule.update_window()
        if K is None or K >= T:
            return 1
        w = np.asarray(ws, np.float64).reshape(T, -1).sum(1)
        return int(sum(w[s:s + K].sum() > 0 for s in range(0, T, K)))

    def _forward(self, xs, targets, objective, hook_inputs=None, mask=None):
        """Forward only: per step the loss, the weighted readout, the readout and each layer's firing rate
        (mean spikes per neuron over the real samples)."""
        B = xs.shape[1]
        mask = jnp.ones(B) if mask is None else mask

        def step(x, target, hook_in):
            if hook_in is not None:
                self.mask_reset(hook_in, with_rule=False)
            out = self.model(x.astype(jnp.float32))
            spikes = self.model.layer_spikes() if hasattr(self.model, 'layer_spikes') else []
            rates = [jnp.sum(mask * s.reshape(s.shape[0], -1).mean(-1)) / jnp.maximum(mask.sum(), 1.)
                     for s in spikes]
            return (objective.loss(out, target), objective.weighted(out, target), out,
                    jnp.asarray(rates, jnp.float32).reshape(-1))

        return brainstate.transform.for_loop(step, xs, targets, hook_inputs)

    def _eval_step(self, xs, labels, mask, ws):
        self.reset(xs.shape[1], with_rule=False)
        losses, wouts, _, rates = self._forward(xs.astype(jnp.float32), ws,
                                                trial_objective(labels, mask, self.loss), mask=mask)
        return losses.sum(), accuracy(wouts.sum(0), labels, mask), rates.mean(0)

    # -- stream -------------------------------------------------------------------------------------
    def _stream_step(self, opt_state, xs, labels, ws, resets):
        objective = stream_objective(self.loss)
        hook = (lambda reset: self.mask_reset(reset)) if self.reset_per_trial else None
        result = self.rule_gradients(xs, (labels, ws), objective, step_hook=hook, keep_outputs=True,
                                 hook_inputs=resets if self.reset_per_trial else None)
        # A chunk without any test step has no loss: no update (Adam's momentum would still move the
        # weights on a zero gradient).
        opt_state, grad_norm, finite, applied = self._apply_update(opt_state, result.grads, result.loss,
                                                                    apply=jnp.sum(ws) > 0)
        per_stream = jax.vmap(lambda o, l, w: w * per_sample_loss(o, l, self.loss))(result.outs, labels, ws)
        return opt_state, result.loss, grad_norm, finite, applied, result.outs, per_stream

    def _stream_eval(self, xs, labels, ws, resets):
        _, _, outs, rates = self._forward(xs, (labels, ws), stream_objective(self.loss),
                                          resets if self.reset_per_trial else None)
        per_stream = jax.vmap(lambda o, l, w: w * per_sample_loss(o, l, self.loss))(outs, labels, ws)
        return outs, per_stream, rates.mean(0)

    def _stream_grads(self, xs, labels, ws, resets):
        hook = (lambda reset: self.mask_reset(reset)) if self.reset_per_trial else None
        return self.rule_gradients(xs, (labels, ws), stream_objective(self.loss), step_hook=hook,
                               hook_inputs=resets if self.reset_per_trial else None).grads

    # -- public: trials -------------------------------------------------------------------------------
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
        self.opt_state, loss, acc, gnorm, finite = self.update_fn(self.opt_state,
                                                                  *self.placement.batch(xs, labels, mask, ws))
        self.last_update_finite = bool(finite)
        return float(loss), float(acc), float(gnorm)

    def gradients(self, xs, labels, ws, method: str = None) -> dict:
        """The summed gradient of one batch, without an update: by the trainer's method, or by `method`
        ('bptt': BPTT's gradient from the same weights and initial states, the reference of --check_grad;
        the trainer's own compiled step and states are left as they are, every step resets the states)."""
        return self.loss_and_gradients(xs, labels, ws, method)[2]

    def compiled_gradients(self, method: str = None):
        """The compiled (grads, loss, accuracy) of one padded batch (xs, labels, mask, ws) by `method` (the
        trainer's by default), without an update: what loss_and_gradients calls (the speed table times it)."""
        method = method or self.method
        if method not in self._grads_jit:
            self.rule_for(method)  # built outside the compiled function (brainscale compiles its graph)
            self._grads_jit[method] = brainstate.transform.jit(
                lambda xs, labels, mask, ws: self._loss_and_grads(xs, labels, mask, ws, method=method))
        return self._grads_jit[method]

    def loss_and_gradients(self, xs, labels, ws, method: str = None):
        """(loss, accuracy, summed gradient) of one batch, without an update."""
        xs, labels, mask = self.pad(xs, labels)
        grads, loss, acc = self.compiled_gradients(method)(*self.placement.batch(xs, labels, mask, ws))
        return float(loss), float(acc), grads

    def evaluate(self, xs, labels, ws):
        """(loss, accuracy, number of samples) of one batch, forward only."""
        n = xs.shape[1]
        xs, labels, mask = self.pad(xs, labels)
        loss, acc, rates = self._eval(*self.placement.batch(xs, labels, mask, ws))
        self._add_rates(rates, n)
        return float(loss), float(acc), n

    def _add_rates(self, rates, n: int):
        total, count = getattr(self, '_rate_sum', (0., 0))
        self._rate_sum = (total + np.asarray(rates, np.float64) * n, count + n)

    def pop_eval_rates(self) -> list:
        """Each layer's mean firing rate (spikes per neuron per step) over the batches evaluated since the
        last call."""
        total, count = getattr(self, '_rate_sum', (0., 0))
        self._rate_sum = (0., 0)
        return [float(r) for r in (total / count if count else [])]

    # -- public: stream ------------------------------------------------------------------------------
    def train_chunk(self, chunk):
        """One update from one chunk of stream; returns (loss, grad norm, updated, outs (U, B, n_out),
        per-step per-stream losses (U, B)) as numpy. The states go on into the next chunk."""
        self.opt_state, loss, gnorm, finite, applied, outs, per_stream = self.update_fn(
            self.opt_state, chunk.xs, chunk.labels, chunk.weights, chunk.resets)
        self.last_update_finite = bool(finite)
        return float(loss), float(gnorm), bool(applied), np.asarray(outs), np.asarray(per_stream)

    def chunk_gradients(self, chunk) -> dict:
        """The summed gradient of one chunk without an update (the states and traces move on, as in training)."""
        if not hasattr(self, '_stream_grads_jit'):
            self._stream_grads_jit = brainstate.transform.jit(self._stream_grads)
        return self._stream_grads_jit(chunk.xs, chunk.labels, chunk.weights, chunk.resets)

    def eval_chunk(self, chunk):
        """Forward only over one chunk from the current states: (outs, per-stream losses); firing rates
        are summed for pop_eval_rates."""
        outs, per_stream, rates = self._eval(chunk.xs, chunk.labels, chunk.weights, chunk.resets)
        self._add_rates(rates, 1)
        return np.asarray(outs), np.asarray(per_stream)


def accuracy(wout, labels, mask):
    """The fraction of real samples whose w-weighted readout's argmax is their label."""
    return jnp.sum(mask * (jnp.argmax(wout, -1) == labels)) / jnp.maximum(jnp.sum(mask), 1.)
