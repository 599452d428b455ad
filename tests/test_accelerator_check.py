"""scripts/accelerator-check.sh end to end at its toy size (TINY=1), on the CPU, and the plan of its full
form: caps that add up to 10 minutes."""
import csv
import json
import os
import re
import subprocess
import sys
import time

import pytest

from conftest import ROOT

SCRIPT = os.path.join(ROOT, 'scripts', 'accelerator-check.sh')


@pytest.mark.slow  # about a minute: the GPU/TPU machine's script at toy size; `make test-all` runs it
def test_accelerator_check_runs_at_tiny_size(tmp_path):
    out = tmp_path / 'check'
    env = dict(os.environ, TINY='1', PY=sys.executable, OUT=str(out))
    t0, cpu0 = time.time(), children_cpu_s()
    proc = subprocess.run(['bash', SCRIPT], capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    seconds, cpu_s = time.time() - t0, children_cpu_s() - cpu0
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    log = (out / 'check.log').read_text()
    for step in ('install: skipped', 'exactness_tests: ok', 'memory_sweep: ok', 'dms_bptt: ok', 'dms_expsm_diag: ok',
                 'dms_diag: ok', 'results_table: ok', 'done: every step ok'):
        assert step in log, (step, log)
    assert 'devices [CpuDevice(id=0)]' in (out / 'machine.txt').read_text()
    assert '3 passed' in (out / 'exactness_tests.log').read_text()
    with open(out / 'sweep' / 'results.csv') as f:
        rows = list(csv.DictReader(f))
    # the methods interleaved at each T, in the order of the rows
    assert [(r['method'], r['T']) for r in rows] == [(m, T) for T in ('4', '8') for m in ('bptt', 'expsm_diag', 'diag')]
    assert all(r['status'] == 'ok' and float(r['step_s']) > 0 for r in rows), rows
    assert (out / 'sweep' / 'results.md').read_text().count('| ok |') == 6
    for method in ('bptt', 'expsm_diag', 'diag'):
        summary = json.load(open(out / f'dms-{method}' / 'summary.json'))
        config = json.load(open(out / f'dms-{method}' / 'config.json'))
        # the README command with a fixed number of batches and the toy sizes on top (the later flag wins)
        assert summary['method'] == method and summary['batches_run'] == 2 and summary['step_s_per_batch'] > 0
        assert config['n_rec'] == 16 and config['batch_size'] == 8 and config['n_data_worker'] == 0, config
    with open(out / 'results.csv') as f:
        assert sorted(r['method'] for r in csv.DictReader(f)) == ['bptt', 'diag', 'expsm_diag']
    print(f'accelerator check, TINY=1: {seconds:.0f} s, {cpu_s:.0f} s of CPU time')
    # the work it takes, whatever else shares the CPU: under 2 minutes of CPU time
    assert cpu_s < 120, (cpu_s, seconds)


def children_cpu_s() -> float:
    import resource
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def test_the_full_checks_caps_add_up_to_10_minutes():
    """The plan on paper (docs/accelerator-check.md): the exactness tests, the sweep's 12 rows at their
    cap (and the workers' start-up), three DMS runs and the table within 600 s with the script's defaults."""
    text = open(SCRIPT).read()
    default = lambda name: int(re.search(rf'^{name}=\${{{name}:-(\d+)}}$', text, re.M).group(1))
    sweep = 3 * 4 * default('ROW_S') + default('STARTUP_S') + 30
    assert 'n_rows=$(( 3 * 4 ))' in text and 'step results_table 30 ' in text
    total = default('TESTS_S') + sweep + 3 * default('DMS_S') + 30
    assert total <= 600, total
    assert 'torch' not in re.sub(r'#.*', '', text) and 'extra-index' not in text
