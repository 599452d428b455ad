"""Recurrent spiking networks written for brainstate/brainscale.

Every trainable weight is a trace-carrying `brainscale` parameter (an `ETraceParam` inside
`brainscale.nn.Linear` or the readout), so the online algorithms D-RTRL and ES-D-RTRL reach all of
them: brainscale 0.1.0 gives plain (non-trace) parameters a zero gradient with single-step VJP.

Each network maps one time step of input, shaped (batch, n_in), to one step of readout, shaped
(batch, n_out). The whole state lives in `brainstate.HiddenState`s, which is what the online
compiler needs to find the hidden-to-hidden Jacobian.
"""
from __future__ import annotations

import math

import brainscale
import brainstate
import braintools
import jax
import jax.numpy as jnp
import numpy as np

from rsnn import recurrence
from rsnn.neurons import MODEL_NAMES, SURROGATE_NAMES

SURROGATES = {
    # name -> factory; the defaults are the usual widths of each surrogate.
    'relu': lambda: braintools.surrogate.ReluGrad(alpha=0.3, width=1.0),
    'sigmoid': lambda: braintools.surrogate.Sigmoid(alpha=4.0),
    'gaussian': lambda: braintools.surrogate.GaussianGrad(sigma=0.5, alpha=0.5),
    'multi_gaussian': lambda: braintools.surrogate.MultiGaussianGrad(),
    'arctan': lambda: braintools.surrogate.Arctan(alpha=1.0),
    'slayer': lambda: braintools.surrogate.SlayerGrad(alpha=1.0),
    'piecewise_quadratic': lambda: braintools.surrogate.PiecewiseQuadratic(alpha=1.0),
}

assert tuple(sorted(SURROGATES)) == SURROGATE_NAMES, 'keep SURROGATE_NAMES in step'


def make_surrogate(name: str):
    if name not in SURROGATES:
        raise ValueError(f'unknown surrogate {name!r}; choose one of {sorted(SURROGATES)}')
    return SURROGATES[name]()


def stacked_recurrent_weight(rng: np.random.Generator, n_in: int, n_rec: int,
                             ff_scale: float, rec_scale: float) -> np.ndarray:
    """[W_ff; W_rec] for one Linear over concat([x_t, s_{t-1}]): Kaiming normal per block."""
    w_ff = rng.normal(0., math.sqrt(ff_scale / n_in), (n_in, n_rec))
    w_rec = rng.normal(0., math.sqrt(rec_scale / n_rec), (n_rec, n_rec))
    return np.concatenate([w_ff, w_rec], axis=0).astype(np.float32)


def standardize(v, eps=1e-5):
    # rsqrt(var + eps): an all-zero V (first step) must give 0, not NaN.
    mean = jnp.mean(v, axis=-1, keepdims=True)
    var = jnp.var(v, axis=-1, keepdims=True)
    return (v - mean) * jax.lax.rsqrt(var + eps)


def run_layer(layer, xs):
    """A recurrent layer's `update` over a whole sequence, xs (T, B, n_x) -> its outputs (T, B, n_rec), for
    BPTT. The same arithmetic (the layer's pure `step`), except that x_t W_in for all t is one matrix product
    before the time loop (only s_{t-1} W_rec stays inside it), and the backward pass is
    recurrence.recurrent_scan's: several times faster on a CPU, the same gradients. The layer's states are
    left at their values after the last step."""
    p = layer.linear.weight_op.value
    if getattr(layer, 'freeze', False):  # the readout-only control (GIFExpLayer.freeze)
        p = jax.tree.map(jax.lax.stop_gradient, p)
    n_x = xs.shape[-1]
    w_in, w_rec = p['weight'][:n_x], p['weight'][n_x:]
    currents = recurrence.input_products(xs, w_in)
    if 'bias' in p:
        currents = currents + p['bias']
    h0 = {n: getattr(layer, n).value for n in layer.state_names()}
    outs, h_last = recurrence.recurrent_scan(layer.step, layer.prev_spike, w_rec, currents, h0)
    for n in layer.state_names():
        getattr(layer, n).value = h_last[n]
    return outs


