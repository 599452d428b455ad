"""Recurrent spiking networks written for brainstate/brainscale: the DMS network (DMSNet), the image
networks' stack (SpikingStack) and the leaky readout. The neuron models (the layers) live in rsnn/neurons/,
one file each, behind the seam of rsnn/neurons/seam.py; their names are re-exported here.

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

from rsnn import neurons, recurrence
from rsnn.neurons import MODEL_NAMES, SURROGATE_NAMES  # noqa: F401  (re-exported)
from rsnn.neurons.base import (SURROGATES, NeuronLayer, make_surrogate, run_layer,  # noqa: F401
                               stacked_recurrent_weight, stateful_update)
from rsnn.neurons.adlif import AdLIFLayer  # noqa: F401
from rsnn.neurons.gif_exp import GIFExpLayer, credit_layout  # noqa: F401
from rsnn.neurons.lif import RecurrentLIFLayer  # noqa: F401


def standardize(v, eps=1e-5):
    # rsqrt(var + eps): an all-zero V (first step) must give 0, not NaN.
    mean = jnp.mean(v, axis=-1, keepdims=True)
    var = jnp.var(v, axis=-1, keepdims=True)
    return (v - mean) * jax.lax.rsqrt(var + eps)


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

    # the network seam (rsnn/neurons/seam.py): the online rules' pure paths read the network through these
    def recurrent_layers(self) -> list:
        return [self.rec]

    def readout_input(self, o):
        return standardize(o)

    def spikes(self):
        return self.rec.spike(self.rec.V.value)

    def layer_spikes(self):
        """The spikes of each spiking layer after the last update (firing rates in metrics.csv)."""
        return [self.spikes()]


class SpikingStack(brainstate.nn.Module):
    """n_layer recurrent spiking layers of one neuron model of the table rsnn/neurons (--model; each layer fed
    the spikes of the one below) and a leaky readout."""

    def __init__(self, n_in: int, n_rec: int, n_out: int, n_layer: int, *, model: str = 'lif-delta',
                 dt: float = 1., tau_mem: float = 10., tau_mem_sigma: float = 1., tau_o: float = 10.,
                 V_th: float = 1., ff_scale: float = 1., rec_scale: float = 0.5, spk_fun: str = 'relu',
                 spk_reset: str = 'soft', readout_scale: float = 1., detach_reset: bool = True, seed: int = 0,
                 tau_syn: float = 5.,
                 tau_adapt: float = 200., beta: float = 1.8):
        super().__init__()
        neurons.get(model)  # an unknown name: one line with the choices
        params = neurons.LayerParams(dt=dt, tau_mem=tau_mem, tau_mem_sigma=tau_mem_sigma, V_th=V_th,
                                     ff_scale=ff_scale, rec_scale=rec_scale, spk_fun=spk_fun, spk_reset=spk_reset,
                                     detach_reset=detach_reset, tau_syn=tau_syn, tau_adapt=tau_adapt, beta=beta)
        rng = np.random.default_rng(seed)
        self.model_name = model
        self.layers = [neurons.build_layer(model, n_in if i == 0 else n_rec, n_rec, params, rng)
                       for i in range(n_layer)]
        self.out = LeakyReadout(n_rec, n_out, tau_o=tau_o, dt=dt, w_scale=readout_scale, rng=rng)

    def update(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.out(x)

    # the network seam (rsnn/neurons/seam.py)
    def recurrent_layers(self) -> list:
        return list(self.layers)

    def readout_input(self, o):
        return o

    def layer_spikes(self):
        """The spikes of each layer after the last update (firing rates in metrics.csv)."""
        return [layer.prev_spike({n: getattr(layer, n).value for n in layer.state_names()}) for layer in self.layers]

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
