"""e-prop (Bellec et al. 2020, Nat. Commun. 11:3625) as the paper writes it, per weight W_ji:

    eps_t = D_t eps_{t-1} + x_t df_t          the eligibility vector: one component per state of neuron j
                                              (D-RTRL's trace without the pseudo-derivative)
    e_t   = psi_t . eps_t                     the eligibility trace: psi_t = d o_t / d h_t, the output's
                                              derivative by the states (ALIF: (psi, -beta psi); GIF: (1, 0, 0))
    e~_t  = kappa e~_{t-1} + e_t              the pseudo-derivative inside the low-pass filter
    grad  = sum_t Lz_t e~_t                   Lz_t = the readout error of step t at the neuron's output

Memory O(B P (S + 1)): eps (S floats) and e~ (1 float) per weight and sample.

The learning signal Lz_t is the readout error of step t carried to the layer's output within step t: through
the readout weight (symmetric feedback, --eprop_feedback symmetric) or a fixed random matrix of the readout
weight's shape and scale (--eprop_feedback random); the layers below the last one get it through the upper
layers' weights within the step. kappa (--eprop_kappa) defaults to the readout's decay: then e~ carries the
path by which a step's spikes reach later readouts through the leaky readout, and for one layer without
recurrent weights and with a detached reset e-prop is BPTT's gradient (tests/test_online_rules.py). With
kappa = 0 and symmetric feedback it is D-RTRL wherever brainscale's learning signal is Lz_t psi_t (LIF, ALIF
layers; not where a new state enters another within the step: the GIF and LIF-exp layers, where e-prop is the
exact one of the two). The readout's own weights keep their exact D-RTRL trace (for a leaky readout: the
kappa-filtered input, Bellec's output-weight rule).

Chunked and step by step (K = 1 chunks) alike: (eps, e~) is one trace of S + 1 states per weight with the
transition [[D_t, 0], [psi_t^T D_t, kappa]], the input (df_t, psi_t . df_t) and the signal (0, Lz_t): D-RTRL's
chunk update (rsnn/rules/d_rtrl.py) on that augmented relation.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from rsnn.rules import chunk_engine
from rsnn.rules.engine_rule import EngineRule
from rsnn.rules.d_rtrl import drtrl_chunk, zero_trace
from rsnn.errors import UserError

FEEDBACKS = ('symmetric', 'random')


def bellec_relation(rel, kappa: float):
    """The relation of (eps, e~): D' = [[D, 0], [psi^T D, kappa]], df' = (df, psi . df), L' = (0, Lz)."""
    D, df, psi, Lz = rel['D'], rel['df'], rel['psi'], rel['Lz']
    S = D.shape[-1]
    top = jnp.concatenate([D, jnp.zeros(D.shape[:-1] + (1,), D.dtype)], axis=-1)          # (..., S, S + 1)
    psi_D = chunk_engine.apply_transposed(D, psi)                                          # (..., S)
    bottom = jnp.concatenate([psi_D, jnp.full(psi_D.shape[:-1] + (1,), kappa, D.dtype)], axis=-1)
    D_aug = jnp.concatenate([top, bottom[..., None, :]], axis=-2)                          # (..., S + 1, S + 1)
    df_aug = jnp.concatenate([df, jnp.sum(psi * df, axis=-1, keepdims=True)], axis=-1)
    L_aug = jnp.concatenate([jnp.zeros(Lz.shape + (S,), Lz.dtype), Lz[..., None]], axis=-1)
    return dict(x=rel['x'], D=D_aug, df=df_aug, L=L_aug)


class EProp(EngineRule):
    name = 'eprop'

    def __init__(self, model, params, options):
        extra = options.extra
        kappa = extra.get('eprop_kappa')
        self.kappa = float(model.out.decay if kappa is None else kappa)
        if not 0. <= self.kappa < 1.:
            raise UserError(f'--eprop_kappa must be in [0, 1), got {self.kappa}')
        self.feedback_kind = extra.get('eprop_feedback') or 'symmetric'
        if self.feedback_kind not in FEEDBACKS:
            raise UserError(f"--eprop_feedback must be one of {', '.join(FEEDBACKS)}, got {self.feedback_kind!r}")
        self.feedback = None
        if self.feedback_kind == 'random':  # fixed for the run: (n_out, n) at the readout weight's scale
            w = np.asarray(model.out.linear.weight_op.value['weight'])
            rng = np.random.default_rng(int(extra.get('eprop_feedback_seed', 12345)))
            self.feedback = jnp.asarray(rng.normal(0., float(w.std()) or 1., w.T.shape), jnp.float32)
        super().__init__(model, params, options)

    def extra_kwargs(self) -> dict:
        out = {'output_signals': True}
        if self.feedback is not None:
            out['feedback'] = self.feedback
        return out

    def zero_traces(self) -> list:
        """(trace_W (B, I, S', J), trace_b (B, J, S')) per relation (D-RTRL's layout, d_rtrl.zero_trace);
        S' = S + 1 for the layers (eps and e~), 1 for the readout."""
        B = self.options.batch_size
        shapes = chunk_engine.relation_shapes(self.model)
        return [zero_trace(B, n_in, n_out, S if i == len(shapes) - 1 else S + 1)
                for i, (n_in, n_out, S) in enumerate(shapes)]

    def chunk_update(self, key, rel, trace, t0):
        if key == 'out':
            return drtrl_chunk(rel, trace)
        return drtrl_chunk(bellec_relation(rel, self.kappa), trace)
