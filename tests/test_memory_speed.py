"""The memory-and-speed sweep (task-memory-and-speed-evaluation-tpu.py) and the speed-ups it measures.

Tiny networks on the CPU. Timing is never asserted (that is the benchmark's job); memory is checked
through the compiled step's memory analysis, which is deterministic.
"""
import csv
import json
import os

import brainstate
import jax
import numpy as np
import pytest

from rsnn import brainscale_adapter
from rsnn import memory_report
import models
from rsnn.trainer import Trainer
import utils
from rsnn import methods
from conftest import load_script

TINY = ['--n_in', '20', '--n_rec', '16', '--n_layer', '2', '--n_out', '3', '--batch_size', '4', '--repeats', '1',
        '--trace_chunk', '4',  # the online methods K steps at a time (SHORT >= K: the same chunk buffers)
        '--devices', 'cpu']
SHORT, LONG = 8, 96


@pytest.fixture(scope='module')
def mem_script():
    return load_script('task-memory-and-speed-evaluation-tpu.py')


@pytest.fixture(scope='module')
def sweep(mem_script, tmp_path_factory):
    out = str(tmp_path_factory.mktemp('memory_speed'))
    args = mem_script.parse_args(TINY + ['--lengths', f'{SHORT},{LONG}', '--out_dir', out])
    return mem_script.run_sweep(args, out)


def rows_by_key(rows):
    return {(r['method'], int(r['T'])): r for r in rows}


def test_sweep_writes_csv_json_png_one_row_per_method_and_length(sweep, mem_script):
    out = sweep['out_dir']
    for name in ('results.csv', 'results.json', 'results.md', 'memory_and_time.png'):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    with open(os.path.join(out, 'results.csv')) as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == memory_report.CSV_COLUMNS
        rows = list(reader)
    assert sorted((r['method'], int(r['T'])) for r in rows) == sorted(
        (m, T) for m in methods.PAPER for T in (SHORT, LONG))
    for r in rows:
        assert r['status'] == 'ok', r
        for col in ('step_s', 'compile_s', 'gflops', 'frac_of_matmul', 'xla_temp_mb', 'step_mb', 'input_mb',
                    'predicted_state_mb', 'peak_rss_mb', 'matmul_gflops'):
            assert float(r[col]) > 0, (col, r)
    data = json.load(open(os.path.join(out, 'results.json')))
    assert len(data['rows']) == 6 and data['machine']['matmul_gflops'] > 0
    assert data['config']['lengths'] == [SHORT, LONG]
    # the tiny flags override the CPU preset
    assert data['config']['n_rec'] == 16 and data['config']['preset'] == 'cpu'


def test_compiled_memory_bptt_grows_online_methods_flat(sweep):
    rows = rows_by_key(sweep['rows'])
    short, long = {}, {}
    for m in methods.PAPER:
        short[m], long[m] = rows[(m, SHORT)]['step_mb'], rows[(m, LONG)]['step_mb']
    # BPTT keeps every step's activations: 12x the steps, several times the memory
    assert long['bptt'] > 3 * short['bptt'], (short, long)
    # the predicted state grows the same way (linear in T), and the measured growth is at least that
    pred = lambda m, T: rows[(m, T)]['predicted_state_mb']
    assert pred('bptt', LONG) == pytest.approx(pred('bptt', SHORT) * LONG / SHORT)
    assert long['bptt'] - short['bptt'] >= pred('bptt', LONG) - pred('bptt', SHORT)
    for m in ('expsm_diag', 'diag'):
        assert abs(long[m] - short[m]) <= 0.01 * short[m], (m, short[m], long[m])
        assert pred(m, LONG) == pred(m, SHORT)
        # the step holds at least the state that the method's formula predicts
        assert short[m] >= pred(m, SHORT)
    # D-RTRL's state (batch x #params) is the largest of the online ones
    assert short['diag'] > short['expsm_diag']


