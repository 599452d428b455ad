"""Online gradients against BPTT on the same batch and initial states (T >= 20).

Theory: D-RTRL is exact when every hidden state's Jacobian is diagonal and each step's loss reads only
that step's states; a leaky readout's own weight has an elementwise trace, so its D-RTRL gradient is
exact too, even in a recurrent network.
"""
import brainscale
import brainstate
import braintools
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
import utils

T, BATCH, N_IN, N_HID, N_OUT = 30, 8, 12, 16, 3


class FeedForwardLIF(brainstate.nn.Module):
    """x_t W -> LIF (no recurrent weights) -> out_t = V_t W_o (+ optional leak on the readout)."""

    def __init__(self, leaky_readout: bool, seed=0):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.n = N_HID
        w = rng.normal(0, 1.5 / np.sqrt(N_IN), (N_IN, N_HID)).astype(np.float32)
        self.linear = brainscale.nn.Linear(N_IN, N_HID, w_init=w, b_init=braintools.init.Constant(0.1))
        self.spk = models.make_surrogate('relu')
        if leaky_readout:
            self.out = models.LeakyReadout(N_HID, N_OUT, tau_o=10., dt=1., w_scale=1., rng=rng)
        else:
            w_o = rng.normal(0, 1 / np.sqrt(N_HID), (N_HID, N_OUT)).astype(np.float32)
            self.out = brainscale.nn.Linear(N_HID, N_OUT, w_init=w_o, b_init=braintools.init.ZeroInit())

    def init_state(self, batch_size=None, **kwargs):
        self.V = brainstate.HiddenState(jnp.zeros((batch_size, self.n)))

    def reset_state(self, batch_size=None, **kwargs):
        self.V.value = jnp.zeros((batch_size, self.n))

    def update(self, x):
        s = jax.lax.stop_gradient(self.spk(self.V.value - 1.))
        V = 0.9 * (self.V.value - s) + self.linear(x)
        self.V.value = V
        return self.out(V)


def batch(seed=1, n_in=N_IN, t=T):
    rng = np.random.default_rng(seed)
    xs = (rng.random((t, BATCH, n_in)) < 0.3).astype(np.float32)
    labels = rng.integers(0, N_OUT, BATCH).astype(np.int32)
    return xs, labels


def gradients(make_model, method, xs, labels, ws, **kw):
    brainstate.environ.set(dt=1.)
    trainer = utils.Trainer(make_model(), method, xs.shape[-1], BATCH, **kw)
    return {k: np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(trainer.gradients(xs, labels, ws))[0]}


def keyname(path):
    return jax.tree_util.keystr(path)


def compare(g_ref, g):
    out = {}
    for k, ref in g_ref.items():
        a, b = ref.ravel(), g[k].ravel()
        cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))
        rel = float(np.linalg.norm(a - b) / (np.linalg.norm(a) + 1e-30))
        out[keyname(k)] = (cos, rel)
    return out


@pytest.fixture(scope='module')
def every_step():
    return np.full(T, 1. / T, np.float32)


def test_drtrl_exact_without_recurrence_and_memoryless_readout(every_step):
    xs, labels = batch()
    g_bptt = gradients(lambda: FeedForwardLIF(False), 'bptt', xs, labels, every_step)
    g_diag = gradients(lambda: FeedForwardLIF(False), 'diag', xs, labels, every_step)
    result = compare(g_bptt, g_diag)
    assert len(result) == 4  # hidden weight + bias, readout weight + bias
    for name, (cos, rel) in result.items():
        assert cos >= 0.9999 and rel < 1e-3, (name, cos, rel)


def test_drtrl_leaky_readout_weight_exact(every_step):
    xs, labels = batch()
    g_bptt = gradients(lambda: FeedForwardLIF(True), 'bptt', xs, labels, every_step)
    g_diag = gradients(lambda: FeedForwardLIF(True), 'diag', xs, labels, every_step)
    result = compare(g_bptt, g_diag)
    readout = {k: v for k, v in result.items() if "['out/" in k}
    assert len(readout) == 2
    for name, (cos, rel) in readout.items():
        assert cos >= 0.9999 and rel < 1e-3, (name, cos, rel)


def test_unpatched_brainscale_gets_the_leaky_readout_wrong(every_step, monkeypatch):
    """The bug the patch fixes: brainscale 0.1.0 rescales traces by their max, shrinking gradients."""
    import brainscale._etrace_vjp_algorithms as alg
    xs, labels = batch()
    g_bptt = gradients(lambda: FeedForwardLIF(True), 'bptt', xs, labels, every_step)
    monkeypatch.setattr(utils, 'patch_brainscale_drtrl', lambda: None)
    monkeypatch.setattr(alg, '_normalize_vector', getattr(alg, '_original_normalize_vector', alg._normalize_vector))
    g_diag = gradients(lambda: FeedForwardLIF(True), 'diag', xs, labels, every_step)
    rel = [r for k, (c, r) in compare(g_bptt, g_diag).items() if "['out/" in k and 'weight' in k][0]
    assert rel > 0.3


def dms_net():
    return models.DMSNet(N_IN, N_HID, N_OUT, dt=1., tau_neu=20., tau_syn=10., tau_I2=200., A2=0.5,
                         ff_scale=6., rec_scale=2., seed=3)


@pytest.fixture(scope='module')
def recurrent_grads(every_step):
    xs, labels = batch(seed=2, t=40)
    ws = np.full(40, 1. / 40, np.float32)
    return {m: gradients(dms_net, m, xs, labels, ws, etrace_decay=0.9) for m in ('bptt', 'diag', 'expsm_diag')}


def test_recurrent_dms_net_readout_exact_for_drtrl(recurrent_grads):
    result = compare(recurrent_grads['bptt'], recurrent_grads['diag'])
    readout = {k: v for k, v in result.items() if "['out/" in k}
    assert len(readout) == 2
    for name, (cos, rel) in readout.items():
        assert cos >= 0.9999 and rel < 1e-3, (name, cos, rel)


def test_recurrent_dms_net_online_cosines(recurrent_grads):
    """Approximate gradients of the recurrent weights: measured cosines 0.954 (D-RTRL) and 0.955 (ES-D-RTRL) here."""
    for method, threshold in (('diag', 0.9), ('expsm_diag', 0.9)):
        result = compare(recurrent_grads['bptt'], recurrent_grads[method])
        print(method, {k: round(c, 4) for k, (c, r) in result.items()})
        for name, (cos, rel) in result.items():
            assert cos >= threshold, (method, name, cos)
