"""Issue #24: the credit-horizon diagnostic (benchmarks/credit_horizon.py), TBPTT(k1, k2) on the stream
(rsnn/rules/bptt.py), the held-out stream's burn-in trial and the credit task."""
import os
import sys
import types

import brainstate
import numpy as np
import pytest

import datasets
import models
from rsnn.trainer import Trainer
from conftest import ROOT, load_script

credit_horizon = load_script('benchmarks/credit_horizon.py')

CFG = datasets.DMSConfig(t_fixation=5., t_sample=20., t_delay=20., t_test=20.)
B = 4


# -- the credit horizon ---------------------------------------------------------------------------

@pytest.fixture(scope='module')
def horizon(tmp_path_factory):
    out = tmp_path_factory.mktemp('horizon')
    # the paper's 200 neurons (batch 2): with 32 or 64 neurons BPTT's own ratio at 1000 ms is below 0.1
    # (0.088, 0.069; D-RTRL 0.089, 0.063), the horizon is the adaptation's at the network's size
    rows = credit_horizon.main(['--out', str(out), '--networks', 'gif', '--n_rec', '200', '--batch', '2',
                                '--lags', '10,150,1000', '--methods', 'bptt,tbptt:100,diag'])
    assert os.path.exists(out / 'horizon.csv') and os.path.exists(out / 'horizon.png')
    return {(r['method'], r['lag_ms']): r for r in rows}


def test_bptt_cosine_is_one(horizon):
    for lag in (10, 150, 1000):
        assert horizon['bptt', lag]['cosine_to_bptt'] == pytest.approx(1., abs=1e-6)


def test_tbptt_gradient_beyond_its_window_is_exactly_zero(horizon):
    assert horizon['tbptt:100', 10]['norm'] > 0
    assert horizon['tbptt:100', 150]['norm'] == 0. and horizon['tbptt:100', 1000]['norm'] == 0.


def test_drtrl_horizon_on_the_gif_network_is_longer_than_1000_ms(horizon):
    assert horizon['diag', 1000]['ratio_to_first_lag'] > 0.1


# -- TBPTT(k1, k2) ---------------------------------------------------------------------------------

def build(k1=None, k2=None, seed=0):
    brainstate.environ.set(dt=1.)
    model = models.DMSNet(CFG.n_input, 12, 2, dt=1., tau_neu=20., tau_syn=20., tau_I2=100., A2=1., ff_scale=6.,
                          rec_scale=2., syn_gain=1., seed=seed)
    opts = dict(tbptt_k1_steps=k1, tbptt_k2_steps=k2) if k2 else {}
    return Trainer(model, 'bptt', CFG.n_input, B, protocol='stream', rule_options=opts)


def chunks(U, n, marks=(), seed=0):
    """n chunks of U steps: background on the channels >= 2, channel c fires once at each step of
    marks[c] (absolute steps), loss on every step of every chunk (label 0)."""
    rng = np.random.default_rng(seed)
    xs = (rng.random((U * n, B, CFG.n_input)) < 0.05).astype(np.uint8)
    xs[:, :, :len(marks)] = 0
    for c, step in enumerate(marks):
        xs[step, :, c] = 1
    return [types.SimpleNamespace(xs=xs[k * U:(k + 1) * U], labels=np.zeros((U, B), np.int32),
                                  weights=np.full((U, B), 1. / U, np.float32),
                                  resets=np.zeros((U, B), bool)) for k in range(n)]


def test_tbptt_k2_equal_to_k1_is_todays_tbptt():
    a, b = build(), build(20, 20)
    assert b.rule.carried_states() == {}
    for c in chunks(20, 3):
        la, ga, *_ = a.train_chunk(c)
        lb, gb, *_ = b.train_chunk(c)
        assert la == lb and ga == gb
    for x, y in zip(a.param_values().values(), b.param_values().values()):
        assert np.array_equal(np.asarray(x['weight'] if isinstance(x, dict) else x),
                              np.asarray(y['weight'] if isinstance(y, dict) else y))


