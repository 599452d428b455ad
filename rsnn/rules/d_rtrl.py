"""D-RTRL (diagonal RTRL, the paper's parameter-dimension algorithm): one eligibility trace per weight, per sample and hidden state, e_t = D_t e_{t-1} + x_t df_t;
the gradient sum_t L_t e_t. Memory O(B P S), constant in T.

L_t is the loss of step t through the paths within step t only (brainscale's single-step learning signal), so
the path by which a step's spikes reach later losses through a leaky readout (r_t = a r_{t-1} + ...) is not in
it: on one LIF layer without recurrent weights D-RTRL's gradient has about 1 - a of BPTT's norm
(tests/test_rule_fidelity.py). That is brainscale's algorithm as published, and the default. The option
--drtrl_readout_filter 1 adds that path where it is cheap to: each layer trace is low-pass filtered with the
readout's decay a, e~_t = a e~_{t-1} + e_t, and read as sum_t L_t e~_t (the layer traces doubled: O(2 B P S));
it runs on the chunked path only (at --trace_chunk 1 its one-step chunks, not brainscale).

Its step-by-step path is brainscale 0.1.0's `ParamDimVjpAlgorithm` (as changed by rsnn/brainscale_adapter.py);
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
from rsnn.errors import UserError
from rsnn.methods import VJP_METHODS



class DRTRL(BrainscaleRule):
    """D-RTRL: brainscale's ParamDimVjpAlgorithm step by step (--trace_chunk 1), or K steps at a time for this
    repository's networks (rsnn/rules/chunk_engine.py; the same gradient)."""
    auto_name = 'diag'

    def __init__(self, model, params, options: RuleOptions):
        self.readout_filter = None
        if options.extra.get('drtrl_readout_filter'):
            if not chunk_engine.supports(model):
                raise UserError('--drtrl_readout_filter 1 needs the chunked traces, which do not know '
                                f'{type(model).__name__}; use --drtrl_readout_filter 0')
            self.readout_filter = float(model.out.decay)
        super().__init__(model, params, options)

    def chunked_only(self) -> str:
        return '--drtrl_readout_filter 1' if self.readout_filter is not None else super().chunked_only()

    @staticmethod
    def chunk_refusal():
        if not brainscale_adapter.drtrl_fix_active():
            return "brainscale's own D-RTRL trace rescaling is on"
        return None

    @staticmethod
    def brainscale_algorithm(model, options: RuleOptions):
        return brainscale.ParamDimVjpAlgorithm(model, mode=brainstate.mixin.Batching(),
                                               vjp_method=VJP_METHODS[options.vjp_time])

    def zero_traces(self) -> list:
        """(e_W (B, I, S, J), e_b (B, J, S)) per relation (layers..., readout; `zero_trace`); with the readout
        filter the layers' S is 2S (e and e~). e_W has the neurons J innermost, so that the per-neuron S x S
        mixing of `update_in_place` runs on rows of J contiguous floats."""
        B = self.options.batch_size
        out, seen = [], {}
        shapes = chunk_engine.relation_shapes(self.model)
        if self.readout_filter is not None:
            shapes = [(n_in, n_out, 2 * S) for n_in, n_out, S in shapes[:-1]] + shapes[-1:]
        for n_in, n_out, S in shapes:
            # Two relations of the same shape (layers 2 and 3) get +0 and -0: XLA merges equal constants, and
            # two loop carries that start from one zero buffer cost a copy of a whole trace. -0 and +0 give
            # the same sums, exactly.
            n = seen[(n_in, n_out, S)] = seen.get((n_in, n_out, S), -1) + 1
            out.append(zero_trace(B, n_in, n_out, S, -0. if n % 2 else 0.))
        return out

    def chunk_update(self, key, rel, trace, t0):
        if self.readout_filter is not None and key != 'out':
            return drtrl_chunk(filtered_relation(rel, self.readout_filter), trace)
        return drtrl_chunk(rel, trace)


