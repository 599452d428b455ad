"""UORO, unbiased online recurrent optimization (Tallec & Ollivier 2018, ICLR): a rank-1 unbiased estimate
s~ theta~^T of the RTRL influence matrix J_t = d h_t / d theta of the layers' weights (s~ over every layer's
states and the readout's), updated each step with fresh random signs nu:

    s~' = (d h_t / d h_{t-1}) s~_{t-1}     one JVP of the network's step (never the dense Jacobian)
    g   = nu^T d h_t / d theta              one VJP of the step
    rho0 = sqrt(|theta~| / |s~'|), rho1 = sqrt(|g| / |nu|)   (variance-minimizing scales, + eps)
    s~_t = rho0 s~' + rho1 nu,   theta~_t = theta~_{t-1} / rho0 + g / rho1
    grad += (d loss_t / d h_t . s~_t) theta~_t

E[s~ theta~^T] = J_t, so the gradient is unbiased for the full RTRL gradient (which over a finite window is
BPTT's): tests/test_online_rules.py averages it over many seeds against the exact one of a tiny network.

The readout's own weights are not estimated: their influence on the readout state is exact and cheap, a trace
of the readout's input filtered with its decay (B x (n_x + 1) floats; Tallec & Ollivier keep this direct term
exact too), so UORO's readout gradient is BPTT's (tests/test_rule_fidelity.py), as every other rule's is.

Two estimates: by default (--uoro_per_sample 0) one rank-1 estimate covers the whole batch (one theta~, the
scales rho from the whole batch's norms): memory O(P + B n S), theta~ (one copy of the layers' weights) and
s~ (one copy of the states). --uoro_per_sample 1: one estimate per sample (per-sample VJPs, scales and theta~:
the batch averages B independent estimates), memory O(B P + B n S), as D-RTRL's trace for S = 1.
Step by step only (a scan over the update's steps); the key is a carried state, so every update and every
batch draws new signs.
"""
from __future__ import annotations

import brainstate
import jax
import jax.numpy as jnp

from rsnn.rules import chunk_engine
from rsnn.rules.base import Result, Rule, RuleOptions
from rsnn.rules.engine_rule import refuse_unsupported
from rsnn.errors import UserError

EPS = 1e-7


class PureNetwork:
    """A network of the neuron seam (rsnn/neurons/seam.py: its recurrent layers and a leaky readout) as a pure step of
    (states, x, weights): states = ([layer state dicts], r); weights = {'layers': [{'weight', 'bias'}...], 'out': {...}}."""

    def __init__(self, model):
        self.model = model
        self.cells, self.readout_input = chunk_engine.network_cells(model)
        self.param_states = chunk_engine.param_states(model, self.cells)
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
        new, (r, _) = self.forward(values, h, x)
        return new, r

    def forward(self, values, h, x):
        """(new states, (readout r_t, the readout's input z_t))."""
        inp, new_layers = x, []
        for cell, p, hl in zip(self.cells, values['layers'], h[0]):
            y = jnp.concatenate([inp, cell.prev_spike(hl)], axis=-1) @ p['weight']
            if p.get('bias') is not None:
                y = y + p['bias']
            new, inp = cell.step(hl, y)
            new_layers.append(new)
        po, z = values['out'], self.readout_input(inp)
        r = self.decay * h[1] + z @ po['weight'] + po['bias']
        return (new_layers, r), (r, z)

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


def per_sample_norm(t):
    """The norm of each sample's slice of a tree whose leaves have the batch on axis 0: (B,)."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(l).reshape(l.shape[0], -1), axis=1) for l in jax.tree.leaves(t)))


def scale(c, t):
    """c * t leaf by leaf; c a scalar or one factor per sample (B,) on the leaves' axis 0."""
    return jax.tree.map(lambda l: (c.reshape(c.shape + (1,) * (l.ndim - c.ndim)) if jnp.ndim(c) else c) * l, t)


