"""scripts/results_table.py: one row per run folder, from summary.json and config.json."""
import csv
import json
import os
import subprocess
import sys

from conftest import ROOT, load_script
from test_dms import TINY_FLAGS


def test_table_of_two_tiny_dms_runs(dms_script, tmp_path):
    root = tmp_path / 'results'
    runs = {'bptt': str(root / 'dms' / 'a'), 'expsm_diag': str(root / 'dms' / 'b')}
    for method, run_dir in runs.items():
        assert dms_script.main(TINY_FLAGS + ['--method', method, '--epochs', '1', '--etrace_decay', '0.8',
                                             '--out_dir', run_dir]) == 0
    table = load_script('scripts/results_table.py')
    rows = table.build_table(str(root))
    assert [r['run_dir'] for r in rows] == [os.path.join('dms', 'a'), os.path.join('dms', 'b')]
    for r, (method, run_dir) in zip(rows, runs.items()):
        summary = json.load(open(os.path.join(run_dir, 'summary.json')))
        assert summary['peak_rss_mb'] > 50
        assert (r['experiment'], r['dataset'], r['method']) == ('dms', 'dms', method)
        assert (r['n_rec'], r['n_layer'], r['T'], r['batch_size']) == (16, 1, 65, 8)
        assert r['etrace_decay'] == (0.8 if method == 'expsm_diag' else None)
        assert r['epochs_run'] == 1 and r['stopped_because'] == 'epochs'
        assert r['test_acc'] == summary['test_acc'] and r['best_test_acc'] == summary['best_test_acc']
        assert r['seconds'] == summary['seconds'] and r['peak_rss_mb'] == summary['peak_rss_mb']
    with open(root / 'results.csv') as f:
        written = list(csv.DictReader(f))
    assert [w['method'] for w in written] == ['bptt', 'expsm_diag']
    assert float(written[1]['test_acc']) == rows[1]['test_acc'] and written[0]['etrace_decay'] == ''
    md = (root / 'results.md').read_text().splitlines()
    assert len(md) == 4 and md[0].startswith('| experiment | dataset | method |')
    assert '| dms | dms | expsm_diag | 0.8 | 16 | 1 | 65 | 8 | 1 | epochs |' in md[3]
    # the command line (what `make results-table RESULTS=DIR` runs)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'results_table.py'), str(root)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and '2 runs' in proc.stdout, proc.stderr
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'results_table.py'), str(tmp_path / 'no')],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count('\n') == 1 and 'RESULTS=DIR' in proc.stderr


def test_a_malformed_summary_is_skipped_with_a_warning(tmp_path, capsys):
    """One damaged run folder must not abort the table of all the others (issue 17, item 14)."""
    root = tmp_path / 'results'
    good, cut, not_object = root / 'dms' / 'good', root / 'dms' / 'cut', root / 'dms' / 'list'
    for folder in (good, cut, not_object):
        folder.mkdir(parents=True)
        (folder / 'config.json').write_text(json.dumps(dict(dataset='dms', method='bptt', n_rec=16)))
    (good / 'summary.json').write_text(json.dumps(dict(method='bptt', epochs_run=3, test_acc=0.75)))
    (cut / 'summary.json').write_text('{"method": "bptt", "epochs_r')
    (not_object / 'summary.json').write_text('[1, 2]')
    rows = load_script('scripts/results_table.py').build_table(str(root))
    assert [r['run_dir'] for r in rows] == [os.path.join('dms', 'good')] and rows[0]['test_acc'] == 0.75
    err = capsys.readouterr().err
    assert err.count('warning: skipped') == 2 and str(cut) in err and str(not_object) in err
