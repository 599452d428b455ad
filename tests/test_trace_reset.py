"""--trace_reset_every H (rsnn/rules/chunk_engine.py zeroed_at, reset_chunk): the eligibility traces are
zeroed before every step that is a multiple of H since the last reset(), the states are not touched; H =
never (and H >= the sequence) is today's gradient; the rules without engine traces refuse it."""
import brainstate
import jax.numpy as jnp
import numpy as np
import pytest

import datasets
import models
from rsnn.errors import UserError
from rsnn.rules import chunk_engine
from rsnn.rules.base import Objective
from rsnn.trainer import Trainer

CFG = datasets.DMSConfig(t_fixation=5., t_sample=20., t_delay=20., t_test=15.)   # 60 steps
B = 4


def net(seed=0):
    brainstate.environ.set(dt=1.)
    return models.DMSNet(CFG.n_input, 12, 2, dt=1., tau_neu=20., tau_syn=20., tau_I2=100., A2=1., ff_scale=6.,
                         rec_scale=2., syn_gain=1., seed=seed)


def trainer(method, K, H=None, seed=0):
    opts = {} if H == 'absent' else dict(trace_reset_every_steps=H)
    return Trainer(net(seed), method, CFG.n_input, B, trace_chunk=K, rule_options=opts)


def batch():
    x, y, _, _ = datasets.dms_trials(CFG, B, np.random.default_rng(1))
    return x, y, CFG.loss_weights()


def grads_of(tr):
    x, y, w = batch()
    g = tr.gradients(x, y, w)
    return {k: np.asarray(v['weight'] if isinstance(v, dict) else v) for k, v in g.items()}



@pytest.mark.parametrize('K', [1, 5])
def test_traces_are_zeroed_exactly_every_H_steps_and_unchanged_between(K):
    model = net()
    brainstate.nn.init_all_states(model, B)
    objective = Objective(lambda out, t: jnp.sum(out) * 0., lambda out, t: out)
    H, n_rel = 10, 2   # the DMS network: one layer and the readout
    for T in (9, 10, 11, 35):
        xs = jnp.zeros((T, B, CFG.n_input))
        targets = jnp.zeros((T,))
        for reset, expect in ((H, T - H * ((T - 1) // H)), (None, T)):
            *_, traces, t_end = chunk_engine.chunked_online_gradients(
                model, lambda k, r, tr, t: (dict(weight=jnp.zeros(()), bias=jnp.zeros(())), tr + r['x'].shape[0]),
                K, xs, targets, objective, [jnp.zeros(())] * n_rel, 0, reset_every=reset)
            assert [float(t) for t in traces] == [expect] * n_rel, (T, reset, K)
            assert int(t_end) == T
    # on a stream: the update starts at t0 = 30 (three resets ago), the count runs from the last multiple of H
    *_, traces, _ = chunk_engine.chunked_online_gradients(
        model, lambda k, r, tr, t: (dict(weight=jnp.zeros(()), bias=jnp.zeros(())), tr + r['x'].shape[0]),
        K, jnp.zeros((15, B, CFG.n_input)), jnp.zeros((15,)), objective, [jnp.full((), 7.)] * n_rel, 30,
        reset_every=H)
    assert [float(t) for t in traces] == [5.] * n_rel


@pytest.mark.parametrize('method', ['diag', 'expsm_diag'])
def test_never_and_H_beyond_the_trial_give_todays_gradient(method):
    today = grads_of(trainer(method, 20, 'absent'))
    for H in (None, 60):
        got = grads_of(trainer(method, 20, H))
        assert all(np.array_equal(today[k], got[k]) for k in today), H


@pytest.mark.parametrize('method', ['diag', 'expsm_diag'])
def test_reset_changes_the_gradient_the_same_step_by_step_and_chunked(method):
    today = grads_of(trainer(method, 20, 'absent'))
    one = grads_of(trainer(method, 1, 10))       # one-step chunks (the rule's step-by-step form)
    chunked = grads_of(trainer(method, 20, 10))  # chunks of gcd(20, 10, 60) = 10
    key = next(k for k in today if k.startswith('rec'))
    assert not np.allclose(today[key], one[key], rtol=1e-3, atol=1e-7), 'a reset every 10 of 60 steps changes it'
    for k in today:
        np.testing.assert_allclose(chunked[k], one[k], rtol=2e-4, atol=1e-6)


def test_rules_without_engine_traces_refuse_it():
    for method in ('bptt', 'uoro'):
        with pytest.raises(UserError, match='--trace_reset_every'):
            trainer(method, None, 10)
