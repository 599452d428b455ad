"""The DMS stream protocol: the stream generator, states carried across updates and trials, TBPTT's cut,
the trial protocol as a special case, resume mid-stream, and the reproduction's tiny run."""
import json
import os
import subprocess
import sys

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import datasets
from rsnn.update_memory import stream_update_memory
from rsnn import dms_stream
import models
from rsnn import stream_protocol
from rsnn.trainer import Trainer, stream_objective
import utils
from conftest import ROOT

CFG = datasets.DMSConfig(t_fixation=5., t_sample=20., t_delay=20., t_test=20.)  # 65 steps per trial
B = 4


def build(method, reset_per_trial=False, seed=0, trace_chunk=1, protocol='stream'):
    """A trainer of the tiny DMS network on the stream (or on trials), twice in the tuple (the trainer and
    the stream trainer were two objects once)."""
    brainstate.environ.set(dt=1.)
    model = models.DMSNet(CFG.n_input, 12, 2, dt=1., tau_neu=20., tau_syn=20., tau_I2=100., A2=1., ff_scale=6.,
                          rec_scale=2., syn_gain=1., seed=seed)
    trainer = Trainer(model, method, CFG.n_input, B, etrace_decay=0.9, trace_chunk=trace_chunk,
                               protocol=protocol, reset_per_trial=reset_per_trial)
    return trainer, trainer


