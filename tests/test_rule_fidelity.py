"""Where a rule is exact, tested against BPTT's gradient over a finite window (T steps from zero states), and
what a rule drops, measured (docs/online-rules.md, the fidelity table):

- e-prop (Bellec 2020, psi inside the kappa filter) is BPTT's gradient for one LIF or ALIF layer without
  recurrent weights, with a detached reset and kappa = the readout's decay, on its chunked path and step by step;
  for the DMS network's GIF layer (no recurrent weights) with a memoryless readout, where D-RTRL's single-step
  signal counts the synaptic current's within-step path twice (norm ratio 1.16);
- D-RTRL drops the path through the leaky readout: on one LIF layer its gradient has a small fraction of BPTT's
  norm; --drtrl_readout_filter 1 restores most of it;
- UORO's readout gradient is BPTT's exactly (its own trace; only the layers' weights are estimated).
"""
import brainstate
import numpy as np
import pytest

import models
from test_chunked_traces import N_IN, N_REC
from test_online_rules import cosine, grads_of, make


def one_layer(model, rec_scale=0., seed=5):
    return models.SpikingStack(N_IN, N_REC, 3, 1, model=model, ff_scale=4., rec_scale=rec_scale,
                               detach_reset=True, seed=seed)


def fidelity(g_ref, g):
    return {k: (cosine(g_ref[k], g[k]), float(np.linalg.norm(g[k]) / np.linalg.norm(g_ref[k]))) for k in g_ref}


@pytest.mark.parametrize('model', ['lif-delta', 'alif-delta'])
def test_eprop_is_bptt_for_one_layer_without_recurrence(model):
    g_bptt = grads_of(make(one_layer(model), 'bptt'), 3)
    for K in (1, 7):
        tr = make(one_layer(model), 'eprop', K)
        assert tr.rule.kappa == pytest.approx(tr.model.out.decay)
        for k, (cos, ratio) in fidelity(g_bptt, grads_of(tr, 3)).items():
            assert cos >= 0.9999 and abs(ratio - 1) <= 1e-3, (model, K, k, cos, ratio)


def test_eprop_is_bptt_on_the_gif_layer_with_memoryless_readout():
    """The GIF layer's output is V, so psi = (1, 0, 0): e-prop reads the full derivative of V. D-RTRL's
    single-step signal also counts the within-step path of the new synaptic and adaptation currents into V,
    on top of the trace of V that already holds it (norm ratio 1.16 here)."""
    def dms():
        m = models.DMSNet(N_IN, N_REC, 2, dt=1., tau_neu=20., tau_syn=20., tau_I2=200., A2=1., ff_scale=6.,
                          rec_scale=0., seed=4)
        m.out.decay = 0.
        return m
    g_bptt = grads_of(make(dms(), 'bptt'), 2)
    for k, (cos, ratio) in fidelity(g_bptt, grads_of(make(dms(), 'eprop', 7), 2)).items():
        assert cos >= 0.9999 and abs(ratio - 1) <= 1e-3, (k, cos, ratio)
    drtrl = fidelity(g_bptt, grads_of(make(dms(), 'diag', 1), 2))
    assert max(abs(r - 1) for _, r in drtrl.values()) > 0.1, drtrl


def test_drtrl_misses_the_readout_path_and_the_filter_restores_most_of_it():
    """One LIF layer, no recurrent weights, leaky readout (decay 0.905): D-RTRL's layer gradient is a small
    fraction of BPTT's (0.14 of its norm here, T = 23); filtered with the readout's decay, 0.86."""
    g_bptt = grads_of(make(one_layer('lif-delta'), 'bptt'), 3)
    plain = fidelity(g_bptt, grads_of(make(one_layer('lif-delta'), 'diag', 1), 3))
    key = [k for k in plain if 'layers' in k and 'weight' in k and 'bias' not in k.split('[')[-1]][-1]
    assert plain[key][1] < 0.3, plain
    for K in (1, 7):
        tr = make(one_layer('lif-delta'), 'diag', K, drtrl_readout_filter=1)
        assert tr.rule.algo is None and tr.rule.readout_filter == pytest.approx(tr.model.out.decay)
        filtered = fidelity(g_bptt, grads_of(tr, 3))
        assert 0.7 < filtered[key][1] < 1.1 and filtered[key][0] > plain[key][0], (K, filtered, plain)


@pytest.mark.parametrize('per_sample', [0, 1])
def test_uoro_readout_gradient_is_bptts(per_sample):
    """The readout's weights keep their own exact trace: UORO's readout gradient is BPTT's (two layers, random
    signs in the layers' estimate), while its layer gradients are a noisy estimate."""
    from test_chunked_traces import KINDS
    g_bptt = grads_of(make(KINDS['lif-delta'](), 'bptt'), 3)
    g = grads_of(make(KINDS['lif-delta'](), 'uoro', 1, uoro_per_sample=per_sample), 3)
    out = [k for k in g_bptt if k.startswith("['out")]
    assert out
    for k in out:
        np.testing.assert_allclose(g[k], g_bptt[k], rtol=1e-5, atol=1e-7)
    assert min(cosine(g_bptt[k], g[k]) for k in g_bptt if k not in out) < 0.99