def input_rows(grads, n):
    g = grads['rec/linear/weight_op']
    return np.abs(np.asarray(g['weight'] if isinstance(g, dict) else g)[:n]).sum(1)


def test_tbptt_k2_reaches_inputs_inside_k2_and_none_older():
    # k1 = 20, k2 = 50: at chunk 3 (steps 60-80) the window is steps 30-80
    cs = chunks(20, 4, marks=(25, 45, 65))
    long, plain = build(20, 50), build()
    for tr in (long, plain):
        for c in cs[:3]:
            tr.chunk_gradients(c)
    g_long = input_rows(long.chunk_gradients(cs[3]), 3)
    g_plain = input_rows(plain.chunk_gradients(cs[3]), 3)
    assert g_long[0] == 0., 'an input older than k2 gets no gradient'
    assert g_long[1] > 0 and g_long[2] > 0, 'inputs inside the last k2 steps get gradient'
    assert g_plain[0] == 0. and g_plain[1] == 0. and g_plain[2] > 0, 'plain TBPTT: only its own window'


def test_tbptt_k2_trains_and_its_history_is_carried_state():
    tr = build(20, 50)
    names = set(tr.named_states())
    assert 'tbptt/history' in names and any(n.startswith('tbptt/start/') for n in names)
    assert tr.rule.history.value.shape == (30, B, CFG.n_input)
    for c in chunks(20, 3):
        loss, gnorm, applied, outs, per_stream = tr.train_chunk(c)
        assert np.isfinite(loss) and applied and outs.shape == (20, B, 2)


def test_tbptt_k2_shorter_than_k1_is_refused():
    with pytest.raises(Exception, match='tbptt_k2'):
        build(50, 20)


# -- the held-out stream's burn-in ---------------------------------------------------------------

def test_the_held_out_burn_in_trial_is_not_scored(monkeypatch):
    from rsnn import dms_stream, stream_protocol
    tr = build()
    stream = dms_stream.DMSStream(CFG, B, 60, seed=0, iti_ms=(5., 15.), salt=dms_stream.HELD_OUT_SALT)
    seen = []
    add = dms_stream.TrialScorer.add

    def recording_add(self, chunk, outs, per_stream):
        done = list(add(self, chunk, outs, per_stream))
        seen.extend((t.stream, t.index, ok) for t, ok, _ in done)
        return done

    monkeypatch.setattr(dms_stream.TrialScorer, 'add', recording_add)
    loss, acc, n = stream_protocol.evaluate_stream(tr, stream, 3)
    assert n == 3 * B
    scored = [ok for b, j, ok in seen if 1 <= j <= 3]
    assert len(scored) == 3 * B and acc == pytest.approx(np.mean(scored))
    assert any(j == 0 for _, j, _ in seen), 'the burn-in trial is run'


def test_stream_metrics_log_rates_weight_norms_and_gradient_statistics():
    from rsnn import stream_protocol
    s = stream_protocol.update_stats([0.5, 2., 3.], 1.)
    assert s == dict(grad_norm_median=2., grad_norm_max=3., clipped_frac=pytest.approx(2 / 3))
    norms = stream_protocol.weight_norms(build())
    assert set(norms) == {'w_in_norm', 'w_rec_norm', 'w_out_norm'} and all(v > 0 for v in norms.values())


# -- make reproduce-credit --------------------------------------------------------------------------

