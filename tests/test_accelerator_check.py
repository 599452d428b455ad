"""scripts/accelerator-check.sh end to end at its toy size (TINY=1), on the CPU."""
import csv
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT


@pytest.mark.slow  # about 40 s: the GPU/TPU machine's script at toy size; `make test-all` runs it
def test_accelerator_check_runs_at_tiny_size(tmp_path):
    out = tmp_path / 'check'
    env = dict(os.environ, TINY='1', PY=sys.executable, OUT=str(out))
    t0 = time.time()
    proc = subprocess.run(['bash', os.path.join(ROOT, 'scripts', 'accelerator-check.sh')], capture_output=True,
                          text=True, timeout=600, cwd=ROOT, env=env)
    seconds = time.time() - t0
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    log = (out / 'check.log').read_text()
    for step in ('install: skipped', 'tests: skipped', 'memory_sweep: ok', 'memory_analysis: ok', 'dms_bptt: ok', 'dms_expsm_diag: ok',
                 'results_table: ok', 'done: every step ok'):
        assert step in log, (step, log)
    assert 'devices [CpuDevice(id=0)]' in (out / 'machine.txt').read_text()
    for folder in ('memory_speed', 'memory_analysis'):  # the online methods at K = 1 and auto (K = T = 4 here)
        with open(out / folder / 'results.csv') as f:
            rows = list(csv.DictReader(f))
        assert sorted((r['method'], r['trace_chunk']) for r in rows) == [
            ('bptt', '1'), ('diag', '1'), ('diag', '4'), ('expsm_diag', '1'), ('expsm_diag', '4')], rows
        assert all(r['status'] == 'ok' and r['T'] == '4' for r in rows), rows
    for method in ('bptt', 'expsm_diag'):
        summary = json.load(open(out / f'dms-{method}' / 'summary.json'))
        config = json.load(open(out / f'dms-{method}' / 'config.json'))
        # the README command with the toy sizes on top (the later flag wins)
        assert summary['method'] == method and summary['epochs_run'] == 2, summary
        assert config['acc_th'] == 0.95 and config['n_rec'] == 16 and config['batch_size'] == 8, config
    with open(out / 'results.csv') as f:
        assert sorted(r['method'] for r in csv.DictReader(f)) == ['bptt', 'expsm_diag']
    print(f'accelerator check, TINY=1: {seconds:.0f} s')
    assert seconds < 150, seconds