def zero_trace(B: int, n_in: int, n_out: int, S: int, zero: float = 0.):
    """A relation's zero trace for `drtrl_chunk` (D-RTRL, and the rules that run its chunk update: SnAp-1,
    e-prop): (e_W (B, n_in, S, n_out), e_b (B, n_out, S)); `zero` is 0. or -0. With one state per neuron e_W
    is (B, n_in, n_out, 1), the same bytes: XLA fuses that shape's update without copying each sample's slice
    first (`update_in_place`)."""
    shape = (B, n_in, n_out, 1) if S == 1 else (B, n_in, S, n_out)
    return jnp.full(shape, zero, jnp.float32), jnp.zeros((B, n_out, S))


def filtered_relation(rel, a: float):
    """The relation of (e, e~ = a e~ + e): D' = [[D, 0], [D, a I]], df' = (df, df), L' = (0, L)."""
    D, df, L = rel['D'], rel['df'], rel['L']
    S = D.shape[-1]
    eye = a * jnp.broadcast_to(jnp.eye(S, dtype=D.dtype), D.shape)
    top = jnp.concatenate([D, jnp.zeros_like(D)], axis=-1)
    bottom = jnp.concatenate([D, eye], axis=-1)
    return dict(x=rel['x'], D=jnp.concatenate([top, bottom], axis=-2), df=jnp.concatenate([df, df], axis=-1),
                L=jnp.concatenate([jnp.zeros_like(L), L], axis=-1))


def drtrl_chunk(rel, trace):
    """D-RTRL over one chunk (brainscale's ParamDimVjpAlgorithm with the adapter's trace fix, single-step
    VJP; rsnn/rules/chunk_engine.py). trace = (e_w (B, I, S, J), e_b (B, J, S))."""
    x, D, df, L = rel['x'], rel['D'], rel['df'], rel['L']
    e_w, e_b = trace
    eye = jnp.broadcast_to(jnp.eye(D.shape[-1], dtype=D.dtype), D.shape[1:])

    def back(carry, inp):
        """Backwards in time, step by step (a few flops per neuron and step; a log-depth associative scan over
        the chunk writes K x B x J x S x S buffers log2(K) times and took longer, docs/chunked-traces.md).
        At step t the carry is Phi(K, t)^T and D_{t+1}^T Lambda_{t+1}; Lambda_t = L_t + D_{t+1}^T Lambda_{t+1},
        q_t = Phi(K, t) df_t, and D_t^T carries both one step back (after step 1: Phi(K, 0)^T and
        D_1^T Lambda_1, the two values the trace update needs)."""
        Phi_T, lam_in = carry
        lam = lam_in + inp['L']
        D_T = jnp.swapaxes(inp['D'], -1, -2)
        new = (chunk_engine.matmul(D_T, Phi_T), chunk_engine.apply_matrix(D_T, lam))
        return new, (chunk_engine.apply_transposed(Phi_T, inp['df']), lam)

    (phi_all_T, M), (qs, lams) = jax.lax.scan(back, (eye, jnp.zeros_like(L[0])), dict(D=D, L=L, df=df),
                                              reverse=True)
    phi_all = jnp.swapaxes(phi_all_T, -1, -2)                                        # Phi(K, 0)
    h = jnp.sum(df * lams, axis=-1)                                                  # (K, B, J)
    e_w, g_w = update_in_place(e_w, M, phi_all, x, qs)
    grad = {'weight': g_w + recurrence.rows_product(x, h),
            'bias': jnp.sum(e_b * M, axis=(0, 2)) + recurrence.rows_sum(h)}
    e_b = brainscale_adapter.new_trace(e_b, phi_all, jnp.sum(qs, axis=0))
    return grad, (e_w, e_b)


