"""scripts/compare_rules.py --tiny (make compare-rules TINY=1): the comparison's code path at toy sizes, on a
subset of rules and tasks that keeps it to a few minutes (the trial task with --check_grad, the stream, one
image stand-in): table.csv's columns, one row per run, a figure per task, and a second call that reuses
the finished runs (resume)."""
import csv
import os
import subprocess
import sys

from conftest import ROOT


def test_compare_rules_tiny(tmp_path):
    out = str(tmp_path / 'cmp')
    cmd = [sys.executable, 'scripts/compare_rules.py', '--tiny', '--rules', 'bptt,ottt,uoro',
           '--tasks', 'dms,dms-stream,shd', '--out', out, '--jobs', '2']   # two runs side by side, as make runs it
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = list(csv.DictReader(open(os.path.join(out, 'table.csv'))))
    assert list(rows[0]) == ['rule', 'task', 'seed', 'final_test_acc', 'best_test_acc', 'batches', 's_per_batch',
                             'step_memory_mb', 'grad_cosine_init', 'grad_cosine_trained', 'step_memory_formula_mb',
                             'budget', 'stopped']
    assert sorted((r['task'], r['rule']) for r in rows) == sorted(
        (t, m) for t in ('dms', 'dms-stream', 'shd') for m in ('bptt', 'ottt', 'uoro'))
    for r in rows:
        assert 0 <= float(r['final_test_acc']) <= 1 and float(r['step_memory_mb']) > 0, r
        assert float(r['step_memory_formula_mb']) > 0, r
        if r['task'] != 'dms-stream' and r['rule'] != 'bptt':
            assert -1 <= float(r['grad_cosine_init']) <= 1, r
    for t in ('dms', 'dms-stream', 'shd'):
        assert os.path.getsize(os.path.join(out, f'accuracy_vs_memory_{t}.png')) > 0
    assert open(os.path.join(out, 'table.md')).read().count('| OTTT |') == 3
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert again.returncode == 0 and '$ ' not in again.stdout, again.stdout[-2000:]   # nothing run again


def test_compare_rules_tiny_new_columns(tmp_path):
    """The columns of the SHD stand-in with adaptive neurons (--model adlif) and of the trial tasks
    cue-accumulation and store-recall (their presets at toy size), one rule each: a row per column with its
    accuracy, step memory and gradient cosine, and the adaptive network in the SHD run's config."""
    import json
    out = str(tmp_path / 'cmp')
    new = ('shd-adlif', 'cue-accumulation', 'store-recall')
    cmd = [sys.executable, 'scripts/compare_rules.py', '--tiny', '--rules', 'ottt', '--tasks', ','.join(new),
           '--out', out, '--jobs', '2']
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = list(csv.DictReader(open(os.path.join(out, 'table.csv'))))
    assert [r['task'] for r in rows] == list(new) and {r['rule'] for r in rows} == {'ottt'}
    for r in rows:
        assert 0 <= float(r['final_test_acc']) <= 1 and float(r['step_memory_mb']) > 0, r
        assert float(r['step_memory_formula_mb']) > 0 and -1 <= float(r['grad_cosine_init']) <= 1, r
        assert r['budget'] == '2 batches', r
    config = {t: json.load(open(os.path.join(out, 'runs', f'{t}-ottt-s0', 'config.json'))) for t in new}
    assert config['shd-adlif']['model'] == 'adlif' and config['shd-adlif']['dataset'] == 'shd'
    assert config['cue-accumulation']['dataset'] == 'cue-accumulation' and config['cue-accumulation']['n_memory'] == 2
    assert config['store-recall']['dataset'] == 'store-recall'
    assert '| shd-adlif: acc |' in open(os.path.join(out, 'summary.md')).read()
