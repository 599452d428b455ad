"""The official on-disk formats that tonic reads, written from events in memory: N-MNIST's 40-bit .bin files in
their Train/Test folders (and the zip files tonic checks for), SHD's shd_{train,test}.h5, and the marker of a
synthetic set (rsnn.event_data.SYNTHETIC_MARKER). scripts/synthetic_events.py and the tests' tiny datasets
(tests/fake_data.py) write through these."""
from __future__ import annotations

import json
import os
import time

import numpy as np

from rsnn.event_data import SYNTHETIC_MARKER


def encode_nmnist_events(x, y, t_us, p) -> bytes:
    """N-MNIST's 40-bit events: x, y, polarity in bit 7 + timestamp bits 22-16, timestamp bits 15-0."""
    x, y, t, p = (np.asarray(a, np.int64) for a in (x, y, t_us, p))
    if np.any(t >= 2 ** 23) or np.any(t < 0):
        raise ValueError('N-MNIST timestamps must lie in [0, 2^23) microseconds')
    raw = np.empty((len(t), 5), np.uint8)
    raw[:, 0], raw[:, 1] = x, y
    raw[:, 2] = (p << 7) | ((t >> 16) & 0x7F)
    raw[:, 3], raw[:, 4] = (t >> 8) & 0xFF, t & 0xFF
    return raw.tobytes()


def zip_folder(zip_path: str, folder: str):
    import zipfile
    with zipfile.ZipFile(zip_path, 'w', zipfile.ZIP_STORED) as z:
        for root, _, files in os.walk(folder):
            for n in sorted(files):
                p = os.path.join(root, n)
                z.write(p, os.path.relpath(p, os.path.dirname(folder)))


def write_nmnist_files(data_dir: str, samples: dict, zip_folders: bool = True):
    """Write <data_dir>/NMNIST/{Train,Test}/<digit>/<id>.bin and train.zip/test.zip.

    samples: {'train': [(label, x, y, t_us, p), ...], 'test': [...]}. tonic demands 10000 .bin files per
    split before it reads any; a smaller set is read through rsnn/tonic_adapter.py, which relaxes that check.
    """
    root = os.path.join(data_dir, 'NMNIST')
    for split, folder, zname in (('train', 'Train', 'train.zip'), ('test', 'Test', 'test.zip')):
        base = os.path.join(root, folder)
        for k, (label, x, y, t, p) in enumerate(samples.get(split, [])):
            d = os.path.join(base, str(int(label)))
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, f'{k:05d}.bin'), 'wb') as f:
                f.write(encode_nmnist_events(x, y, t, p))
        os.makedirs(base, exist_ok=True)
        if zip_folders:
            zip_folder(os.path.join(root, zname), base)
        else:
            open(os.path.join(root, zname), 'wb').close()
    return root


def write_shd_files(data_dir: str, samples: dict, n_speakers: int = 3):
    """Write <data_dir>/SHD/shd_{train,test}.h5 (+ the .zip files tonic checks for) in the layout of the
    release: spikes/times (vlen float16, s), spikes/units (vlen uint16), labels (uint16), extra/keys,
    extra/speaker. samples: {'train': [(label, units, times_s), ...], 'test': [...]}; a row may carry a
    fourth item, its speaker id (otherwise speakers cycle through n_speakers)."""
    import h5py
    import zipfile
    root = os.path.join(data_dir, 'SHD')
    os.makedirs(root, exist_ok=True)
    keys = [f'{lang}-{d}'.encode() for lang in ('english', 'german') for d in range(10)]
    for split in ('train', 'test'):
        rows = samples.get(split, [])
        path = os.path.join(root, f'shd_{split}.h5')
        with h5py.File(path, 'w') as f:
            times = f.create_dataset('spikes/times', (len(rows),), dtype=h5py.vlen_dtype(np.float16))
            units = f.create_dataset('spikes/units', (len(rows),), dtype=h5py.vlen_dtype(np.uint16))
            for i, (_, u, t, *_) in enumerate(rows):
                times[i] = np.asarray(t, np.float16)
                units[i] = np.asarray(u, np.uint16)
            f.create_dataset('labels', data=np.asarray([r[0] for r in rows], np.uint16))
            f.create_dataset('extra/keys', data=np.asarray(keys))
            speaker = [r[3] if len(r) > 3 else i % n_speakers for i, r in enumerate(rows)]
            f.create_dataset('extra/speaker', data=np.asarray(speaker, np.uint16))
        with zipfile.ZipFile(path + '.zip', 'w') as z:
            z.write(path, os.path.basename(path))
    return root


def write_marker(folder: str, info: dict):
    """The marker event_data.open_tonic_dataset looks for; its content (with the creation time) also keys the
    frame cache, so a regenerated set with the same file names is framed again."""
    info = dict(info, created=time.strftime('%Y-%m-%dT%H:%M:%S'), created_ns=time.time_ns())
    with open(os.path.join(folder, SYNTHETIC_MARKER), 'w') as f:
        json.dump(info, f, indent=2)