def test_forced_failure_is_a_row_and_the_sweep_goes_on(sweep, mem_script, tmp_path):
    rows = rows_by_key(sweep['rows'])
    total = lambda r: r['xla_args_mb'] + r['xla_out_mb'] + r['xla_temp_mb'] - r['xla_alias_mb']
    # a device too small for BPTT at the long T, large enough for everything else
    others = max(total(r) for k, r in rows.items() if k != ('bptt', LONG))
    limit = (others + total(rows[('bptt', LONG)])) / 2
    assert total(rows[('bptt', LONG)]) > 1.2 * limit and limit > 1.2 * others
    out = str(tmp_path / 'limited')
    args = mem_script.parse_args(TINY + ['--methods', 'bptt,expsm_diag', '--lengths', f'{SHORT},{LONG}',
                                         '--memory_limit_mb', f'{limit:.6f}', '--out_dir', out, '--no_plot'])
    result = mem_script.run_sweep(args, out)
    got = rows_by_key(result['rows'])
    assert len(got) == 4
    assert got[('bptt', LONG)]['status'] == 'OOM' and 'memory_limit_mb' in got[('bptt', LONG)]['reason']
    for key in [('bptt', SHORT), ('expsm_diag', SHORT), ('expsm_diag', LONG)]:
        assert got[key]['status'] == 'ok' and got[key]['step_s'] > 0, got[key]
    with open(os.path.join(out, 'results.csv')) as f:
        statuses = {(r['method'], int(r['T'])): r['status'] for r in csv.DictReader(f)}
    assert statuses[('bptt', LONG)] == 'OOM' and list(statuses.values()).count('ok') == 3


def test_worker_failure_is_an_error_row_with_one_line(mem_script):
    payload = dict(method='bptt', T=4, batch_size=2, n_in=4, n_rec=0, n_layer=1, n_out=2, repeats=1,
                   density=0.1, etrace_decay=0.9, model='lif-delta', seed=0, devices='cpu', memory_limit_mb=None)
    result, failure = mem_script.run_child('--_worker', payload, 300, 'cpu')
    assert failure is None and result['status'] == 'error'
    assert result['reason'] and '\n' not in result['reason']
    assert mem_script.classify_failure('RESOURCE_EXHAUSTED: Out of memory while trying to allocate') == 'OOM'
    assert mem_script.classify_failure('MemoryError: ') == 'OOM'
    assert mem_script.classify_failure('ValueError: bad shape') == 'error'
    for text in ('ValueError: no room for the readout', 'RuntimeError: zoom level', 'KeyError: bloom'):
        assert mem_script.classify_failure(text) == 'error', text
    assert mem_script.classify_failure('jaxlib.xla_extension.XlaRuntimeError: RESOURCE_EXHAUSTED: ') == 'OOM'
    assert mem_script.classify_failure('CUDA error: out of memory') == 'OOM'


def test_missing_device_warning_reaches_the_user(mem_script, capfd):
    """--devices 3 on a machine without a 4th accelerator: the child's warning is repeated here."""
    if len([d for d in jax.devices() if d.platform != 'cpu']) > 3:
        pytest.skip('this machine has a 4th accelerator')
    mem_script._WARNED.clear()
    info, failure = mem_script.run_child('--_probe', dict(devices='3', matmul_n=64), 300, '3')
    assert failure is None and info['device'].endswith(':0')
    err = capfd.readouterr().err
    assert err.count('warning: --devices 3 not found') == 1, err
    mem_script.forward_warnings('warning: --devices 3 not found (no accelerator); running on cpu:0\n')
    assert 'warning' not in capfd.readouterr().err  # said once per sweep, not once per measurement