def test_reproduce_credit_tiny_end_to_end(tmp_path):
    import utils
    from conftest import load_script
    repro = load_script(os.path.join('scripts', 'reproduce_credit.py'))
    out = str(tmp_path / 'credit')
    assert repro.main(['--tiny', '--skip_horizon', '--out', out]) == 0
    rows = utils.read_csv(os.path.join(out, 'table.csv'))
    assert list(rows[0]) == repro.TABLE
    assert [(r['method'], r['delay_ms'], r['window_ms']) for r in rows] == [
        ('ES-D-RTRL (0.99)', '20', '20'), ('D-RTRL', '20', '20'), ('TBPTT', '20', '40'),
        ('TBPTT', '20', '60'),   # the control: a window longer than sample + delay
        ('TBPTT', '20', '20'),   # and the short window TBPTT(k1, k1)
        ('ES-D-RTRL (0.99)', '40', '20'), ('D-RTRL', '40', '20'), ('TBPTT', '40', '40')]
    assert os.path.getsize(os.path.join(out, 'accuracy.png')) > 0
    assert all(float(r['update_memory_mb']) > 0 and float(r['s_per_1000_steps']) > 0 for r in rows)
    controls = utils.read_csv(os.path.join(out, 'controls.csv'))
    assert [c['control'].split(' ')[0].rstrip(',') for c in controls] == ['readout', 'BPTT']
    run = [d for d in os.listdir(os.path.join(out, 'runs')) if d.startswith('bptt-') and not d.endswith('.log')][0]
    m = utils.read_csv(os.path.join(out, 'runs', run, 'metrics.csv'))[-1]
    for k in ('grad_norm_median', 'grad_norm_max', 'clipped_frac', 'w_rec_norm', 'test_rate_hz'):
        assert k in m
    # resumable: a second call reuses every finished run folder
    assert repro.main(['--tiny', '--skip_horizon', '--out', out]) == 0


# -- the split-channel credit task (rsnn/tasks/credit_split.py, scripts/credit_ablation.py) -------------

def split_task_and_net(n_memory=4):
    import jax.numpy as jnp  # noqa: F401
    from rsnn.tasks import credit_split
    task = credit_split.make(dict(dt=1., t_fixation=5., t_sample=20., t_delay=30., t_test=10.))   # 65 steps
    brainstate.environ.set(dt=1.)
    memory = dict(credit_split.ABLATION['memory'], n_memory=n_memory, zero_in_rows=task.sample_channels.stop)
    model = models.DMSNet(task.n_in, 12, 2, dt=1., tau_neu=20., tau_syn=20., tau_I2=15., A2=1., ff_scale=6.,
                          rec_scale=2., syn_gain=1., seed=0, memory=memory)
    return task, model


def window_gradient(task, model, x, y, W):
    """BPTT over the trial's last W steps, the states before them carried in as constants (a TBPTT window
    that ends at the trial's end): the recurrent layer's weight gradient (n_in + n_rec, n_rec)."""
    import jax
    import jax.numpy as jnp
    from rsnn.trainer import per_sample_loss
    T = x.shape[0]
    brainstate.nn.init_all_states(model, x.shape[1])
    if T > W:
        brainstate.transform.for_loop(lambda xt: model(xt), jnp.asarray(x[:T - W], jnp.float32))
    for s in model.states().values():
        if not isinstance(s, brainstate.ParamState):
            s.value = jax.lax.stop_gradient(s.value)
    ws = jnp.asarray(task.loss_weights()[T - W:])
    params = model.states(brainstate.ParamState)

    def loss():
        outs = model.run_sequence(jnp.asarray(x[T - W:], jnp.float32))
        return jnp.sum(ws * jax.vmap(lambda o: jnp.mean(per_sample_loss(o, jnp.asarray(y), 'cel')))(outs))

    g = brainstate.transform.grad(loss, params)()
    g = next(v for k, v in g.items() if 'rec' in str(k))
    return np.asarray(g['weight'] if isinstance(g, dict) else g)


def test_split_task_sample_channels_are_silent_outside_the_sample_and_memory_weights_start_at_zero():
    task, model = split_task_and_net()
    n, cfg = task.sample_channels.stop, task.cfg
    x, y = task.trials(64, np.random.default_rng(0))
    assert x.shape == (cfg.n_steps, 64, 2 * n)
    assert x[:cfg.sample_start, :, :n].sum() == 0 and x[cfg.delay_start:, :, :n].sum() == 0
    assert x[cfg.sample_start:cfg.delay_start, :, :n].sum() > 0 and x[:, :, n:].sum() > 0
    w = np.asarray(model.rec.linear.weight_op.value['weight'])
    assert np.all(w[:n, -4:] == 0.) and np.all(w[task.n_in:, -4:] == 0.), 'memory: no sample input, no recurrence'
    assert np.all(w[:n, :-4] != 0.) and np.all(w[n:task.n_in, -4:] != 0.)


