"""A recurrent layer over a whole sequence, for BPTT, with a backward pass written for speed on a CPU.

    h_t, out_t = step(h_{t-1}, c_t + prev_spike(h_{t-1}) @ W_rec)          t = 1 .. T

`recurrent_scan` returns the outputs of all steps and the last state, and has the exact gradient of that
scan (the same as jax's autodiff, summed in another order). Its backward pass differs from jax's in two
places (and its products in one more), all measured on this repository's 2-core CPU (XLA CPU, jax 0.8; docs/chunked-traces.md, "BPTT, the yardstick"):

* jax's transpose of `s @ W_rec` inside the backward scan is a dot that contracts W_rec's second axis
  (`dy @ W_rec^T` without a transposed copy). XLA CPU runs that form about 3.5x slower than a plain product
  (32 x 512 by 512 x 512, 100 steps: 58 ms against 17 ms). Here W_rec^T is materialized once, before the
  loop, and the loop multiplies by it.
* jax accumulates dW_rec += s_{t-1}^T dy_t inside the loop, one small product per step. Here the loop
  keeps dy_t, and dW_rec is one product over all T x B rows after it.
* On a CPU, the per-step products (forward `s_{t-1} W_rec`, backward `dy_t W_rec^T`) of a layer of 256 neurons or
  more run as blocks of COLUMN_BLOCK columns (`step_product`): XLA CPU hands a 32 x 512 by 512 x 512 product to
  two threads, and inside a time loop that hand-over costs as much as the product (one LIF layer's scan of
  100 steps: 17.6 ms as one product, 8.9 ms as four blocks of 128 columns, on a 2-core Xeon with AVX-512).

Only the element-wise neuron update is differentiated by jax, one step at a time (`jax.vjp` of `step`
and `prev_spike`, recomputed from the saved states, a few flops per neuron).
"""
from __future__ import annotations

import contextlib
from functools import partial

import jax
import jax.numpy as jnp

_batch_split = False  # True while a step is traced with its batch axis split over several devices


COLUMN_BLOCK = 128  # columns per block of a per-step product (step_product); 0: one product


def column_blocks(w):
    """w (n, m) split into blocks of COLUMN_BLOCK columns on a CPU (the whole of w if m is less than two
    blocks, and on a GPU or TPU, where each block would be a kernel launch of its own: not measured there)."""
    m = w.shape[-1]
    if not COLUMN_BLOCK or m < 2 * COLUMN_BLOCK or jax.default_backend() != 'cpu':
        return [w]
    return [w[:, i:i + COLUMN_BLOCK] for i in range(0, m, COLUMN_BLOCK)]


def step_product(s, blocks):
    """s @ w inside a time loop, w given as column_blocks(w): one product per block, concatenated. XLA CPU
    runs a 32 x 512 by 512 x 512 product on two threads, and inside a loop the threads' hand-over costs as
    much as the product; 32 x 512 by 512 x 128 blocks run on one thread each, side by side (docs/chunked-traces.md)."""
    if len(blocks) == 1:
        return s @ blocks[0]
    return jnp.concatenate([s @ b for b in blocks], axis=-1)


def forward_scan(step, prev_spike, w_rec, currents, h0):
    """The scan itself: (outputs, last state, the states h_{t-1} and weight outputs y_t of every step)."""
    blocks = column_blocks(w_rec)

    def body(h, c_t):
        y = c_t + step_product(prev_spike(h), blocks)
        new, out = step(h, y)
        return new, (h, y, out)

    h_last, (prevs, ys, outs) = jax.lax.scan(body, h0, currents)
    return outs, h_last, prevs, ys


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def recurrent_scan(step, prev_spike, w_rec, currents, h0):
    """(outputs (T, B, ...), last state) of the layer over currents (T, B, N) from the states h0 (a dict of
    (B, N) arrays). `step(h, y) -> (new h, output)` and `prev_spike(h) -> s` are pure functions."""
    outs, h_last, _, _ = forward_scan(step, prev_spike, w_rec, currents, h0)
    return outs, h_last


def _recurrent_scan_fwd(step, prev_spike, w_rec, currents, h0):
    outs, h_last, prevs, ys = forward_scan(step, prev_spike, w_rec, currents, h0)
    return (outs, h_last), (w_rec, prevs, ys)


def _recurrent_scan_bwd(step, prev_spike, residuals, cotangents):
    w_rec, prevs, ys = residuals
    d_outs, d_h_last = cotangents
    blocks_t = column_blocks(jnp.transpose(w_rec))  # materialized once: the loop's product is then a plain one

    def body(d_h, inputs):  # d_h: the cotangent of h_t; returns that of h_{t-1}
        h, y, d_out = inputs
        _, step_vjp = jax.vjp(step, h, y)
        d_h_step, d_y = step_vjp((d_h, d_out))
        _, spike_vjp = jax.vjp(prev_spike, h)
        d_h_rec, = spike_vjp(step_product(d_y, blocks_t))
        return jax.tree.map(jnp.add, d_h_step, d_h_rec), d_y

    d_h0, d_ys = jax.lax.scan(body, d_h_last, (prevs, ys, d_outs), reverse=True)
    s_prev = prev_spike(prevs)  # element-wise, so it takes the stacked (T, B, N) states as they are
    return rows_product(s_prev, d_ys), d_ys, d_h0


recurrent_scan.defvjp(_recurrent_scan_fwd, _recurrent_scan_bwd)


@contextlib.contextmanager
def batch_split_over_devices():
    """Trace the products below for a batch axis split over several devices (rsnn.trainer.Trainer with a mesh):
    as 3-D einsums, which GSPMD keeps split. Their 2-D form, faster on one CPU, merges T with the split batch
    axis, and every device would then hold the whole batch's (T, B, ...) arrays (measured: per-device BPTT
    memory 0.77 of one device's instead of 0.53; tests/test_multi_device.py)."""
    global _batch_split
    before, _batch_split = _batch_split, True
    try:
        yield
    finally:
        _batch_split = before


def input_products(xs, w):
    """x_t W for all t, xs (T, B, n) -> (T, B, m), as one 2-D product over T x B rows (so is its weight
    gradient; as a 3-D einsum inside batch_split_over_devices)."""
    if _batch_split:
        return jnp.einsum('tbi,ij->tbj', xs, w)
    T, B, n = xs.shape
    return (xs.reshape(T * B, n) @ w).reshape(T, B, w.shape[-1])


def rows_product(x, g):
    """sum over t and b of x[t, b]^T g[t, b]: x (T, B, I), g (T, B, J) -> (I, J), one 2-D product over T x B
    rows (a 3-D einsum inside batch_split_over_devices)."""
    if _batch_split:
        return jnp.einsum('tbi,tbj->ij', x, g)
    return x.reshape(-1, x.shape[-1]).T @ g.reshape(-1, g.shape[-1])


def rows_sum(g):
    """sum over t and b of g[t, b]: g (T, B, J) -> (J,), as a product of a row of ones with the T x B rows
    (XLA CPU's reduction over the two leading axes took 0.36 ms per (32, 32, 200) chunk; the product makes
    ES-D-RTRL's step on the DMS network 0.338 -> 0.279 s, docs/chunked-traces.md)."""
    if _batch_split:
        return jnp.sum(g, axis=(0, 1))
    rows = g.shape[0] * g.shape[1]
    return jnp.ones((rows,), g.dtype) @ g.reshape(rows, g.shape[-1])
