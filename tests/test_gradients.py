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
from rsnn.trainer import Trainer

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
    trainer = Trainer(make_model(), method, xs.shape[-1], BATCH, **kw)
    return {k: np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(trainer.gradients(xs, labels, ws))[0]}


def keyname(path):
    return jax.tree_util.keystr(path)


def compare(g_ref, g):
    """{name: (cosine, relative error)} of g against the reference g_ref."""
    return {k: (cos, rel) for k, (cos, rel, ratio) in compare3(g_ref, g).items()}


def compare3(g_ref, g):
    """{name: (cosine, relative error, norm ratio |g| / |g_ref|)}."""
    out = {}
    for k, ref in g_ref.items():
        a, b = ref.ravel(), g[k].ravel()
        cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))
        rel = float(np.linalg.norm(a - b) / (np.linalg.norm(a) + 1e-30))
        out[keyname(k)] = (cos, rel, float(np.linalg.norm(b) / (np.linalg.norm(a) + 1e-30)))
    return out


def check(result, bounds):
    """bounds: [(fragment of the name, min cosine, (min ratio, max ratio))], one entry matching each name."""
    for name, (cos, rel, ratio) in result.items():
        hits = [b for b in bounds if b[0] in name]
        assert len(hits) == 1, (name, hits)
        _, min_cos, (lo, hi) = hits[0]
        assert cos >= min_cos and lo <= ratio <= hi, (name, round(cos, 5), round(ratio, 5), hits[0])


@pytest.fixture(scope='module')
def every_step():
    return np.full(T, 1. / T, np.float32)


def test_drtrl_exact_without_recurrence_and_memoryless_readout(every_step):
    xs, labels = batch()
    g_bptt = gradients(lambda: FeedForwardLIF(False), 'bptt', xs, labels, every_step)
    g_diag = gradients(lambda: FeedForwardLIF(False), 'diag', xs, labels, every_step)
    result = compare3(g_bptt, g_diag)
    assert len(result) == 4  # hidden weight + bias, readout weight + bias
    for name, (cos, rel, ratio) in result.items():
        assert cos >= 0.9999 and rel < 1e-3 and abs(ratio - 1) < 1e-3, (name, cos, rel, ratio)


def test_drtrl_leaky_readout_weight_exact(every_step):
    xs, labels = batch()
    g_bptt = gradients(lambda: FeedForwardLIF(True), 'bptt', xs, labels, every_step)
    g_diag = gradients(lambda: FeedForwardLIF(True), 'diag', xs, labels, every_step)
    result = compare3(g_bptt, g_diag)
    readout = {k: v for k, v in result.items() if "['out/" in k}
    assert len(readout) == 2
    for name, (cos, rel, ratio) in readout.items():
        assert cos >= 0.9999 and rel < 1e-3 and abs(ratio - 1) < 1e-3, (name, cos, rel, ratio)
    # The hidden weights reach the loss at later steps only through the readout's leak, a path that
    # D-RTRL cuts (another hidden state): the same direction (measured cosine 0.999), about 1/7 of the
    # norm (measured 0.146 bias, 0.148 weight; 1 - 0.905 = 0.095 if dL/dr were constant in time).
    check({k: v for k, v in result.items() if "['linear/" in k},
          [("['bias']", 0.998, (0.1, 0.2)), ("['weight']", 0.997, (0.1, 0.2))])


