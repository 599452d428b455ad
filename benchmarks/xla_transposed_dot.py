"""The measurement behind recurrence.py: on XLA CPU, a scan whose step multiplies by a weight's transpose
(what jax's autodiff makes of `s @ W` in a backward pass) against the same scan with the transpose made once
before the loop, and one recurrent layer's BPTT gradient through jax's autodiff against recurrent_scan's.

    python scripts/xla_transposed_dot.py                     # T 100, batch 32, 512 neurons (the image network)
    python scripts/xla_transposed_dot.py --out results/xla_transposed_dot.json

Median of --repeats calls after two warm-up calls, each compiled once.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from rsnn.cli import positive_int
from rsnn.files import write_json


def median_seconds(fn, args, repeats):
    import jax
    import numpy as np
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(argv) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--T', type=positive_int, default=100, help='time steps')
    p.add_argument('--batch', type=positive_int, default=32, help='batch size')
    p.add_argument('--n', type=positive_int, default=512, help='neurons (W is n x n)')
    p.add_argument('--repeats', type=positive_int, default=7, help='timed calls per row (median)')
    p.add_argument('--out', default=None, help='also write the rows to this JSON file')
    args = p.parse_args(argv)
    import jax
    import jax.numpy as jnp
    from rsnn import recurrence

    T, B, n = args.T, args.batch, args.n
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    w = jax.random.normal(k1, (n, n)) * (0.5 / n) ** .5
    currents = jax.random.normal(k2, (T, B, n))
    cotangent = jax.random.normal(k3, (T, B, n))

    def tanh_scan(w, c, transposed):
        def body(s, c_t):
            m = jax.lax.dot_general(s, w, (((1,), (1,)), ((), ()))) if transposed else s @ w
            s = jnp.tanh(c_t + m)
            return s, s
        return jax.lax.scan(body, jnp.zeros((B, n)), c)[1]

    spike = jax.custom_jvp(lambda v: (v >= 0).astype(v.dtype))
    spike.defjvp(lambda primals, tangents: (spike(primals[0]), tangents[0] * jnp.maximum(0.3 - 0.3 * jnp.abs(primals[0]), 0.)))

    def step(h, y):  # LIF, soft reset, decay 0.9, V_th 1
        V = 0.9 * (h['V'] - spike(h['V'] - 1.)) + y
        return {'V': V}, spike(V - 1.)

    def prev_spike(h):
        return spike(h['V'] - 1.)

    def autodiff_layer(w, c):
        def body(h, c_t):
            new, out = step(h, c_t + prev_spike(h) @ w)
            return new, out
        return jax.lax.scan(body, {'V': jnp.zeros((B, n))}, c)[1]

    def fast_layer(w, c):
        return recurrence.recurrent_scan(step, prev_spike, w, c, {'V': jnp.zeros((B, n))})[0]

    def grad_of(layer):
        return jax.jit(jax.grad(lambda w, c: jnp.vdot(layer(w, c), cotangent), argnums=(0, 1)))

    rows = {
        'scan, s @ W': median_seconds(jax.jit(lambda w, c: tanh_scan(w, c, False)), (w, currents), args.repeats),
        'scan, s @ W^T inside the loop': median_seconds(jax.jit(lambda w, c: tanh_scan(w, c, True)),
                                                        (w, currents), args.repeats),
        'scan, s @ W^T made before the loop': median_seconds(jax.jit(lambda w, c: tanh_scan(w.T, c, False)),
                                                             (w, currents), args.repeats),
        'LIF layer, forward': median_seconds(jax.jit(autodiff_layer), (w, currents), args.repeats),
        "LIF layer, gradient by jax's autodiff": median_seconds(grad_of(autodiff_layer), (w, currents), args.repeats),
        'LIF layer, gradient by recurrence.recurrent_scan': median_seconds(grad_of(fast_layer), (w, currents),
                                                                           args.repeats),
    }
    print(f'T {T}, batch {B}, {n} neurons, jax {jax.__version__}, {os.cpu_count()} CPUs; median of {args.repeats}:')
    for name, seconds in rows.items():
        print(f'  {name}: {1e3 * seconds:.1f} ms')
    if args.out:
        write_json(args.out, dict(T=T, batch=B, n=n, jax=jax.__version__, seconds=rows))
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