def leaves_close(a, b, **kw):
    return all(np.allclose(np.asarray(x), np.asarray(y), **kw) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# -- the stream generator -------------------------------------------------------------------------

def test_stream_is_a_function_of_seed_and_chunk_and_independent_of_the_chunk_length():
    a = dms_stream.DMSStream(CFG, B, 30, seed=3, iti_ms=(5., 15.))
    later = dms_stream.DMSStream(CFG, B, 30, seed=3, iti_ms=(5., 15.)).chunk(7)  # a fresh object, straight to chunk 7
    c7 = [a.chunk(k) for k in range(8)][7]
    assert np.array_equal(c7.xs, later.xs) and np.array_equal(c7.labels, later.labels)
    # the trials (labels, loss weights, trial starts) do not depend on how the stream is cut
    b = dms_stream.DMSStream(CFG, B, 60, seed=3, iti_ms=(5., 15.))
    cat = lambda chunks, f: np.concatenate([getattr(c, f) for c in chunks])
    for field in ('labels', 'weights', 'resets'):
        assert np.array_equal(cat([a.chunk(k) for k in range(8)], field), cat([b.chunk(k) for k in range(4)], field))
    other = dms_stream.DMSStream(CFG, B, 30, seed=4, iti_ms=(5., 15.)).chunk(7)
    assert not np.array_equal(other.labels, c7.labels)


def test_trials_intervals_and_test_weights():
    s = dms_stream.DMSStream(CFG, B, 100, seed=0, iti_ms=(5., 15.))
    for b in range(B):
        trials = [s.trial(b, j) for j in range(20)]
        gaps = np.diff([t.start for t in trials]) - CFG.n_steps
        assert gaps.min() >= 5 and gaps.max() <= 15 and len(set(gaps)) > 3
        assert 0 <= trials[0].start < CFG.n_steps + 15
    c = s.chunk(3)
    # each test period weighs 1 in total, as a trial's loss in the trial protocol
    n_test = CFG.n_steps - CFG.test_start
    assert np.allclose(c.weights[c.weights > 0], 1. / n_test)
    for t, lo, hi, ends_here in c.tests:
        assert np.all(c.labels[lo:hi, t.stream] == t.label)
    with pytest.raises(ValueError):
        dms_stream.parse_iti('500-100')
    assert dms_stream.parse_iti('0') == (0., 0.) and dms_stream.parse_iti('100-500') == (100., 500.)


# -- states persist ------------------------------------------------------------------------------

@pytest.mark.parametrize('method', ['expsm_diag', 'bptt'])
def test_states_and_traces_persist_across_updates_and_trials(method):
    stream = dms_stream.DMSStream(CFG, B, 90, seed=0, iti_ms=(5., 15.))
    trainer, st = build(method)
    st.train_chunk(stream.chunk(0))
    carried, weights, opt_state = st.get_states(), trainer.param_values(), st.opt_state
    assert all(np.abs(np.asarray(v)).max() > 0 for k, v in carried.items() if np.ndim(v) >= 2), \
        'the neuron states (and traces) after an update must not be zero'
    _, _, _, outs_carried, _ = st.train_chunk(stream.chunk(1))
    # the same weights and chunk from zero states give other outputs: the states were carried, not reset
    trainer2, st2 = build(method)
    st2.train_chunk(stream.chunk(0))
    st2.reset()
    _, _, _, outs_reset, _ = st2.train_chunk(stream.chunk(1))
    assert np.abs(outs_carried - outs_reset).max() > 1e-3
    # across trials inside one chunk: without the reset control the outputs after a trial start differ
    trainer3, st3 = build(method, reset_per_trial=True)
    trainer3.set_param_values(weights)
    st3.opt_state = opt_state
    st3.set_states(carried)
    _, _, _, outs_trial_reset, _ = st3.train_chunk(stream.chunk(1))
    starts = np.argwhere(stream.chunk(1).resets)
    assert len(starts)
    t, b = starts[0]
    assert np.allclose(outs_carried[:t, b], outs_trial_reset[:t, b], atol=1e-5)  # same until the trial starts
    assert np.abs(outs_carried[t:, b] - outs_trial_reset[t:, b]).max() > 1e-3


# -- TBPTT's cut ---------------------------------------------------------------------------------

def test_tbptt_gradient_is_zero_for_inputs_before_the_window():
    """d(window loss) / d(inputs of the previous window) = 0, while the loss does depend on those inputs."""
    stream = dms_stream.DMSStream(CFG, B, 60, seed=1, iti_ms=(5., 15.))
    trainer, st = build('bptt')
    c0, c1 = stream.chunk(0), stream.chunk(1)
    model = trainer.model

    def window_loss(x0, cut):
        brainstate.nn.reset_all_states(model, B)
        brainstate.transform.for_loop(lambda x: model(x), x0)   # the previous window: states depend on x0
        objective = stream_objective('cel')
        if cut:
            return st.rule.gradients(jnp.asarray(c1.xs, jnp.float32), (c1.labels, c1.weights), objective).loss
        losses = brainstate.transform.for_loop(
            lambda x, l, w: objective.loss(model(x), (l, w)), jnp.asarray(c1.xs, jnp.float32), c1.labels, c1.weights)
        return losses.sum()

    x0 = jnp.asarray(c0.xs, jnp.float32)
    g_cut = brainstate.transform.grad(lambda x: window_loss(x, True), argnums=0)(x0)
    g_full = brainstate.transform.grad(lambda x: window_loss(x, False), argnums=0)(x0)
    assert float(jnp.abs(g_full).max()) > 0, 'without the cut the loss has a gradient into the previous window'
    assert float(jnp.abs(g_cut).max()) == 0.


# -- the trial protocol as a special case ---------------------------------------------------------

@pytest.mark.parametrize('method', ['bptt', 'expsm_diag', 'diag'])
def test_one_trial_per_update_no_interval_reset_per_trial_gives_the_trial_protocols_gradient(method):
    stream = dms_stream.DMSStream(CFG, B, CFG.n_steps, seed=0, iti_ms=(0., 0.))
    trainer, st = build(method, reset_per_trial=True)
    reference, _ = build(method, protocol='trials')
    for k in range(2):  # the second chunk starts from the states the first one left (reset at the trial start)
        chunk = stream.chunk(k)
        assert chunk.resets[0].all() and chunk.weights[:CFG.test_start].sum() == 0
        g_stream = st.chunk_gradients(chunk)
        g_trials = reference.gradients(chunk.xs, chunk.labels[-1], CFG.loss_weights())
        for key in g_trials:
            for a, b in zip(jax.tree.leaves(g_stream[key]), jax.tree.leaves(g_trials[key])):
                assert np.abs(np.asarray(b)).max() > 0
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6 * np.abs(b).max())


# -- the command line, resume ---------------------------------------------------------------------

TINY = ['--protocol', 'stream', '--t_fixation', '5', '--t_sample', '20', '--t_delay', '20', '--t_test', '20',
        '--n_rec', '12', '--batch_size', '4', '--t_iti', '5-15', '--update_every', '30', '--eval_every_trials', '2',
        '--n_test_trials', '8', '--devices', 'cpu', '--no_progress']


