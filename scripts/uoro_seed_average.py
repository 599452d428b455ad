"""UORO averaged over seeds against the exact RTRL gradient of a tiny network (the computation of
tests/test_online_rules.py::test_uoro_average_approaches_exact_rtrl), the layers' weights only (the readout's
gradient is exact for every seed), for both estimates, printed for 1 ... 16384 seeds:
    python scripts/uoro_seed_average.py
"""
import sys; import os; sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpy as np, jax, jax.numpy as jnp, brainstate
import models
from rsnn.trainer import Trainer, trial_objective
from rsnn.rules import uoro
brainstate.environ.set(dt=1.)
T, B, NI, NR, N = 10, 2, 4, 4, 16384
for kind in ['lif', 'dms']:
    for per_sample in (0, 1):
        if kind == 'lif':
            m = models.SpikingStack(NI, NR, 2, 1, model='lif-delta', ff_scale=4., seed=0)
        else:
            m = models.DMSNet(NI, NR, 2, dt=1., tau_neu=20., tau_syn=20., tau_I2=200., A2=1., ff_scale=6.,
                              rec_scale=2., seed=4)
        tr = Trainer(m, 'uoro', NI, B, trace_chunk=1, rule_options={'uoro_per_sample': per_sample})
        rng = np.random.default_rng(0)
        xs = (rng.random((T, B, NI)) < 0.5).astype(np.float32)
        labels, ws = rng.integers(0, 2, B).astype(np.int32), np.linspace(0.2, 1, T).astype(np.float32)
        net = tr.rule.net; tr.reset(B)
        obj = trial_objective(jnp.asarray(labels), jnp.ones(B), 'cel')
        values, h0 = net.values(), net.states()
        exact = jax.grad(net.sequence_loss)(values, h0, jnp.asarray(xs), jnp.asarray(ws), obj.loss)
        s0, th0, ro0 = jax.tree.map(jnp.zeros_like, h0), tr.rule.zero_theta(), tr.rule.zero_readout_trace()
        f = jax.jit(jax.vmap(lambda k: uoro.uoro_sequence(net, values, h0, s0, th0, ro0, k, jnp.asarray(xs),
                                                          jnp.asarray(ws), obj.loss, per_sample=bool(per_sample))[0]))
        g = f(jax.random.split(jax.random.PRNGKey(1), N))
        G = np.concatenate([np.asarray(l).reshape(N, -1) for l in jax.tree.leaves(g['layers'])], 1)
        e = np.concatenate([np.ravel(l) for l in jax.tree.leaves(exact['layers'])])
        print(kind, 'per_sample' if per_sample else 'batch', ' '.join(
            f'{n}:{G[:n].mean(0) @ e / np.linalg.norm(G[:n].mean(0)) / np.linalg.norm(e):.3f}'
            for n in [1, 4, 16, 64, 256, 1024, 4096, 16384]), flush=True)
