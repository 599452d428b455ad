"""The chunk engine: an online rule's trace recursion run K time steps at a time, for any network of the
neuron seam (rsnn/neurons/seam.py: recurrent layers in a chain with a pure `step`, and a leaky readout).
D-RTRL and ES-D-RTRL get the same gradient as brainscale's step-by-step algorithms (`--trace_chunk 1`) at
the speed of BPTT; e-prop, OTTT and SnAp-1 run on it only (rsnn/rules/engine_rule.py).

Within one update the weights are fixed, so the work of K consecutive steps can be done together.
For each chunk of K steps (the last one may be shorter):

1. Forward, layer after layer (as BPTT's `run_sequence`): the input products x_t W_in of all K steps
   are one matrix product over K x B rows; only s_{t-1} W_rec and the neuron update stay step by step.
   The chunk keeps, per layer, each step's previous state h_{t-1} and weight output y_t (K x B x neurons
   per state: the buffer; nothing grows with T).
2. brainscale's per-step quantities, for all K steps at once (element-wise, vectorized over K):
     D_t  = d h_t / d h_{t-1} with y_t fixed     (per neuron S x S; brainscale's hidden-group Jacobian)
     df_t = d h_t / d y_t                        (brainscale's `df`, jvp with ones)
     L_t  = d loss_t / d h_t through the paths within step t only (brainscale's single-step VJP: a
            perturbation added to each new state where the model writes it), as one backward pass
            through the K steps with the recurrent inputs held fixed: again products over K x B rows.
3. The trace recursion and the gradient read for the whole chunk:
   ES-D-RTRL (a = decay):  x^_t = a x^_{t-1} + x_t,  f^_t = a D_t f^_{t-1} + (1 - a) df_t,
       dW = sum_t x^_t^T G_t with G_t = sum_k f^_t[k] L_t[k] / c_t (c_t brainscale's bias correction)
          = X^T G~ + a x^_0^T G~_1,  G~_s = sum_{t>=s} a^(t-s) G_t   (one product over K x B rows).
   D-RTRL:  e_t = D_t e_{t-1} + x_t df_t (per sample, weight and state), dW = sum_t sum_b e_t L_t.
       With Phi(t, s) = D_t ... D_{s+1} and Lambda_s = sum_{t>=s} Phi(t, s)^T L_t (a backward recursion
       over the chunk, per neuron):
          dW  = sum_b e_0 (D_1^T Lambda_1) + X^T (sum_k df[k] Lambda[k])     (one pass over e_0 + one product)
          e_K = Phi(K, 0) e_0 + sum_s x_s (Phi(K, s) df_s)^T                  (one pass + one batched product)
       so the trace (batch x #weights x S floats) is read and written once per chunk instead of every
       step, and its K rank-1 updates become a matrix product with K as the inner dimension.
Exact in real arithmetic; in float32 the sums are ordered differently (tests/test_chunked_traces.py:
cosine >= 0.99999 and norm ratio within 1e-5 of brainscale's, per weight).

The networks' neuron updates as pure functions: `LayerCell` uses the layers' `step` (the seam's pure step,
from which rsnn.neurons.base derives the stateful `update` that brainscale runs and BPTT's run_sequence).
The tests compare against brainscale running the models' stateful `update`, so a layer whose `update` is
not its `step` fails them (tests/test_neuron_seam.py: a toy model defined in the test).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from rsnn import models
from rsnn import recurrence
from rsnn.neurons import seam


# --------------------------------------------------------------------------------------------
# The networks' neuron updates as pure functions
# --------------------------------------------------------------------------------------------


class LayerCell:
    """A recurrent layer of the neuron seam (rsnn/neurons/seam.py) as a pure function of its states `names`."""

    def __init__(self, layer, names):
        self.layer, self.names = layer, list(names)

    def state(self) -> dict:
        return {n: getattr(self.layer, n).value for n in self.names}

    def set_state(self, h: dict):
        for n in self.names:
            getattr(self.layer, n).value = h[n]

    def prev_spike(self, h):
        """s_{t-1}: the spike that enters this step's recurrent input."""
        return self.layer.prev_spike(h)

    def step(self, h: dict, y, perturb: dict = None):
        """(new states, output) from the previous states h and the weight output y; `perturb` is added to
        each new state where brainscale adds its hidden perturbation (later uses see it)."""
        return self.layer.step(h, y, perturb)

    def output(self, h):
        """The output (spike, or V) as a function of the new states h_t."""
        return self.layer.output(h)


def why_not(model):
    """Why the engine cannot run `model` (one line), or None: a network of the seam (recurrent_layers(),
    readout_input(), layers with the seam's methods) with the leaky readout models.LeakyReadout."""
    reason = seam.why_not_network(model)
    if reason is None and not isinstance(getattr(model, 'out', None), models.LeakyReadout):
        reason = f'{type(model).__name__}.out is not the leaky readout models.LeakyReadout'
    return reason


