"""The DMS network's neuron (rsnn.models.DMSNet): a generalized integrate-and-fire layer with exponential
synapses and spike-triggered adaptation current, whose output is its membrane potential V."""
from __future__ import annotations

import math

import brainscale
import braintools
import jax
import jax.numpy as jnp
import numpy as np

from rsnn.neurons.base import NeuronLayer, make_surrogate, perturbed, stacked_recurrent_weight


class GIFExpLayer(NeuronLayer):
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
        if memory:  # the credit task (credit_layout below): fast neurons and a few slow memory neurons
            tau_I2, w = credit_layout(rng, n_in, n_rec, tau_I2_max, w, **memory)
        self.tau_I2 = tau_I2
        self.I2_decay = jnp.asarray(np.exp(-dt / tau_I2), dtype=jnp.float32)
        self.linear = brainscale.nn.Linear(n_in + n_rec, n_rec, w_init=w, b_init=braintools.init.ZeroInit())

    def spike(self, V):
        return self.spk_fun((V - self.V_th) / self.V_th)

    def state_names(self):
        return ['V', 'g', 'I2']

    # The dynamics, once: a pure function of the states (a dict of arrays). `update` (stateful_update),
    # BPTT's run_sequence (rsnn/recurrence.py) and the chunk engine (rsnn/rules/chunk_engine.py) all run it.
    def prev_spike(self, h):
        return self.spike(h['V'])

    def step(self, h: dict, y, perturb: dict = None):
        """(new states, V) from the previous states h and y = [x_t, s_{t-1}] W + b; `perturb` as in
        the seam (rsnn/neurons/seam.py)."""
        add = perturbed(perturb)
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
                  tau_memory: float, tau_fast_min: float, in_scale: float, rec_scale: float, zero_in_rows: int = 0):
    """The credit task's layer (--preset credit, docs/stream.md): the last n_memory neurons are memory
    neurons with slow adaptation (tau_I2 = tau_memory) whose input and recurrent weights into them are
    scaled by in_scale and rec_scale (weak at the start: the sample has to be routed into them by learning);
    the others adapt fast, tau_I2 ~ U(tau_fast_min, 1.5 tau_I2_max), and forget within the delay.
    zero_in_rows N: the weights from the first N inputs (the split-channel task's sample channels,
    rsnn/tasks/credit_split.py) into the memory neurons start at exactly 0."""
    tau = rng.uniform(tau_fast_min, max(1.5 * tau_I2_max, tau_fast_min), n_rec)
    m = slice(n_rec - n_memory, n_rec)
    tau[m] = tau_memory
    w = w.copy()
    w[:n_in, m] *= in_scale
    w[n_in:, m] *= rec_scale
    w[:zero_in_rows, m] = 0.
    return tau, w
