"""The DMS trial generator, training with each method, the run folder, resume and bad input."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import brainstate
import jax
import numpy as np
import pytest

from rsnn import run_folder
import datasets
import models
from rsnn import train_loop
from rsnn.trainer import Trainer
import utils
from conftest import ROOT

README_CFG = datasets.DMSConfig(dt=1., t_fixation=10., t_delay=1000.)


def test_phase_timing_of_the_readme_trial():
    assert README_CFG.n_steps == 2010
    assert README_CFG.sample_start == 10 and README_CFG.delay_start == 510 and README_CFG.test_start == 1510
    w = README_CFG.loss_weights()
    assert w[:1510].sum() == 0 and np.isclose(w[1510:].sum(), 1.) and np.all(w[1510:] > 0)


def test_phases_and_rates():
    cfg = datasets.DMSConfig(t_fixation=10., t_sample=200., t_delay=300., t_test=200.)
    x, y, sample, test = datasets.dms_trials(cfg, 256, np.random.default_rng(0))
    assert x.shape == (cfg.n_steps, 256, 100) and x.dtype == np.uint8
    quiet = np.concatenate([x[:cfg.sample_start], x[cfg.delay_start:cfg.test_start]])
    assert abs(quiet.mean() - 0.001) < 0.0003  # 1 Hz background at dt = 1 ms
    # The input neuron tuned to the sample direction fires at 101 Hz during the sample.
    preferred = (sample * 100 // 8)
    peak = x[cfg.sample_start:cfg.delay_start, np.arange(256), preferred]
    assert abs(peak.mean() - 0.101) < 0.01
    # Population rate during the sample: mean tuning x 100 Hz + background.
    tuning_mean = datasets.dms_tuning(cfg, np.zeros(1)).mean()
    assert abs(x[cfg.sample_start:cfg.delay_start].mean() - (0.001 + 0.1 * tuning_mean)) < 0.002


def test_labels_balanced_and_match_repeats_the_sample():
    cfg = datasets.DMSConfig(t_fixation=0., t_sample=100., t_delay=10., t_test=100.)
    x, y, sample, test = datasets.dms_trials(cfg, 2000, np.random.default_rng(1))
    assert abs(y.mean() - 0.5) < 0.04
    assert np.all(sample[y == 1] == test[y == 1]) and np.all(sample[y == 0] != test[y == 0])
    assert set(np.unique(test[y == 0] - sample[y == 0]) % 8) == set(range(1, 8))
    # The direction decoded from the spikes (population vector) agrees with the labels.
    angles = 2 * np.pi * np.arange(100) / 100

    def decode(spk):
        counts = spk.sum(0).astype(float)
        return np.angle(counts @ np.exp(1j * angles))

    d_sample = decode(x[cfg.sample_start:cfg.delay_start])
    d_test = decode(x[cfg.test_start:])
    same = np.abs(np.angle(np.exp(1j * (d_sample - d_test)))) < np.pi / 8
    assert np.mean(same == (y == 1)) > 0.97


def test_trials_are_seeded():
    a = datasets.dms_trials(README_CFG, 4, datasets.dms_batch_rng(0, 1, 2))
    b = datasets.dms_trials(README_CFG, 4, datasets.dms_batch_rng(0, 1, 2))
    c = datasets.dms_trials(README_CFG, 4, datasets.dms_batch_rng(0, 1, 3))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and not np.array_equal(a[0], c[0])


def test_worker_loader_gives_the_same_batches():
    cfg = datasets.DMSConfig(t_fixation=0., t_sample=20., t_delay=10., t_test=20.)
    direct = [datasets.dms_trials(cfg, 4, datasets.dms_batch_rng(5, 2, i))[:2] for i in range(3)]
    loaded = list(datasets.dms_train_loader(cfg, 4, 3, seed=5, n_workers=1)(2))
    assert len(loaded) == 3
    for (x1, y1), (x2, y2) in zip(direct, loaded):
        assert np.array_equal(x1, x2) and np.array_equal(y1, y2)


def test_no_worker_loader_reads_in_process_the_batches_of_a_torch_loader():
    """--n_data_worker 0 (the default): the batches read in this process, no torch DataLoader (importing
    torch cost every run ~1.5 s of CPU), the same arrays as the direct trials and as torch's loader."""
    import torch.utils.data
    cfg = datasets.DMSConfig(t_fixation=0., t_sample=20., t_delay=10., t_test=20.)
    direct = [datasets.dms_trials(cfg, 4, datasets.dms_batch_rng(5, 2, i))[:2] for i in range(3)]
    loaded = list(datasets.dms_train_loader(cfg, 4, 3, seed=5, n_workers=0)(2))
    sampler = datasets.EpochSampler(3)
    sampler.epoch = 2
    by_torch = list(datasets.AsNumpy(torch.utils.data.DataLoader(datasets.DMSBatches(cfg, 4, 3, 5), batch_size=None,
                                                                 sampler=sampler)))
    assert len(loaded) == len(by_torch) == 3
    for (x1, y1), (x2, y2), (x3, y3) in zip(direct, loaded, by_torch):
        assert x2.dtype == x3.dtype and y2.dtype == y3.dtype
        assert np.array_equal(x1, x2) and np.array_equal(y1, y2) and np.array_equal(x2, x3) and np.array_equal(y2, y3)
    assert isinstance(datasets.worker_loader(datasets.DMSBatches(cfg, 4, 3, 5), 0, batch_size=None, sampler=sampler),
                      datasets.InProcessLoader)