def run_cli(args):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'task-rsnn-long-term-dependency.py')] + args,
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_resume_mid_stream_continues_the_same_stream(tmp_path):
    straight, split = str(tmp_path / 'straight'), str(tmp_path / 'split')
    run_cli(TINY + ['--stream_trials', '6', '--out_dir', straight])
    run_cli(TINY + ['--stream_trials', '3', '--out_dir', split])
    out = run_cli(['--resume', split, '--stream_trials', '6'])
    assert 'resumed' in out.stdout
    # the same updates on the same chunks: every training loss and the held-out results at the same points
    # (the shorter run also evaluated at its own end, chunk 8: one more row, nothing else)
    la = [float(r['loss']) for r in utils.read_csv(os.path.join(straight, 'batches.csv'))]
    lb = [float(r['loss']) for r in utils.read_csv(os.path.join(split, 'batches.csv'))]
    # The first update after the resume (chunk 9) from the restored states gives the same loss; after it
    # float32 rounding (it differs between processes, ~1e-6) grows through the spiking network: close.
    assert len(la) == len(lb) == 15 and max(la) > 0
    assert np.allclose(la[:9], lb[:9], rtol=1e-6) and np.allclose(la, lb, rtol=5e-2)
    # the traces were restored too: the first resumed update's gradient is the straight run's (zeroed
    # traces gave 0.448 against 6.76 once)
    ga = [float(r['grad_norm']) for r in utils.read_csv(os.path.join(straight, 'batches.csv'))]
    gb = [float(r['grad_norm']) for r in utils.read_csv(os.path.join(split, 'batches.csv'))]
    assert ga[8] > 0 and np.allclose(ga[:9], gb[:9], rtol=1e-5), (ga[:9], gb[:9])
    a = {int(float(r['batches'])): r for r in utils.read_csv(os.path.join(straight, 'metrics.csv'))}
    b = {int(float(r['batches'])): r for r in utils.read_csv(os.path.join(split, 'metrics.csv'))}
    assert sorted(a) == [5, 10, 15] and sorted(b) == [5, 8, 10, 15]
    for n in a:
        assert int(float(a[n]['trials'])) == int(float(b[n]['trials']))
        assert np.isclose(float(a[n]['test_loss']), float(b[n]['test_loss']), rtol=5e-2), (a[n], b[n])
    summary = json.load(open(os.path.join(split, 'summary.json')))
    assert summary['protocol'] == 'stream' and summary['update_memory_mb'] > 0


def test_bad_iti_is_one_line():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'task-rsnn-long-term-dependency.py')]
                          + TINY + ['--t_iti', 'abc', '--out_dir', '/nonexistent/never'], capture_output=True, text=True)
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr and '--t_iti' in proc.stderr


def test_reproduce_stream_tiny_end_to_end(tmp_path):
    from conftest import load_script
    repro = load_script(os.path.join('scripts', 'reproduce_stream.py'))
    out = str(tmp_path / 'stream')
    assert repro.main(['--tiny', '--out', out]) == 0
    rows = utils.read_csv(os.path.join(out, 'table.csv'))
    assert [(r['method'], r['update_ms']) for r in rows][:3] == [('ES-D-RTRL', '30'), ('BPTT', '20'), ('BPTT', '80')]
    for r in rows:
        summary = json.load(open(os.path.join(ROOT, r['run_dir'], 'summary.json')))
        assert float(r['final_test_acc']) == summary['test_acc'] and float(r['peak_rss_mb']) > 100
    memory = utils.read_csv(os.path.join(out, 'memory.csv'))
    windows = [(int(r['window_steps']), float(r['update_memory_mb'])) for r in memory if r['method'] == 'BPTT']
    assert [w for w, _ in windows] == [20, 80, 75, 300]  # the TBPTT windows, then full BPTT over 1 and 4 periods
    assert windows[3][1] > 2.5 * windows[2][1] and windows[1][1] > 2 * windows[0][1]  # grows with the window
    online = [r for r in memory if r['what'] == 'online update']
    assert {r['method'] for r in online} == {'ES-D-RTRL', 'D-RTRL'} and all(float(r['s_per_1000_steps']) > 0 for r in online)
    for name in ('table.md', 'memory.md', 'accuracy_vs_stream.png', 'accuracy_vs_memory.png'):
        assert os.path.getsize(os.path.join(out, name)) > 0


# -- traces carried across updates: chunked == brainscale, and never zeroed ---------------------------

