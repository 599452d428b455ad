"""One device against two (CPU) devices on the same batch: loss, gradients, one update, and where the
states live. Run as a script (tests/test_multi_device.py does, in a fresh process): it asks XLA for two
CPU devices before jax is imported and prints one JSON line per method.

    python tests/multi_device_check.py [bptt diag expsm_diag]
"""
import json
import os
import sys

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=2').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import brainstate  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

import datasets  # noqa: E402
import models  # noqa: E402
from rsnn.trainer import Trainer  # noqa: E402
import utils  # noqa: E402
from rsnn import brainstate_adapter, methods  # noqa: E402

B, N_REC = 8, 16
CFG = datasets.DMSConfig(t_fixation=5., t_sample=20., t_delay=20., t_test=20.)


def trainer(method, devices):
    brainstate.environ.set(dt=1.)
    net = models.DMSNet(CFG.n_input, N_REC, 2, dt=1., tau_neu=20., tau_syn=20., tau_I2=100., A2=1., ff_scale=6.,
                        rec_scale=2., seed=0)
    return Trainer(net, method, CFG.n_input, B, lr=1e-2, etrace_decay=0.9, devices=devices)


def flat(tree):
    return {jax.tree_util.keystr(k): np.asarray(v, np.float64) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def max_rel(a, b):
    return max(float(np.linalg.norm(a[k] - b[k]) / (np.linalg.norm(a[k]) + 1e-30)) for k in a)


def compiled_hlo(tr, xs, labels, ws):
    """The compiled training step's HLO text (per-device shapes after partitioning)."""
    xs, labels, mask = tr.pad(xs, labels)
    args = (tr.opt_state, *tr.device_batch(xs, labels, mask, ws))
    return brainstate_adapter.compiled(tr.update_fn, *args).as_text()


def check(method):
    x, y, _, _ = datasets.dms_trials(CFG, B, np.random.default_rng(0))
    ws = CFG.loss_weights()
    cpus = jax.devices('cpu')
    one, two = trainer(method, cpus[:1]), trainer(method, cpus[:2])
    out = dict(method=method, n_devices=len(cpus))
    l1, a1, g1 = one.loss_and_gradients(x, y, ws)
    l2, a2, g2 = two.loss_and_gradients(x, y, ws)
    out.update(loss_1=l1, loss_2=l2, acc_1=a1, acc_2=a2, grad_rel=max_rel(flat(g1), flat(g2)))
    out['grad_devices'] = sorted({len(v.sharding.device_set) for v in jax.tree.leaves(g2)})
    # two updates, then the weights and the next loss
    for _ in range(2):
        s1, s2 = one.train_step(x, y, ws), two.train_step(x, y, ws)
    out.update(step_loss_1=s1[0], step_loss_2=s2[0], gnorm_1=s1[2], gnorm_2=s2[2],
               param_rel=max_rel(flat(one.param_values()), flat(two.param_values())))
    # where the states are after a step: weights on both devices (replicated), per-sample states split
    params = jax.tree.leaves(two.param_values()) + jax.tree.leaves(two.opt_state)
    out['params_replicated'] = all(v.sharding.is_fully_replicated and len(v.sharding.device_set) == 2
                                   for v in params if hasattr(v, 'sharding'))
    shards = {}
    for s in two.sample_states():
        for v in jax.tree.leaves(s.value):
            if getattr(v, 'ndim', 0) >= 1 and v.shape[0] == B:
                shards[str(v.shape)] = [list(sh.data.shape) for sh in v.addressable_shards]
    out['state_shards'] = shards
    if method == 'diag':  # the recurrent layer's D-RTRL trace (B, 116, 16, 3) inside the compiled step
        hlo = compiled_hlo(two, x, y, ws)
        out['trace_half_batch_in_hlo'] = f'f32[{B // 2},{CFG.n_input + N_REC},{N_REC},3]' in hlo
        out['trace_full_batch_in_hlo'] = f'f32[{B},{CFG.n_input + N_REC},{N_REC},3]' in hlo
    print('@@MULTI ' + json.dumps(out), flush=True)


if __name__ == '__main__':
    for m in sys.argv[1:] or [n for n in methods.names() if methods.get(n).several_devices]:
        check(m)
