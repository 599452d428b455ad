"""Damaged N-MNIST / SHD files and frame caches (issue 17, items 8-10): one error line naming the file and
what is wrong, never a NaN run or a raw IndexError; a damaged cache is rebuilt; no empty run folder."""
import glob
import os

import numpy as np
import pytest

from rsnn import event_data
import fake_data as fakes
import utils
from conftest import load_script
from test_image_classification import _nmnist_check_small

NMNIST, SHD = event_data.event_dataset('nmnist'), event_data.event_dataset('shd')
T = 8


@pytest.fixture(autouse=True)
def small_nmnist_ok(monkeypatch):
    import tonic.datasets
    monkeypatch.setattr(tonic.datasets.NMNIST, '_check_exists', _nmnist_check_small)


def samples(name, n_train=6, n_test=4):
    return fakes.synthetic_event_samples(name, n_train, n_test, n_classes=4, events_per_sample=50, seed=3)


def write(name, root, data):
    if name == 'nmnist':
        fakes.write_nmnist_files(root, data, zip_folders=False)
    else:
        fakes.write_shd_files(root, data)


def frame(info, root, train=True):
    return event_data.load_framed_split(info, root, train, T, cache_dir=os.path.join(root, 'cache'), progress=False)


def first_bin(root):
    return sorted(glob.glob(os.path.join(root, 'NMNIST', 'Train', '*', '*.bin')))[0]


def test_truncated_nmnist_file_is_named(tmp_path):
    root = str(tmp_path)
    write('nmnist', root, samples('nmnist'))
    path = first_bin(root)
    with open(path, 'r+b') as f:
        f.truncate(7)
    with pytest.raises(utils.UserError, match=f'{path} cannot be read'):
        frame(NMNIST, root)


def test_nmnist_event_off_the_sensor_is_named(tmp_path):
    root, data = str(tmp_path), samples('nmnist')
    label, x, y, t, p = data['train'][0]
    x = np.array(x)
    x[3] = 40  # a 34-pixel sensor
    data['train'][0] = (label, x, y, t, p)
    write('nmnist', root, data)
    with pytest.raises(utils.UserError, match=r'00000\.bin cannot be read: ValueError: an event has x = 40, outside'):
        frame(NMNIST, root)


@pytest.mark.parametrize('damage, fragment', [
    ('unit_800', r'shd_train\.h5 \(sample 1\) cannot be read: ValueError: an event has unit = 800'),
    ('label_50', r'shd_train\.h5 \(sample 2\): label 50 is outside the 20 classes'),
    ('no_labels', r'shd_train\.h5 cannot be read: KeyError'),
    ('no_units', r'shd_train\.h5 cannot be read: KeyError'),  # the file's lengths are checked first
])
def test_damaged_shd_file_is_named(tmp_path, damage, fragment):
    root, data = str(tmp_path), samples('shd')
    if damage == 'unit_800':
        label, u, t = data['train'][1]
        data['train'][1] = (label, np.concatenate([u[:-1], [800]]), t)
    elif damage == 'label_50':
        data['train'][2] = (50,) + tuple(data['train'][2][1:])
    write('shd', root, data)
    if damage.startswith('no_'):
        import h5py
        with h5py.File(os.path.join(root, 'SHD', 'shd_train.h5'), 'a') as f:
            del f['labels' if damage == 'no_labels' else 'spikes/units']
    with pytest.raises(utils.UserError, match=fragment):
        frame(SHD, root)


def test_a_truncated_frame_cache_is_rebuilt(tmp_path, capsys):
    root = str(tmp_path)
    write('shd', root, samples('shd'))
    first = frame(SHD, root)
    expected = [first[i][0].copy() for i in range(len(first))]
    with open(os.path.join(first.folder, 'index.bin'), 'r+b') as f:
        f.truncate(os.path.getsize(os.path.join(first.folder, 'index.bin')) // 2)
    capsys.readouterr()
    again = frame(SHD, root)
    assert 'is damaged (index.bin holds' in capsys.readouterr().out
    assert again.folder == first.folder and len(again) == len(expected)
    for i, x in enumerate(expected):
        assert np.array_equal(again[i][0], x)


@pytest.mark.parametrize('case, fragment', [
    ('empty_test_split', 'test split .* has no samples'),
    ('label_50', 'label 50 is outside'),
])
def test_bad_data_stops_the_script_before_the_run_folder_exists(tmp_path, case, fragment):
    root, data = str(tmp_path / 'data'), samples('shd')
    if case == 'empty_test_split':
        data['test'] = []
    else:
        data['test'][0] = (50,) + tuple(data['test'][0][1:])
    write('shd', root, data)
    task = load_script('task-image-classification.py')
    out = tmp_path / 'run'
    with pytest.raises(utils.UserError, match=fragment):
        task.main(['--dataset', 'shd', '--data_dir', root, '--data_length', str(T), '--n_layer', '1',
                   '--n_rec', '8', '--batch_size', '2', '--epochs', '1', '--devices', 'cpu', '--no_progress',
                   '--out_dir', str(out)])
    assert not out.exists()


def test_summary_json_holds_null_not_nan(tmp_path):
    path = str(tmp_path / 'summary.json')
    utils.write_json(path, dict(test_acc=float('nan'), seconds=np.float32('inf'), rows=[1.5, float('nan')]))
    text = open(path).read()
    assert 'NaN' not in text and 'Infinity' not in text
    import json
    assert json.loads(text) == dict(test_acc=None, seconds=None, rows=[1.5, None])