def network_cells(model):
    """(cells, readout input function) of a network of the seam, or None."""
    if seam.why_not_network(model) is not None:
        return None
    return [LayerCell(l, l.state_names()) for l in model.recurrent_layers()], model.readout_input


def supports(model) -> bool:
    """The engine can run this network (every other network goes through brainscale or is refused)."""
    return why_not(model) is None


# --------------------------------------------------------------------------------------------
# One chunk: forward, and brainscale's per-step quantities for all its steps
# --------------------------------------------------------------------------------------------


def layer_forward(cell, w, bias, xs, h0):
    """The layer over the chunk's inputs xs (K, B, n_x), from the states h0; w: the layer's weights as
    `prepared_weights` gives them. Returns the final states and, per step: the previous states (dict of
    (K, B, J)), the recurrent input s_{t-1}, the weight output y_t and the output (spikes, or V for the GIF layer)."""
    z = recurrence.input_products(xs, w['in'])
    if bias is not None:
        z = z + bias
    outs, h_end, prevs, ys = recurrence.forward_scan(cell.step, cell.prev_spike, w['rec'], z, h0)
    return h_end, prevs, cell.prev_spike(prevs), ys, outs


def stacked(d: dict, names):
    return jnp.stack([d[n] for n in names], axis=-1)


def state_jacobians(cell, prevs, ys):
    """D (K, B, J, S, S) = d h_t / d h_{t-1} with y_t fixed, D[..., k, s] = d h_t[k] / d h_{t-1}[s];
    df (K, B, J, S) = d h_t / d y_t (brainscale: hidden-group Jacobian; jvp of y -> hidden with ones)."""
    names = cell.names
    zeros = {n: jnp.zeros_like(prevs[n]) for n in names}
    columns = []
    for s in names:
        tangent = dict(zeros, **{s: jnp.ones_like(prevs[s])})
        _, t = jax.jvp(lambda h: cell.step(h, ys)[0], (prevs,), (tangent,))
        columns.append(stacked(t, names))
    _, t = jax.jvp(lambda y: cell.step(prevs, y)[0], (ys,), (jnp.ones_like(ys),))
    return jnp.stack(columns, axis=-1), stacked(t, names)


def output_derivatives(cell, hs):
    """psi (K, B, J, S) = d o_t / d h_t[s] per neuron, o_t the layer's output read from its new states h_t
    (e-prop's pseudo-derivative; for an ALIF neuron (psi_V, -beta psi_V), for the GIF layer (1, 0, 0))."""
    names = cell.names
    zeros = {n: jnp.zeros_like(hs[n]) for n in names}
    cols = [jax.jvp(cell.output, (hs,), (dict(zeros, **{s: jnp.ones_like(hs[s])}),))[1] for s in names]
    return jnp.stack(cols, axis=-1)


def spike_derivatives(cell, prevs):
    """ds (K, B, J, S) = d s_{t-1} / d h_{t-1}[s] per neuron (the recurrent spike is element-wise in the states)."""
    names = cell.names
    zeros = {n: jnp.zeros_like(prevs[n]) for n in names}
    cols = [jax.jvp(cell.prev_spike, (prevs,), (dict(zeros, **{s: jnp.ones_like(prevs[s])}),))[1] for s in names]
    return jnp.stack(cols, axis=-1)


