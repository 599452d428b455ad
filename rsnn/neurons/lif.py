"""The LIF family (--model lif-delta, alif-delta, lif-exp-cu): one recurrent layer class with a LIF or an
adaptive-threshold (ALIF) neuron behind a delta or an exponential current synapse."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import brainscale
import braintools

from rsnn.neurons import LayerParams
from rsnn.neurons.base import NeuronLayer, make_surrogate, perturbed, stacked_recurrent_weight


class RecurrentLIFLayer(NeuronLayer):
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

    def state_names(self):
        return ['V'] + (['b'] if self.neuron == 'alif' else []) + (['I'] if self.synapse == 'exp' else [])

    def threshold(self):
        return self.V_th + self.beta * self.b.value if self.neuron == 'alif' else self.V_th

    def spike(self):
        th = self.threshold()
        return self.spk_fun((self.V.value - th) / self.V_th)

    # The dynamics, once: a pure function of the states (a dict of arrays). `update` (stateful_update),
    # BPTT's run_sequence (rsnn/recurrence.py) and the chunk engine (rsnn/rules/chunk_engine.py) all run it.
    def prev_spike(self, h):
        """s_{t-1}, the spike that enters step t's recurrent input, from the states h_{t-1}."""
        th = self.V_th + self.beta * h['b'] if self.neuron == 'alif' else self.V_th
        return self.spk_fun((h['V'] - th) / self.V_th)

    def step(self, h: dict, y, perturb: dict = None):
        """(new states, output spike) from the previous states h and the weight output y = [x_t, s_{t-1}] W.
        `perturb` (the seam, rsnn/neurons/seam.py) is added to each new state where it is formed, which is
        where brainscale adds its hidden perturbation when `update` writes it."""
        add = perturbed(perturb)
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


def memory_layout(layer: RecurrentLIFLayer, n_in: int, rng: np.random.Generator, *, n_memory: int,
                  tau_memory: float, tau_fast, in_scale: float, rec_scale: float, dt: float = 1.):
    """The credit layout (as rsnn/neurons/gif_exp.py credit_layout) in an alif layer (--model alif-delta
    --n_memory N, docs/tasks.md): the last n_memory neurons are memory neurons whose threshold adapts slowly
    (tau_a = tau_memory) and whose initial input and recurrent weights are scaled by in_scale and rec_scale (weak
    at the start: the untrained network does not hold the cues, the memory has to be written by learning); the
    others adapt fast, tau_a ~ U(*tau_fast) ms, and forget within the delay, or, with tau_fast None, are LIF
    (beta 0: Bellec et al.'s mix of LIF and ALIF neurons)."""
    if layer.neuron != 'alif':
        raise ValueError('memory_layout needs an alif layer')
    n_rec = layer.n_rec
    m = slice(n_rec - n_memory, n_rec)
    if tau_fast is None:
        beta = np.zeros(n_rec, np.float32)
        beta[m] = layer.beta
        layer.beta = jnp.asarray(beta)
        tau = np.full(n_rec, tau_memory)
    else:
        tau = rng.uniform(tau_fast[0], max(tau_fast), n_rec)
        tau[m] = tau_memory
    layer.adapt_decay = jnp.asarray(np.exp(-dt / tau), dtype=jnp.float32)
    w = np.array(layer.linear.weight_op.value['weight'])
    w[:n_in, m] *= in_scale
    w[n_in:, m] *= rec_scale
    layer.linear.weight_op.value = dict(layer.linear.weight_op.value, weight=jnp.asarray(w))


def build(n_in: int, n_rec: int, p: LayerParams, rng: np.random.Generator, *, neuron: str, synapse: str):
    """The table's builder (rsnn/neurons/__init__.py) of the rows lif-delta, alif-delta, lif-exp-cu."""
    return RecurrentLIFLayer(n_in, n_rec, dt=p.dt, tau_mem=p.tau_mem, tau_mem_sigma=p.tau_mem_sigma, V_th=p.V_th,
                             ff_scale=p.ff_scale, rec_scale=p.rec_scale, spk_fun=p.spk_fun, spk_reset=p.spk_reset,
                             rng=rng, neuron=neuron, synapse=synapse, tau_syn=p.tau_syn, tau_adapt=p.tau_adapt,
                             beta=p.beta, detach_reset=p.detach_reset)
