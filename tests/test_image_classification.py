"""N-MNIST / SHD classification: tonic's real readers on tiny datasets written in the official on-disk
formats, framing and its cache, batching, step weights, short training runs for every method, and the
message for a missing dataset."""
import csv
import json
import math
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from rsnn import event_data  # noqa: E402
import fake_data as fakes  # noqa: E402  (the fixture below is called fake_data)
from rsnn import train_loop  # noqa: E402
from rsnn.trainer import Trainer, step_schedule  # noqa: E402
import utils  # noqa: E402
from rsnn import run_folder  # noqa: E402
from conftest import load_script  # noqa: E402

SCRIPT = os.path.join(ROOT, 'task-image-classification.py')
N_CLASSES = 4          # classes present in the fake sets (the networks still have 10 / 20 outputs)
NMNIST, SHD = event_data.event_dataset('nmnist'), event_data.event_dataset('shd')


task = load_script('task-image-classification.py')


def _nmnist_check_small(self):
    # tonic demands 10000 .bin files per split before reading any (tonic's own tests patch this too).
    return self._is_file_present() and self._folder_contains_at_least_n_files_of_type(1, '.bin')


@pytest.fixture(autouse=True)
def small_nmnist_ok(monkeypatch):
    import tonic.datasets
    monkeypatch.setattr(tonic.datasets.NMNIST, '_check_exists', _nmnist_check_small)


@pytest.fixture(scope='module')
def fake_data(tmp_path_factory):
    """Class-separable fake N-MNIST and SHD (64 train / 32 test samples, 4 classes) in one --data_dir."""
    root = str(tmp_path_factory.mktemp('data'))
    fakes.write_nmnist_files(root, fakes.synthetic_event_samples(
        'nmnist', 64, 32, n_classes=N_CLASSES, events_per_sample=200, seed=1))
    fakes.write_shd_files(root, fakes.synthetic_event_samples(
        'shd', 64, 32, n_classes=N_CLASSES, events_per_sample=200, seed=2))
    return root


def reference_frames(t_us, channel, T, n_in):
    """ToFrame(n_time_bins=T) by hand: bin width (t_last - t_first) // T, bins [t0 + i w, t0 + (i+1) w)."""
    t = np.asarray(t_us, np.int64)
    out = np.zeros((T, n_in), np.float32)
    if len(t) == 0:
        return out
    w = (t[-1] - t[0]) // T
    if w == 0:
        return out
    b = (t - t[0]) // w
    keep = b < T
    np.add.at(out, (b[keep], np.asarray(channel)[keep]), 1.)
    return out


# --------------------------------------------------------------------------------------------
# Reading and framing
# --------------------------------------------------------------------------------------------


