"""K-step chunked eligibility traces (chunked_traces.py) against brainscale's step-by-step algorithms.

For each online method and each network type of this repository, the gradient of one batch with
`trace_chunk` K in {1, 7, T} (T = 23, not a multiple of 7) equals the one brainscale computes step by
step (`trace_chunk` 1): cosine >= 0.99999 and norm ratio within 1e-5, per weight; and the compiled
step's memory does not grow with T.
"""
import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rsnn.rules import chunk_engine as chunked_traces, es_d_rtrl
import models
from rsnn.trainer import Trainer
import utils

T, B, N_IN, N_REC = 23, 4, 6, 8

KINDS = {  # name -> (network factory, number of classes)
    'lif-delta': lambda: models.SpikingStack(N_IN, N_REC, 3, 2, model='lif-delta', ff_scale=4., seed=0),
    'lif-delta-hard-detached': lambda: models.SpikingStack(N_IN, N_REC, 3, 2, model='lif-delta', ff_scale=4.,
                                                           spk_reset='hard', detach_reset=True, seed=1),
    'alif-delta': lambda: models.SpikingStack(N_IN, N_REC, 3, 2, model='alif-delta', ff_scale=4., seed=2),
    'alif-delta-layout': lambda: alif_layout((5., 30.)),  # the credit layout: a per-neuron adaptation decay
    'alif-delta-mix': lambda: alif_layout(None),  # Bellec's LIF + ALIF mix: a per-neuron beta (0 for the LIF half)
    'lif-exp-cu': lambda: models.SpikingStack(N_IN, N_REC, 3, 2, model='lif-exp-cu', ff_scale=4., seed=3),
    'adlif': lambda: models.SpikingStack(N_IN, N_REC, 3, 2, model='adlif', ff_scale=400., rec_scale=4., V_th=0.5,
                                         seed=5),  # adLIF's (1 - alpha) input gain and adaptation: ~0.1 spikes per step
    'dms': lambda: models.DMSNet(N_IN, N_REC, 2, dt=1., tau_neu=20., tau_syn=20., tau_I2=200., A2=1.,
                                 ff_scale=6., rec_scale=2., seed=4),
}


def alif_layout(tau_fast):
    from rsnn.neurons.lif import memory_layout
    net = models.SpikingStack(N_IN, N_REC, 3, 2, model='alif-delta', ff_scale=4., tau_adapt=50., seed=6)
    memory_layout(net.layers[0], N_IN, np.random.default_rng(6), n_memory=N_REC // 2, tau_memory=200.,
                  tau_fast=tau_fast, in_scale=0.5, rec_scale=0.5)
    return net


def data(n_out, t=T, seed=0):
    rng = np.random.default_rng(seed)
    xs = (rng.random((t, B, N_IN)) < 0.3).astype(np.float32)
    return xs, rng.integers(0, n_out, B).astype(np.int32), np.linspace(0.2, 1., t).astype(np.float32)


def trainer(kind, method, trace_chunk):
    brainstate.environ.set(dt=1.)
    return Trainer(KINDS[kind](), method, N_IN, B, etrace_decay=0.9, trace_chunk=trace_chunk)


def flat(grads):
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(grads)[0]}


@pytest.mark.parametrize('kind', sorted(KINDS))
@pytest.mark.parametrize('method', ['expsm_diag', 'diag'])
def test_chunked_gradient_equals_brainscale_step_by_step(method, kind):
    n_out = 2 if kind == 'dms' else 3
    xs, labels, ws = data(n_out)
    reference = trainer(kind, method, 1)
    assert reference.rule.algo is not None  # K = 1: brainscale's own algorithm
    loss_ref, acc_ref, g_ref = reference.loss_and_gradients(xs, labels, ws)
    g_ref = flat(g_ref)
    assert len(g_ref) == (4 if kind == 'dms' else 6)
    for K in (1, 7, T):
        chunked = trainer(kind, method, max(K, 2))
        chunked.rule.trace_chunk = K  # K = 1: the chunked code with one-step chunks (--trace_chunk 1 is brainscale)
        assert chunked.rule.algo is None
        loss, acc, g = chunked.loss_and_gradients(xs, labels, ws)
        g = flat(g)
        # the loss and accuracy summed over the chunks as brainscale's over the steps (they feed --acc_th)
        assert abs(loss - loss_ref) <= 1e-5 * abs(loss_ref) and acc == acc_ref, (K, loss, loss_ref, acc, acc_ref)
        for name, ref in g_ref.items():
            a, b = ref.ravel(), g[name].ravel()
            cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
            ratio = np.linalg.norm(b) / np.linalg.norm(a)
            assert np.linalg.norm(a) > 0, name
            assert cos >= 0.99999 and abs(ratio - 1) <= 1e-5, (K, name, cos, ratio)