TINY_CFG = datasets.DMSConfig(t_fixation=5., t_sample=20., t_delay=20., t_test=20.)


@pytest.mark.parametrize('method', ['bptt', 'diag', 'expsm_diag'])
def test_each_method_lowers_the_loss(method):
    brainstate.environ.set(dt=1.)
    net = models.DMSNet(100, 16, 2, dt=1., tau_neu=20., tau_syn=20., tau_I2=100., A2=1., ff_scale=6.,
                        rec_scale=2., seed=0)
    trainer = Trainer(net, method, 100, 16, lr=1e-2)
    x, y, _, _ = datasets.dms_trials(TINY_CFG, 16, np.random.default_rng(0))
    ws = TINY_CFG.loss_weights()
    before, _, _ = trainer.evaluate(x, y, ws)
    for _ in range(25):
        trainer.train_step(x, y, ws)
    after, _, _ = trainer.evaluate(x, y, ws)
    assert np.isfinite(after) and after < 0.8 * before, (before, after)


TINY_FLAGS = ['--t_fixation', '5', '--t_sample', '20', '--t_delay', '20', '--t_test', '20', '--n_rec', '16',
              '--batch_size', '8', '--batches_per_epoch', '3', '--n_test_trials', '16', '--devices', 'cpu',
              '--no_progress', '--tau_neu', '20', '--tau_syn', '20', '--tau_I2', '100', '--acc_th', '1.1']


def read_metrics(run_dir):
    return run_folder.RunLog(run_dir).read_metrics()


@pytest.mark.parametrize('method', ['bptt', 'diag', 'expsm_diag'])
def test_main_writes_the_run_folder(dms_script, tmp_path, method):
    run_dir = str(tmp_path / method)
    assert dms_script.main(TINY_FLAGS + ['--method', method, '--epochs', '2', '--out_dir', run_dir]) == 0
    config = json.load(open(os.path.join(run_dir, 'config.json')))
    assert config['method'] == method and config['n_rec'] == 16 and config['n_steps'] == 65
    rows = read_metrics(run_dir)
    assert [r['epoch'] for r in rows] == [1, 2]
    assert all(0 <= r['test_acc'] <= 1 and np.isfinite(r['train_loss']) for r in rows)
    summary = json.load(open(os.path.join(run_dir, 'summary.json')))
    assert summary['method'] == method and summary['epochs_run'] == 2 and summary['stopped_because'] == 'epochs'
    assert summary['test_acc'] == rows[-1]['test_acc']
    assert summary['best_test_acc'] == max(r['test_acc'] for r in rows)
    assert sorted(os.listdir(os.path.join(run_dir, 'checkpoints', 'last'))) == ['1', '2']
    best_epoch = max(rows, key=lambda r: r['test_acc'])['epoch']  # the first epoch with the best accuracy
    assert os.listdir(os.path.join(run_dir, 'checkpoints', 'best')) == [str(best_epoch)]
    assert_png(os.path.join(run_dir, 'learning_curves.png'), (1000, 400))