def test_nmnist_frames_through_tonic(tmp_path):
    T = 10
    rng = np.random.default_rng(0)
    samples = []
    for label in (3, 7):
        n = 50
        t = np.sort(rng.integers(0, 150_000, n))        # a third of them after the first saccade (100 ms)
        t[0] = 0
        samples.append((label, rng.integers(0, 34, n), rng.integers(0, 34, n), t, rng.integers(0, 2, n)))
    # A third sample whose events are laid out by hand: last kept event exactly at the end of the span.
    t = np.array([0, 50, 100, 250, 999, 1000, 120_000])
    x = np.array([1, 2, 3, 4, 5, 6, 7])
    y = np.array([0, 1, 2, 3, 4, 33, 0])
    p = np.array([0, 1, 0, 1, 0, 1, 1])
    samples.append((5, x, y, t, p))
    fakes.write_nmnist_files(str(tmp_path), {'train': samples, 'test': samples[:1]})

    split = event_data.load_framed_split(NMNIST, str(tmp_path), True, T, progress=False)
    assert len(split) == 3
    by_label = {s[0]: s for s in samples}                  # tonic lists the samples digit by digit
    for i in range(3):
        frame, target = split[i]
        label, x, y, t, p = by_label[target]
        assert frame.shape == (T, 2312) and frame.dtype == np.float32
        keep = t < 100_000                                 # first saccade only
        ref = reference_frames(t[keep], (p * 34 * 34 + y * 34 + x)[keep], T, 2312)
        np.testing.assert_array_equal(frame, ref)
        assert split.n_events(i) == int(ref.sum()) > 0
    assert sorted(split.labels.tolist()) == [3, 5, 7]
    # The hand-made sample: span 1000 us, bins of 100 us; the event at t = 1000 falls outside (tonic
    # drops the last event) and the one at 120 ms is after the first saccade: 5 of 7 events counted.
    frame, _ = split[int(np.flatnonzero(split.labels == 5)[0])]
    assert frame.sum() == 5
    assert frame[0, 0 * 1156 + 0 * 34 + 1] == 1 and frame[0, 1156 + 1 * 34 + 2] == 1
    assert frame[1, 2 * 34 + 3] == 1 and frame[2, 1156 + 3 * 34 + 4] == 1 and frame[9, 4 * 34 + 5] == 1

    # The cache holds exactly what tonic's own ToFrame gives.
    import tonic
    ds = tonic.datasets.NMNIST(str(tmp_path), train=True, first_saccade_only=True,
                               transform=tonic.transforms.ToFrame(sensor_size=(34, 34, 2), n_time_bins=T))
    for i in range(3):
        frames, label = ds[i]
        assert label == split[i][1]
        np.testing.assert_array_equal(split[i][0], frames.reshape(T, -1).astype(np.float32))


def test_shd_frames_through_tonic(tmp_path):
    T = 8
    rng = np.random.default_rng(1)
    samples = []
    for label in (0, 19, 4):
        n = 60
        times = np.sort(rng.uniform(0., 0.9, n))
        samples.append((label, rng.integers(0, 700, n), times))
    samples.append((2, np.array([699, 0, 5]), np.array([0., 0.5, 0.75])))
    fakes.write_shd_files(str(tmp_path), {'train': samples, 'test': samples})
    split = event_data.load_framed_split(SHD, str(tmp_path), False, T, progress=False)
    assert len(split) == 4
    for i, (label, units, times) in enumerate(samples):
        frame, target = split[i]
        assert frame.shape == (T, 700) and frame.dtype == np.float32
        t_us = (np.asarray(times, np.float16).astype(np.float64) * 1e6).astype(np.int64)  # as tonic reads
        np.testing.assert_array_equal(frame, reference_frames(t_us, units, T, 700))
        assert target == label
    frame, _ = split[3]
    assert frame.sum() == 2 and frame[0, 699] == 1 and frame[5, 0] == 1   # the last event is dropped


def test_cache_is_reused_and_keyed_by_transform(fake_data, tmp_path, monkeypatch):
    import tonic.transforms
    cache = str(tmp_path / 'cache')
    first = event_data.load_framed_split(SHD, fake_data, True, 12, cache_dir=cache, progress=False)

    def no_framing(*a, **k):
        raise AssertionError('the cached split was framed again')

    monkeypatch.setattr(tonic.transforms.ToFrame, '__call__', no_framing)
    again = event_data.load_framed_split(SHD, fake_data, True, 12, cache_dir=cache, progress=False)
    assert again.folder == first.folder
    np.testing.assert_array_equal(again[5][0], first[5][0])
    monkeypatch.undo()
    other = event_data.load_framed_split(SHD, fake_data, True, 13, cache_dir=cache, progress=False)
    assert other.folder != first.folder and other[0][0].shape == (13, 700)
    meta = json.load(open(os.path.join(other.folder, 'meta.json')))
    assert 'n_time_bins=13' in meta['transform'] and meta['n_samples'] == 64


