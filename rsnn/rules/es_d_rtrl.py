"""ES-D-RTRL (exponentially smoothed D-RTRL, the paper's input/output-dimension algorithm): an input trace x^ per weight matrix input and an output trace f^ per neuron and state,
x^ <- a x^ + x, f^ <- a D f^ + (1 - a) df; the gradient ~ x^ (x) (f^ L). Memory O(B (I + n S)).

As D-RTRL (rsnn/rules/d_rtrl.py) it reads only the same-step learning signal L_t, so the path by which a
step's spikes reach later losses through a leaky readout is not in it: on one LIF layer without recurrent
weights its layer gradient has 0.07 of BPTT's norm, and the readout's own weight, also a trace-carrying weight
here, about 0.5 of its norm at decay 0.9 (scripts/rule_fidelity.py; docs/online-rules.md, "Fidelity").
brainscale's algorithm as published; no option adds the path (a rank-1 trace has no cheap place for it).

Its step-by-step path is brainscale 0.1.0's `IODimVjpAlgorithm` (as changed by rsnn/brainscale_adapter.py);
its chunked path (--trace_chunk K > 1, the default for this repository's networks) is `chunk_update`
below, driven by rsnn/rules/chunk_engine.py. The traces are carried across updates on a stream (the trainer
does not reset them there) and are zeroed by `reset()` before each batch of trials.
"""
from __future__ import annotations

import brainscale
import brainstate
import jax
import jax.numpy as jnp

from rsnn import brainscale_adapter, recurrence
from rsnn.rules import chunk_engine
from rsnn.rules.base import RuleOptions
from rsnn.rules.brainscale_rule import BrainscaleRule
from rsnn.methods import VJP_METHODS



def decay_of(decay_or_rank) -> float:
    """ES-D-RTRL's decay as brainscale's IODimVjpAlgorithm reads --etrace_decay: a float in (0, 1) is the
    decay, an integer rank r gives (r - 1) / (r + 1)."""
    if isinstance(decay_or_rank, int):
        return (decay_or_rank - 1) / (decay_or_rank + 1)
    return float(decay_or_rank)



class ESDRTRL(BrainscaleRule):
    """ES-D-RTRL: brainscale's IODimVjpAlgorithm step by step (--trace_chunk 1), or K steps at a time for this
    repository's networks (rsnn/rules/chunk_engine.py; the same gradient)."""
    auto_name = 'expsm_diag'

    @staticmethod
    def brainscale_algorithm(model, options: RuleOptions):
        return brainscale.IODimVjpAlgorithm(model, decay_or_rank=options.etrace_decay,
                                            mode=brainstate.mixin.Batching(),
                                            vjp_method=VJP_METHODS[options.vjp_time])

    @property
    def decay(self) -> float:
        return decay_of(self.options.etrace_decay)

    def zero_traces(self) -> list:
        """(x^ (B, I), f^ (B, J, S)) per relation (layers..., readout)."""
        B = self.options.batch_size
        return [(jnp.zeros((B, n_in)), jnp.zeros((B, n_out, S))) for n_in, n_out, S in chunk_engine.relation_shapes(self.model)]

    def chunk_update(self, key, rel, trace, t0):
        return es_drtrl_chunk(rel, trace, self.decay, t0)


def es_drtrl_chunk(rel, trace, decay: float, t0):
    """ES-D-RTRL over one chunk (brainscale's IODimVjpAlgorithm, single-step VJP; rsnn/rules/chunk_engine.py).
    trace = (x^ (B, I), f^ (B, J, S)); t0 = the chunk's first step (brainscale's running index)."""
    x, D, df, L = rel['x'], rel['D'], rel['df'], rel['L']
    xhat, fhat = trace
    K = x.shape[0]
    def f_step(f, inp):  # f^_t = a D_t f^_{t-1} + (1 - a) df_t: a few flops per neuron, step by step
        D_t, df_t = inp
        f = decay * chunk_engine.apply_matrix(D_t, f) + (1. - decay) * df_t
        return f, f

    _, fhats = jax.lax.scan(f_step, fhat, (D, df))
    n = t0 + jnp.arange(K)
    correction = jnp.where(n < 1000, 1. - (1. - decay) ** (n + 1).astype(x.dtype), 1.)
    G = jnp.sum(fhats / correction[:, None, None, None] * L, axis=-1)             # (K, B, J)
    steps = jnp.arange(K)
    lag = steps[None, :] - steps[:, None]                                            # t - s
    later = jnp.where(lag >= 0, decay ** jnp.maximum(lag, 0).astype(G.dtype), 0.)    # a^(t-s) for t >= s
    G_tilde = (later @ G.reshape(K, -1)).reshape(G.shape)                            # sum_{t>=s} a^(t-s) G_t
    dW = recurrence.rows_product(x, G_tilde) + decay * xhat.T @ G_tilde[0]
    powers = decay ** jnp.arange(K - 1, -1, -1, dtype=x.dtype)
    xhat_end = decay ** K * xhat + jnp.einsum('k,kbi->bi', powers, x)
    return {'weight': dW, 'bias': recurrence.rows_sum(G)}, (xhat_end, fhats[-1])
