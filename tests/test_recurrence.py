"""recurrence.recurrent_scan: the exact gradient of the recurrent scan (the same as jax's autodiff of it), for
the weights, the input currents and the initial states; and its benchmark script at toy size."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rsnn import recurrence
from conftest import ROOT

T, B, N = 13, 3, 5


@jax.custom_jvp
def spike(v):
    return (v >= 0).astype(v.dtype)


@spike.defjvp
def _spike_jvp(primals, tangents):
    v, = primals
    return spike(v), tangents[0] * jnp.maximum(1. - jnp.abs(v), 0.)


def step(h, y):  # two states that feed each other, as the GIF and ALIF layers have
    th = 1. + 0.5 * h['b']
    s = spike(h['V'] - th)
    b = 0.9 * h['b'] + s
    V = 0.8 * (h['V'] - th * s) + y
    return {'V': V, 'b': b}, spike(V - 1. - 0.5 * b)


def prev_spike(h):
    return spike(h['V'] - 1. - 0.5 * h['b'])


def autodiff_scan(w, c, h0):
    def body(h, c_t):
        return step(h, c_t + prev_spike(h) @ w)
    h_last, outs = jax.lax.scan(body, h0, c)
    return outs, h_last


@pytest.mark.parametrize('block', [0, 2])
def test_recurrent_scan_has_autodiffs_gradient(block, monkeypatch):
    """Also with the per-step products in column blocks (block 2: N = 5 as blocks of 2, 2 and 1 columns)."""
    monkeypatch.setattr(recurrence, 'COLUMN_BLOCK', block)
    assert len(recurrence.column_blocks(jnp.zeros((N, N)))) == (3 if block else 1)
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(0., 0.6, (N, N)), jnp.float32)
    c = jnp.asarray(rng.normal(0.6, 0.8, (T, B, N)), jnp.float32)
    h0 = {'V': jnp.asarray(rng.normal(0.5, 0.5, (B, N)), jnp.float32), 'b': jnp.zeros((B, N))}
    g_out = jnp.asarray(rng.normal(size=(T, B, N)), jnp.float32)
    g_last = jnp.asarray(rng.normal(size=(B, N)), jnp.float32)

    def loss(fn):
        def f(w, c, h0):
            outs, h_last = fn(w, c, h0)
            return jnp.vdot(outs, g_out) + jnp.vdot(h_last['V'], g_last)
        return f

    fast = lambda w, c, h0: recurrence.recurrent_scan(step, prev_spike, w, c, h0)
    outs_a, last_a = autodiff_scan(w, c, h0)
    outs_f, last_f = fast(w, c, h0)
    np.testing.assert_array_equal(outs_a, outs_f)
    assert 0.05 < float(outs_a.mean()) < 0.95  # the neurons spike, so the spike paths are exercised
    ref = jax.grad(loss(autodiff_scan), argnums=(0, 1, 2))(w, c, h0)
    got = jax.grad(loss(fast), argnums=(0, 1, 2))(w, c, h0)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
        assert np.abs(a).max() > 0
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max())


def test_column_blocks_split_only_products_of_two_blocks_or_more(monkeypatch):
    monkeypatch.setattr(recurrence, 'COLUMN_BLOCK', 128)
    w = jnp.arange(300 * 512, dtype=jnp.float32).reshape(300, 512)
    blocks = recurrence.column_blocks(w)
    assert [b.shape for b in blocks] == [(300, 128)] * 4
    np.testing.assert_array_equal(jnp.concatenate(blocks, axis=-1), w)
    assert len(recurrence.column_blocks(w[:, :255])) == 1 and len(recurrence.column_blocks(w[:, :256])) == 2
    monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')  # one product per step on an accelerator
    assert len(recurrence.column_blocks(w)) == 1
    monkeypatch.undo()
    s = jnp.asarray(np.random.default_rng(0).normal(size=(4, 300)), jnp.float32)
    np.testing.assert_allclose(recurrence.step_product(s, blocks), s @ w, rtol=1e-6)


def test_rows_sum_is_the_sum_over_steps_and_samples():
    g = jnp.asarray(np.random.default_rng(1).normal(size=(7, 3, 5)), jnp.float32)
    np.testing.assert_allclose(recurrence.rows_sum(g), np.asarray(g).sum(axis=(0, 1)), rtol=1e-5, atol=1e-6)
    with recurrence.batch_split_over_devices():
        np.testing.assert_allclose(recurrence.rows_sum(g), np.asarray(g).sum(axis=(0, 1)), rtol=1e-5, atol=1e-6)


def test_transposed_dot_benchmark_runs_at_toy_size(tmp_path):
    out = tmp_path / 'rows.json'
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'xla_transposed_dot.py'), '--T', '6',
                        '--batch', '2', '--n', '8', '--repeats', '1', '--out', str(out)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = json.loads(out.read_text())['seconds']
    assert len(rows) == 6 and all(v > 0 for v in rows.values()), rows