def test_batches_time_major_padding_and_workers(fake_data, tmp_path):
    split = event_data.load_framed_split(NMNIST, fake_data, True, 6, cache_dir=str(tmp_path), progress=False)
    test = event_data.load_framed_split(NMNIST, fake_data, False, 6, cache_dir=str(tmp_path), progress=False)
    train_batches, test_batches = event_data.event_loaders(split, test, batch_size=24, seed=0, n_workers=1,
                                                         eval_batches=1)
    batches = list(train_batches(1))        # 64 samples: 24 + 24 + 16 (the short one is kept)
    assert [b[0].shape for b in batches] == [(6, 24, 2312), (6, 24, 2312), (6, 16, 2312)]
    assert all(b[0].dtype == np.float32 and b[1].dtype == np.int32 for b in batches)
    order = np.random.default_rng([0, 1, 7]).permutation(64)
    np.testing.assert_array_equal(batches[0][0][:, 3], split[order[3]][0])
    assert sorted(np.concatenate([b[1] for b in batches]).tolist()) == sorted(split.labels.tolist())
    assert len(list(test_batches())) == 1
    again = list(train_batches(1))          # the same epoch gives the same batches; another does not
    np.testing.assert_array_equal(again[1][0], batches[1][0])
    assert not np.array_equal(list(train_batches(2))[0][1], batches[0][1])
    it = iter(train_batches(1))              # a consumer that stops early (NaN, acc_th) stops the prefetch
    np.testing.assert_array_equal(next(it)[0], batches[0][0])
    it.close()
    assert len(list(train_batches(1))) == 3
    args = task.build_parser().parse_args(['--batch_size', '24', '--drop_last'])
    assert args.drop_last == 1
    train_batches, _ = event_data.event_loaders(split, test, batch_size=args.batch_size, seed=args.seed,
                                              drop_last=args.drop_last)
    assert [b[0].shape[1] for b in train_batches(1)] == [24, 24]


def test_step_weights():
    np.testing.assert_allclose(task.step_weights(10, 0.), np.full(10, 0.1, np.float32))
    w = task.step_weights(20, 0.25)                  # a fraction of T
    assert (w[:5] == 0).all() and np.allclose(w[5:], 1 / 15)
    w = task.step_weights(20, 3)                     # a step count
    assert (w[:3] == 0).all() and np.allclose(w[3:], 1 / 17) and np.isclose(w.sum(), 1)
    with pytest.raises(utils.UserError):
        task.step_weights(20, 20)


def test_readme_flags_parse():
    base = ('--devices 0 --dataset nmnist --data_length 400 {e} 100 --n_layer 3 --n_rec 512 --method {m} '
            '--model lif-delta --exp_name test-nmnist --warmup_ratio 0.')
    for e in ('--epoch', '--epochs'):
        for m, extra in (('bptt', ''), ('expsm_diag', ' --etrace_decay 0.9'), ('diag', '')):
            args = run_folder.parse_args(task.build_parser(), (base.format(e=e, m=m) + extra).split())
            assert (args.epochs, args.data_length, args.n_layer, args.n_rec, args.method, args.model) == \
                (100, 400, 3, 512, m, 'lif-delta')
            assert args.warmup_ratio == 0. and args.data_dir == './data' and args.exp_name == 'test-nmnist'
    args = task.build_parser().parse_args('--dataset shd --lr_milestones 30,60 --weight_L2 1e-4 --loss mse '
                                          '--tau_mem 20 --tau_mem_sigma 2 --tau_o 15 --V_th 0.5 --ff_scale 3 '
                                          '--rec_scale 1 --spk_reset hard --drop_last 0'.split())
    assert args.lr_milestones == [30, 60] and args.weight_L2 == 1e-4 and args.loss == 'mse'
    assert (args.tau_mem, args.tau_mem_sigma, args.tau_o, args.V_th) == (20, 2, 15, 0.5)
    assert (args.ff_scale, args.rec_scale, args.spk_reset, args.drop_last) == (3, 1, 'hard', 0)
    args = task.build_parser().parse_args('--tau_syn 8 --tau_adapt 50 --beta 0.7'.split())
    assert (args.tau_syn, args.tau_adapt, args.beta) == (8, 50, 0.7)
    helptext = task.build_parser().format_help()
    for flag in ('--dataset', '--data_length', '--n_layer', '--n_rec', '--model', '--warmup_ratio', '--exp_name',
                 '--data_dir', '--loss', '--tau_mem', '--tau_mem_sigma', '--tau_o', '--V_th', '--ff_scale',
                 '--rec_scale', '--spk_reset', '--lr_milestones', '--weight_L2', '--drop_last',
                 '--batches_per_epoch', '--eval_batches', '--n_data_worker', '--epoch', '--tau_syn', '--tau_adapt',
                 '--beta'):
        assert flag in helptext