@pytest.mark.parametrize('model', ['lif-delta', 'alif-delta', 'lif-exp-cu', 'adlif'])
def test_formulas_match_the_real_network_and_traces(mem_script, model):
    """n_params against the built network's weights; the predicted online state against the traces that
    brainscale actually allocates after compile_graph (D-RTRL: etrace_bwg; ES-D-RTRL: etrace_xs + etrace_dfs).
    alif-delta, lif-exp-cu and adlif have two hidden states per neuron, so twice the hidden layers' traces."""
    cfg = dict(batch_size=4, n_in=20, n_rec=16, n_layer=3, n_out=5, model=model)
    brainstate.environ.set(dt=1.)
    sizes = {}
    for method in ('diag', 'expsm_diag'):
        net = models.SpikingStack(cfg['n_in'], cfg['n_rec'], cfg['n_out'], cfg['n_layer'], model=model, seed=0)
        trainer = Trainer(net, method, cfg['n_in'], cfg['batch_size'], etrace_decay=0.9)
        assert memory_report.n_params(cfg) == models.count_params(net)
        algo = trainer.rule.algo
        states = list(algo.etrace_bwg.values()) if method == 'diag' else \
            list(algo.etrace_xs.values()) + list(algo.etrace_dfs.values())
        sizes[method] = 4. * sum(np.size(leaf) for st in states for leaf in jax.tree.leaves(st.value))
        assert sizes[method] > 0
        assert memory_report.predicted_state_bytes(cfg, method, 10) == sizes[method], (method, sizes[method])
    if model == 'lif-delta':
        assert sizes['diag'] == 4. * cfg['batch_size'] * memory_report.n_params(cfg)
    else:
        assert sizes['diag'] > 1.9 * 4. * cfg['batch_size'] * memory_report.n_params(cfg)


def test_flops_and_predicted_state(mem_script):
    cfg = dict(batch_size=128, n_in=32768, n_rec=512, n_layer=3, n_out=11)
    # D-RTRL's trace of the paper's network: batch x #params floats; layer 1 alone ~8 GiB
    assert memory_report.predicted_state_bytes(cfg, 'diag', 1000) == 4 * 128 * memory_report.n_params(cfg)
    assert 128 * 33280 * 512 * 4 / 2 ** 30 == pytest.approx(8.125)
    assert memory_report.predicted_state_bytes(cfg, 'bptt', 200) == 2 * memory_report.predicted_state_bytes(cfg, 'bptt', 100)
    small = dict(batch_size=1, n_in=2, n_rec=3, n_layer=1, n_out=1)
    # forward + weight gradient of [x, s] W (2 x 2 x 5 x 3), gradient of s (2 x 3 x 3), readout 3 x 2 x 3
    assert memory_report.flop_per_time_step(small) == 60 + 18 + 18


# ------------------------------------------------------------------------------------------------
# The speed-ups are exact: same gradients as brainscale's own code and as the per-step BPTT loop
# ------------------------------------------------------------------------------------------------

T, B, N_IN, N_REC = 24, 4, 6, 8


def data(n_out, seed=0):
    rng = np.random.default_rng(seed)
    xs = (rng.random((T, B, N_IN)) < 0.3).astype(np.float32)
    return xs, rng.integers(0, n_out, B).astype(np.int32), np.linspace(0.2, 1., T).astype(np.float32)


def build(kind, seed=0):
    brainstate.environ.set(dt=1.)
    if kind == 'dms':
        return models.DMSNet(N_IN, N_REC, 2, dt=1., tau_neu=20., tau_syn=20., tau_I2=200., A2=1., ff_scale=6.,
                             rec_scale=2., seed=seed), 2
    return models.SpikingStack(N_IN, N_REC, 3, 2, model=kind, seed=seed), 3


def flat(grads):
    return np.concatenate([np.asarray(v).ravel() for _, v in sorted(jax.tree_util.tree_flatten_with_path(grads)[0],
                                                                    key=lambda kv: str(kv[0]))])


def assert_same(a, b):
    a, b = flat(a), flat(b)
    assert a.shape == b.shape
    assert np.abs(a).max() > 0
    np.testing.assert_allclose(b, a, rtol=2e-5, atol=2e-6 * np.abs(a).max())


