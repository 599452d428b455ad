"""The benchmark (scripts/benchmark.py, docs/benchmark.md): its statistics against a hand computation and
scipy, the validation split of the task scripts (--validation), and the TINY benchmark end to end."""
import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from rsnn.benchmark_stats import mean_se, paired_difference  # noqa: E402

DMS = os.path.join(ROOT, 'task-rsnn-long-term-dependency.py')
TINY_DMS = ['--preset', 'short-delay', '--n_rec', '8', '--t_sample', '20', '--t_delay', '20', '--t_test', '20',
            '--batch_size', '4', '--batches_per_epoch', '2', '--epochs', '2', '--n_test_trials', '8', '--no_progress',
            '--method', 'bptt', '--seed', '0']


def test_mean_se_by_hand():
    m = mean_se([0.7, 0.8, 0.9])
    assert m.n == 3 and m.mean == pytest.approx(0.8) and m.se == pytest.approx(0.1 / math.sqrt(3))
    assert mean_se([0.5]).se is None


def test_paired_interval_by_hand_and_scipy():
    from scipy import stats
    rule = {0: 0.80, 1: 0.90, 2: 0.85}
    ref = {0: 0.70, 1: 0.85, 2: 0.80, 3: 0.99}       # seed 3 has no pair: left out
    d = paired_difference(rule, ref)
    # by hand: differences 0.10, 0.05, 0.05; mean 1/15; s_d = sqrt(1/1200); t_{0.975, 2} = 4.302653
    half = 4.302653 * math.sqrt(1 / 1200) / math.sqrt(3)
    assert d.n == 3 and d.seeds == (0, 1, 2) and d.mean == pytest.approx(1 / 15)
    assert (d.low, d.high) == pytest.approx((1 / 15 - half, 1 / 15 + half), abs=1e-6)
    assert not d.excludes_zero                        # -0.005 < 0 < 0.138
    ci = stats.ttest_rel([0.80, 0.90, 0.85], [0.70, 0.85, 0.80]).confidence_interval(0.95)
    assert (d.low, d.high) == pytest.approx((ci.low, ci.high), abs=1e-9)
    # five seeds, all better by about 0.1: the interval excludes zero; one seed: no interval
    rng = np.random.default_rng(0)
    a = {s: 0.8 + 0.01 * rng.standard_normal() for s in range(5)}
    b = {s: v - 0.1 for s, v in a.items()}
    assert paired_difference(a, b).excludes_zero and paired_difference(b, a).excludes_zero
    assert paired_difference({0: 0.9}, {0: 0.8}).low is None and not paired_difference({0: 0.9}, {0: 0.8}).excludes_zero


def test_dms_validation_set_is_its_own_stream():
    import datasets
    cfg = datasets.DMSConfig(t_fixation=10., t_sample=20., t_delay=20., t_test=20.)
    test = datasets.dms_test_set(cfg, 8, 8, 0)[0][0]
    val = datasets.dms_test_set(cfg, 8, 8, 0, key=datasets.VALIDATION_KEY)[0][0]
    train = datasets.dms_trials(cfg, 8, datasets.dms_batch_rng(0, 1, 0))[0]
    assert val.shape == test.shape and not np.array_equal(val, test) and not np.array_equal(val, train)


def test_image_validation_is_held_apart_from_training():
    from rsnn.validation import hold_apart

    class Split:  # the part of a FramedSplit that hold_apart reads
        folder, meta, n_time_bins, n_in = 'x', {}, 3, 2
        labels = np.arange(20) % 10

        def __len__(self):
            return 20

        def sparse_batch(self, idx):
            return np.asarray(idx)
    rest, val = hold_apart(Split(), 5)
    assert len(val) == 5 and len(rest) == 15
    assert not set(rest.indices) & set(val.indices) and set(rest.indices) | set(val.indices) == set(range(20))
    assert list(val.sparse_batch([0, 1])) == list(val.indices[:2])
    assert list(hold_apart(Split(), 5)[1].indices) == list(val.indices)  # the same for every run
    with pytest.raises(ValueError):
        hold_apart(Split(), 20)


def metrics(run_dir):
    with open(os.path.join(run_dir, 'metrics.csv')) as f:
        return list(csv.DictReader(f))


def test_validation_flag_adds_val_acc_and_changes_nothing_else(tmp_path):
    for name, extra in (('off', []), ('on', ['--validation', '8'])):
        subprocess.run([sys.executable, DMS] + TINY_DMS + extra + ['--out_dir', str(tmp_path / name)], cwd=ROOT,
                       check=True, stdout=subprocess.DEVNULL)
    off, on = metrics(tmp_path / 'off'), metrics(tmp_path / 'on')
    assert 'val_acc' not in off[0] and len(on) == len(off) == 2
    for a, b in zip(off, on):
        for k in ('train_loss', 'train_acc', 'test_loss', 'test_acc', 'grad_norm', 'rate_layer0'):
            assert a[k] == b[k], k
        assert 0 <= float(b['val_acc']) <= 1 and math.isfinite(float(b['val_loss']))