def stateful_update(layer, x):
    """A recurrent layer's stateful `update` (what brainstate and brainscale run), derived from its pure
    `step`: the dynamics are written once. Reads the states, forms y = [x_t, s_{t-1}] W + b through the
    layer's trace-carrying Linear (brainscale finds the weight-to-state links through it), writes the new
    states and returns the layer's output."""
    names = layer.state_names()
    h = {n: getattr(layer, n).value for n in names}
    y = layer.linear(jnp.concatenate([x, layer.prev_spike(h)], axis=-1))
    if getattr(layer, 'freeze', False):  # the readout-only control (GIFExpLayer.freeze)
        y = jax.lax.stop_gradient(y)
    new, out = layer.step(h, y)
    for n in names:
        getattr(layer, n).value = new[n]
    return out


class LeakyReadout(brainstate.nn.Module):
    """r_t = exp(-dt/tau_o) r_{t-1} + x_t W + b, with W and b trace-carrying."""

    def __init__(self, n_in: int, n_out: int, tau_o: float, dt: float, w_scale: float,
                 rng: np.random.Generator):
        super().__init__()
        self.n_out = n_out
        self.decay = float(math.exp(-dt / tau_o))
        w = rng.normal(0., w_scale / math.sqrt(n_in), (n_in, n_out)).astype(np.float32)
        self.linear = brainscale.nn.Linear(n_in, n_out, w_init=w, b_init=braintools.init.ZeroInit())

    def init_state(self, batch_size=None, **kwargs):
        self.r = brainstate.HiddenState(jnp.zeros((batch_size, self.n_out) if batch_size else (self.n_out,)))

    def reset_state(self, batch_size=None, **kwargs):
        self.r.value = jnp.zeros((batch_size, self.n_out) if batch_size else (self.n_out,))

    def update(self, x):
        r = self.decay * self.r.value + self.linear(x)
        self.r.value = r
        return r

    def run_sequence(self, xs):
        """`update` over xs (T, B, n_in) -> (T, B, n_out), with x_t W + b for all t as one product."""
        p = self.linear.weight_op.value
        z = recurrence.input_products(xs, p['weight']) + p['bias']

        def step(z_t):
            r = self.decay * self.r.value + z_t
            self.r.value = r
            return r

        return brainstate.transform.for_loop(step, z)