@pytest.mark.parametrize('method,kind', [('diag', 'lif-exp-cu'), ('diag', 'dms'), ('diag', 'alif-delta'),
                                         ('expsm_diag', 'lif-delta'), ('expsm_diag', 'dms')])
def test_brainscale_speedups_give_brainscale_gradients(method, kind):
    grads = {}
    for fast in (False, True):
        brainscale_adapter.adapt_brainscale(speedups=fast)
        net, n_out = build(kind)
        trainer = Trainer(net, method, N_IN, B, etrace_decay=0.9)
        before = dict(brainscale_adapter.STATS)
        xs, labels, ws = data(n_out)
        grads[fast] = trainer.gradients(xs, labels, ws)
        traced_fast = brainscale_adapter.STATS['fast'] - before['fast']
        assert brainscale_adapter.speedups_active() == fast
        assert (traced_fast > 0) == fast
        assert brainscale_adapter.STATS['fallback'] == before['fallback']  # every layer took the fast path
    assert_same(grads[False], grads[True])


def test_fast_path_counts_the_drtrl_gradient_read(monkeypatch):
    """A D-RTRL gradient read (_param_dim_solve) that falls back to brainscale's code is counted."""
    monkeypatch.delenv('BRAINSCALE_SPEEDUPS', raising=False)
    net, n_out = build('lif-delta')
    trainer = Trainer(net, 'diag', N_IN, B)
    real = brainscale_adapter._plain_dense

    def plain_dense_but_not_in_solve(relation, mode):  # the 2nd call of each trace: the gradient read
        import sys
        if sys._getframe(1).f_code.co_name == "_param_dim_solve":
            return False
        return real(relation, mode)

    monkeypatch.setattr(brainscale_adapter, '_plain_dense', plain_dense_but_not_in_solve)
    before = dict(brainscale_adapter.STATS)
    xs, labels, ws = data(n_out)
    trainer.gradients(xs, labels, ws)
    # every dense layer's gradient read fell back (brainscale may trace the step more than once)
    n_relations = len(trainer.rule.algo.etrace_bwg)
    fallback = brainscale_adapter.STATS['fallback'] - before['fallback']
    assert fallback > 0 and fallback % n_relations == 0, fallback
    assert brainscale_adapter.STATS['fast'] - before['fast'] > 0  # the trace updates stayed fast


