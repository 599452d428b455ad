"""FPTT, Forward Propagation Through Time (Kag & Saligrama, ICML 2021; for spiking networks Yin, Corradi &
Bohte, Nature Machine Intelligence 2023): not a gradient estimator but a training procedure. The sequence is
cut into windows of K steps, the states carried from one window to the next but detached at each window's
start (as TBPTT), and after each window one optimizer step on the window's loss plus a dynamic regulariser:

    grad_t = d l_t(theta) / d theta + alpha (theta - theta_bar) - lambda

i.e. the gradient of l_t(theta) + (alpha/2) |theta - theta_bar|^2 - <theta, lambda> (the authors' code: the
regulariser (rho - 1) <theta, lambda> + (alpha/2) |theta - theta_bar|^2 with rho = 0). After the step, with the
new weights theta:

    lambda    <- lambda - alpha (theta - theta_bar)
    theta_bar <- (1 - beta) theta_bar + beta theta - (beta / alpha) lambda     (the new lambda; beta = 1/2)

that is theta_bar <- (theta_bar + theta)/2 - lambda/(2 alpha). lambda starts at 0 and theta_bar at the initial
weights. alpha = 0 is plain windowed TBPTT: lambda stays 0 and the lambda/alpha term is taken as 0.

Here the window's loss is the objective's loss over the window's steps (the task's step weights), its gradient
BPTT's over the window from the states carried in (rsnn/rules/bptt.py, the cut included). On a stream a window
is a chunk of --update_every ms (the trainer's one update per chunk); on trials `update_window` gives the
trainer --fptt_window steps, and the trainer does one update per window within the batch. A window whose
steps all have weight 0 (no loss) is no update, as a stream's chunk without a test step (the regulariser alone
would move the weights through Adam's momentum). lambda and theta_bar are `optimizer_states`: never reset, in
every checkpoint. Memory: BPTT's tape over K steps, O(K B n S), plus lambda and theta_bar, 2 |theta|.
"""
from __future__ import annotations

import brainstate
import jax
import jax.numpy as jnp

from rsnn.methods import FPTT_WINDOW
from rsnn.rules.base import path_key
from rsnn.rules.bptt import BPTT
from rsnn.errors import UserError

DEFAULT_ALPHA = 0.1   # the authors' S-MNIST command (byin-cwi/sFPTT, fptt_mnist/README.md: --alpha 0.1 --beta 0.5)
DEFAULT_WINDOW = FPTT_WINDOW  # steps per update on trials (--fptt_window)
BETA = 0.5            # the running average's step (the algorithm's 1/2)


def regularised(grads: dict, values: dict, bar: dict, lam: dict, alpha: float) -> dict:
    """d l/d theta + alpha (theta - theta_bar) - lambda, leaf by leaf."""
    return jax.tree.map(lambda g, p, b, l: g + alpha * (p - b) - l, grads, values, bar, lam)


def advanced(values: dict, bar: dict, lam: dict, alpha: float):
    """(lambda, theta_bar) after an update to the weights `values` (module docstring)."""
    lam = jax.tree.map(lambda l, p, b: l - alpha * (p - b), lam, values, bar)
    # alpha = 0: lambda stays 0 and its term is 0 (0/0 otherwise)
    over = (lambda l: l / alpha) if alpha > 0 else jnp.zeros_like
    bar = jax.tree.map(lambda b, p, l: (1. - BETA) * b + BETA * p - BETA * over(l), bar, values, lam)
    return lam, bar


class FPTT(BPTT):
    def __init__(self, model, params: dict, options):
        super().__init__(model, params, options)
        if options.several_devices:  # lambda and theta_bar are not placed on a mesh (not measured nor tested)
            raise UserError('--method fptt runs on one device; give --devices 0 or cpu')
        extra = options.extra
        alpha = extra.get('fptt_alpha')
        self.alpha = float(DEFAULT_ALPHA if alpha is None else alpha)
        if not self.alpha >= 0.:
            raise UserError(f'--fptt_alpha must be >= 0, got {self.alpha}')
        window = extra.get('fptt_window')
        self.window = int(DEFAULT_WINDOW if window is None else window)
        if self.window < 1:
            raise UserError(f'--fptt_window must be >= 1 step, got {self.window}')
        values = {path_key(k): s.value for k, s in params.items()}
        self.lam = brainstate.LongTermState(jax.tree.map(jnp.zeros_like, values))
        self.bar = brainstate.LongTermState(jax.tree.map(lambda v: jnp.array(v, copy=True), values))

    def update_window(self):
        # on a stream the chunk is the window (the trainer's one update per chunk)
        return None if self.options.stream else self.window

    def optimizer_states(self) -> dict:
        return {'fptt/lambda': self.lam, 'fptt/theta_bar': self.bar}

    def adjust_gradients(self, grads: dict, values: dict) -> dict:
        return regularised(grads, values, self.bar.value, self.lam.value, self.alpha)

    def after_update(self, values: dict, applied):
        lam, bar = advanced(values, self.bar.value, self.lam.value, self.alpha)
        keep = lambda new, old: jnp.where(applied, new, old)
        self.lam.value = jax.tree.map(keep, lam, self.lam.value)
        self.bar.value = jax.tree.map(keep, bar, self.bar.value)
