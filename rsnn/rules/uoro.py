"""UORO, unbiased online recurrent optimization (Tallec & Ollivier 2018, ICLR): a rank-1 unbiased estimate
s~ theta~^T of the full RTRL influence matrix J_t = d h_t / d theta of the whole network (every layer's states
and the readout, the whole batch), updated each step with fresh random signs nu:

    s~' = (d h_t / d h_{t-1}) s~_{t-1}     one JVP of the network's step (never the dense Jacobian)
    g   = nu^T d h_t / d theta              one VJP of the step
    rho0 = sqrt(|theta~| / |s~'|), rho1 = sqrt(|g| / |nu|)   (variance-minimizing scales, + eps)
    s~_t = rho0 s~' + rho1 nu,   theta~_t = theta~_{t-1} / rho0 + g / rho1
    grad += (d loss_t / d h_t . s~_t) theta~_t

E[s~ theta~^T] = J_t, so the gradient is unbiased for the full RTRL gradient (which over a finite window is
BPTT's): tests/test_online_rules.py averages it over many seeds against the exact one of a tiny network.
Memory O(P + B n S): theta~ (one copy of the weights) and s~ (one copy of the states), plus the random key.
Step by step only (a scan over the update's steps); the key is a carried state, so every update and every
batch draws new signs.
"""
from __future__ import annotations

import brainstate
import jax
import jax.numpy as jnp

from rsnn.rules import chunks
from rsnn.rules.base import Result, Rule, RuleOptions
from rsnn.rules.chunked_rule import ChunkedRule
from utils import UserError

EPS = 1e-7


class PureNetwork:
    """A network of chunks.py (layers of models.py and a leaky readout) as a pure step of
    (states, x, weights): states = ([layer state dicts], r); weights = {'layers': [{'weight', 'bias'}...], 'out': {...}}."""

    def __init__(self, model):
        self.model = model
        self.cells, self.readout_input = chunks.network_cells(model)
        self.param_states = chunks.param_states(model, self.cells)
        self.decay = model.out.decay

    def values(self):
        return {'layers': [dict(s.value) for s in self.param_states[:-1]], 'out': dict(self.param_states[-1].value)}

    def states(self):
        return ([c.state() for c in self.cells], self.model.out.r.value)

    def set_states(self, h):
        for c, hl in zip(self.cells, h[0]):
            c.set_state(hl)
        self.model.out.r.value = h[1]

    def step(self, values, h, x):
        """(new states, readout r_t): the arithmetic of the models' `update`, in the same order."""
        inp, new_layers = x, []
        for cell, p, hl in zip(self.cells, values['layers'], h[0]):
            y = jnp.concatenate([inp, cell.prev_spike(hl)], axis=-1) @ p['weight']
            if p.get('bias') is not None:
                y = y + p['bias']
            new, inp = cell.step(hl, y)
            new_layers.append(new)
        po = values['out']
        r = self.decay * h[1] + self.readout_input(inp) @ po['weight'] + po['bias']
        return (new_layers, r), r

    def sequence_loss(self, values, h0, xs, targets, loss):
        """The summed loss of the window from h0 (for the exact gradient)."""
        def body(h, inp):
            h, r = self.step(values, h, inp[0])
            return h, loss(r, inp[1])
        _, losses = jax.lax.scan(body, h0, (xs, targets))
        return jnp.sum(losses)


def tree_norm(t):
    return jnp.sqrt(sum(jnp.sum(jnp.square(l)) for l in jax.tree.leaves(t)))


def signs_like(key, tree):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [jax.random.rademacher(k, l.shape, l.dtype) for k, l in zip(keys, leaves)])


