"""What a learning rule is to the trainer (rsnn/trainer.py), and what the rules share.

A rule is a class in its own file of rsnn/rules/ named by a row of the table of methods (rsnn/methods.py).
The trainer builds it once, `Rule(model, params, options)`, and asks it for the summed gradient of one
update: `rule.gradients(xs, targets, objective, step_hook, keep_outputs)`:

- xs (T, B, n_in): the inputs of the update (a batch of trials, or a stretch of stream);
- targets: a pytree with leading axis T, one slice per step, that `objective` reads;
- objective.loss(out_t, target_t) -> the step's loss; objective.weighted(out_t, target_t) -> (B, n_out),
  the readout as the accuracy reads it (summed over the steps);
- step_hook(t_input): called at the start of each step where given (the stream's reset-per-trial control);
  a rule whose path cannot call it (a chunked path) says so in `supports_step_hook`.

It returns a `Result`. What the rule carries from one update to the next besides the neuron states (its
eligibility traces) are brainstate states that `carried_states()` names: the trainer zeroes them with
`reset()` before each batch of trials, carries them on a stream and saves them in the stream's checkpoints
by those names.

A rule that updates the weights within a sequence and keeps state with the optimizer (FPTT, rsnn/rules/fptt.py)
says so through four hooks whose defaults do nothing: `update_window()` (steps per optimizer update within a
batch of trials; None: one update per batch), `adjust_gradients(grads, values)` (what the optimizer is given,
from the rule's gradient: a regulariser's gradient added), `after_update(values, applied)` (called after every
optimizer update with the new weights) and `optimizer_states()` (states never reset, saved in every checkpoint
and restored by --resume, like the optimizer's).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import brainstate
import jax
import jax.numpy as jnp

from rsnn.chunk_policy import DEFAULT_TRACE_CHUNK
from rsnn.errors import UserError


@dataclasses.dataclass
class RuleOptions:
    batch_size: int
    n_in: int
    etrace_decay: float = 0.99          # ES-D-RTRL's decay or rank (brainscale's decay_or_rank)
    vjp_time: str = 't'                 # brainscale's VJP: 't' single-step, 't_minus_1' multi-step
    trace_chunk: Optional[int] = None   # K; None: the measured default where the rule has a chunked path
    several_devices: bool = False       # the batch is split over a mesh
    stream: bool = False                # traces carried across updates (--protocol stream)
    step_hook: bool = False             # the trainer will pass a step_hook (the reset-per-trial control)
    extra: dict = dataclasses.field(default_factory=dict)  # a rule's own options


@dataclasses.dataclass
class Objective:
    loss: Callable       # (out_t (B, n_out), target_t) -> scalar loss of the step
    weighted: Callable   # (out_t, target_t) -> (B, n_out): the readout that the accuracy sums


@dataclasses.dataclass
class Result:
    grads: dict                  # the params dict's keys (weight paths) -> summed gradient of the update
    loss: jax.Array              # the summed loss
    wout: jax.Array              # sum_t objective.weighted(out_t, target_t), (B, n_out)
    outs: Optional[jax.Array]    # the readout of every step (T, B, n_out) when keep_outputs, else None


class Rule:
    """The interface; see the module docstring. `trace_chunk` is the K the rule runs with (1: step by step)."""
    trace_chunk = 1
    supports_step_hook = True
    supports_trace_reset = False  # --trace_reset_every: the rules whose traces run on the chunk engine

    def __init__(self, model, params: dict, options: RuleOptions):
        self.model, self.params, self.options = model, params, options
        if options.extra.get('trace_reset_every_steps') and not self.supports_trace_reset:
            raise UserError('--trace_reset_every needs a rule with eligibility traces on the chunk engine '
                            '(diag, expsm_diag, eprop, ottt, snap1); drop it for this --method')

    def reset_every(self):
        """H in steps (--trace_reset_every), or None: the traces are never zeroed within a sequence."""
        return self.options.extra.get('trace_reset_every_steps') or None

    @staticmethod
    def choose_chunk(model, options: RuleOptions) -> int:
        """The K this rule would run with on `model` (1 for a rule without a chunked path)."""
        return 1

    def carried_states(self) -> dict:
        """name -> brainstate state of what the rule carries between updates (not the neurons' states)."""
        return {}

    def reset(self):
        """Zero what the rule carries (before each batch of trials; at the start of a stream)."""

    def gradients(self, xs, targets, objective: Objective, step_hook=None, keep_outputs=False) -> Result:
        raise NotImplementedError

    # -- the optimizer hooks (module docstring); the defaults leave every rule but FPTT as it was
    def update_window(self) -> Optional[int]:
        """Steps per optimizer update within a batch of trials (the states carried from one window to the
        next within the batch); None: one update per batch."""
        return None

    def optimizer_states(self) -> dict:
        """name -> brainstate state kept with the optimizer: never reset, saved in every checkpoint."""
        return {}

    def adjust_gradients(self, grads: dict, values: dict) -> dict:
        """The gradient the optimizer is given, from the rule's summed gradient (both keyed like `values`,
        the weights by path_key)."""
        return grads

    def after_update(self, values: dict, applied):
        """After each optimizer update: `values` the weights now, `applied` whether the update was applied
        (a traced bool: a refused or skipped update leaves them as they were)."""


def path_key(path) -> str:
    """A weight's name: its path in the model joined by '/' (the key of the trainer's gradient dicts)."""
    return '/'.join(str(p) for p in path)


def zero_grads(params: dict) -> dict:
    return jax.tree.map(jnp.zeros_like, {k: s.value for k, s in params.items()})


def step_by_step(call, model, params: dict, xs, targets, objective: Objective, step_hook=None,
                 keep_outputs=False, extra=None) -> Result:
    """The online rules' step-by-step path: for each step t, the gradient of that step's loss through
    `call(x_t)` (brainscale's algorithm, which updates the traces and turns them into this step's weight
    gradient), summed as it comes (running sums: memory constant in T). `extra` (hook inputs) are scanned
    with xs and given to step_hook."""
    def step(acc, inp):
        x, target, hook_in = inp
        x = x.astype(jnp.float32)  # per step: a stream's chunk stays uint8 (memory flat in its length)
        if step_hook is not None:
            step_hook(hook_in)

        def step_loss():
            out = call(x)
            return objective.loss(out, target), out

        g, loss, out = brainstate.transform.grad(step_loss, params, return_value=True, has_aux=True)()
        grads, loss_sum, wout = acc
        acc = (jax.tree.map(jnp.add, grads, g), loss_sum + loss, wout + objective.weighted(out, target))
        return acc, (out if keep_outputs else None)

    out = brainstate.transform.StatefulFunction(model).get_out_shapes(xs[0].astype(jnp.float32))[0]
    out_shape = jax.eval_shape(lambda: objective.weighted(jnp.zeros(out.shape, out.dtype),
                                                          jax.tree.map(lambda a: a[0], targets)))
    zeros = (zero_grads(params), jnp.zeros(()), jnp.zeros(out_shape.shape, out_shape.dtype))
    (grads, loss, wout), outs = brainstate.transform.scan(step, zeros, (xs, targets, extra))
    return Result(grads, loss, wout, outs)


def chunk_for(options: RuleOptions, has_chunked_path: bool, why_not: Optional[str], auto=None) -> int:
    """The K of --trace_chunk for a rule with a chunked path: K > 1 needs it (why_not None), else 1 (its
    step-by-step path). `None` (the default) and 'auto' mean `auto()` (the rule's rsnn.chunk_policy.auto_trace_chunk:
    the largest K whose buffers fit the budget; DEFAULT_TRACE_CHUNK when the rule gives none) where K > 1
    works, else 1."""
    if not has_chunked_path:
        why_not = why_not or 'this rule has no chunked path'
    elif options.vjp_time != 't':
        why_not = '--vjp_time t_minus_1 is brainscale-only'
    elif options.several_devices:  # not yet measured nor tested split over devices (docs/chunked-traces.md)
        why_not = 'the chunked traces run on one device only'
    elif options.step_hook:
        why_not = 'the reset-per-trial control (--stream_reset 1) resets states inside an update'
    K = options.trace_chunk
    if K is None or K == 'auto':
        return 1 if why_not else (auto() if auto is not None else DEFAULT_TRACE_CHUNK)
    if int(K) < 1:
        raise UserError(f'--trace_chunk must be >= 1, got {K}')
    if int(K) > 1 and why_not:
        raise UserError(f'--trace_chunk {K} needs the chunked traces, but {why_not}; use --trace_chunk 1')
    return int(K)