def test_tiny_benchmark_end_to_end_and_resumed(tmp_path):
    pytest.importorskip('optuna')
    cmd = [sys.executable, os.path.join(ROOT, 'scripts', 'benchmark.py'), '--tiny', '--tasks', 'dms', '--rules',
           'bptt,expsm_diag', '--trials', '2', '--seeds', '2', '--jobs', '2', '--out', str(tmp_path)]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for name in ('table.csv', 'table.md', 'selected.json', 'learning_curves_dms.png', 'studies.db'):
        assert (tmp_path / name).exists(), name
    with open(tmp_path / 'table.csv') as f:
        rows = {r['rule']: r for r in csv.DictReader(f)}
    assert set(rows) == {'bptt', 'expsm_diag'}
    for r in rows.values():
        assert r['seeds'] == '2' and 0 <= float(r['test_acc_mean']) <= 1 and float(r['test_acc_se']) >= 0
        assert 1e-4 <= float(r['lr']) <= 1e-1 and r['budget'] == '--epochs 2' and float(r['updates']) == 4
        assert int(r['trials_complete']) + int(r['trials_pruned']) >= 2
    e = rows['expsm_diag']
    assert float(e['diff_low']) <= float(e['diff_to_bptt']) <= float(e['diff_high'])
    assert 0.5 <= float(e['knob_value']) <= 0.999 and e['knob'] == 'etrace_decay'
    # the difference is the paired one, from the final runs' last held-out accuracy
    acc = {rule: [float(metrics(tmp_path / 'final' / f'dms-{rule}-s{s}')[-1]['test_acc']) for s in (0, 1)]
           for rule in rows}
    assert float(e['diff_to_bptt']) == pytest.approx(np.mean(np.subtract(acc['expsm_diag'], acc['bptt'])), abs=1e-6)
    sel = json.load(open(tmp_path / 'selected.json'))['dms']['expsm_diag']
    best = max((t for t in sel['trials'] if t['state'] == 'COMPLETE'), key=lambda t: t['value'])
    assert sel['status'] == 'selected' and sel['val_acc'] == best['value'] and 0 <= sel['val_acc'] <= 1
    assert sel['config']['lr'] == pytest.approx(float(e['lr']), rel=1e-5)
    run_dir = tmp_path / sel['trials'][0]['run_dir']
    assert 'val_acc' in metrics(run_dir)[0] and json.load(open(run_dir / 'config.json'))['seed'] == 100
    # resumed: a second call finds everything done and starts no run
    logs = {p: os.path.getsize(p) for p in (tmp_path / 'final').glob('*.log')}
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert {p: os.path.getsize(p) for p in (tmp_path / 'final').glob('*.log')} == logs


def test_the_estimate_multiplies_measured_seconds_by_updates_and_runs(tmp_path, capsys):
    """benchmarks/benchmark_estimate.py: hours = median s_per_batch x updates at the last rung x (trials + seeds);
    a table without a budget column (the reduced comparison's) is not read."""
    from conftest import load_script
    estimate = load_script('benchmarks/benchmark_estimate.py')
    table = tmp_path / 't.md'
    table.write_text('| rule | task | seed | s_per_batch | budget |\n|---|---|---|---|---|\n'
                     '| BPTT | dms | 0 | 0.4 | 250 batches |\n| BPTT | dms | 1 | 0.6 | 250 batches |\n'
                     '| BPTT | dms | 2 | 0.5 | 250 batches |\n| D-RTRL | dms-stream | 0 | 0.36 | 150 trials / stream |\n'
                     '\n| rule | task | seed | s_per_batch |\n|---|---|---|---|\n| BPTT | shd | 0 | 9 |\n')
    assert estimate.main(['--table', str(table), '--trials', '3', '--tasks', 'dms,dms-stream,shd']) == 0
    out = capsys.readouterr().out
    # dms: 0.5 s x (10 epochs x 25 batches) x (3 trials + 5 seeds) = 1000 s; the stream: 0.36 s x 150 trials x
    # 2310 ms / 500 ms x (3 + 3) = 1496.88 s
    assert '| dms | bptt | 0.5 | 250 | 8 | 0.28 |' in out
    assert '| dms-stream | diag | 0.36 | 693 | 6 | 0.42 |' in out
    assert f'total: {(1000 + 1496.88) / 3600:.1f} core-hours' in out
    assert 'shd/bptt' in out.split('not estimated')[1]
