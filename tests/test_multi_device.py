"""Data parallel training on several devices (--devices 0,1): two CPU devices, asked for with
XLA_FLAGS=--xla_force_host_platform_device_count=2 in a fresh process (jax reads it at import)."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import utils
from rsnn import methods
from conftest import ROOT
from test_dms import TINY_FLAGS, lines_besides_usage, read_metrics

TWO_CPUS = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2', JAX_PLATFORMS='cpu')
DMS = os.path.join(ROOT, 'task-rsnn-long-term-dependency.py')


def on_two_devices(*flags):
    return [f if f != 'cpu' else '0,1' for f in TINY_FLAGS] + list(flags)


@pytest.fixture(scope='module')
def one_vs_two():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'tests', 'multi_device_check.py')],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(l.split(' ', 1)[1]) for l in proc.stdout.splitlines() if l.startswith('@@MULTI ')]
    return {r['method']: r for r in rows}


@pytest.mark.parametrize('method', [n for n in methods.names() if methods.get(n).several_devices])
def test_two_devices_give_the_loss_and_gradients_of_one(one_vs_two, method):
    r = one_vs_two[method]
    assert r['n_devices'] == 2
    assert np.isclose(r['loss_1'], r['loss_2'], rtol=1e-5, atol=0) and r['acc_1'] == r['acc_2'], r
    assert r['grad_rel'] < 1e-5, r            # every weight's gradient (relative norm of the difference)
    assert np.isclose(r['step_loss_1'], r['step_loss_2'], rtol=1e-5), r   # after two updates
    assert np.isclose(r['gnorm_1'], r['gnorm_2'], rtol=1e-5), r
    assert r['param_rel'] < 1e-5, r
    assert r['grad_devices'] == [2] and r['params_replicated'], r


@pytest.mark.parametrize('method', [n for n in methods.names() if methods.get(n).several_devices])
def test_per_sample_states_are_split_across_the_devices(one_vs_two, method):
    shards = one_vs_two[method]['state_shards']
    # neuron states (8, 16) and the readout (8, 2); the online methods' eligibility traces too
    expected = {'(8, 16)', '(8, 2)'} | {'diag': {'(8, 116, 16, 3)', '(8, 16, 3)', '(8, 16, 2, 1)', '(8, 2, 1)'},
                                        'expsm_diag': {'(8, 116)', '(8, 16, 3)', '(8, 2, 1)'}}.get(method, set())
    assert expected <= set(shards), shards
    for shape, parts in shards.items():
        full = json.loads(shape.replace('(', '[').replace(')', ']'))
        assert parts == [[4] + full[1:]] * 2, (shape, parts)   # half of the batch on each device
    if method == 'diag':  # inside the compiled step too: only half-batch traces on a device
        assert one_vs_two[method]['trace_half_batch_in_hlo'] and not one_vs_two[method]['trace_full_batch_in_hlo']


def test_checkpoint_of_two_devices_resumes_on_one(dms_script, tmp_path):
    part, whole = str(tmp_path / 'part'), str(tmp_path / 'whole')
    proc = subprocess.run([sys.executable, DMS, *on_two_devices('--epochs', '1', '--out_dir', part)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=TWO_CPUS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'on cpu:0,cpu:1' in proc.stdout
    assert json.load(open(os.path.join(part, 'config.json')))['n_devices'] == 2
    assert dms_script.main(['--resume', part, '--epochs', '2', '--devices', 'cpu']) == 0
    assert json.load(open(os.path.join(part, 'config.json')))['n_devices'] == 1
    assert dms_script.main(TINY_FLAGS + ['--epochs', '2', '--out_dir', whole]) == 0
    rows_part, rows_whole = read_metrics(part), read_metrics(whole)
    assert [r['epoch'] for r in rows_part] == [1, 2]
    for a, b in zip(rows_whole, rows_part):
        for key in ('train_loss', 'train_acc', 'test_loss', 'test_acc'):
            assert np.isclose(a[key], b[key], rtol=1e-4, atol=1e-6), (key, a, b)


@pytest.mark.parametrize('flags, fragment', [
    (['--devices', '0,1', '--batch_size', '7'], '--batch_size 7 does not divide by the 2 devices'),
    (['--devices', '0,1,2', '--batch_size', '6'], 'there is no device 2 here (cpu:0, cpu:1)'),
    (['--devices', '0,0'], 'distinct indices'),
])
def test_bad_device_input_is_one_line(tmp_path, flags, fragment):
    argv = [f for f in TINY_FLAGS] + ['--epochs', '1', '--out_dir', str(tmp_path / 'r')]
    i = argv.index('--devices')
    del argv[i:i + 2]
    i = argv.index('--batch_size')
    del argv[i:i + 2]
    if '--batch_size' not in flags:
        argv += ['--batch_size', '8']
    proc = subprocess.run([sys.executable, DMS, *argv, *flags], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env=TWO_CPUS)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = lines_besides_usage(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith('error:') and fragment in lines[0], lines
    if 'divide' in fragment:  # checked before anything is written
        assert not os.path.exists(tmp_path / 'r')


def test_memory_sweep_on_two_devices_reports_memory_per_device(tmp_path):
    """--devices 0,1: every row is per device. BPTT's activations (batch x T) and D-RTRL's traces
    (batch x #weights) split over two devices: each device's compiled step needs less than one device
    with the whole batch, and the predicted state is per device (half). (docs/devices.md, "Several devices".)"""
    mem = os.path.join(ROOT, 'task-memory-and-speed-evaluation-tpu.py')
    rows = {}
    for devices in ('cpu', '0,1'):
        out = str(tmp_path / devices.replace(',', '-'))
        proc = subprocess.run([sys.executable, mem, '--n_in', '20', '--n_rec', '64', '--n_layer', '2', '--n_out', '3',
                               '--batch_size', '64', '--repeats', '1', '--lengths', '8', '--methods', 'bptt,diag',
                               # brainscale's path on both: several devices do not take the chunked traces
                               '--trace_chunk', '1', '--devices', devices, '--out_dir', out, '--no_plot'],
                              capture_output=True, text=True, timeout=600, cwd=ROOT, env=TWO_CPUS)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows[devices] = {r['method']: r for r in json.load(open(os.path.join(out, 'results.json')))['rows']}
    for method in ('bptt', 'diag'):
        one, two = rows['cpu'][method], rows['0,1'][method]
        print(method, 'step MB per device, one device / two:', round(one['step_mb'], 3), round(two['step_mb'], 3),
              'temporaries', round(one['xla_temp_mb'], 3), round(two['xla_temp_mb'], 3))
        assert one['status'] == two['status'] == 'ok', (one, two)
        assert (one['n_devices'], two['n_devices']) == (1, 2) and two['device'] == 'cpu:0,cpu:1'
        assert np.isclose(two['predicted_state_mb'], one['predicted_state_mb'] / 2)
        assert two['input_mb'] < one['input_mb']
    for method in ('bptt', 'diag'):
        assert rows['0,1'][method]['step_mb'] < 0.8 * rows['cpu'][method]['step_mb'], method
    # D-RTRL's traces (outputs of the step) are half as large on each device, and no copy of them is
    # kept in temporaries (brainscale_adapter reads the gradient per device: shard_map)
    assert np.isclose(rows['0,1']['diag']['xla_out_mb'], rows['cpu']['diag']['xla_out_mb'] / 2, rtol=0.1)
    assert rows['0,1']['diag']['xla_temp_mb'] < 0.1 * rows['0,1']['diag']['xla_out_mb']
    # a batch that does not split evenly: one error line before any measurement
    proc = subprocess.run([sys.executable, mem, '--batch_size', '7', '--devices', '0,1', '--lengths', '8',
                           '--out_dir', str(tmp_path / 'bad')], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env=TWO_CPUS)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        'error: ' + utils.batch_error(7, 2, '0,1')], proc.stderr


def test_image_classification_on_two_devices_with_check_grad(tmp_path):
    """The other training script on --devices 0,1 (SHD-format fake data), with --check_grad on top."""
    import fake_data
    data = str(tmp_path / 'data')
    fake_data.write_shd_files(data, fake_data.synthetic_event_samples('shd', 32, 16, n_classes=4,
                                                                      events_per_sample=200, seed=2))
    run_dir = str(tmp_path / 'run')
    argv = (f'--devices 0,1 --dataset shd --data_dir {data} --data_length 12 --epoch 1 --n_layer 1 --n_rec 16 '
            f'--method expsm_diag --batch_size 16 --check_grad --out_dir {run_dir} --no_progress').split()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'task-image-classification.py'), *argv],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, env=TWO_CPUS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'on cpu:0,cpu:1' in proc.stdout
    config = json.load(open(os.path.join(run_dir, 'config.json')))
    assert config['n_devices'] == 2 and config['device'] == 'cpu:0,cpu:1'
    rows = list(csv.DictReader(open(os.path.join(run_dir, 'grad_fidelity.csv'))))
    assert sorted({int(r['epoch']) for r in rows}) == [0, 1] and len(rows) == 2 * 4  # layer + readout, w + b
    assert all(-1 <= float(r['cosine']) <= 1 for r in rows)
    assert np.isfinite(float(read_metrics(run_dir)[0]['test_loss']))