def assert_png(path, size):
    """A PNG file of `size` (width, height) pixels, read back from its header."""
    import struct
    with open(path, 'rb') as f:
        head = f.read(24)
    assert os.path.getsize(path) > 1000 and head[:8] == b'\x89PNG\r\n\x1a\n', path
    assert struct.unpack('>II', head[16:24]) == size


def test_resume_continues_where_it_stopped(dms_script, tmp_path):
    full, part = str(tmp_path / 'full'), str(tmp_path / 'part')
    dms_script.main(TINY_FLAGS + ['--epochs', '4', '--out_dir', full])
    dms_script.main(TINY_FLAGS + ['--epochs', '2', '--out_dir', part])
    assert [r['epoch'] for r in read_metrics(part)] == [1, 2]
    dms_script.main(['--resume', part, '--epochs', '4'])
    rows_full, rows_part = read_metrics(full), read_metrics(part)
    assert [r['epoch'] for r in rows_part] == [1, 2, 3, 4]
    assert json.load(open(os.path.join(part, 'summary.json')))['epochs_run'] == 4
    # Same batches, same restored parameters and optimizer state: the same numbers, batch by batch too.
    batches_full, batches_part = (utils.read_csv(os.path.join(d, 'batches.csv')) for d in (full, part))
    assert [int(r['batch']) for r in batches_part] == list(range(1, 13))
    assert np.allclose([float(r['loss']) for r in batches_full], [float(r['loss']) for r in batches_part], rtol=1e-4)
    for a, b in zip(rows_full, rows_part):
        assert np.isclose(a['train_loss'], b['train_loss'], rtol=1e-4), (a, b)
        assert np.isclose(a['test_loss'], b['test_loss'], rtol=1e-4), (a, b)


def test_kill_while_saving_leaves_a_usable_checkpoint(dms_script, tmp_path):
    run_dir = str(tmp_path / 'killed')
    # A child that is SIGKILLed right after orbax starts writing the checkpoint of epoch 2.
    child = textwrap.dedent(f'''
        import os, signal, sys
        import orbax.checkpoint as ocp
        from conftest import load_script
        original = ocp.CheckpointManager.save
        def save(self, step, *a, **k):
            result = original(self, step, *a, **k)
            if step == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return result
        ocp.CheckpointManager.save = save
        load_script('task-rsnn-long-term-dependency.py').main({TINY_FLAGS!r} + ['--epochs', '3', '--out_dir', {run_dir!r}])
    ''')
    proc = subprocess.run([sys.executable, '-c', child], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert [r['epoch'] for r in read_metrics(run_dir)] == [1, 2]
    # Epoch 2's checkpoint was not complete: the newest complete step is epoch 1's.
    import orbax.checkpoint as ocp
    manager = ocp.CheckpointManager(os.path.join(run_dir, 'checkpoints', 'last'))
    assert manager.latest_step() == 1 and list(manager.all_steps()) == [1]
    manager.close()
    assert dms_script.main(['--resume', run_dir, '--epochs', '3']) == 0
    rows = read_metrics(run_dir)
    # The run goes on from epoch 1 and redoes 2, with the same numbers as a run never interrupted.
    assert [r['epoch'] for r in rows] == [1, 2, 3]
    assert json.load(open(os.path.join(run_dir, 'summary.json')))['epochs_run'] == 3
    whole = str(tmp_path / 'whole')
    assert dms_script.main(TINY_FLAGS + ['--epochs', '3', '--out_dir', whole]) == 0
    for a, b in zip(read_metrics(whole), rows):
        for key in ('train_loss', 'train_acc', 'test_loss', 'test_acc'):
            assert np.isclose(a[key], b[key], rtol=1e-4, atol=1e-6), (key, a, b)


def run_cli(*flags):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'task-rsnn-long-term-dependency.py'), *flags],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


