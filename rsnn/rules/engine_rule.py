"""EngineRule: what the rules that run on the chunk engine only (rsnn/rules/chunk_engine.py) share (e-prop,
OTTT, SnAp-1): traces held as brainstate states, zeroed by `reset()`, carried on a stream, and the engine
called with the rule's `chunk_update`. Such a rule has one code path: K steps at a time (--trace_chunk K > 1, the default) or one step
at a time (--trace_chunk 1: the same `chunk_update` on one-step chunks, the rule's step-by-step form).

These rules run on the networks of the neuron seam (rsnn/neurons/seam.py: models.SpikingStack of any neuron
model of the table rsnn/neurons, models.DMSNet) on one device, with the single-step learning signal (--vjp_time
t); anything else is refused with one line (`refuse_unsupported`, which UORO's pure network shares).
"""
from __future__ import annotations

import brainstate
import jax.numpy as jnp

from rsnn.rules import chunk_engine
from rsnn.rules.base import Result, Rule, RuleOptions, chunk_for
from rsnn.errors import UserError


def refuse_unsupported(name: str, model, options: RuleOptions):
    """A rule that needs the pure network of the seam (the chunk engine, UORO) refuses a network or options
    it cannot run with one line naming the fix."""
    why_not = chunk_engine.why_not(model)
    if why_not:
        raise UserError(f'--method {name} needs a network of the neuron seam, but {why_not}')
    if options.vjp_time != 't':
        raise UserError(f'--method {name} has the single-step learning signal only; use --vjp_time t')
    if options.several_devices:
        raise UserError(f'--method {name} runs on one device; give --devices 0 or cpu')
    if options.step_hook:
        raise UserError(f'--method {name} cannot reset states inside an update (--stream_reset 1)')


class EngineRule(Rule):
    name = 'this rule'
    supports_step_hook = False
    supports_trace_reset = True
    chunk_kwargs: dict = {}  # extras asked of chunk_engine.chunked_online_gradients (feedback, self_recurrence)

    def __init__(self, model, params: dict, options: RuleOptions):
        super().__init__(model, params, options)
        refuse_unsupported(self.name, model, options)
        self.trace_chunk = self.choose_chunk(model, options)
        self.traces = [brainstate.ShortTermState(t) for t in self.zero_traces()]
        self.t0 = brainstate.ShortTermState(jnp.zeros((), jnp.int32))

    @staticmethod
    def choose_chunk(model, options: RuleOptions) -> int:
        why_not = chunk_engine.why_not(model)
        return chunk_for(RuleOptions(**dict(vars(options), several_devices=False, step_hook=False,
                                            vjp_time='t')), True, why_not)

    def carried_states(self) -> dict:
        out = {'trace_steps': self.t0}
        out.update({f'trace/{i}': st for i, st in enumerate(self.traces)})
        return out

    def reset(self):
        for st, zero in zip(self.traces, self.zero_traces()):
            st.value = zero
        self.t0.value = jnp.zeros((), jnp.int32)

    def zero_traces(self) -> list:
        raise NotImplementedError

    def chunk_update(self, key, rel, trace, t0):
        raise NotImplementedError

    def extra_kwargs(self) -> dict:
        return dict(self.chunk_kwargs, reset_every=self.reset_every())

    def gradients(self, xs, targets, objective, step_hook=None, keep_outputs=False, hook_inputs=None) -> Result:
        if step_hook is not None:
            raise UserError(f'--method {self.name} cannot call a step hook (--stream_reset 1)')
        grads, loss, wout, outs, traces, t_end = chunk_engine.chunked_online_gradients(
            self.model, self.chunk_update, self.trace_chunk, xs, targets, objective,
            [st.value for st in self.traces], self.t0.value, keep_outputs, **self.extra_kwargs())
        for st, tr in zip(self.traces, traces):
            st.value = tr
        self.t0.value = t_end
        return Result({k: grads[s] for k, s in self.params.items() if s in grads}, loss, wout, outs)
