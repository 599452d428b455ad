"""BrainscaleRule: what D-RTRL and ES-D-RTRL share: brainscale's algorithm step by step at --trace_chunk 1, or
the rule's own chunked update K steps at a time on the chunk engine (rsnn/rules/chunk_engine.py) with the traces as named brainstate states, carried
across updates on a stream and zeroed by `reset()` before each batch of trials.

A subclass gives `brainscale_algorithm(model, options)`, `zero_traces()`, `chunk_update(key, rel, trace, t0)`,
`auto_name` (its budget in rsnn.chunk_policy.auto_trace_chunk) and, where needed, `chunk_refusal()`.
"""
from __future__ import annotations

import brainstate
import jax
import jax.numpy as jnp

from rsnn import brainscale_adapter
from rsnn.rules import chunk_engine
from rsnn.rules.base import Result, Rule, RuleOptions, chunk_for, step_by_step
from rsnn.chunk_policy import auto_trace_chunk
from rsnn.errors import UserError

brainscale_adapter.ensure_adapted()  # before any brainscale algorithm is built


class BrainscaleRule(Rule):
    supports_trace_reset = True
    auto_name = ''  # the method whose buffer budget rsnn.chunk_policy.auto_trace_chunk applies

    def __init__(self, model, params: dict, options: RuleOptions):
        super().__init__(model, params, options)
        self.trace_chunk = self.choose_chunk(model, options)
        if self.reset_every() and chunk_engine.why_not(model):
            raise UserError(f'--trace_reset_every needs the chunked traces, which do not know '
                            f'{type(model).__name__}; drop --trace_reset_every')
        if self.chunked_only() and (options.vjp_time != 't' or options.several_devices or options.step_hook):
            raise UserError(f'{self.chunked_only()} needs the chunked traces: --vjp_time t, one device and '
                            '--stream_reset 0')
        self.supports_step_hook = self.trace_chunk == 1 and not self.chunked_only()
        if self.trace_chunk == 1 and not self.chunked_only():
            self.algo = self.brainscale_algorithm(model, options)
            self.algo.compile_graph(jnp.zeros((options.batch_size, options.n_in), jnp.float32))
        else:
            self.algo = None
            # abstract_traces (the memory command's --analysis_only): shapes only, nothing allocated; the
            # compiled step zeroes the traces itself before a batch of trials (reset)
            zeros = jax.eval_shape(self.zero_traces) if options.extra.get('abstract_traces') else self.zero_traces()
            self.traces = [brainstate.ShortTermState(t) for t in zeros]
            self.t0 = brainstate.ShortTermState(jnp.zeros((), jnp.int32))

    def chunked_only(self) -> str:
        """The option (its flag) for which the rule runs its chunked update even at K = 1 (brainscale's
        algorithm does not have it), or ''. --trace_reset_every is one: at --trace_chunk 1 the traces run
        step by step as one-step chunks of the engine (the same gradient as brainscale's)."""
        return '--trace_reset_every' if self.reset_every() else ''

    @staticmethod
    def chunk_refusal():
        """Why the chunked path cannot run (besides an unknown network), or None."""
        return None

    @classmethod
    def choose_chunk(cls, model, options: RuleOptions) -> int:
        """The K this rule runs with on `model` (rules.base.chunk_for)."""
        why_not = chunk_engine.why_not(model) or cls.chunk_refusal()
        return chunk_for(options, True, why_not, lambda: auto_trace_chunk(
            cls.auto_name, chunk_engine.relation_shapes(model), options.batch_size))

    def carried_states(self) -> dict:
        if self.algo is not None:
            return brainscale_adapter.trace_states(self.algo, self.model)
        out = {'trace_steps': self.t0}
        out.update({f'trace/{i}': st for i, st in enumerate(self.traces)})
        return out

    def reset(self):
        if self.algo is not None:
            self.algo.reset_state()
            return
        for st, zero in zip(self.traces, self.zero_traces()):
            st.value = zero
        self.t0.value = jnp.zeros((), jnp.int32)

    def gradients(self, xs, targets, objective, step_hook=None, keep_outputs=False, hook_inputs=None) -> Result:
        if self.algo is not None:
            return step_by_step(self.algo, self.model, self.params, xs, targets, objective, step_hook, keep_outputs,
                                hook_inputs)
        grads, loss, wout, outs, traces, t_end = chunk_engine.chunked_online_gradients(
            self.model, self.chunk_update, self.trace_chunk, xs, targets, objective,
            [st.value for st in self.traces], self.t0.value, keep_outputs, reset_every=self.reset_every())
        for st, tr in zip(self.traces, traces):
            st.value = tr
        self.t0.value = t_end
        return Result({k: grads[s] for k, s in self.params.items() if s in grads}, loss, wout, outs)