class PerStep(brainstate.nn.Module):
    """The same network without `run_sequence`: Trainer falls back to the per-step BPTT loop."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def update(self, x):
        return self.net(x)


@pytest.mark.parametrize('kind,reset,detach', [('lif-delta', 'hard', True), ('alif-delta', 'soft', True),
                                               ('lif-exp-cu', 'soft', True), ('lif-delta', 'soft', False),
                                               ('dms', None, None)])
def test_bptt_layer_by_layer_equals_step_by_step(kind, reset, detach):
    """run_sequence (input products out of the loop, recurrence.recurrent_scan's backward pass) gives the
    gradient of the plain per-step loop, for every layer type and reset."""
    grads = {}
    for layered in (False, True):
        if kind == 'dms':
            net, n_out = build('dms', seed=3)
        else:
            brainstate.environ.set(dt=1.)
            net, n_out = models.SpikingStack(N_IN, N_REC, 3, 2, model=kind, spk_reset=reset, detach_reset=detach,
                                             seed=3), 3
        net = net if layered else PerStep(net)
        assert hasattr(net, 'run_sequence') == layered
        trainer = Trainer(net, 'bptt', N_IN, B)
        xs, labels, ws = data(n_out, seed=1)
        grads[layered] = trainer.gradients(xs, labels, ws)
    assert_same(grads[False], grads[True])


@pytest.mark.parametrize('oom_counts, status', [((3, 4), 'OOM'), ((3, 3), 'killed'), ((None, None), 'killed')])
def test_a_sigkilled_worker_is_oom_only_when_the_kernel_says_so(mem_script, monkeypatch, oom_counts, status):
    """A worker killed by the user is not recorded as out of memory (issue 17, item 14)."""
    import subprocess
    counts = iter(oom_counts)
    monkeypatch.setattr(mem_script, 'oom_kills', lambda: next(counts))
    monkeypatch.setattr(subprocess, 'run', lambda *a, **k: subprocess.CompletedProcess(a, -9, '', ''))
    result, row = mem_script.run_child('--_worker', {}, 10., 'cpu')
    assert result is None and row['status'] == status, row


def test_a_second_sweep_into_one_out_dir_is_refused(mem_script, tmp_path):
    out = tmp_path / 'sweep'
    out.mkdir()
    (out / 'results.csv').write_text('method,T,status\nbptt,25,ok\n')
    args = mem_script.parse_args(TINY + ['--out_dir', str(out)])
    with pytest.raises(utils.UserError, match='already holds a sweep'):
        mem_script.run_sweep(args, str(out))
    assert (out / 'results.csv').read_text() == 'method,T,status\nbptt,25,ok\n'


# --------------------------------------------------------------------------------------------
# Both configurations of the online methods (K = 1 and the chunked default), --analysis_only
# --------------------------------------------------------------------------------------------

SMALL = dict(devices='cpu', batch_size=8, n_in=64, n_rec=32, n_layer=2, n_out=11, model='lif-delta', seed=0,
             etrace_decay=0.9, density=0.1, repeats=1, memory_limit_mb=None, analysis_only=True)


def test_analysis_only_shapes_of_both_configurations(mem_script):
    """--analysis_only at T 25 and 200 (compiled against abstract shapes, nothing run): K = 1 (brainscale step by
    step) within 1.2x between the lengths, a chunked K = 8 (T >= 2K) within 1.05x, BPTT >= 3x; the parts add up."""
    step = {}
    for method, K in (('bptt', None), ('expsm_diag', 1), ('diag', 1), ('expsm_diag', 8), ('diag', 8)):
        for T in (25, 200):
            r = mem_script.measure(dict(SMALL, method=method, T=T, trace_chunk=K))
            assert r['status'] == 'ok' and r['reason'].startswith('compiled only'), r
            assert 'step_s' not in r and r['trace_chunk'] == (K or 1)
            assert r['step_mb'] == pytest.approx(r['xla_args_mb'] + r['xla_out_mb'] + r['xla_temp_mb']
                                                 - r['xla_alias_mb'] - r['input_mb'])
            assert r['method_mb'] == pytest.approx(r['step_mb'] - r['weights_opt_mb']) and r['weights_opt_mb'] > 0
            step[(method, K, T)] = r['step_mb']
    for method in ('expsm_diag', 'diag'):
        assert step[(method, 1, 200)] <= 1.2 * step[(method, 1, 25)], step
        assert abs(step[(method, 8, 200)] - step[(method, 8, 25)]) <= 0.05 * step[(method, 8, 25)], step
    assert step[('bptt', None, 200)] >= 3 * step[('bptt', None, 25)], step


def test_analysis_only_memory_limit_is_an_oom_row(mem_script):
    r = mem_script.measure(dict(SMALL, method='bptt', T=50, trace_chunk=None, memory_limit_mb=0.5))
    assert r['status'] == 'OOM' and '--memory_limit_mb 0.5' in r['reason'] and r['step_mb'] > 0


def test_chunked_drtrl_holds_its_traces_once():
    """CPU preset, T 200: D-RTRL's default chunk (auto) needs at most 1.3x the step-by-step path's memory (the
    traces once, updated in place, plus K-step buffers); ES-D-RTRL's auto keeps K = 64 there (speed)."""
    mem = load_script('task-memory-and-speed-evaluation-tpu.py')
    cfg = dict(SMALL, batch_size=32, n_in=2312, n_rec=512, n_layer=3)
    k1 = mem.measure(dict(cfg, method='diag', T=200, trace_chunk=1))
    auto = mem.measure(dict(cfg, method='diag', T=200, trace_chunk='auto'))
    assert auto['trace_chunk'] > 1 and auto['step_mb'] <= 1.3 * k1['step_mb'], (k1['step_mb'], auto['step_mb'])
    shapes = [(2824, 512, 1), (1024, 512, 1), (1024, 512, 1), (512, 11, 1)]
    assert utils.auto_trace_chunk('expsm_diag', shapes, 32) == 64
    # the paper's size: K-step buffers of B x 32768 inputs: auto keeps them small
    paper = [(33280, 512, 1), (1024, 512, 1), (1024, 512, 1), (512, 11, 1)]
    assert utils.auto_trace_chunk('expsm_diag', paper, 128) <= 4
    assert utils.auto_trace_chunk('diag', paper, 128) == 32  # 1.7 GB of buffers beside 9.3 GB of traces


def test_auto_chunk_keeps_es_drtrl_jacobians_in_a_cache_sized_budget():
    """ES-D-RTRL's auto K also keeps the chunk's per-neuron Jacobians (K x B x S x S floats per neuron) within
    AUTO_CHUNK_CACHE_MB: the DMS network (GIF, S = 3) gets K 32 at batch 32 and 8 at batch 128 (the fastest
    measured, docs/chunked-traces.md); the image network (LIF, S = 1) keeps 64 and 16; D-RTRL is unchanged."""
    dms = [(300, 200, 3), (200, 2, 1)]
    image = [(2824, 512, 1), (1024, 512, 1), (1024, 512, 1), (512, 10, 1)]
    assert [utils.auto_trace_chunk('expsm_diag', dms, B) for B in (32, 128)] == [32, 8]
    assert [utils.auto_trace_chunk('expsm_diag', image, B) for B in (32, 128)] == [64, 16]
    assert [utils.auto_trace_chunk('diag', dms, B) for B in (32, 128)] == [64, 16]


def test_trace_chunk_flag_lists_and_auto(mem_script):
    args = mem_script.parse_args(['--devices', 'cpu'])
    assert args.trace_chunk == [1, 'auto']
    assert mem_script.parse_args(['--trace_chunk', 'auto,8,8']).trace_chunk == ['auto', 8]
    assert utils.trace_chunk_arg('AUTO') == 'auto' and utils.trace_chunk_arg('3') == 3
    cfg = dict(methods=['bptt', 'diag'], trace_chunks=[1, 'auto'])
    assert mem_script.sweep_plan(cfg) == [('bptt', None), ('diag', 1), ('diag', 'auto')]


def test_the_smoke_preset_shows_bptt_memory_growing_and_es_d_rtrl_flat(mem_script, tmp_path, capsys):
    """--preset smoke (the README's smoke run): BPTT and ES-D-RTRL (K = 1) at T = 20 and 80 on a toy network;
    BPTT's step memory grows with T, ES-D-RTRL's is the same at both lengths."""
    out = str(tmp_path / 'smoke')
    assert mem_script.main(['--preset', 'smoke', '--devices', 'cpu', '--no_plot', '--out_dir', out]) == 0
    data = json.load(open(os.path.join(out, 'results.json')))
    assert data['config']['preset'] == 'smoke' and data['config']['n_rec'] == 32
    mb = {(r['method'], int(r['T'])): float(r['step_mb']) for r in data['rows'] if r['status'] == 'ok'}
    assert sorted(mb) == [('bptt', 20), ('bptt', 80), ('expsm_diag', 20), ('expsm_diag', 80)]
    assert mb['bptt', 80] > 2 * mb['bptt', 20]
    assert mb['expsm_diag', 80] == pytest.approx(mb['expsm_diag', 20], rel=1e-6)
    assert 'memory ES-D-RTRL K=1' in capsys.readouterr().out