def test_split_task_a_window_shorter_than_sample_to_test_gives_exactly_zero_gradient_to_the_sample_weights():
    task, model = split_task_and_net()
    n, cfg = task.sample_channels.stop, task.cfg
    x, y = task.trials(B, np.random.default_rng(3))
    short = window_gradient(task, model, x, y, cfg.n_steps - cfg.delay_start - 1)   # starts after the sample
    assert np.all(short[:n] == 0.), 'no path back to the sample: exactly zero'
    assert np.abs(short[n:task.n_in]).sum() > 0
    full = window_gradient(task, model, x, y, cfg.n_steps)
    assert np.abs(full[:n, -4:]).sum() > 0, 'a window over the whole trial reaches the memory neurons\' sample weights'


@pytest.mark.parametrize('W', [30, 45, 65, 200])
def test_bptt_trial_window_is_bptt_over_the_last_W_steps(W):
    """TBPTT(W) on trials (rule option trial_window_steps, scripts/credit_ablation.py --window): the rule's
    gradient equals the hand-written window gradient above; W >= T (65 steps) is BPTT over the whole trial."""
    task, model = split_task_and_net()
    n = task.sample_channels.stop
    x, y = task.trials(B, np.random.default_rng(3))
    ws = task.loss_weights()
    trainer = Trainer(model, 'bptt', task.n_in, B, trace_chunk=None, rule_options=dict(trial_window_steps=W))
    grads = trainer.gradients(x, y, ws)
    got = np.asarray(next(v for k, v in grads.items() if 'rec' in str(k))['weight'])
    want = window_gradient(task, model, x, y, min(W, x.shape[0]))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    whole = Trainer(model, 'bptt', task.n_in, B, trace_chunk=None).gradients(x, y, ws)
    whole = np.asarray(next(v for k, v in whole.items() if 'rec' in str(k))['weight'])
    if W >= x.shape[0]:
        np.testing.assert_array_equal(got, whole)
    else:
        assert not np.allclose(got, whole)
    if W < task.cfg.n_steps - task.cfg.delay_start:   # the window starts after the sample
        assert np.all(got[:n] == 0.)


def test_credit_ablation_table_pairs_by_seed(tmp_path):
    """--table: mean +- s.e. per (method, H, lr) and paired differences of test_acc (95 %, t with n - 1 dof)
    to whole-trial BPTT and to the uncut method, on the seeds both have."""
    ablation = load_script('scripts/credit_ablation.py')
    path = tmp_path / 'a.csv'
    rows = [('bptt', 'never', 'whole', s, acc) for s, acc in ((0, 0.9), (1, 0.8), (2, 0.7))]
    rows += [('bptt', 'never', '300', s, acc) for s, acc in ((0, 0.5), (1, 0.5), (2, 0.6))]
    rows += [('diag', '100', 'whole', s, acc) for s, acc in ((0, 0.6), (2, 0.5))]
    with open(path, 'w') as f:
        f.write(','.join(ablation.FIELDS) + '\n')
        for m, H, w, s, acc in rows:
            f.write(f'{m},{H},{s},0.005,10,0.5,{acc},0.1,0.2,0.1,0.1,0.0,1.0,{w}\n')
    lines = {l.split(' | ')[0].lstrip('| '): l for l in ablation.table(str(path)).splitlines()[2:]}
    # window 300 - whole: -0.4, -0.3, -0.1: mean -0.2667, s_d 0.1528, t(0.975, 2) = 4.3027 -> half 0.3795
    assert lines['bptt (window 300 ms)'].endswith('| -0.267 [-0.646, +0.113] (3) | -0.267 [-0.646, +0.113] (3) |')
    # diag H 100 has seeds 0, 2: - BPTT = -0.3, -0.2; no uncut diag rows: no second difference
    assert lines['diag'].endswith('| -0.250 [-0.885, +0.385] (2) |  |')
    assert '| 0.800 +- 0.058 |' in lines['bptt']