@pytest.fixture(scope='module')
def mem_script():
    from conftest import load_script
    return load_script('task-memory-and-speed-evaluation-tpu.py')


@pytest.mark.parametrize('method', ['expsm_diag', 'diag'])
def test_step_memory_flat_in_T(mem_script, method):
    """The compiled training step's memory (without the input) at T and 4 T: the same within 5 %, step by step
    (brainscale) and K = 7 steps at a time (a K-step buffer, no T-long tape). T = 28, 112: whole chunks; a
    last, shorter chunk adds its own buffer of T mod K steps (bounded: below one more chunk's)."""
    cfg = dict(method=method, devices='cpu', batch_size=4, n_in=20, n_rec=16, n_layer=2, n_out=3, model='alif-delta',
               seed=0, etrace_decay=0.9, density=0.1, repeats=1, memory_limit_mb=None)
    for K in (1, 7):
        short, long = (mem_script.measure(dict(cfg, T=T, trace_chunk=K)) for T in (28, 112))
        assert short['status'] == long['status'] == 'ok' and short['trace_chunk'] == K, (short, long)
        assert abs(long['step_mb'] - short['step_mb']) <= 0.05 * short['step_mb'], (K, short, long)
    bptt = [mem_script.measure(dict(cfg, method='bptt', T=T))['step_mb'] for T in (28, 112)]
    assert bptt[1] > 1.5 * bptt[0]  # the yardstick: BPTT's tape grows with T


def test_trace_chunk_default_and_refusals():
    """None: the measured default where the chunked traces apply, else 1; an explicit K > 1 where they do not
    apply is one line naming the fix."""
    from rsnn import methods
    from rsnn.rules.base import RuleOptions

    def check(K, model, method, vjp_time, several=False):
        options = RuleOptions(batch_size=2, n_in=3, trace_chunk=K, vjp_time=vjp_time, several_devices=several)
        return methods.rule_class(method).choose_chunk(model, options)
    net = KINDS['alif-delta']()
    assert check(None, net, 'expsm_diag', 't') == check(None, net, 'diag', 't') == utils.DEFAULT_TRACE_CHUNK > 1
    assert check(5, net, 'diag', 't') == 5 and check(1, net, 'diag', 't') == 1 and check(9, net, 'bptt', 't') == 1
    assert check(None, net, 'diag', 't_minus_1') == check(None, net, 'diag', 't', True) == 1
    foreign = models.LeakyReadout(3, 2, tau_o=10., dt=1., w_scale=1., rng=np.random.default_rng(0))
    assert not chunked_traces.supports(foreign) and check(None, foreign, 'expsm_diag', 't') == 1
    for args in [(8, net, 'diag', 't_minus_1'), (8, net, 'diag', 't', True), (8, foreign, 'expsm_diag', 't')]:
        with pytest.raises(utils.UserError, match='use --trace_chunk 1'):
            check(*args)
    assert es_d_rtrl.decay_of(0.9) == 0.9 and es_d_rtrl.decay_of(19) == 0.9
    dms = KINDS['dms']()
    assert check(None, dms, 'expsm_diag', 't') == check(None, dms, 'diag', 't') == utils.DEFAULT_TRACE_CHUNK