def test_esdrtrl_scale_on_a_leaky_readout(every_step):
    """ES-D-RTRL (decay lam = 0.9) on the leaky readout (decay d = exp(-1/10) = 0.905): brainscale 0.1.0
    filters the input as x_hat = lam x_hat + x (no 1 - lam) and the output factor as
    df_hat = lam D df_hat + (1 - lam) df, and a bias's implicit input 1 is not filtered at all. For a
    steady input the weight's trace is then (1 - d) / (1 - lam d) = 0.51 of the true one, the bias's
    (1 - lam)(1 - d) / (1 - lam d) = 0.051 (measured at T = 30: 0.498 and 0.062; cosines 0.9999).
    Without a leak (memoryless readout, no hidden state) brainscale takes the exact same-step gradient."""
    xs, labels = batch()
    g_bptt = gradients(lambda: FeedForwardLIF(True), 'bptt', xs, labels, every_step)
    g_es = gradients(lambda: FeedForwardLIF(True), 'expsm_diag', xs, labels, every_step, etrace_decay=0.9)
    check({k: v for k, v in compare3(g_bptt, g_es).items() if "['out/" in k},
          [("['bias']", 0.999, (0.04, 0.08)), ("['weight']", 0.999, (0.45, 0.55))])
    g_bptt = gradients(lambda: FeedForwardLIF(False), 'bptt', xs, labels, every_step)
    g_es = gradients(lambda: FeedForwardLIF(False), 'expsm_diag', xs, labels, every_step, etrace_decay=0.9)
    # hidden layer (V decay 0.9): measured bias 0.062, weight 0.491 of BPTT; memoryless readout exact
    check(compare3(g_bptt, g_es), [("out/weight_op']['bias']", 0.9999, (0.999, 1.001)),
                                   ("out/weight_op']['weight']", 0.9999, (0.999, 1.001)),
                                   ("linear/weight_op']['bias']", 0.999, (0.04, 0.08)),
                                   ("linear/weight_op']['weight']", 0.999, (0.44, 0.54))])


def test_unpatched_brainscale_gets_the_leaky_readout_wrong(every_step):
    """The bug the patch fixes: brainscale 0.1.0 rescales traces by their max, shrinking gradients."""
    from rsnn import brainscale_adapter
    xs, labels = batch()
    g_bptt = gradients(lambda: FeedForwardLIF(True), 'bptt', xs, labels, every_step)
    brainscale_adapter.adapt_brainscale(drtrl_fix=False)
    try:
        g_diag = gradients(lambda: FeedForwardLIF(True), 'diag', xs, labels, every_step)
        assert not brainscale_adapter.drtrl_fix_active()
    finally:
        brainscale_adapter.adapt_brainscale()  # the fix back on for the tests that follow
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
    result = compare3(recurrent_grads['bptt'], recurrent_grads['diag'])
    readout = {k: v for k, v in result.items() if "['out/" in k}
    assert len(readout) == 2
    for name, (cos, rel, ratio) in readout.items():
        assert cos >= 0.9999 and rel < 1e-3 and abs(ratio - 1) < 1e-3, (name, cos, rel, ratio)


def test_recurrent_dms_net_online_norm_ratios(recurrent_grads):
    """Norm of the online gradient over BPTT's (measured here, bounds with a margin): D-RTRL's recurrent
    layer 0.118 (bias) / 0.120 (weight), its readout exact; ES-D-RTRL (decay 0.9) 0.0054 / 0.043 for
    the recurrent layer, 0.059 / 0.499 for the readout (its scale, see test_esdrtrl_scale_on_a_leaky_readout)."""
    check(compare3(recurrent_grads['bptt'], recurrent_grads['diag']),
          [("rec/linear/weight_op']['bias']", 0.9, (0.08, 0.17)), ("rec/linear/weight_op']['weight']", 0.9, (0.08, 0.17)),
           ("out/linear/weight_op']['bias']", 0.9999, (0.999, 1.001)),
           ("out/linear/weight_op']['weight']", 0.9999, (0.999, 1.001))])
    check(compare3(recurrent_grads['bptt'], recurrent_grads['expsm_diag']),
          [("rec/linear/weight_op']['bias']", 0.9, (0.003, 0.009)),
           ("rec/linear/weight_op']['weight']", 0.9, (0.025, 0.065)),
           ("out/linear/weight_op']['bias']", 0.999, (0.04, 0.08)),
           ("out/linear/weight_op']['weight']", 0.999, (0.45, 0.55))])


