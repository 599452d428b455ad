"""OTTT, online training through time (Xiao et al. 2022, NeurIPS): the presynaptic trace a^_t = lambda a^_{t-1} + x_t
of each weight matrix input and the instantaneous surrogate gradient: grad_W = sum_t a^_t^T (sum_s df_t[s] L_t[s]),
with df_t = d h_t / d y_t (the surrogate derivative through the step) and L_t the same-step learning signal.
No output-side recursion: ES-D-RTRL's input-side trace alone, i.e. ES-D-RTRL with its output-side decay set to 0
(tests/test_online_rules.py). Memory O(B I) per weight matrix. lambda: --etrace_decay (as ES-D-RTRL's input trace).

Chunked as ES-D-RTRL's input side: with G_t = sum_s df_t L_t and G~_s = sum_{t>=s} lambda^(t-s) G_t,
dW = X^T G~ + lambda a^_0^T G~_1: one product over the K x B rows of a chunk.
"""
from __future__ import annotations

import jax.numpy as jnp

from rsnn import recurrence
from rsnn.rules import chunk_engine
from rsnn.rules.engine_rule import EngineRule
from rsnn.rules.es_d_rtrl import decay_of


def ottt_chunk(rel, xhat, lam: float):
    """OTTT over one chunk; xhat (B, I) the presynaptic trace before it. Returns (grad dict, xhat after)."""
    x, df, L = rel['x'], rel['df'], rel['L']
    K = x.shape[0]
    G = jnp.sum(df * L, axis=-1)                                                     # (K, B, J)
    steps = jnp.arange(K)
    lag = steps[None, :] - steps[:, None]
    later = jnp.where(lag >= 0, lam ** jnp.maximum(lag, 0).astype(G.dtype), 0.)      # lambda^(t-s), t >= s
    G_tilde = (later @ G.reshape(K, -1)).reshape(G.shape)
    dW = recurrence.rows_product(x, G_tilde) + lam * xhat.T @ G_tilde[0]
    powers = lam ** jnp.arange(K - 1, -1, -1, dtype=x.dtype)
    xhat_end = lam ** K * xhat + jnp.einsum('k,kbi->bi', powers, x)
    return {'weight': dW, 'bias': recurrence.rows_sum(G)}, xhat_end


class OTTT(EngineRule):
    name = 'ottt'

    @property
    def decay(self) -> float:
        return decay_of(self.options.extra.get('ottt_decay', self.options.etrace_decay))

    def zero_traces(self) -> list:
        """a^ (B, I) per relation (layers..., readout)."""
        B = self.options.batch_size
        return [jnp.zeros((B, n_in)) for n_in, _, _ in chunk_engine.relation_shapes(self.model)]

    def chunk_update(self, key, rel, trace, t0):
        return ottt_chunk(rel, trace, self.decay)