def cosine(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return a @ b / (np.linalg.norm(a) * np.linalg.norm(b))


@pytest.mark.parametrize('method', ['expsm_diag', 'diag'])
def test_chunked_traces_on_the_stream_equal_brainscale_over_three_updates(method):
    stream = dms_stream.DMSStream(CFG, B, 70, seed=2, iti_ms=(5., 15.))
    step, _ = build(method, trace_chunk=1)
    chunked, _ = build(method, trace_chunk=16)   # 70 = 4 x 16 + 6: a shorter last chunk too
    assert step.rule.algo is not None and chunked.rule.trace_chunk == 16
    for k in range(3):
        chunk = stream.chunk(k)
        assert chunk.weights.sum() > 0  # every update has a loss
        g_step, g_chunk = step.chunk_gradients(chunk), chunked.chunk_gradients(chunk)
        for key in g_step:
            for a, b in zip(jax.tree.leaves(g_step[key]), jax.tree.leaves(g_chunk[key])):
                assert np.abs(np.asarray(a)).max() > 0, (k, key)
                assert cosine(a, b) >= 0.99999, (k, key, cosine(a, b))
                assert abs(np.linalg.norm(b) / np.linalg.norm(a) - 1) <= 1e-4, (k, key)


@pytest.mark.parametrize('trace_chunk', [1, 16])
@pytest.mark.parametrize('method', ['expsm_diag', 'diag'])
def test_the_second_update_sees_the_traces_of_the_first(method, trace_chunk):
    """An update's gradient with the traces carried equals the online gradient over both chunks as one
    sequence with the first chunk's loss weights set to 0: the traces were carried, not zeroed."""
    stream = dms_stream.DMSStream(CFG, B, 70, seed=2, iti_ms=(5., 15.))
    c0, c1 = stream.chunk(0), stream.chunk(1)
    assert c1.weights.sum() > 0
    carried, _ = build(method, trace_chunk=trace_chunk)
    carried.chunk_gradients(c0)
    g_carried = carried.chunk_gradients(c1)
    both = dms_stream.Chunk(0, np.concatenate([c0.xs, c1.xs]), np.concatenate([c0.labels, c1.labels]),
                            np.concatenate([np.zeros_like(c0.weights), c1.weights]),
                            np.concatenate([c0.resets, c1.resets]), [])
    whole, _ = build(method, trace_chunk=trace_chunk)
    g_whole = whole.chunk_gradients(both)
    fresh, _ = build(method, trace_chunk=trace_chunk)
    g_fresh = fresh.chunk_gradients(c1)  # from zero states and traces: another gradient
    for key in g_whole:
        for a, b, c in zip(jax.tree.leaves(g_whole[key]), jax.tree.leaves(g_carried[key]),
                           jax.tree.leaves(g_fresh[key])):
            assert cosine(a, b) >= 0.99999 and abs(np.linalg.norm(b) / np.linalg.norm(a) - 1) <= 1e-4, key
    flat = lambda g: np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)])
    assert cosine(flat(g_whole), flat(g_fresh)) < 0.999


@pytest.mark.parametrize('method', ['expsm_diag', 'diag', 'bptt'])
def test_stream_update_temporaries_do_not_grow_with_the_update_interval(method):
    trainer, _ = build(method, trace_chunk=None if method != 'bptt' else 1)
    short, long = (stream_update_memory(trainer, U, CFG.n_input)['temp_bytes'] for U in (64, 256))
    if method == 'bptt':
        assert long > 2 * short  # the yardstick: truncated BPTT's tape grows with its window
    else:
        assert long <= 1.05 * short + 2 ** 16, (short, long)


def test_a_damaged_stream_checkpoint_is_skipped_with_one_warning(tmp_path):
    from test_run_folders import damage
    run_dir = str(tmp_path / 'run')
    run_cli(TINY + ['--stream_trials', '4', '--out_dir', run_dir])
    last = os.path.join(run_dir, 'checkpoints', 'last')
    newest = max(os.listdir(last), key=int)
    damage(os.path.join(last, newest), 'emptied')
    out = run_cli(['--resume', run_dir, '--stream_trials', '6'])
    warnings = [l for l in out.stderr.splitlines() if 'damaged' in l]
    assert len(warnings) == 1 and f'checkpoint last/{newest} is damaged' in warnings[0], out.stderr
    assert 'Traceback' not in out.stderr and 'resumed' in out.stdout
    assert json.load(open(os.path.join(run_dir, 'summary.json')))['stream_trials'] == 6