def update_in_place(e_w, M, phi_all, x, qs):
    """The weight trace's gradient read and update of one chunk, one sample at a time, in place:
    for each b, g += sum_s e_w[b, :, s, :] M[b, :, s] (the old trace, read first), then
    e_w[b, :, k, :] = sum_s Phi(K, 0)[b, :, k, s] e_w[b, :, s, :] + (x[:, b]^T q[:, b])[:, k, :] (a product over
    the K steps). Each sample's slice is read once for both and written back where it was
    (dynamic_update_slice in a loop: XLA updates the buffer in place), so the step holds the trace once plus
    one sample's slice (I x S x J), instead of the old trace, a B x I x S x J product and the new trace side
    by side. With J innermost the mixing is element-wise on rows of J floats (with S innermost it took 1.1 x
    the whole step's time, docs/chunked-traces.md).
    e_w (B, I, S, J) (one state: (B, I, J, 1)), M (B, J, S), phi_all (B, J, S, S), x (K, B, I), qs (K, B, J, S)."""
    if M.shape[-1] == 1:  # S from M: e_w's last axis is also 1 for a layer of one neuron (J = 1)
        return update_in_place_one_state(e_w, M, phi_all, x, qs)
    B, I, S, J = e_w.shape
    K = x.shape[0]
    q_rows = jnp.swapaxes(qs, -1, -2).reshape(K, B, S * J)                             # (K, B, S J)
    m_rows = jnp.swapaxes(M, -1, -2)                                                   # (B, S, J)
    phi_rows = jnp.transpose(phi_all, (0, 2, 3, 1))                                    # (B, k, s, J)

    def sample(b, carry):
        e_w, g = carry
        e = jax.lax.dynamic_index_in_dim(e_w, b, 0, keepdims=False)                  # (I, S, J)
        m = jax.lax.dynamic_index_in_dim(m_rows, b, 0, keepdims=False)               # (S, J)
        g = g + jnp.sum(e * m[None], axis=1)
        xb = jax.lax.dynamic_index_in_dim(x, b, 1, keepdims=False)                   # (K, I)
        qb = jax.lax.dynamic_index_in_dim(q_rows, b, 1, keepdims=False)              # (K, S J)
        phg = (xb.T @ qb).reshape(I, S, J)
        phi = jax.lax.dynamic_index_in_dim(phi_rows, b, 0, keepdims=False)           # (k, s, J)
        # `+ 0 * g`: the write-back then depends on the gradient read, so XLA knows the read comes first
        # and updates the trace in place; without it XLA copies the whole trace (twice) for every sample
        new = phg + jnp.sum(phi[None] * e[:, None], axis=2) + 0. * g[:, None, :]
        return jax.lax.dynamic_update_index_in_dim(e_w, new[None], b, 0), g

    return jax.lax.fori_loop(0, B, sample, (e_w, jnp.zeros((I, J), e_w.dtype)))


def update_in_place_one_state(e_w, M, phi_all, x, qs):
    """update_in_place for one state per neuron, e_w (B, I, J, 1): each sample's slice is read inside the
    gradient read's and the update's fusions (the general form's reduce over the states made XLA copy the
    slice first: 2.12 s against 1.88 s for the image network's D-RTRL step, alternating in one process)."""
    B, I, J, _ = e_w.shape
    K = x.shape[0]

    def sample(b, carry):
        e_w, g = carry
        e = jax.lax.dynamic_index_in_dim(e_w, b, 0, keepdims=False)                  # (I, J, 1)
        m = jax.lax.dynamic_index_in_dim(M, b, 0, keepdims=False)                    # (J, 1)
        g = g + e[:, :, 0] * m[None, :, 0]
        xb = jax.lax.dynamic_index_in_dim(x, b, 1, keepdims=False)                   # (K, I)
        qb = jax.lax.dynamic_index_in_dim(qs, b, 1, keepdims=False)                  # (K, J, 1)
        phg = (xb.T @ qb.reshape(K, J)).reshape(1, I, J, 1)
        phi = jax.lax.dynamic_index_in_dim(phi_all, b, 0, keepdims=True)             # (1, J, 1, 1)
        new = brainscale_adapter.new_trace(e[None], phi, phg) + 0. * g[None, :, :, None]  # `+ 0 * g`: as above
        return jax.lax.dynamic_update_index_in_dim(e_w, new, b, 0), g

    return jax.lax.fori_loop(0, B, sample, (e_w, jnp.zeros((I, J), e_w.dtype)))