class GIFExpLayer(brainstate.nn.Module):
    """Recurrent generalized integrate-and-fire layer with exponential synapses (the DMS network).

    Per step, with s_{t-1} = H(V_{t-1} - V_th):
      c   = [x_t, s_{t-1}] W + b
      g_t = g_{t-1} exp(-dt/tau_syn) + syn_gain * c
      V'  = V_{t-1} - V_th s_{t-1} (reset spike detached unless diff_spike)
      I2_t = (I2_{t-1} - A2 s_{t-1}) exp(-dt/tau_I2)   (spike kept differentiable: the sample is held here)
      V_t = V' exp(-dt/tau_neu) + (1 - exp(-dt/tau_neu)) (V_rest + R (g_t + I2_t))
    """

    def __init__(self, n_in: int, n_rec: int, *, dt: float, tau_neu: float, tau_syn: float,
                 tau_I2_max: float, A2: float, ff_scale: float, rec_scale: float, spk_fun: str,
                 diff_spike: bool, syn_gain: float, rng: np.random.Generator,
                 V_th: float = 1., V_rest: float = 0., R: float = 1., memory: dict = None,
                 freeze: bool = False):
        super().__init__()
        self.n_in, self.n_rec = n_in, n_rec
        self.V_th, self.V_rest, self.R, self.A2 = V_th, V_rest, R, A2
        self.diff_spike, self.syn_gain = diff_spike, syn_gain
        self.spk_fun = make_surrogate(spk_fun)
        self.syn_decay = float(math.exp(-dt / tau_syn))
        self.neu_decay = float(math.exp(-dt / tau_neu))
        # Per-neuron adaptation time constants: U(100 ms, 1.5 tau_I2), the spec's spread of memories.
        tau_I2 = rng.uniform(100., max(1.5 * tau_I2_max, 100.), n_rec)
        w = stacked_recurrent_weight(rng, n_in, n_rec, ff_scale, rec_scale)
        self.freeze = freeze  # a control: no gradient reaches this layer's weights (only the readout learns)
        if memory:  # the credit task (CREDIT_MEMORY below): fast neurons and a few slow memory neurons
            tau_I2, w = credit_layout(rng, n_in, n_rec, tau_I2_max, w, **memory)
        self.tau_I2 = tau_I2
        self.I2_decay = jnp.asarray(np.exp(-dt / tau_I2), dtype=jnp.float32)
        self.linear = brainscale.nn.Linear(n_in + n_rec, n_rec, w_init=w, b_init=braintools.init.ZeroInit())

    def _zeros(self, batch_size):
        return jnp.zeros((batch_size, self.n_rec) if batch_size else (self.n_rec,))

    def init_state(self, batch_size=None, **kwargs):
        self.V = brainstate.HiddenState(self._zeros(batch_size))
        self.g = brainstate.HiddenState(self._zeros(batch_size))
        self.I2 = brainstate.HiddenState(self._zeros(batch_size))

    def reset_state(self, batch_size=None, **kwargs):
        for st in (self.V, self.g, self.I2):
            st.value = self._zeros(batch_size)

    def spike(self, V):
        return self.spk_fun((V - self.V_th) / self.V_th)

    def update(self, x):
        return stateful_update(self, x)

    def state_names(self):
        return ['V', 'g', 'I2']

    def run_sequence(self, xs):
        """`update` over a whole sequence, xs (T, B, n_in) -> V (T, B, n_rec), for BPTT (run_layer)."""
        return run_layer(self, xs)

    # The dynamics, once: a pure function of the states (a dict of arrays). `update` (stateful_update),
    # BPTT's run_sequence (rsnn/recurrence.py) and the chunked traces (rsnn/rules/chunks.py) all run it.
    def prev_spike(self, h):
        return self.spike(h['V'])

    def step(self, h: dict, y, perturb: dict = None):
        """(new states, V) from the previous states h and y = [x_t, s_{t-1}] W + b; `perturb` as in
        RecurrentLIFLayer.step."""
        def add(name, value):
            return value + perturb[name] if perturb and name in perturb else value

        s = self.spike(h['V'])
        s_reset = s if self.diff_spike else jax.lax.stop_gradient(s)
        g = add('g', h['g'] * self.syn_decay + self.syn_gain * y)
        I2 = add('I2', (h['I2'] - self.A2 * s) * self.I2_decay)
        V = (h['V'] - self.V_th * s_reset) * self.neu_decay + (1. - self.neu_decay) * (self.V_rest + self.R * (g + I2))
        V = add('V', V)
        return {'V': V, 'g': g, 'I2': I2}, V

    def output(self, h):
        """The layer's output as a function of its new states h_t: V."""
        return h['V']


def credit_layout(rng, n_in: int, n_rec: int, tau_I2_max: float, w: np.ndarray, *, n_memory: int,
                  tau_memory: float, tau_fast_min: float, in_scale: float, rec_scale: float):
    """The credit task's layer (--preset credit, docs/stream.md): the last n_memory neurons are memory
    neurons with slow adaptation (tau_I2 = tau_memory) whose input and recurrent weights into them are
    scaled by in_scale and rec_scale (weak at the start: the sample has to be routed into them by learning);
    the others adapt fast, tau_I2 ~ U(tau_fast_min, 1.5 tau_I2_max), and forget within the delay."""
    tau = rng.uniform(tau_fast_min, max(1.5 * tau_I2_max, tau_fast_min), n_rec)
    m = slice(n_rec - n_memory, n_rec)
    tau[m] = tau_memory
    w = w.copy()
    w[:n_in, m] *= in_scale
    w[n_in:, m] *= rec_scale
    return tau, w


