"""SnAp-1 (Menick et al. 2021, ICLR): RTRL's influence recursion J_t = (d h_t / d h_{t-1}) J_{t-1} + d h_t / d theta
kept on its one-step sparsity pattern: the influence of a weight on the neuron it drives only. Per weight, sample
and state: e_t = D~_t e_{t-1} + x_t df_t, where D~_t is the neuron's full one-step Jacobian, its own states'
D_t (D-RTRL's) plus the path through its own recurrent weight:
    D~_t[k, s] = D_t[k, s] + df_t[k] W_rec[j, j] d s_{t-1}[j] / d h_{t-1}[s].
D-RTRL drops that term (all recurrent mixing); SnAp-1 equals D-RTRL where diag(W_rec) = 0
(tests/test_online_rules.py). Memory O(B P S), as D-RTRL. grad = sum_t L_t e_t (same-step learning signal).

Chunked: D-RTRL's chunk update (rsnn/rules/d_rtrl.py) with D~ in place of D; chunk_engine.py gives ds and diag(W_rec)
(its `self_recurrence` extra). The readout has no recurrent weight: D-RTRL there.
"""
from __future__ import annotations


from rsnn.rules import chunk_engine
from rsnn.rules.engine_rule import EngineRule
from rsnn.rules.d_rtrl import drtrl_chunk, zero_trace


def with_self_recurrence(rel):
    D = rel['D'] + rel['w_self'][:, None, None] * rel['df'][..., :, None] * rel['ds'][..., None, :]
    return dict(rel, D=D)


class SnAp1(EngineRule):
    name = 'snap1'
    chunk_kwargs = {'self_recurrence': True}

    def zero_traces(self) -> list:
        """(e_W (B, I, S, J), e_b (B, J, S)) per relation (layers..., readout), as D-RTRL."""
        B = self.options.batch_size
        return [zero_trace(B, n_in, n_out, S)
                for n_in, n_out, S in chunk_engine.relation_shapes(self.model)]

    def chunk_update(self, key, rel, trace, t0):
        if key == 'out':
            return drtrl_chunk(rel, trace)
        return drtrl_chunk(with_self_recurrence(rel), trace)
