"""UORO averaged over seeds against the exact RTRL gradient of a tiny network (the computation of
tests/test_online_rules.py::test_uoro_average_approaches_exact_rtrl, printed for 1 ... 4096 seeds):
    python scripts/uoro_seed_average.py
"""
import sys; import os; sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import time, numpy as np, jax, jax.numpy as jnp, brainstate
import models
from rsnn.trainer import Trainer, trial_objective
from rsnn.rules import uoro
brainstate.environ.set(dt=1.)
T,B,NI,NR=10,2,4,4
for kind in ['lif','dms']:
    if kind=='lif':
        m = models.SpikingStack(NI, NR, 2, 1, model='lif-delta', ff_scale=4., seed=0); n_out=2
    else:
        m = models.DMSNet(NI, NR, 2, dt=1., tau_neu=20., tau_syn=20., tau_I2=200., A2=1., ff_scale=6., rec_scale=2., seed=4)
    tr = Trainer(m, 'uoro', NI, B, trace_chunk=1)
    rng=np.random.default_rng(0)
    xs=(rng.random((T,B,NI))<0.5).astype(np.float32); labels=rng.integers(0,2,B).astype(np.int32); ws=np.linspace(0.2,1,T).astype(np.float32)
    net=tr.rule.net; tr.reset(B)
    obj=trial_objective(jnp.asarray(labels), jnp.ones(B), 'cel')
    values=net.values(); h0=net.states()
    exact_f = jax.jacfwd(net.sequence_loss)(values, h0, jnp.asarray(xs), jnp.asarray(ws), obj.loss)
    exact_b = jax.grad(net.sequence_loss)(values, h0, jnp.asarray(xs), jnp.asarray(ws), obj.loss)
    bp = tr.gradients(xs, labels, ws, method='bptt')
    fl=lambda t: np.concatenate([np.ravel(l) for l in jax.tree.leaves(t)])
    print('fwd vs bwd', np.abs(fl(exact_f)-fl(exact_b)).max(), 'vs trainer bptt', np.abs(np.sort(fl(bp))-np.sort(fl(exact_b))).max())
    s0=jax.tree.map(jnp.zeros_like,h0); th0=jax.tree.map(jnp.zeros_like,values)
    f=jax.jit(jax.vmap(lambda k: uoro.uoro_sequence(net, values, h0, s0, th0, k, jnp.asarray(xs), jnp.asarray(ws), obj.loss)[0]))
    t=time.time(); g=f(jax.random.split(jax.random.PRNGKey(1), 4096)); G=np.concatenate([np.asarray(l).reshape(4096,-1) for l in jax.tree.leaves(g)],1); print('t', time.time()-t)
    e=fl(exact_b)
    for n in [1,4,16,64,256,1024,4096]:
        a=G[:n].mean(0); print(kind, n, a@e/np.linalg.norm(a)/np.linalg.norm(e))