class DMSNet(brainstate.nn.Module):
    """GIF-exp recurrent layer -> standardized membrane potential -> leaky readout (2 outputs)."""

    def __init__(self, n_in: int, n_rec: int, n_out: int, *, dt: float, tau_neu: float, tau_syn: float,
                 tau_I2: float, A2: float, ff_scale: float, rec_scale: float, spk_fun: str = 'relu',
                 diff_spike: bool = False, syn_gain: float = 1., tau_o: float = 10.,
                 readout_scale: float = 0.1, seed: int = 0, memory: dict = None, freeze_rec: bool = False):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.rec = GIFExpLayer(n_in, n_rec, dt=dt, tau_neu=tau_neu, tau_syn=tau_syn, tau_I2_max=tau_I2,
                               A2=A2, ff_scale=ff_scale, rec_scale=rec_scale, spk_fun=spk_fun,
                               diff_spike=diff_spike, syn_gain=syn_gain, rng=rng, memory=memory,
                               freeze=freeze_rec)
        self.out = LeakyReadout(n_rec, n_out, tau_o=tau_o, dt=dt, w_scale=readout_scale, rng=rng)

    def update(self, x):
        return self.out(standardize(self.rec(x)))

    def run_sequence(self, xs):
        """The readout for a whole sequence xs (T, B, n_in), layer after layer (BPTT; see Trainer)."""
        return self.out.run_sequence(standardize(self.rec.run_sequence(xs)))

    def spikes(self):
        return self.rec.spike(self.rec.V.value)

    def layer_spikes(self):
        """The spikes of each spiking layer after the last update (firing rates in metrics.csv)."""
        return [self.spikes()]


