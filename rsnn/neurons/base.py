"""What every neuron model shares: the surrogate gradients, the weight initialisation, and the layer's stateful
forms derived from its pure `step` (Norse's split: the neuron is a pure step function; the module that
brainstate and brainscale run is derived from it, so the dynamics are written once).

A neuron model derives from `NeuronLayer` and writes `state_names`, `step`, `output` and `prev_spike` (the
seam, rsnn/neurons/seam.py); `init_state`, `reset_state`, `update` (brainscale), `run_sequence` (BPTT) and
`last_spike` come from here.
"""
from __future__ import annotations

import math

import brainstate
import braintools
import jax
import jax.numpy as jnp
import numpy as np

from rsnn import recurrence
from rsnn.neurons import SURROGATE_NAMES

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


def perturbed(perturb):
    """add(name, value): value + perturb[name] where a perturbation of that state is given (the seam's
    `perturb` argument of `step`), else value."""
    def add(name, value):
        return value + perturb[name] if perturb and name in perturb else value
    return add


class NeuronLayer(brainstate.nn.Module):
    """The stateful forms of a layer of the seam (rsnn/neurons/seam.py), derived from its pure `step`. A
    subclass sets `n_rec` and `linear` (a brainscale.nn.Linear over [x_t, s_{t-1}]) and writes
    `state_names`, `step`, `output` and `prev_spike`."""

    def state_names(self) -> list:
        raise NotImplementedError

    def step(self, h: dict, y, perturb: dict = None):
        raise NotImplementedError

    def output(self, h: dict):
        raise NotImplementedError

    def prev_spike(self, h: dict):
        raise NotImplementedError

    def _zeros(self, batch_size):
        return jnp.zeros((batch_size, self.n_rec) if batch_size else (self.n_rec,))

    def init_state(self, batch_size=None, **kwargs):
        for name in self.state_names():
            setattr(self, name, brainstate.HiddenState(self._zeros(batch_size)))

    def reset_state(self, batch_size=None, **kwargs):
        for name in self.state_names():
            getattr(self, name).value = self._zeros(batch_size)

    def current_state(self) -> dict:
        """The states now, as the dict that `step` reads."""
        return {n: getattr(self, n).value for n in self.state_names()}

    def last_spike(self):
        """The spikes after the last update (firing rates in metrics.csv)."""
        return self.prev_spike(self.current_state())

    def update(self, x):
        return stateful_update(self, x)

    def run_sequence(self, xs):
        """`update` over a whole sequence, xs (T, B, n_in) -> outputs (T, B, n_rec), for BPTT (run_layer)."""
        return run_layer(self, xs)