def chunk_forward_and_signals(cells, readout_input, model, values, weights, hidden, xs, targets, objective,
                              feedback=None, self_recurrence=False, output_signals=False):
    """Forward over the chunk and the learning signals. `values`: {'layers': [{'weight', 'bias'}...],
    'out': {...}}; `weights`: prepared_weights(values); `hidden`: ([state dicts], readout r); targets: the
    chunk's slice of the update's targets (leading axis K). Returns (new hidden, relations, loss sum, weighted
    readout sum, the readout of each step (K, B, n_out)); relations: {layer index or 'out': dict(x (K, B, I), D, df, L)}, one per
    trace-carrying weight.

    Optional (other rules than D-RTRL / ES-D-RTRL; the defaults leave everything above as it was):
    feedback (n_out, n): the matrix that carries the readout error into the last layer's learning signal
    instead of the readout weight transposed (e-prop's random feedback); self_recurrence: each layer's
    relation also gets ds (K, B, J, S) = d s_{t-1} / d h_{t-1} (the recurrent spike's derivative by each
    state) and w_self (J,) = the diagonal of its recurrent weight (SnAp-1's extra term of D); output_signals:
    each layer's relation also gets Lz (K, B, J) = d loss_t / d o_t, the step's error at the layer's output o_t,
    and psi (K, B, J, S) = d o_t / d h_t (output_derivatives): e-prop's learning signal and pseudo-derivative.
    L = Lz psi wherever no new state enters another new state within the step (LIF, ALIF); where one does
    (the GIF layer's g and I2 into V, LIF-exp's I into V) brainscale's L also counts that path."""
    relations, states, layer_data = {}, [], []
    x = xs
    for cell, p, w, h0 in zip(cells, values['layers'], weights, hidden[0]):
        h_end, prevs, s_prev, ys, outs = layer_forward(cell, w, p.get('bias'), x, h0)
        states.append(h_end)
        layer_data.append((x, prevs, s_prev, ys))
        x = outs
    x_out, back_out = jax.vjp(readout_input, x)
    po, decay = values['out'], model.out.decay
    y_out = recurrence.input_products(x_out, po['weight']) + po['bias']
    r_end, rs = jax.lax.scan(lambda r, y: (decay * r + y, decay * r + y), hidden[1], y_out)
    losses, dl_dr = jax.vmap(jax.value_and_grad(objective.loss))(rs, targets)
    ones = jnp.ones(rs.shape + (1,), rs.dtype)
    relations['out'] = dict(x=x_out, D=decay * ones[..., None], df=ones, L=dl_dr[..., None])
    # Learning signals, top down: the chunk's steps with the recurrent inputs held fixed.
    ct, = back_out(recurrence.input_products(dl_dr, weights[-1]['in_T'] if feedback is None else feedback))
    for i in reversed(range(len(cells))):
        cell, (x_in, prevs, s_prev, ys) = cells[i], layer_data[i]
        zero_perturb = {n: jnp.zeros_like(prevs[n]) for n in cell.names}
        _, back = jax.vjp(lambda y, p: cell.step(prevs, y, p)[1], ys, zero_perturb)
        ct_y, signal = back(ct)
        D, df = state_jacobians(cell, prevs, ys)
        relations[i] = dict(x=jnp.concatenate([x_in, s_prev], axis=-1), D=D, df=df, L=stacked(signal, cell.names))
        if output_signals:
            hs = {n: jnp.concatenate([prevs[n][1:], states[i][n][None]], axis=0) for n in cell.names}  # h_t
            relations[i]['Lz'], relations[i]['psi'] = ct, output_derivatives(cell, hs)
        if self_recurrence:
            relations[i]['ds'] = spike_derivatives(cell, prevs)
            relations[i]['w_self'] = jnp.diagonal(weights[i]['rec'])
        if i > 0:
            ct = recurrence.input_products(ct_y, weights[i]['in_T'])
    wout = jnp.sum(jax.vmap(objective.weighted)(rs, targets), axis=0)
    return (states, r_end), relations, jnp.sum(losses), wout, rs


# --------------------------------------------------------------------------------------------
# The trace recursion and the gradient read of one chunk
# --------------------------------------------------------------------------------------------


def apply_matrix(D, v):
    """sum_s D[..., k, s] v[..., s]: a per-neuron S x S matrix on a state vector."""
    return jnp.sum(D * v[..., None, :], axis=-1)


def apply_transposed(D, v):
    """sum_s D[..., s, k] v[..., s]: the transposed matrix."""
    return jnp.sum(D * v[..., :, None], axis=-2)


def matmul(A, B):
    """Per-neuron S x S matrix product A B (element-wise code: S is 1 to 3)."""
    return jnp.sum(A[..., :, :, None] * B[..., None, :, :], axis=-2)


# --------------------------------------------------------------------------------------------
# A whole sequence, chunk after chunk
# --------------------------------------------------------------------------------------------


def param_states(model, cells):
    """The trace-carrying weights in the order of the relations: the layers', then the readout's."""
    return [c.layer.linear.weight_op for c in cells] + [model.out.linear.weight_op]


def relation_shapes(model):
    """Per relation (layers..., readout): (n_in, n_out, S), the weight's shape and the states per neuron."""
    cells, _ = network_cells(model)
    shapes = []
    for i, st in enumerate(param_states(model, cells)):
        n_in, n_out = st.value['weight'].shape
        shapes.append((n_in, n_out, len(cells[i].names) if i < len(cells) else 1))
    return shapes


def prepared_weights(values, n_in: int) -> list:
    """Per layer the input and recurrent parts of its weight and the input part transposed (for the
    learning signals), then the readout's weight transposed: made once per sequence, before the loop over
    chunks. A dot that contracts a weight's second axis inside the loop (jax's transpose of x W) runs
    several times slower on the CPU measured here (recurrence.py)."""
    out = []
    for i, p in enumerate(values['layers']):
        n_x = n_in if i == 0 else p['weight'].shape[1]
        w_in = p['weight'][:n_x]
        out.append({'in': w_in, 'rec': p['weight'][n_x:], 'in_T': jnp.transpose(w_in)})
    return out + [{'in_T': jnp.transpose(values['out']['weight'])}]


