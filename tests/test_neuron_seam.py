"""The neuron-model seam (rsnn/neurons/seam.py) and the table of neuron models (rsnn/neurons/__init__.py).

A toy neuron model defined HERE, through the public seams only (a brainstate module with the seam's methods,
its stateful forms from rsnn.neurons.base's public helpers, one row registered in the table at runtime; no
other module edited), is:
- a --model choice of the image task's parser;
- trained by every rule of rsnn/methods.py for two updates (finite loss, weights moved);
- run chunked where the rule has a chunked path (the default K > 1: not a silent fall-back to K = 1), with
  the chunked gradient equal to the step-by-step one (brainscale's for D-RTRL / ES-D-RTRL, one-step chunks
  for e-prop, OTTT, SnAp-1) within float32 rounding.
A layer that lacks a method of the seam is refused with one line naming it. adLIF (rsnn/neurons/adlif.py):
its step against the equations written out in numpy; its chunked = step-by-step gradients are in
tests/test_chunked_traces.py and tests/test_online_rules.py (KINDS['adlif']).
"""
import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
import utils
from rsnn import methods, neurons
from rsnn.neurons import base, seam
from rsnn.rules.base import RuleOptions
from rsnn.trainer import Trainer

T, B, N_IN, N_REC, N_OUT = 23, 4, 6, 8, 3
TOY = 'toy-refractory'


class ToyLayer(brainstate.nn.Module):
    """A leaky neuron with a refractory trace r and a saturating self-excitation (not a model of the table):
        s_{t-1} = H(V_{t-1} - 1),  r_t = 0.7 r_{t-1} + s_{t-1},
        V_t = 0.85 (V_{t-1} - s_{t-1}) + 0.1 tanh(V_{t-1}) - 0.6 r_t + y_t."""

    def __init__(self, n_in, n_rec, params: neurons.LayerParams, rng):
        super().__init__()
        self.n_rec = n_rec
        self.spk = base.make_surrogate(params.spk_fun)
        w = base.stacked_recurrent_weight(rng, n_in, n_rec, params.ff_scale, params.rec_scale)
        import brainscale
        import braintools
        self.linear = brainscale.nn.Linear(n_in + n_rec, n_rec, w_init=w, b_init=braintools.init.ZeroInit())

    def state_names(self):
        return ['V', 'r']

    def init_state(self, batch_size=None, **kwargs):
        for n in self.state_names():
            setattr(self, n, brainstate.HiddenState(jnp.zeros((batch_size, self.n_rec))))

    def reset_state(self, batch_size=None, **kwargs):
        for n in self.state_names():
            getattr(self, n).value = jnp.zeros((batch_size, self.n_rec))

    def prev_spike(self, h):
        return self.spk(h['V'] - 1.)

    def step(self, h, y, perturb=None):
        add = base.perturbed(perturb)
        s = self.prev_spike(h)
        r = add('r', 0.7 * h['r'] + s)
        V = add('V', 0.85 * (h['V'] - jax.lax.stop_gradient(s)) + 0.1 * jnp.tanh(h['V']) - 0.6 * r + y)
        new = {'V': V, 'r': r}
        return new, self.prev_spike(new)

    def output(self, h):
        return self.prev_spike(h)

    def update(self, x):
        return base.stateful_update(self, x)

    def run_sequence(self, xs):
        return base.run_layer(self, xs)


@pytest.fixture
def toy_row():
    neurons.register(neurons.NeuronModel(TOY, ToyLayer, ('V', 'r'), 'a toy neuron registered by a test'))
    yield TOY
    neurons.unregister(TOY)


def toy_net(seed=0):
    return models.SpikingStack(N_IN, N_REC, N_OUT, 2, model=TOY, ff_scale=4., seed=seed)


def data(seed=0):
    rng = np.random.default_rng(seed)
    xs = (rng.random((T, B, N_IN)) < 0.3).astype(np.float32)
    return xs, rng.integers(0, N_OUT, B).astype(np.int32), np.linspace(0.2, 1., T).astype(np.float32)


def trainer(method, K=None, **extra):
    brainstate.environ.set(dt=1.)
    return Trainer(toy_net(), method, N_IN, B, etrace_decay=0.9, trace_chunk=K, rule_options=extra)


def flat(grads):
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(grads)[0]}


def test_the_toy_row_is_a_model_choice(toy_row):
    from conftest import load_script
    assert TOY in utils.MODEL_NAMES and TOY in utils.model_help()
    parser = load_script('task-image-classification.py').build_parser()
    assert parser.parse_args(['--model', TOY]).model == TOY
    net = toy_net()
    assert isinstance(net.layers[0], ToyLayer) and isinstance(net.layers[0], seam.RecurrentLayer)
    assert seam.why_not_network(net) is None
    neurons.unregister(TOY)
    assert TOY not in utils.MODEL_NAMES
    with pytest.raises(ValueError, match='unknown --model'):
        toy_net()


@pytest.mark.parametrize('method', methods.names())
def test_every_rule_trains_the_toy_model(toy_row, method):
    xs, labels, ws = data()
    tr = trainer(method)
    row = methods.get(method)
    if row.chunked:  # the default K: chunked (the engine took the toy model), not a fall-back to K = 1
        assert tr.rule.trace_chunk > 1, method
    before = flat(tr.param_values())
    losses = [tr.train_step(xs, labels, ws)[0] for _ in range(2)]
    after = flat(tr.param_values())
    assert np.all(np.isfinite(losses)) and tr.last_update_finite, (method, losses)
    moved = [k for k in before if not np.allclose(before[k], after[k])]
    assert len(moved) == len(before) == 6, (method, moved)  # two layers' weight and bias, the readout's