def test_neuron_constants_reach_the_layers():
    import models
    net = models.SpikingStack(4, 3, 2, 2, model='alif-delta', tau_syn=8., tau_adapt=50., beta=0.7)
    for layer in net.layers:
        assert layer.beta == 0.7 and np.isclose(layer.adapt_decay, np.exp(-1 / 50))
        assert np.isclose(layer.syn_decay, np.exp(-1 / 8))
    default = models.SpikingStack(4, 3, 2, 1, model='alif-delta').layers[0]
    assert default.beta == 1.8 and np.isclose(default.adapt_decay, np.exp(-1 / 200))


# --------------------------------------------------------------------------------------------
# Training (in-process, tiny)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize('dataset', ['nmnist', 'shd'])
@pytest.mark.parametrize('method', ['bptt', 'diag', 'expsm_diag'])
def test_short_training_run(dataset, method, fake_data, tmp_path, monkeypatch):
    seen = {}
    import rsnn.trainer
    real_schedule, real_trainer = step_schedule, Trainer

    def schedule(lr, milestones, batches_per_epoch, factor=0.1):
        seen['schedule'] = (lr, list(milestones), batches_per_epoch)
        return real_schedule(lr, milestones, batches_per_epoch, factor)

    class SeenTrainer(real_trainer):
        def __init__(self, *a, **k):
            seen['trainer'] = k
            super().__init__(*a, **k)

    monkeypatch.setattr(rsnn.trainer, 'step_schedule', schedule)
    monkeypatch.setattr(rsnn.trainer, 'Trainer', SeenTrainer)
    run_dir = str(tmp_path / 'run')
    argv = (f'--devices cpu --dataset {dataset} --data_dir {fake_data} --data_length 12 --epoch 4 '
            f'--n_layer 1 --n_rec 16 --method {method} --batch_size 16 --lr 0.01 --warmup_ratio 0.25 '
            f'--lr_milestones 3 --weight_L2 1e-5 --out_dir {run_dir} --no_progress --exp_name t').split()
    args = run_folder.parse_args(task.build_parser(), argv)
    summary = task.train_and_evaluate(args, run_dir)
    with open(os.path.join(run_dir, 'metrics.csv')) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and summary['epochs_run'] == 4
    losses = [float(r['train_loss']) for r in rows]
    assert losses[-1] < 0.7 * losses[0], losses
    test_acc = float(rows[-1]['test_acc'])
    assert test_acc >= 0.75, (test_acc, rows)            # chance: 1/4 of the classes present
    assert summary['best_test_acc'] == max(float(r['test_acc']) for r in rows)
    assert summary['test_acc'] == test_acc
    for r in rows:
        assert float(r['data_wait_s_per_batch']) >= 0 and float(r['step_s_per_batch']) > 0
    for name in ('config.json', 'metrics.csv', 'summary.json', 'learning_curves.png'):
        assert os.path.getsize(os.path.join(run_dir, name)) > 0, name
    with open(os.path.join(run_dir, 'learning_curves.png'), 'rb') as f:
        head = f.read(24)
    assert head[:8] == b'\x89PNG\r\n\x1a\n' and struct.unpack('>II', head[16:24]) == (1000, 400)
    assert os.listdir(os.path.join(run_dir, 'checkpoints', 'last'))
    assert os.listdir(os.path.join(run_dir, 'checkpoints', 'best'))
    config = json.load(open(os.path.join(run_dir, 'config.json')))
    assert config['n_in'] == (2312 if dataset == 'nmnist' else 700) and config['warmup_steps'] == 3
    assert seen['schedule'] == (0.01, [3], 4)            # 64 samples / batch 16
    assert seen['trainer']['weight_L2'] == 1e-5 and seen['trainer']['loss'] == 'cel'


