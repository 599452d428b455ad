"""--model adlif: the adaptive LIF neuron of Bittar & Garner 2022 ("A surrogate gradient spiking baseline for
speech command recognition", Front. Neurosci.; their code sparch), in its recurrent form RadLIF (our layers are
recurrent: one Linear over [x_t, s_{t-1}], so RadLIF's recurrent weights V are the second block of W).

Per neuron, with s_{t-1} = H(u_{t-1} - V_th) (surrogate gradient) and y_t = [x_t, s_{t-1}] W + b:

    w_t = beta w_{t-1} + (1 - beta) (a u_{t-1} + b_w s_{t-1})      (adaptation, coupled to u and to the spikes)
    u_t = alpha (u_{t-1} - V_th s_{t-1}) + (1 - alpha) (y_t - w_t)  (soft reset; --detach_reset 1 detaches it)

alpha = exp(-dt/tau_u), beta = exp(-dt/tau_w), per neuron: tau_u ~ U(5, 25) ms, tau_w ~ U(30, 120) ms,
a ~ U(-1, 1), b_w ~ U(0, 2) (sparch's ranges: alpha_lim, beta_lim, a_lim, b_lim at dt = 1 ms). a < 0 makes
the pair (u, w) a damped resonator, b_w > 0 spike-frequency adaptation.

w is the Euler step of the paper's tau_w dw/dt = -w + a u + b_w s (the (1 - beta) factor). sparch's code
writes w_t = beta w_{t-1} + a u_{t-1} + b_w s_{t-1}, without it: its sub-threshold system is then unstable for
a < -(1 - beta) (an eigenvalue above 1), and at 3 x 128 on the SHD stand-in BPTT's first update was not finite;
with a restricted to [0, 1] in that form the network learned to 0.18 held-out accuracy in 625 batches, against
0.90 in 250 batches with the factor (docs/image-classification.md, "adLIF on the SHD stand-in").

What else differs from sparch: alpha, beta, a, b_w are drawn once and fixed (sparch learns them; here only the
Linear weights carry eligibility traces, so every rule trains the same parameters); no batch norm and no
dropout; the recurrent diagonal is not zeroed; the weights are Kaiming normal per block (as every model here).
Two states per neuron (u, w): the online rules' traces carry S = 2 per weight, and w's path into u within the
step is in the learning signal (as the LIF-exp synapse's I into V).
"""
from __future__ import annotations

import brainscale
import braintools
import jax
import jax.numpy as jnp
import numpy as np

from rsnn.neurons import LayerParams
from rsnn.neurons.base import NeuronLayer, make_surrogate, perturbed, stacked_recurrent_weight

TAU_U_MS = (5., 25.)     # membrane time constants (sparch alpha_lim)
TAU_W_MS = (30., 120.)   # adaptation time constants (sparch beta_lim)
A_RANGE = (-1., 1.)      # sub-threshold coupling u -> w (sparch a_lim)
B_RANGE = (0., 2.)       # spike-triggered adaptation (sparch b_lim)


class AdLIFLayer(NeuronLayer):
    """A recurrent layer of adLIF neurons (module docstring); output: the spikes."""

    def __init__(self, n_in: int, n_rec: int, *, dt: float, V_th: float, ff_scale: float, rec_scale: float,
                 spk_fun: str, rng: np.random.Generator, detach_reset: bool = True,
                 tau_u=TAU_U_MS, tau_w=TAU_W_MS, a=A_RANGE, b=B_RANGE):
        super().__init__()
        self.n_rec, self.V_th, self.detach_reset = n_rec, V_th, detach_reset
        self.spk_fun = make_surrogate(spk_fun)
        f32 = lambda v: jnp.asarray(v, dtype=jnp.float32)
        self.tau_u, self.tau_w = rng.uniform(*tau_u, n_rec), rng.uniform(*tau_w, n_rec)
        self.alpha, self.beta = f32(np.exp(-dt / self.tau_u)), f32(np.exp(-dt / self.tau_w))
        self.a, self.b = f32(rng.uniform(*a, n_rec)), f32(rng.uniform(*b, n_rec))
        w = stacked_recurrent_weight(rng, n_in, n_rec, ff_scale, rec_scale)
        self.linear = brainscale.nn.Linear(n_in + n_rec, n_rec, w_init=w, b_init=braintools.init.ZeroInit())

    def state_names(self):
        return ['u', 'w']

    def prev_spike(self, h):
        """s_{t-1} from the states h_{t-1}."""
        return self.spk_fun((h['u'] - self.V_th) / self.V_th)

    def step(self, h: dict, y, perturb: dict = None):
        """(new states, spike) from the previous states h and y = [x_t, s_{t-1}] W + b; `perturb` as in the
        seam (rsnn/neurons/seam.py): w is formed first and enters u."""
        add = perturbed(perturb)
        s = self.prev_spike(h)
        s_reset = jax.lax.stop_gradient(s) if self.detach_reset else s
        w = add('w', self.beta * h['w'] + (1. - self.beta) * (self.a * h['u'] + self.b * s))
        u = add('u', self.alpha * (h['u'] - self.V_th * s_reset) + (1. - self.alpha) * (y - w))
        new = {'u': u, 'w': w}
        return new, self.prev_spike(new)

    def output(self, h):
        return self.prev_spike(h)


def build(n_in: int, n_rec: int, p: LayerParams, rng: np.random.Generator):
    """The table's builder of the row adlif (reads --dt, --V_th, --ff_scale, --rec_scale, --spk_fun,
    --detach_reset; the LIF time constants do not apply)."""
    return AdLIFLayer(n_in, n_rec, dt=p.dt, V_th=p.V_th, ff_scale=p.ff_scale, rec_scale=p.rec_scale,
                      spk_fun=p.spk_fun, rng=rng, detach_reset=p.detach_reset)