def uoro_sequence(net: PureNetwork, values, h0, s0, th0, key, xs, targets, loss, weighted=None,
                  keep_outputs=False):
    """UORO over the window xs (T, B, n_in) from the states h0 and the estimate (s0, th0).
    Returns (summed gradient (values' structure), summed loss, summed weighted readout or None, outputs or
    None, final states, final s~, final theta~, final key). Pure: vmap-able over keys."""
    def body(carry, inp):
        h, s_t, th_t, key, g_acc, l_acc, w_acc = carry
        x, target = inp
        key, sub = jax.random.split(key)
        (h_new, r), (s_prop, _) = jax.jvp(lambda hh: net.step(values, hh, x), (h,), (s_t,))
        nu = signs_like(sub, h_new)
        _, back = jax.vjp(lambda v: net.step(v, h, x)[0], values)
        g, = back(nu)
        rho0 = jnp.sqrt(tree_norm(th_t) / (tree_norm(s_prop) + EPS)) + EPS
        rho1 = jnp.sqrt(tree_norm(g) / (tree_norm(nu) + EPS)) + EPS
        s_new = jax.tree.map(lambda a, b: rho0 * a + rho1 * b, s_prop, nu)
        th_new = jax.tree.map(lambda a, b: a / rho0 + b / rho1, th_t, g)
        l, dl_dr = jax.value_and_grad(loss)(r, target)
        c = jnp.sum(dl_dr * s_new[1])              # d loss_t / d h_t . s~_t (the loss reads the readout only)
        g_acc = jax.tree.map(lambda a, b: a + c * b, g_acc, th_new)
        if weighted is not None:
            w_acc = w_acc + weighted(r, target)
        return (h_new, s_new, th_new, key, g_acc, l_acc + l, w_acc), (r if keep_outputs else None)

    out_shape = net.step(values, h0, xs[0])[1] if weighted is not None else None
    w0 = jnp.zeros(jax.eval_shape(weighted, out_shape, jax.tree.map(lambda a: a[0], targets)).shape) \
        if weighted is not None else jnp.zeros(())
    carry = (h0, s0, th0, key, jax.tree.map(jnp.zeros_like, values), jnp.zeros(()), w0)
    (h, s, th, key, g, l, w), outs = jax.lax.scan(body, carry, (xs.astype(jnp.float32), targets))
    return g, l, (w if weighted is not None else None), outs, h, s, th, key


class UORO(Rule):
    name = 'uoro'
    supports_step_hook = False

    def __init__(self, model, params: dict, options: RuleOptions):
        super().__init__(model, params, options)
        ChunkedRule.check_supported.__func__(self.__class__, model, options)
        if options.trace_chunk not in (None, 1):
            raise UserError(f'--method uoro runs step by step only; use --trace_chunk 1 (got {options.trace_chunk})')
        self.net = PureNetwork(model)
        self.s = brainstate.ShortTermState(self.zero_s())
        self.th = brainstate.ShortTermState(jax.tree.map(jnp.zeros_like, self.net.values()))
        seed = int(options.extra.get('uoro_seed', options.extra.get('seed', 0)))
        self.key = brainstate.ShortTermState(jax.random.PRNGKey(seed))

    @staticmethod
    def choose_chunk(model, options: RuleOptions) -> int:
        return 1

    def zero_s(self):
        return jax.tree.map(jnp.zeros_like, self.net.states())

    def carried_states(self) -> dict:
        return {'uoro/s': self.s, 'uoro/theta': self.th, 'uoro/key': self.key}

    def reset(self):
        # the estimate restarts with the states; the key goes on (new signs in every batch)
        self.s.value = self.zero_s()
        self.th.value = jax.tree.map(jnp.zeros_like, self.th.value)

    def gradients(self, xs, targets, objective, step_hook=None, keep_outputs=False, hook_inputs=None) -> Result:
        if step_hook is not None:
            raise UserError('--method uoro cannot call a step hook (--stream_reset 1)')
        g, loss, wout, outs, h, s, th, key = uoro_sequence(
            self.net, self.net.values(), self.net.states(), self.s.value, self.th.value, self.key.value, xs,
            targets, objective.loss, objective.weighted, keep_outputs)
        self.net.set_states(h)
        self.s.value, self.th.value, self.key.value = s, th, key
        grads = {st: gv for st, gv in zip(self.net.param_states, g['layers'] + [g['out']])}
        return Result({k: grads[st] for k, st in self.params.items() if st in grads}, loss, wout, outs)