def test_speed_table_runs_at_toy_sizes(tmp_path):
    """benchmarks/speed_table.py (the table of docs/chunked-traces.md) at toy sizes: every row of the DMS part
    at batch 32 (--batches 32: the 128 rows are the same code) timed, its floor from the shapes (the memory script's
    FLOP count for BPTT) and its share of it."""
    import json
    import subprocess
    import sys
    from conftest import ROOT, load_script
    from rsnn import memory_report
    table = load_script('benchmarks/speed_table.py')
    image = dict(table.SIZES['image'], batch_size=32)
    assert table.flop_per_step(image, 32, 'bptt') == memory_report.flop_per_time_step(dict(image, n_out=10))
    assert table.trace_bytes(image, 32) == 4 * 32 * (memory_report.n_params(dict(image, n_out=10))
                                                     - 512 * 3 - 10)  # every weight but the biases
    proc = subprocess.run([sys.executable, 'benchmarks/speed_table.py', '--tiny', '--only', 'dms', '--repeats', '1',
                           '--batches', '32', '--trace_chunk', '8', '--out_dir', str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.load(open(tmp_path / 'speed_table.json'))['rows']
    assert [(r['B'], r['method'], r['K']) for r in rows] == [
        (32, m, K) for m, K in [('bptt', 1), ('expsm_diag', 1), ('expsm_diag', 8), ('diag', 1), ('diag', 8)]]
    for r in rows:
        assert not r.get('error') and r['s_per_batch'] > 0 and 0 < r['share'] <= 1, r
    assert (tmp_path / 'speed_table.md').read_text().count('| dms |') == 5


def test_speed_table_refuses_a_selection_it_cannot_run(tmp_path):
    """benchmarks/speed_table.py: a bad --sweep, --batches or --only, or one that selects no row, is a one-line
    usage error before anything is measured or written."""
    import subprocess
    import sys
    from conftest import ROOT
    for flags, says in ((['--sweep', 'x'], 'positive integer'), (['--batches', '0'], '> 0'),
                        (['--only', 'foo'], 'dms, image'), (['--batches', '64'], 'no row of the table')):
        proc = subprocess.run([sys.executable, 'benchmarks/speed_table.py', *flags, '--out_dir', str(tmp_path / 'o')],
                              capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert proc.returncode == 2 and says in proc.stderr.strip().split('\n')[-1], (flags, proc.stderr)
        assert 'Traceback' not in proc.stderr and not (tmp_path / 'o').exists()


def test_profile_step_sums_xla_ops_at_toy_size(tmp_path):
    """benchmarks/profile_step.py (the profiles of docs/chunked-traces.md) at a toy size: XLA's per-op events
    summed per op, each op named with its shape from the HLO dump, the recurrent product once per step."""
    import csv
    import subprocess
    import sys
    from conftest import ROOT
    proc = subprocess.run([sys.executable, 'benchmarks/profile_step.py', '--tiny', '--size', 'dms', '--method',
                           'bptt', '--calls', '2', '--out_dir', str(tmp_path)], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / 'profile.csv')))
    assert rows and all(float(r['ms_per_call']) >= 0 for r in rows)
    # the toy DMS network: 12 neurons, batch 32, T 60: s_{t-1} W_rec is a (32, 12) product in the time loop
    step_dots = [r for r in rows if r['shape'].startswith('f32[32,12]') and r['shape'].endswith(' dot')]
    assert step_dots and max(float(r['events_per_call']) for r in step_dots) == 60, step_dots
    assert 'untraced' in (tmp_path / 'profile.md').read_text()


@pytest.mark.parametrize('S,J', [(3, 1), (3, 4), (2, 5), (1, 4), (1, 1)])
def test_update_in_place_is_the_trace_recursion(S, J):
    """d_rtrl.update_in_place against the formula, in the trace layout of d_rtrl.zero_trace (one state:
    (B, I, J, 1); else (B, I, S, J), J = 1 included): g = sum_b,s e[b, :, s, :] M[b, :, s],
    e'[b, :, k, :] = sum_s phi[b, :, k, s] e[b, :, s, :] + sum_t x[t, b]^T q[t, b, :, k]."""
    from rsnn.rules import d_rtrl
    B, I, K = 3, 4, 5
    rng = np.random.default_rng(0)
    e = rng.normal(size=(B, I, S, J)).astype(np.float32)
    M, phi = rng.normal(size=(B, J, S)).astype(np.float32), rng.normal(size=(B, J, S, S)).astype(np.float32)
    x, q = rng.normal(size=(K, B, I)).astype(np.float32), rng.normal(size=(K, B, J, S)).astype(np.float32)
    stored = d_rtrl.zero_trace(B, I, J, S)[0].shape
    e_in = e.transpose(0, 1, 3, 2) if stored == (B, I, J, 1) else e
    assert e_in.shape == stored
    new, g = d_rtrl.update_in_place(jnp.asarray(e_in), jnp.asarray(M), jnp.asarray(phi), jnp.asarray(x), jnp.asarray(q))
    new = np.asarray(new).transpose(0, 1, 3, 2) if stored == (B, I, J, 1) else np.asarray(new)
    np.testing.assert_allclose(g, np.einsum('bisj,bjs->ij', e, M), rtol=1e-5, atol=1e-5)
    want = np.einsum('bjks,bisj->bikj', phi, e) + np.einsum('tbi,tbjk->bikj', x, q)
    np.testing.assert_allclose(new, want, rtol=1e-5, atol=1e-5)
