"""e-prop (Bellec et al. 2020, Nat. Commun. 11:3625): the D-RTRL eligibility trace e_t = D_t e_{t-1} +
x_t df_t of each weight, low-pass filtered with kappa, e~_t = kappa e~_{t-1} + e_t, read against the
same-step learning signal: grad = sum_t L_t e~_t. Memory O(2 B P S) (e and e~).

The learning signal L_t is the readout error of step t carried back to the neurons within step t: through the
readout weight (symmetric feedback, --eprop_feedback symmetric: for one recurrent layer exactly the signal D-RTRL
uses) or through a fixed random matrix of the readout weight's shape and scale (--eprop_feedback random; the
layers below the last one get it through the upper layers' weights, within the step, as D-RTRL's signal does).
kappa (--eprop_kappa) defaults to the readout's decay: then e~ carries the path by which the step's spikes
reach later readouts through the leaky readout (Bellec's derivation). With kappa = 0 and symmetric feedback
e-prop is D-RTRL (tests/test_online_rules.py). The readout's own weights keep their exact D-RTRL trace
(for a leaky readout it is the kappa-filtered input, Bellec's output-weight rule).

Chunked: (e, e~) is one trace of 2S states per weight with the transition [[D_t, 0], [D_t, kappa]] and the input
(df_t, df_t), read against (0, L_t): D-RTRL's chunk update (rsnn/rules/d_rtrl.py) on that augmented relation.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from rsnn.rules import chunks
from rsnn.rules.chunked_rule import ChunkedRule
from rsnn.rules.d_rtrl import drtrl_chunk
from utils import UserError

FEEDBACKS = ('symmetric', 'random')


def augmented(rel, kappa: float):
    """The relation of (e, e~): D' = [[D, 0], [D, kappa I]], df' = (df, df), L' = (0, L)."""
    D, df, L = rel['D'], rel['df'], rel['L']
    S = D.shape[-1]
    eye = kappa * jnp.broadcast_to(jnp.eye(S, dtype=D.dtype), D.shape)
    top = jnp.concatenate([D, jnp.zeros_like(D)], axis=-1)
    bottom = jnp.concatenate([D, eye], axis=-1)
    return dict(x=rel['x'], D=jnp.concatenate([top, bottom], axis=-2), df=jnp.concatenate([df, df], axis=-1),
                L=jnp.concatenate([jnp.zeros_like(L), L], axis=-1))


class EProp(ChunkedRule):
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
        return {} if self.feedback is None else {'feedback': self.feedback}

    def zero_traces(self) -> list:
        """(e_W (B, I, J, S'), e_b (B, J, S')) per relation; S' = 2S for the layers (e and e~), 1 for the readout."""
        B = self.options.batch_size
        shapes = chunks.relation_shapes(self.model)
        return [(jnp.zeros((B, n_in, n_out, S if i == len(shapes) - 1 else 2 * S)),
                 jnp.zeros((B, n_out, S if i == len(shapes) - 1 else 2 * S)))
                for i, (n_in, n_out, S) in enumerate(shapes)]

    def chunk_update(self, key, rel, trace, t0):
        if key == 'out':
            return drtrl_chunk(rel, trace)
        return drtrl_chunk(augmented(rel, self.kappa), trace)