class RecurrentLIFLayer(brainstate.nn.Module):
    """A recurrent layer of the LIF family (the image networks: --model lif-delta, alif-delta, lif-exp-cu): one
    Linear over concat([x_t, s_{t-1}]), soft (or hard) reset.

    neuron='lif'   : V_t = a V_{t-1} + c_t - V_th s_{t-1}                (delta synapse)
    neuron='alif'  : same, threshold V_th + beta b_t, b_t = rho b_{t-1} + s_{t-1}
    synapse='exp'  : c_t is first filtered by a current synapse I_t = exp(-dt/tau_syn) I_{t-1} + c_t
    """

    def __init__(self, n_in: int, n_rec: int, *, dt: float, tau_mem: float, tau_mem_sigma: float,
                 V_th: float, ff_scale: float, rec_scale: float, spk_fun: str, spk_reset: str,
                 rng: np.random.Generator, neuron: str = 'lif', synapse: str = 'delta',
                 tau_syn: float = 5., tau_adapt: float = 200., beta: float = 1.8, detach_reset: bool = True):
        super().__init__()
        if neuron not in ('lif', 'alif') or synapse not in ('delta', 'exp'):
            raise ValueError(f'unknown neuron/synapse {neuron}/{synapse}')
        if spk_reset not in ('soft', 'hard'):
            raise ValueError(f'--spk_reset must be soft or hard, got {spk_reset!r}')
        self.n_rec, self.V_th, self.neuron, self.synapse = n_rec, V_th, neuron, synapse
        self.spk_reset, self.beta, self.detach_reset = spk_reset, beta, detach_reset
        self.spk_fun = make_surrogate(spk_fun)
        tau = np.clip(rng.normal(tau_mem, tau_mem_sigma, n_rec), dt, None)
        self.mem_decay = jnp.asarray(np.exp(-dt / tau), dtype=jnp.float32)
        self.syn_decay = float(math.exp(-dt / tau_syn))
        self.adapt_decay = float(math.exp(-dt / tau_adapt))
        w = stacked_recurrent_weight(rng, n_in, n_rec, ff_scale, rec_scale)
        self.linear = brainscale.nn.Linear(n_in + n_rec, n_rec, w_init=w, b_init=braintools.init.ZeroInit())

    def _zeros(self, batch_size):
        return jnp.zeros((batch_size, self.n_rec) if batch_size else (self.n_rec,))

    def state_names(self):
        return ['V'] + (['b'] if self.neuron == 'alif' else []) + (['I'] if self.synapse == 'exp' else [])

    def init_state(self, batch_size=None, **kwargs):
        for name in self.state_names():
            setattr(self, name, brainstate.HiddenState(self._zeros(batch_size)))

    def reset_state(self, batch_size=None, **kwargs):
        for name in self.state_names():
            getattr(self, name).value = self._zeros(batch_size)

    def threshold(self):
        return self.V_th + self.beta * self.b.value if self.neuron == 'alif' else self.V_th

    def spike(self):
        th = self.threshold()
        return self.spk_fun((self.V.value - th) / self.V_th)

    def update(self, x):
        return stateful_update(self, x)

    def run_sequence(self, xs):
        """`update` over a whole sequence, xs (T, B, n_in) -> spikes (T, B, n_rec), for BPTT (run_layer)."""
        return run_layer(self, xs)

    # The dynamics, once: a pure function of the states (a dict of arrays). `update` (stateful_update),
    # BPTT's run_sequence (rsnn/recurrence.py) and the chunked traces (rsnn/rules/chunks.py) all run it.
    def prev_spike(self, h):
        """s_{t-1}, the spike that enters step t's recurrent input, from the states h_{t-1}."""
        th = self.V_th + self.beta * h['b'] if self.neuron == 'alif' else self.V_th
        return self.spk_fun((h['V'] - th) / self.V_th)

    def step(self, h: dict, y, perturb: dict = None):
        """(new states, output spike) from the previous states h and the weight output y = [x_t, s_{t-1}] W.
        `perturb` (rsnn/rules/chunks.py) is added to each new state where it is formed, which is where
        brainscale adds its hidden perturbation when `update` writes it."""
        def add(name, value):
            return value + perturb[name] if perturb and name in perturb else value

        th = self.V_th + self.beta * h['b'] if self.neuron == 'alif' else self.V_th
        s = self.spk_fun((h['V'] - th) / self.V_th)
        s_reset = jax.lax.stop_gradient(s) if self.detach_reset else s
        new, c = {}, y
        if self.synapse == 'exp':
            c = new['I'] = add('I', h['I'] * self.syn_decay + c)
        if self.neuron == 'alif':
            new['b'] = add('b', h['b'] * self.adapt_decay + s_reset)
        if self.spk_reset == 'soft':
            V = self.mem_decay * (h['V'] - th * s_reset) + c
        else:
            V = self.mem_decay * h['V'] * (1. - s_reset) + c
        new['V'] = add('V', V)
        return new, self.prev_spike(new)

    def output(self, h):
        """The layer's output as a function of its new states h_t (the spike; e-prop's psi is its derivative)."""
        return self.prev_spike(h)