def assert_same(g_ref, g, what):
    assert g_ref.keys() == g.keys()
    for name, ref in g_ref.items():
        a, b = ref.ravel(), g[name].ravel()
        assert np.linalg.norm(a) > 0, (what, name)
        cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
        ratio = np.linalg.norm(b) / np.linalg.norm(a)
        assert cos >= 0.99999 and abs(ratio - 1) <= 1e-5, (what, name, cos, ratio)


@pytest.mark.parametrize('method', [m for m in methods.names() if methods.get(m).chunked])
def test_toy_chunked_gradient_equals_step_by_step(toy_row, method):
    xs, labels, ws = data(1)
    reference = trainer(method, 1)
    if method in ('diag', 'expsm_diag'):
        assert reference.rule.algo is not None  # K = 1: brainscale's own algorithm on the toy's `update`
    g_ref = flat(reference.gradients(xs, labels, ws))
    K = 7  # T = 23: three whole chunks and a shorter last one
    assert_same(g_ref, flat(trainer(method, K).gradients(xs, labels, ws)), (method, K))


class Incomplete(brainstate.nn.Module):
    """A layer without `output` (the seam's output read from the new states)."""

    def __init__(self, n_in, n_rec, params, rng):
        super().__init__()
        self.inner = ToyLayer(n_in, n_rec, params, rng)
        self.n_rec, self.linear = n_rec, self.inner.linear
        for m in ('state_names', 'step', 'prev_spike', 'update', 'run_sequence', 'init_state', 'reset_state'):
            setattr(self, m, getattr(self.inner, m))


def test_a_layer_without_a_seam_method_is_refused_by_name():
    neurons.register(neurons.NeuronModel('toy-incomplete', Incomplete, ('V', 'r'), 'no output()'))
    try:
        net = models.SpikingStack(N_IN, N_REC, N_OUT, 1, model='toy-incomplete', seed=0)
    finally:
        neurons.unregister('toy-incomplete')
    assert 'output' in seam.why_not_network(net)
    options = lambda K: RuleOptions(batch_size=B, n_in=N_IN, trace_chunk=K)
    for method in ('eprop', 'uoro'):
        with pytest.raises(utils.UserError, match='lacks output of the neuron seam'):
            methods.rule_class(method)(net, {}, options(None))
    with pytest.raises(utils.UserError, match='lacks output of the neuron seam.*use --trace_chunk 1'):
        methods.rule_class('diag').choose_chunk(net, options(8))
    assert methods.rule_class('diag').choose_chunk(net, options(None)) == 1


def test_adlif_step_is_the_equations():
    """One step of the adLIF layer against its equations in numpy (rsnn/neurons/adlif.py)."""
    layer = neurons.build_layer('adlif', 3, 5, neurons.LayerParams(dt=1., V_th=1., spk_fun='relu'),
                                np.random.default_rng(0))
    assert layer.state_names() == list(neurons.get('adlif').states) == ['u', 'w']
    assert np.all((layer.tau_u >= 5.) & (layer.tau_u <= 25.)) and np.all((layer.tau_w >= 30.) & (layer.tau_w <= 120.))
    rng = np.random.default_rng(1)
    u0, w0, y = (rng.normal(0., 1., (2, 5)).astype(np.float32) + c for c in (0.8, 0., 0.))
    new, out = layer.step({'u': jnp.asarray(u0), 'w': jnp.asarray(w0)}, jnp.asarray(y))
    alpha, beta, a, b = (np.asarray(v) for v in (layer.alpha, layer.beta, layer.a, layer.b))
    s0 = (u0 >= 1.).astype(np.float32)   # the surrogate's forward: H(u - V_th)
    w1 = beta * w0 + (1. - beta) * (a * u0 + b * s0)
    u1 = alpha * (u0 - s0) + (1. - alpha) * (y - w1)
    np.testing.assert_allclose(np.asarray(new['w']), w1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(new['u']), u1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out), (u1 >= 1.).astype(np.float32))
    from rsnn import memory_report
    sizes = memory_report.network_sizes(dict(model='adlif', n_in=3, n_rec=5, n_out=2, n_layer=2, batch_size=4), 10)
    assert [S for _, _, S in sizes.layers] == [2, 2]


def test_the_table_and_the_seam_import_no_jax():
    """A parser's --help reads the table: rsnn.neurons and rsnn.neurons.seam import no jax."""
    import subprocess
    import sys
    code = ('import sys, rsnn.neurons, rsnn.neurons.seam; '
            'print(sorted(m for m in ("jax", "brainstate", "brainscale") if m in sys.modules))')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == '[]', out


def test_every_row_builds_a_layer_of_the_seam():
    """Each row of the table builds a layer that implements the seam, with the states the row declares (the
    memory formulas read the row)."""
    for name in utils.MODEL_NAMES:
        layer = neurons.build_layer(name, 3, 4, neurons.LayerParams(), np.random.default_rng(0))
        assert seam.layer_gaps(layer) == [] and isinstance(layer, seam.RecurrentLayer), name
        assert tuple(layer.state_names()) == neurons.get(name).states, name
    assert list(utils.MODEL_NAMES) == ['lif-delta', 'alif-delta', 'lif-exp-cu', 'adlif']