def reset_chunk(K: int, T: int, reset_every) -> int:
    """The chunk length with --trace_reset_every H steps: gcd(K, H, T), so that every multiple of H (counted
    from the last reset()) is a chunk boundary when the update starts at a multiple of gcd(H, T) (trials: 0;
    a stream of updates of T steps: a multiple of T). K itself without H."""
    if not reset_every:
        return K
    return math.gcd(math.gcd(int(K), int(reset_every)), int(T))


def zeroed_at(traces, t, reset_every):
    """The traces zeroed where t (the chunk's first step since the last reset()) is a multiple of H
    (--trace_reset_every), unchanged otherwise (and always without H); the states are not touched."""
    if not reset_every:
        return traces
    keep = (t % int(reset_every) != 0).astype(jnp.float32)
    return jax.tree.map(lambda a: a * keep.astype(a.dtype), traces)


def chunked_online_gradients(model, update, K: int, xs, targets, objective, traces, t0, keep_outputs=False,
                             feedback=None, self_recurrence=False, output_signals=False, reset_every=None):
    """An online rule over xs (T, B, n_in), K steps per chunk, from the model's current states and the
    traces `traces` (one per relation: layers..., readout; zeros after a reset). `update(key, relation,
    trace, t0) -> (gradient dict, new trace)` is the rule's trace recursion and gradient read of one chunk
    (key: the layer index or 'out'; t0: the chunk's first step counted from the last reset, brainscale's
    running index). targets: a pytree with leading axis T; objective: rules.base.Objective.

    Returns ({param state: gradient}, summed loss, summed weighted readout (B, n_out), per-step readouts
    (T, B, n_out) or None, the traces after the last step, t0 + T); the model's hidden states are left at
    their values after the last step (as brainscale's step does). feedback, self_recurrence, output_signals:
    as in chunk_forward_and_signals (other rules' extras; the defaults change nothing). reset_every: H steps
    (--trace_reset_every): the traces are zeroed before every step t0 + t that is a multiple of H, the chunks
    cut to gcd(K, H, T) steps (reset_chunk); None: never."""
    cells, readout_input = network_cells(model)
    states = param_states(model, cells)
    values = {'layers': [s.value for s in states[:-1]], 'out': states[-1].value}
    T, B = xs.shape[:2]
    K = reset_chunk(max(1, min(int(K), T)), T, reset_every)
    keys = list(range(len(cells))) + ['out']
    weights = prepared_weights(values, n_in=xs.shape[-1])
    zero_grads = [jax.tree.map(jnp.zeros_like, dict(v)) for v in values['layers'] + [values['out']]]

    def chunk(carry, inp):
        hidden, traces, grads, loss, wout, t = carry
        xs_c, tg_c = inp
        hidden, relations, loss_c, wout_c, outs_c = chunk_forward_and_signals(
            cells, readout_input, model, values, weights, hidden, xs_c.astype(jnp.float32), tg_c, objective,
            feedback, self_recurrence, output_signals)
        new_traces, new_grads = [], []
        traces = zeroed_at(traces, t, reset_every)
        for key, trace, g in zip(keys, traces, grads):
            dg, trace = update(key, relations[key], trace, t)
            new_traces.append(trace)
            new_grads.append(jax.tree.map(jnp.add, g, {k: dg[k] for k in g}))
        carry = (hidden, new_traces, new_grads, loss + loss_c, wout + wout_c, t + xs_c.shape[0])
        return carry, (outs_c if keep_outputs else None)

    carry = (([c.state() for c in cells], model.out.r.value), list(traces), zero_grads,
             jnp.zeros(()), jnp.zeros((B, values['out']['weight'].shape[1])), jnp.asarray(t0, jnp.int32))
    n_full = T // K
    outs = []
    if n_full:  # the chunks sliced out of xs inside the loop: no copy of the input
        take = lambda a, i: jax.lax.dynamic_slice_in_dim(a, i * K, K)
        carry, outs_full = jax.lax.scan(
            lambda c, i: chunk(c, (take(xs, i), jax.tree.map(lambda a: take(a, i), targets))), carry,
            jnp.arange(n_full))
        if keep_outputs:
            outs.append(outs_full.reshape((n_full * K,) + outs_full.shape[2:]))
    if T % K:
        carry, outs_rest = chunk(carry, (xs[n_full * K:], jax.tree.map(lambda a: a[n_full * K:], targets)))
        if keep_outputs:
            outs.append(outs_rest)
    (hidden_states, r), traces, grads, loss, wout, t_end = carry
    for c, h in zip(cells, hidden_states):
        c.set_state(h)
    model.out.r.value = r
    outs = (jnp.concatenate(outs, 0) if len(outs) > 1 else outs[0]) if keep_outputs else None
    return dict(zip(states, grads)), loss, wout, outs, traces, t_end