class SpikingStack(brainstate.nn.Module):
    """n_layer recurrent spiking layers (each fed the spikes of the one below) and a leaky readout."""

    def __init__(self, n_in: int, n_rec: int, n_out: int, n_layer: int, *, model: str = 'lif-delta',
                 dt: float = 1., tau_mem: float = 10., tau_mem_sigma: float = 1., tau_o: float = 10.,
                 V_th: float = 1., ff_scale: float = 1., rec_scale: float = 0.5, spk_fun: str = 'relu',
                 spk_reset: str = 'soft', readout_scale: float = 1., detach_reset: bool = True, seed: int = 0,
                 tau_syn: float = 5.,
                 tau_adapt: float = 200., beta: float = 1.8):
        super().__init__()
        if model not in MODEL_NAMES:
            raise ValueError(f'unknown --model {model!r}; choose one of {", ".join(MODEL_NAMES)}')
        neuron, synapse = model.split('-')[:2]  # 'lif-exp-cu': a LIF neuron behind an exponential synapse
        rng = np.random.default_rng(seed)
        self.layers = [
            RecurrentLIFLayer(n_in if i == 0 else n_rec, n_rec, dt=dt, tau_mem=tau_mem, tau_mem_sigma=tau_mem_sigma,
                          V_th=V_th, ff_scale=ff_scale, rec_scale=rec_scale, spk_fun=spk_fun,
                          spk_reset=spk_reset, rng=rng, neuron=neuron, synapse=synapse, tau_syn=tau_syn,
                          tau_adapt=tau_adapt, beta=beta, detach_reset=detach_reset)
            for i in range(n_layer)
        ]
        self.out = LeakyReadout(n_rec, n_out, tau_o=tau_o, dt=dt, w_scale=readout_scale, rng=rng)

    def update(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.out(x)

    def layer_spikes(self):
        """The spikes of each layer after the last update (firing rates in metrics.csv)."""
        return [layer.spike() for layer in self.layers]

    def run_sequence(self, xs):
        """The readout for a whole sequence xs (T, B, n_in), layer after layer (BPTT; see Trainer)."""
        for layer in self.layers:
            xs = layer.run_sequence(xs)
        return self.out.run_sequence(xs)


def count_params(model) -> int:
    return int(sum(np.size(leaf) for s in model.states(brainstate.ParamState).values()
                   for leaf in jax.tree.leaves(s.value)))


def calibrate_feedforward(model: SpikingStack, xs, target_rate: float, iters: int = 14) -> tuple:
    """Data-dependent init: scale each layer's feed-forward weights so that, on the sample batch xs
    (T, B, n_in), the layer fires target_rate spikes per neuron per step at initialization.

    Kaiming's variance ff_scale / fan_in assumes every input is active with unit power. Event frames are
    far sparser (N-MNIST at 400 bins: about 3 events per step over 2312 inputs), so layer 0 stays silent;
    a --ff_scale large enough to wake it makes the layers above, fed by spikes, fire at 0.2-0.5. Layers are calibrated from the
    bottom up (each sees the calibrated layers below), by bisection on a log scale. Returns the factors
    and the layers' rates on xs after the calibration.
    """
    import jax.numpy as jnp
    xs = jnp.asarray(xs, jnp.float32)
    brainstate.nn.init_all_states(model, xs.shape[1])

    @brainstate.transform.jit
    def layer_rates(xs):
        brainstate.nn.reset_all_states(model, xs.shape[1])
        rates = []
        for layer in model.layers:
            xs = layer.run_sequence(xs)
            rates.append(jnp.mean(xs))
        return jnp.stack(rates)

    factors = []
    n_x = xs.shape[-1]
    for i, layer in enumerate(model.layers):
        state = layer.linear.weight_op
        base = dict(state.value)
        n_ff = n_x if i == 0 else model.layers[i - 1].n_rec

        def set_factor(f):
            w = base['weight']
            state.value = dict(base, weight=jnp.concatenate([w[:n_ff] * f, w[n_ff:]], axis=0))

        lo, hi = -4., 4.  # log10 of the factor
        for _ in range(iters):
            mid = (lo + hi) / 2
            set_factor(10. ** mid)
            if float(layer_rates(xs)[i]) < target_rate:
                lo = mid
            else:
                hi = mid
        factors.append(10. ** ((lo + hi) / 2))
        set_factor(factors[-1])
    return factors, [float(r) for r in layer_rates(xs)]