def uoro_sequence(net: PureNetwork, values, h0, s0, th0, ro0, key, xs, targets, loss, weighted=None,
                  keep_outputs=False, per_sample=False):
    """UORO over the window xs (T, B, n_in) from the states h0, the estimate (s0, th0) of the layers' weights
    (th0 with a leading batch axis where per_sample) and the readout's exact trace ro0 = (e_W (B, n_x),
    e_b (B,)). Returns (summed gradient (values' structure), summed loss, summed weighted readout or None,
    outputs or None, final states, final s~, final theta~, final readout trace, final key). Pure: vmap-able
    over keys."""
    layers = lambda lv: {'layers': lv, 'out': values['out']}
    decay = net.decay

    def body(carry, inp):
        h, s_t, th_t, (e_w, e_b), key, g_acc, l_acc, w_acc = carry
        x, target = inp
        key, sub = jax.random.split(key)
        (h_new, (r, z)), (s_prop, _) = jax.jvp(lambda hh: net.forward(values, hh, x), (h,), (s_t,))
        nu = signs_like(sub, h_new)
        if per_sample:   # one rank-1 estimate per sample: a per-sample VJP and per-sample scales
            g = jax.vmap(lambda hb, xb, nb: jax.vjp(lambda lv: net.step(layers(lv), hb, xb)[0],
                                                      values['layers'])[1](nb)[0])(h, x, nu)
            norm = per_sample_norm
        else:            # one estimate for the whole batch
            g, = jax.vjp(lambda lv: net.step(layers(lv), h, x)[0], values['layers'])[1](nu)
            norm = tree_norm
        rho0 = jnp.sqrt(norm(th_t) / (norm(s_prop) + EPS)) + EPS
        rho1 = jnp.sqrt(norm(g) / (norm(nu) + EPS)) + EPS
        s_new = jax.tree.map(jnp.add, scale(rho0, s_prop), scale(rho1, nu))
        th_new = jax.tree.map(jnp.add, scale(1. / rho0, th_t), scale(1. / rho1, g))
        l, dl_dr = jax.value_and_grad(loss)(r, target)
        c = jnp.sum(dl_dr * s_new[1], axis=-1)      # d loss_t / d h_t . s~_t per sample (the loss reads r only)
        est = jax.tree.map(lambda t: jnp.tensordot(c, t, axes=1), th_new) if per_sample else scale(jnp.sum(c), th_new)
        # the readout's own weights: their exact trace (r_t = a r_{t-1} + z_t W + b)
        e_w = decay * e_w + z
        e_b = decay * e_b + 1.
        g_acc = {'layers': jax.tree.map(jnp.add, g_acc['layers'], est),
                 'out': {'weight': g_acc['out']['weight'] + e_w.T @ dl_dr,
                         'bias': g_acc['out']['bias'] + e_b @ dl_dr}}
        if weighted is not None:
            w_acc = w_acc + weighted(r, target)
        return (h_new, s_new, th_new, (e_w, e_b), key, g_acc, l_acc + l, w_acc), (r if keep_outputs else None)

    out_shape = net.step(values, h0, xs[0])[1] if weighted is not None else None
    w0 = jnp.zeros(jax.eval_shape(weighted, out_shape, jax.tree.map(lambda a: a[0], targets)).shape) \
        if weighted is not None else jnp.zeros(())
    g0 = {'layers': jax.tree.map(jnp.zeros_like, values['layers']),
          'out': {k: jnp.zeros_like(values['out'][k]) for k in ('weight', 'bias')}}
    carry = (h0, s0, th0, ro0, key, g0, jnp.zeros(()), w0)
    (h, s, th, ro, key, g, l, w), outs = jax.lax.scan(body, carry, (xs.astype(jnp.float32), targets))
    return g, l, (w if weighted is not None else None), outs, h, s, th, ro, key


class UORO(Rule):
    name = 'uoro'
    supports_step_hook = False

    def __init__(self, model, params: dict, options: RuleOptions):
        super().__init__(model, params, options)
        refuse_unsupported(self.name, model, options)
        if options.trace_chunk not in (None, 1):
            raise UserError(f'--method uoro runs step by step only; use --trace_chunk 1 (got {options.trace_chunk})')
        self.net = PureNetwork(model)
        self.per_sample = bool(options.extra.get('uoro_per_sample'))
        self.s = brainstate.ShortTermState(self.zero_s())
        self.th = brainstate.ShortTermState(self.zero_theta())
        self.readout_trace = brainstate.ShortTermState(self.zero_readout_trace())
        seed = int(options.extra.get('uoro_seed', options.extra.get('seed', 0)))
        self.key = brainstate.ShortTermState(jax.random.PRNGKey(seed))

    @staticmethod
    def choose_chunk(model, options: RuleOptions) -> int:
        return 1

    def zero_s(self):
        return jax.tree.map(jnp.zeros_like, self.net.states())

    def zero_theta(self):
        """theta~ of the layers' weights: one copy, or one per sample (--uoro_per_sample 1)."""
        B = self.options.batch_size
        return jax.tree.map(lambda v: jnp.zeros(((B,) if self.per_sample else ()) + v.shape, v.dtype),
                            self.net.values()['layers'])

    def zero_readout_trace(self):
        """The readout's exact trace: its input filtered with its decay (B, n_x), and the bias's (B,)."""
        n_x = self.net.values()['out']['weight'].shape[0]
        B = self.options.batch_size
        return jnp.zeros((B, n_x), jnp.float32), jnp.zeros((B,), jnp.float32)

    def carried_states(self) -> dict:
        return {'uoro/s': self.s, 'uoro/theta': self.th, 'uoro/key': self.key, 'uoro/readout': self.readout_trace}

    def reset(self):
        # the estimate restarts with the states; the key goes on (new signs in every batch)
        self.s.value = self.zero_s()
        self.th.value = self.zero_theta()
        self.readout_trace.value = self.zero_readout_trace()

    def gradients(self, xs, targets, objective, step_hook=None, keep_outputs=False, hook_inputs=None) -> Result:
        if step_hook is not None:
            raise UserError('--method uoro cannot call a step hook (--stream_reset 1)')
        g, loss, wout, outs, h, s, th, ro, key = uoro_sequence(
            self.net, self.net.values(), self.net.states(), self.s.value, self.th.value, self.readout_trace.value,
            self.key.value, xs, targets, objective.loss, objective.weighted, keep_outputs, self.per_sample)
        self.net.set_states(h)
        self.s.value, self.th.value, self.readout_trace.value, self.key.value = s, th, ro, key
        grads = {st: gv for st, gv in zip(self.net.param_states, g['layers'] + [g['out']])}
        return Result({k: grads[st] for k, st in self.params.items() if st in grads}, loss, wout, outs)
