"""scripts/braintrace_crosscheck.py (docs/online-rules.md, "Cross-check against braintrace 0.2.6").

- fast: the export half alone, in our environment (BPTT only, a short window): the file holds the
  network's arrays and our gradients, and BPTT's is not zero;
- slow (not in CI; skipped without .venv-braintrace, built by `make braintrace-crosscheck`): both halves; the
  network rebuilt in braintrace 0.2.6 has our BPTT gradient (the same model) and braintrace's D_RTRL is ours.
"""
import csv
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, load_script

BT_PYTHON = os.path.join(ROOT, '.venv-braintrace', 'bin', 'python')
SCRIPT = os.path.join(ROOT, 'scripts', 'braintrace_crosscheck.py')


def test_export_half_writes_the_network_and_our_gradients(tmp_path):
    cc = load_script('scripts/braintrace_crosscheck.py')
    path = str(tmp_path / 'x.npz')
    cc.export(path, uoro_seeds=1, T_=8, rules=('bptt',))
    d = np.load(path)
    for name in ('xs', 'labels', 'ws', 'layer_weight', 'layer_bias', 'out_weight', 'out_bias', 'mem_decay',
                 'out_decay', 'V_th', 'surrogate_alpha', 'surrogate_width', 'es_decay', 'eprop_kappa', 'meta'):
        assert name in d, name
    assert d['xs'].shape == (8, cc.B, cc.N_IN) and d['layer_weight'].shape == (cc.N_IN + cc.N_REC, cc.N_REC)
    assert sorted(k for k in d if k.startswith('g/')) == sorted(f'g/bptt/{w}' for w in cc.WEIGHTS)
    assert all(np.linalg.norm(d[f'g/bptt/{w}']) > 0 for w in cc.WEIGHTS)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(BT_PYTHON), reason='no .venv-braintrace (make braintrace-crosscheck)')
def test_braintrace_half_same_model_and_drtrl(tmp_path):
    path = str(tmp_path / 'x.npz')
    load_script('scripts/braintrace_crosscheck.py').export(path, uoro_seeds=2, T_=20,
                                                           rules=('bptt', 'diag', 'snap1'))
    proc = subprocess.run([BT_PYTHON, SCRIPT, '--braintrace', path, '--out', str(tmp_path / 'out')],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / 'out' / 'crosscheck.csv')))
    match = [r for r in rows if r['ours'] == 'bptt' and r['braintrace'].startswith('brainstate')]
    assert len(match) == 5
    for r in match:
        assert float(r['cos_ours_bt']) > 0.9999 and abs(float(r['norm_ratio']) - 1) < 1e-3, r
    drtrl = [r for r in rows if r['ours'] == 'diag' and r['braintrace'] == 'D_RTRL']
    assert len(drtrl) == 5
    for r in drtrl:
        assert float(r['cos_ours_bt']) > 0.99, r
    assert (tmp_path / 'out' / 'crosscheck.md').read_text().count('| D-RTRL | D_RTRL |') == 2