def lines_besides_usage(stderr: str) -> list:
    """stderr without argparse's usage block (the 'usage:' line and its indented continuations)."""
    lines, in_usage = [], False
    for line in stderr.splitlines():
        if line.startswith('usage:'):
            in_usage = True
            continue
        if in_usage and line.startswith(' '):
            continue
        in_usage = False
        if line.strip():
            lines.append(line)
    return lines


@pytest.mark.parametrize('flags, fragment, usage', [
    (['--method', 'rtrl'], "invalid choice: 'rtrl'", True),
    (['--dataset', 'mnist'], "invalid choice: 'mnist'", True),
    (['--n_rec', '0'], 'must be > 0', True),
    (['--batch_size', '-3'], 'must be > 0', True),
    (['--t_delay', '-5', '--devices', 'cpu'], '--t_delay must be >= 0', False),
    (['--resume', '/nonexistent/run'], 'no checkpoint there', False),
])
def test_bad_input_is_one_line_with_exit_code_2(flags, fragment, usage):
    proc = run_cli(*flags)
    assert proc.returncode == 2, proc.stderr
    assert ('usage:' in proc.stderr) == usage, proc.stderr
    lines = lines_besides_usage(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith(('error:', 'task-rsnn-long-term-dependency.py: error:')), lines
    assert fragment in lines[0]


def test_missing_device_warns_and_runs(tmp_path):
    flags = ['3' if f == 'cpu' else f for f in TINY_FLAGS]  # --devices 3: the authors' fourth GPU
    proc = run_cli(*flags, '--epochs', '1', '--batches_per_epoch', '1', '--out_dir', str(tmp_path / 'r'))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'warning: --devices 3 not found' in proc.stderr



@pytest.mark.parametrize('window,epochs_run', [(None, 7), (5, 2)])
def test_stops_at_acc_th(dms_script, tmp_path, window, epochs_run):
    """acc_th 0: the smoothed accuracy (last --acc_th_window batches, default 20) passes it as soon as
    that many batches are in."""
    run_dir = str(tmp_path / 'th')
    flags = [f if f != '1.1' else '0.0' for f in TINY_FLAGS]
    flags += ['--acc_th_window', str(window)] if window else []
    assert dms_script.main(flags + ['--epochs', '10', '--out_dir', run_dir]) == 0
    summary = json.load(open(os.path.join(run_dir, 'summary.json')))
    # 3 batches per epoch: the 20th batch is the 2nd of epoch 7, the 5th the 2nd of epoch 2.
    assert summary['stopped_because'] == 'acc_th' and summary['epochs_run'] == epochs_run


def saved_params(run_dir, which):
    """{step: flat list of the saved weight arrays} of checkpoints/<which>."""
    import orbax.checkpoint as ocp
    root = os.path.join(run_dir, 'checkpoints', which)
    out = {}
    for step in sorted(d for d in os.listdir(root) if d.isdigit()):
        state = ocp.PyTreeCheckpointer().restore(os.path.join(root, step, 'state'))
        out[int(step)] = [np.asarray(v) for v in jax.tree.leaves(state['params'])]
    return out


def test_infinite_gradient_with_finite_loss_is_never_saved(dms_script, tmp_path, monkeypatch):
    """The last batch of epoch 2 has a finite loss but an infinite gradient: the clipped update would be
    NaN. The run must stop ('nan') with epoch 1 as its last and best checkpoint, never a NaN one."""
    import jax.numpy as jnp
    original = Trainer._loss_and_grads

    def poisoned(self, xs, labels, mask, ws):
        grads, loss, acc = original(self, xs, labels, mask, ws)
        scale = jnp.where(xs[0, 0, 0] == 7, jnp.inf, 1.)
        return jax.tree.map(lambda g: g * scale, grads), loss, acc

    calls = []
    real_step = Trainer.train_step

    def step(self, xs, labels, ws):
        calls.append(1)
        if len(calls) == 6:  # 3 batches per epoch: the last batch of epoch 2
            xs = np.array(xs)
            xs[0, 0, 0] = 7
        loss, acc, gnorm = real_step(self, xs, labels, ws)
        if len(calls) == 6:
            assert np.isfinite(loss) and not np.isfinite(gnorm)
        return loss, acc, gnorm

    monkeypatch.setattr(Trainer, '_loss_and_grads', poisoned)
    monkeypatch.setattr(Trainer, 'train_step', step)
    run_dir = str(tmp_path / 'nan')
    assert dms_script.main(TINY_FLAGS + ['--epochs', '3', '--out_dir', run_dir]) == 1
    summary = json.load(open(os.path.join(run_dir, 'summary.json')))
    assert summary['stopped_because'] == 'nan' and summary['epochs_run'] == 1
    assert [r['epoch'] for r in read_metrics(run_dir)] == [1]
    for which in ('last', 'best'):
        saved = saved_params(run_dir, which)
        assert list(saved) == [1], (which, list(saved))
        assert all(np.all(np.isfinite(v)) for v in saved[1])


def interrupt_at_call(monkeypatch, n):
    """Make the n-th training step of this process raise KeyboardInterrupt (Ctrl-C)."""
    calls = []
    real_step = Trainer.train_step

    def step(self, *a):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real_step(self, *a)

    monkeypatch.setattr(Trainer, 'train_step', step)


def test_resume_keeps_the_overrides_of_an_earlier_resume(dms_script, tmp_path, monkeypatch):
    """--epochs 1; --resume --epochs 4 interrupted in epoch 3; --resume alone must go on to epoch 4."""
    run_dir = str(tmp_path / 'run')
    assert dms_script.main(TINY_FLAGS + ['--epochs', '1', '--out_dir', run_dir]) == 0
    with monkeypatch.context() as m:
        interrupt_at_call(m, 5)  # epochs 2 and 3 have 3 batches each: the 2nd batch of epoch 3
        with pytest.raises(KeyboardInterrupt):
            dms_script.main(['--resume', run_dir, '--epochs', '4'])
    assert json.load(open(os.path.join(run_dir, 'config.json')))['epochs'] == 4
    assert [r['epoch'] for r in read_metrics(run_dir)] == [1, 2]
    assert dms_script.main(['--resume', run_dir]) == 0
    assert [r['epoch'] for r in read_metrics(run_dir)] == [1, 2, 3, 4]
    summary = json.load(open(os.path.join(run_dir, 'summary.json')))
    assert summary['epochs_run'] == 4 and summary['stopped_because'] == 'epochs'


@pytest.mark.parametrize('how', ['acc_th', 'last_epoch'])
def test_resume_of_a_finished_run_does_not_train(dms_script, tmp_path, capsys, how):
    run_dir = str(tmp_path / how)
    if how == 'acc_th':  # acc_th 0: stops at the 20th batch, the 2nd of epoch 7 (of 10)
        flags = [f if f != '1.1' else '0.0' for f in TINY_FLAGS] + ['--epochs', '10']
    else:
        flags = TINY_FLAGS + ['--epochs', '2']
    assert dms_script.main(flags + ['--out_dir', run_dir]) == 0
    files = {name: open(os.path.join(run_dir, name), 'rb').read()
             for name in ('metrics.csv', 'summary.json', 'config.json')}
    capsys.readouterr()
    assert dms_script.main(['--resume', run_dir]) == 0
    out = capsys.readouterr().out
    assert 'is finished' in out and 'nothing to train' in out and 'epoch 8' not in out
    for name, content in files.items():
        assert open(os.path.join(run_dir, name), 'rb').read() == content, name
    if how == 'acc_th':  # a larger --epochs does not reopen a run that reached its accuracy threshold
        assert dms_script.main(['--resume', run_dir, '--epochs', '12']) == 0
        assert open(os.path.join(run_dir, 'metrics.csv'), 'rb').read() == files['metrics.csv']


@pytest.mark.parametrize('again', ['out_dir', 'resume'])
def test_run_stopped_before_its_first_checkpoint_starts_over(dms_script, tmp_path, monkeypatch, capsys, again):
    run_dir = str(tmp_path / 'early')
    with monkeypatch.context() as m:
        interrupt_at_call(m, 2)  # Ctrl-C in the 2nd batch of epoch 1: no checkpoint yet
        with pytest.raises(KeyboardInterrupt):
            dms_script.main(TINY_FLAGS + ['--epochs', '2', '--out_dir', run_dir])
    assert os.path.isdir(os.path.join(run_dir, 'checkpoints')) and not run_folder.has_checkpoint(run_dir)
    capsys.readouterr()
    argv = TINY_FLAGS + ['--epochs', '2', '--out_dir', run_dir] if again == 'out_dir' else ['--resume', run_dir]
    assert dms_script.main(argv) == 0
    assert 'starting' in capsys.readouterr().err
    assert [r['epoch'] for r in read_metrics(run_dir)] == [1, 2]
    assert sorted(os.listdir(os.path.join(run_dir, 'checkpoints', 'last'))) == ['1', '2']
    assert json.load(open(os.path.join(run_dir, 'summary.json')))['epochs_run'] == 2


def test_train_acc_is_weighted_by_the_real_samples(dms_script, tmp_path, monkeypatch):
    """An epoch of a full batch (8) and a short one (2, padded to 8): the epoch's train_acc and train_loss
    are per-sample means, as test_acc is, not a plain mean over the two batches."""
    args = run_folder.parse_args(dms_script.build_parser(), TINY_FLAGS + ['--epochs', '1', '--out_dir', str(tmp_path / 'w')])
    run_dir = run_folder.prepare_run_dir(args)
    brainstate.environ.set(dt=1.)
    cfg = datasets.DMSConfig(t_fixation=5., t_sample=20., t_delay=20., t_test=20.)
    net = models.DMSNet(cfg.n_input, 16, 2, dt=1., tau_neu=20., tau_syn=20., tau_I2=100., A2=1., ff_scale=6.,
                        rec_scale=2., seed=0)
    trainer = Trainer(net, 'bptt', cfg.n_input, 8)
    x, y, _, _ = datasets.dms_trials(cfg, 10, np.random.default_rng(0))
    batches = [(x[:, :8], y[:8]), (x[:, 8:], y[8:])]
    seen = []
    real_step = trainer.train_step

    def step(xs, labels, ws):
        out = real_step(xs, labels, ws)
        seen.append((out[0], out[1], len(labels)))
        return out

    trainer.train_step = step
    train_loop.fit(train_loop.LoopSettings.from_args(args), trainer, run_dir, lambda epoch: batches, lambda: batches[:1],
                   cfg.loss_weights(), config=dict(vars(args), run_dir=run_dir))
    (l1, a1, n1), (l2, a2, n2) = seen
    assert (n1, n2) == (8, 2) and a1 != a2
    row = read_metrics(run_dir)[0]
    assert np.isclose(row['train_acc'], (8 * a1 + 2 * a2) / 10, atol=1e-6), (row, seen)
    assert np.isclose(row['train_loss'], (8 * l1 + 2 * l2) / 10, rtol=1e-5), (row, seen)