def test_recurrent_dms_net_online_cosines(recurrent_grads):
    """Approximate gradients of the recurrent weights: measured cosines 0.954 (D-RTRL) and 0.955 (ES-D-RTRL) here."""
    for method, threshold in (('diag', 0.9), ('expsm_diag', 0.9)):
        result = compare(recurrent_grads['bptt'], recurrent_grads[method])
        print(method, {k: round(c, 4) for k, (c, r) in result.items()})
        for name, (cos, rel) in result.items():
            assert cos >= threshold, (method, name, cos)


# ------------------------------------------------------------------------------------------------
# A deep stack: 3 x 16 LIF-delta (models.SpikingStack) and a leaky readout
# ------------------------------------------------------------------------------------------------

DEEP_L, DEEP_N = 3, 16


def deep_stack():
    brainstate.environ.set(dt=1.)
    return models.SpikingStack(N_IN, DEEP_N, N_OUT, DEEP_L, model='lif-delta', seed=0, ff_scale=2.)


def layer_grads(make_model, method, xs, labels, ws):
    """{'layers/0', ..., 'out'}: the layer's weight and bias gradient as one flat vector."""
    brainstate.environ.set(dt=1.)
    trainer = Trainer(make_model(), method, xs.shape[-1], BATCH, etrace_decay=0.9)
    out = {}
    for key, g in trainer.gradients(xs, labels, ws).items():
        name = 'out' if key.startswith('out') else '/'.join(key.split('/')[:2])
        out[name] = np.concatenate([np.ravel(g['weight']), np.ravel(g['bias'])])
    return out


def drtrl_paths_reference(xs, labels, ws):
    """BPTT of deep_stack() restricted to the paths that D-RTRL keeps, per target layer: the target
    layer's own membrane leak V_{t-1} -> V_t (the diagonal of its hidden-to-hidden Jacobian; brainscale
    treats the recurrent spikes s_{t-1} as the input of the weight, so even the self-connection
    W_rec[i, i] is not in the diagonal), every other layer's and the readout's path from t-1 to t cut
    (stop_gradient), every same-step path (through the layers above and the readout) kept. Written out
    in jax from the network's own weights, decays and surrogate; returns layer_grads()'s layout."""
    sg = jax.lax.stop_gradient
    net = deep_stack()
    brainstate.nn.init_all_states(net, BATCH)
    layers = net.layers
    assert all(l.neuron == 'lif' and l.synapse == 'delta' and l.spk_reset == 'soft' and l.V_th == 1.
               for l in layers)
    f = layers[0].spk_fun
    params = {f'layers/{k}': dict(l.linear.weight_op.value) for k, l in enumerate(layers)}
    params['out'] = dict(net.out.linear.weight_op.value)

    def loss(params, target):
        def step(carry, inp):
            V, r = carry
            x, w = inp
            V = list(V)
            for k, layer in enumerate(layers):
                p = params[f'layers/{k}']
                V_prev = V[k] if target == f'layers/{k}' else sg(V[k])
                s_prev = sg(f(V_prev - 1.))     # input of the weight (and the reset): no gradient
                c = jnp.concatenate([x, s_prev], -1) @ p['weight'] + p['bias']
                V[k] = layer.mem_decay * (V_prev - s_prev) + c
                x = f(V[k] - 1.)
            r = net.out.decay * (r if target == 'out' else sg(r)) + x @ params['out']['weight'] + params['out']['bias']
            logp = jax.nn.log_softmax(r, -1)
            return (tuple(V), r), w * jnp.mean(-jnp.take_along_axis(logp, jnp.asarray(labels)[:, None], -1)[:, 0])

        init = (tuple(jnp.zeros((BATCH, DEEP_N)) for _ in layers), jnp.zeros((BATCH, N_OUT)))
        return jax.lax.scan(step, init, (jnp.asarray(xs), jnp.asarray(ws)))[1].sum()

    out = {}
    for target in params:
        g = jax.jit(jax.grad(loss), static_argnums=1)(params, target)[target]
        out[target] = np.concatenate([np.ravel(g['weight']), np.ravel(g['bias'])])
    return out


def cos_ratio(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))), float(np.linalg.norm(b) / np.linalg.norm(a))