# --------------------------------------------------------------------------------------------
# A missing dataset
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize('dataset,folder', [('nmnist', 'NMNIST'), ('shd', 'SHD')])
def test_missing_dataset_message(dataset, folder, tmp_path):
    data_dir = tmp_path / 'nowhere' / 'data'
    out_dir = tmp_path / 'run'
    # A proxy on a closed port: the download fails at once even on a machine that is online.
    env = dict(os.environ, http_proxy='http://127.0.0.1:9', https_proxy='http://127.0.0.1:9',
               HTTP_PROXY='http://127.0.0.1:9', HTTPS_PROXY='http://127.0.0.1:9', no_proxy='', NO_PROXY='')
    proc = subprocess.run([sys.executable, SCRIPT, '--dataset', dataset, '--data_dir', str(data_dir),
                           '--out_dir', str(out_dir), '--devices', 'cpu'],
                          capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and 'Traceback' not in proc.stderr, proc.stderr
    msg = lines[0]
    assert msg.startswith('error: ') and str(data_dir / folder) in msg
    info = event_data.event_dataset(dataset)
    for name, url in info.urls:
        assert name in msg and url in msg
    for f in info.train_files + info.test_files:
        assert f.split(' ')[0] in msg
    assert sorted(os.listdir(tmp_path)) == []           # neither the data folders nor the run folder


def test_missing_dataset_keeps_what_was_there(tmp_path, monkeypatch):
    """In-process: a failed download removes only what it created (a partial archive), not the user's files."""
    import tonic.dataset
    data_dir = tmp_path / 'data'
    (data_dir / 'SHD').mkdir(parents=True)
    (data_dir / 'SHD' / 'notes.txt').write_text('mine')

    def failing_download(url, root, filename=None, md5=None, **k):
        with open(os.path.join(root, filename), 'wb') as f:
            f.write(b'partial')
        raise OSError('connection reset')

    monkeypatch.setattr(tonic.dataset, 'download_and_extract_archive', failing_download)
    with pytest.raises(utils.UserError, match='connection reset'):
        event_data.open_tonic_dataset(SHD, str(data_dir), True)
    assert sorted(os.listdir(data_dir / 'SHD')) == ['notes.txt']


# --------------------------------------------------------------------------------------------
# Realistic synthetic data (scripts/synthetic_events.py): learning, firing rates, the silent-layer warning
# --------------------------------------------------------------------------------------------


load_generator = fakes.load_generator


@pytest.fixture(scope='module')
def realistic_data(tmp_path_factory):
    gen = load_generator()
    root = str(tmp_path_factory.mktemp('realistic'))
    gen.write_nmnist(root, gen.nmnist_recordings(300, 100, seed=0), dict(seed=0))
    gen.write_shd(root, gen.shd_samples(300, 100, seed=0), dict(seed=0))
    return root


def test_generators_formats_and_stats(realistic_data):
    gen = load_generator()
    import tonic
    ds = tonic.datasets.NMNIST(realistic_data, train=False)        # the whole recording, all saccades
    assert len(ds) == 100 and os.path.isfile(os.path.join(realistic_data, 'NMNIST', 'SYNTHETIC.json'))
    ev, label = ds[0]
    assert 1500 < len(ev) < 7000 and np.all(np.diff(ev['t']) >= 0) and 0 <= label < 10
    assert 250_000 < ev['t'][-1] <= 300_000 and 0.35 < ev['p'].mean() < 0.65
    assert ev['x'].max() < 34 and ev['y'].max() < 34
    shd = tonic.datasets.SHD(realistic_data, train=True)
    ev, label = shd[0]
    assert 2000 < len(ev) < 20000 and ev['x'].max() < 700 and 0 <= label < 20
    import h5py
    with h5py.File(os.path.join(realistic_data, 'SHD', 'shd_train.h5')) as f, \
            h5py.File(os.path.join(realistic_data, 'SHD', 'shd_test.h5')) as g:
        assert not set(f['extra/speaker'][:]) & set(g['extra/speaker'][:])   # disjoint speakers
    # no blob: one pixel does not tell the digits apart
    small = gen.nmnist_recordings(200, 100, seed=3)
    Xtr, Xte = gen.nmnist_features(small['train']), gen.nmnist_features(small['test'])
    ytr, yte = (np.array([r[0] for r in small[s]]) for s in ('train', 'test'))
    assert gen.single_feature_accuracy(Xtr, ytr, Xte, yte, 10) < 0.35


def _run(dataset, method, data_dir, tmp_path, extra=''):
    run_dir = str(tmp_path / f'run-{dataset}-{method}')
    argv = (f'--devices cpu --dataset {dataset} --data_dir {data_dir} --data_length 50 --n_layer 1 '
            f'--n_rec 64 --method {method} --batch_size 50 --lr 0.01 --out_dir {run_dir} --no_progress '
            f'--exp_name t {extra}').split()
    args = run_folder.parse_args(task.build_parser(), argv)
    summary = task.train_and_evaluate(args, run_dir)
    with open(os.path.join(run_dir, 'metrics.csv')) as f:
        return summary, list(csv.DictReader(f))


@pytest.mark.parametrize('dataset,method', [('nmnist', 'bptt'), ('nmnist', 'expsm_diag'), ('shd', 'bptt')])
def test_learns_realistic_data(dataset, method, realistic_data, tmp_path, capsys):
    summary, rows = _run(dataset, method, realistic_data, tmp_path, '--epochs 4')
    chance = 0.1 if dataset == 'nmnist' else 0.05
    assert summary['best_test_acc'] >= 3 * chance, rows
    for r in rows:
        assert 0 < float(r['rate_layer0']) < 1
    assert 'warning' not in capsys.readouterr().out


def test_silent_layer_warning(realistic_data, tmp_path, capsys):
    summary, rows = _run('nmnist', 'bptt', realistic_data, tmp_path, '--epochs 1 --ff_scale 1e-4 --rec_scale 0 --lr 1e-7 --init_rate 0')
    out = capsys.readouterr().out
    lines = [l for l in out.splitlines() if l.startswith('warning')]
    assert len(lines) == 1 and 'layer 0' in lines[0] and '--ff_scale' in lines[0], out
    assert float(rows[0]['rate_layer0']) < 1e-3


def test_silence_warning_rules():
    assert train_loop.silence_warning([0.02, 0.01], [1.0] * 30, 10) is None
    msg = train_loop.silence_warning([0.02, 1e-5], [1.0] * 30, 10)
    assert 'layer 1' in msg and '--rec_scale' in msg
    stuck = [math.log(10)] * 30
    assert '--lr' in train_loop.silence_warning([0.02], stuck, 10)
    assert train_loop.silence_warning([0.02], stuck[:5], 10) is None        # too few batches to judge


def test_kaiming_leaves_layer0_silent_and_calibration_sets_the_rates(realistic_data, tmp_path):
    """The root cause of the README N-MNIST size not learning, and its fix: on sparse event frames
    (T = 400) Kaiming's fan-in init leaves layer 0 all but silent, and a --ff_scale large enough to wake
    it makes the layers above saturate; models.calibrate_feedforward brings every layer to the target rate."""
    import brainstate
    import jax.numpy as jnp
    import models
    split = event_data.load_framed_split(NMNIST, realistic_data, True, 400, progress=False)
    xs, _ = split.batch(np.arange(16))
    brainstate.environ.set(dt=1.)

    def rates(model):
        brainstate.nn.init_all_states(model, xs.shape[1])
        h = jnp.asarray(xs)
        out = []
        for layer in model.layers:
            h = layer.run_sequence(h)
            out.append(float(h.mean()))
        return out

    r = rates(models.SpikingStack(2312, 64, 10, 3, ff_scale=10., rec_scale=2., seed=0))
    assert r[0] < 1e-3, r
    r = rates(models.SpikingStack(2312, 64, 10, 3, ff_scale=100., rec_scale=0.5, seed=0))
    assert r[0] > 5e-3 and r[2] > 0.2, r
    model = models.SpikingStack(2312, 64, 10, 3, ff_scale=10., rec_scale=0.5, seed=0)
    factors, after = models.calibrate_feedforward(model, xs, 0.05)
    assert factors[0] > 2 and all(f < 1 for f in factors[1:]), factors
    assert np.allclose(rates(model), 0.05, rtol=0.15) and np.allclose(after, rates(model), rtol=1e-5), after


@pytest.mark.parametrize('detach', [True, False])
def test_gradient_through_the_reset(detach):
    """dV_t/dV_{t-1} of a LIF neuron: decay with a detached reset; decay * (1 - V_th * surrogate') when the
    reset carries gradient (the authors' LIF, --detach_reset 0), which keeps BPTT's backward pass through
    400 steps from growing (docs/image-classification.md, "Why the README size learns")."""
    import brainstate
    import jax
    import jax.numpy as jnp
    import models
    layer = models.RecurrentLIFLayer(3, 4, dt=1., tau_mem=10., tau_mem_sigma=0., V_th=1., ff_scale=1., rec_scale=0.,
                                 spk_fun='relu', spk_reset='soft', rng=np.random.default_rng(0),
                                 detach_reset=detach)
    brainstate.nn.init_all_states(layer, 1)
    v0 = jnp.array([[0.2, 0.8, 1.3, 2.5]])

    def step(v):
        layer.V.value = v
        layer.update(jnp.zeros((1, 3)))
        return layer.V.value

    jac = np.diag(np.asarray(jax.jacobian(step)(v0))[0, :, 0, :])
    decay = np.exp(-1. / 10.)
    surrogate = 0.3 * np.maximum(0., 1. - np.abs(np.asarray(v0[0]) - 1.))
    expected = decay * (1. if detach else 1. - surrogate)
    assert np.allclose(jac, expected, rtol=1e-5), (jac, expected)


def test_smoke_preset_makes_its_stand_in_and_two_methods_differ(tmp_path, monkeypatch, capsys):
    """--preset smoke (the README's smoke run): the tiny synthetic stand-in is made in data/synthetic-smoke on
    first use, the run takes the preset's sizes, and BPTT and ES-D-RTRL on the same batches end with different
    losses."""
    monkeypatch.chdir(tmp_path)
    summaries, losses = {}, {}
    for method in ('bptt', 'expsm_diag'):
        run_dir = str(tmp_path / method)
        assert task.main(['--preset', 'smoke', '--method', method, '--no_progress', '--out_dir', run_dir]) == 0
        config = json.load(open(os.path.join(run_dir, 'config.json')))
        assert (config['n_rec'], config['data_length'], config['n_train'], config['n_test']) == (64, 50, 128, 64)
        summaries[method] = run_folder.read_summary(run_dir)
        losses[method] = [float(r['train_loss']) for r in utils.read_csv(os.path.join(run_dir, 'metrics.csv'))]
    assert os.path.isfile(tmp_path / 'data' / 'synthetic-smoke' / 'NMNIST' / event_data.SYNTHETIC_MARKER)
    assert capsys.readouterr().err.count('making its tiny synthetic stand-in') == 1  # once, then reused
    for s in summaries.values():
        assert s['epochs_run'] == 2 and s['batches_run'] == 16 and 0 <= s['test_acc'] <= 1
    assert len(losses['bptt']) == 2 and losses['bptt'] != losses['expsm_diag']