def test_deep_stack_one_step_is_exact():
    """T = 1 from rest: no path through time exists, so D-RTRL must equal BPTT for every layer, and
    ES-D-RTRL must be BPTT times (1 - lam) / (1 - (1 - lam)^1) = 0.1 / 0.9 (its df filter and
    brainscale's bias correction), cosine 1."""
    xs, labels = batch(seed=1, t=1)
    ws = np.ones(1, np.float32)
    g = {m: layer_grads(deep_stack, m, xs, labels, ws) for m in ('bptt', 'diag', 'expsm_diag')}
    assert sorted(g['bptt']) == ['layers/0', 'layers/1', 'layers/2', 'out']
    for name, ref in g['bptt'].items():
        assert np.linalg.norm(ref) > 0, name
        cos, ratio = cos_ratio(ref, g['diag'][name])
        assert cos >= 0.9999 and abs(ratio - 1) < 1e-3, ('diag', name, cos, ratio)
        cos, ratio = cos_ratio(ref, g['expsm_diag'][name])
        assert cos >= 0.9999 and abs(ratio - 0.1 / 0.9) < 1e-3, ('expsm_diag', name, cos, ratio)


def test_deep_stack_drtrl_is_bptt_without_the_paths_it_cuts():
    """T = 30 (`python -m pytest -s tests/test_gradients.py -k deep_stack` prints the numbers).

    Measured: D-RTRL against BPTT, layers 0 / 1 / 2: cosine 0.779 / 0.892 / 0.757, norm ratio
    0.0041 / 0.0196 / 0.135; the readout exact. Against the path-restricted BPTT above: cosine 1.0000,
    ratio 1.0000 for every layer, so all of the gap is the method's approximation (the cut temporal
    paths through the upper layers' leaky membranes and the leaky readout), none of it an error.
    ES-D-RTRL (decay 0.9): cosine 0.706 / 0.833 / 0.702 and ratio 0.0019 / 0.0093 / 0.063 against
    BPTT; 0.92-0.96 and 0.46-0.47 against the restricted BPTT (its smoothing, and its scale
    (1 - d) / (1 - lam d) = 0.51 for membranes with d = 0.905).
    """
    xs, labels = batch(seed=1, t=T)
    ws = np.full(T, 1. / T, np.float32)
    g = {m: layer_grads(deep_stack, m, xs, labels, ws) for m in ('bptt', 'diag', 'expsm_diag')}
    ref = drtrl_paths_reference(xs, labels, ws)
    bptt_bounds = {'layers/0': (0.7, (0.002, 0.008)), 'layers/1': (0.8, (0.01, 0.04)),
                   'layers/2': (0.65, (0.08, 0.25)), 'out': (0.9999, (0.999, 1.001))}
    for name in ('layers/0', 'layers/1', 'layers/2', 'out'):
        c_ref, r_ref = cos_ratio(ref[name], g['diag'][name])
        c_bptt, r_bptt = cos_ratio(g['bptt'][name], g['diag'][name])
        c_es, r_es = cos_ratio(ref[name], g['expsm_diag'][name])
        print(f'{name}: D-RTRL vs BPTT cos {c_bptt:.3f} ratio {r_bptt:.4f}; vs restricted BPTT cos {c_ref:.4f} '
              f'ratio {r_ref:.4f}; ES-D-RTRL vs restricted cos {c_es:.3f} ratio {r_es:.3f}')
        assert c_ref >= 0.9999 and abs(r_ref - 1) < 1e-3, (name, c_ref, r_ref)     # theory: exact
        min_cos, (lo, hi) = bptt_bounds[name]                                       # measured
        assert c_bptt >= min_cos and lo <= r_bptt <= hi, (name, c_bptt, r_bptt)
        assert c_es >= 0.9 and 0.3 <= r_es <= 0.6, (name, c_es, r_es)              # measured
    # the restriction is not empty: layer 0 loses most of its gradient norm
    assert cos_ratio(g['bptt']['layers/0'], ref['layers/0'])[1] < 0.05
