"""Tiny class-separable event data sets in the official N-MNIST / SHD on-disk formats, for the tests.

The format writers are rsnn/event_files.py's (the realistic generator, scripts/synthetic_events.py, writes
through them too), re-exported here; `synthetic_event_samples` draws the toy samples the tests train on (each
class fires in its own band of pixels or channels). A benchmark set in the same way:

    PYTHONPATH=.:tests python -c "import fake_data as f; \
        f.write_nmnist_files('bench', f.synthetic_event_samples('nmnist', 10000, 10000, \
        events_per_sample=3300, duration_us=300_000), zip_folders=False)"
"""
from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from rsnn import event_data  # noqa: E402


def load_generator():
    """scripts/synthetic_events.py as a module (scripts/ is no package)."""
    if 'synthetic_events' in sys.modules:
        return sys.modules['synthetic_events']
    spec = importlib.util.spec_from_file_location('synthetic_events', os.path.join(ROOT, 'scripts',
                                                                                   'synthetic_events.py'))
    mod = importlib.util.module_from_spec(spec)
    sys.modules['synthetic_events'] = mod
    spec.loader.exec_module(mod)
    return mod


from rsnn.event_files import write_nmnist_files, write_shd_files  # noqa: E402,F401  (the official formats)


def synthetic_event_samples(name: str, n_train: int, n_test: int, *, n_classes: int = None,
                            events_per_sample: int = 300, duration_us: int = 100_000, seed: int = 0):
    """Class-separable random samples for write_nmnist_files / write_shd_files: class k fires inside its
    own band of pixels (N-MNIST: rows, both polarities) or channels (SHD), with 10 % uniform noise."""
    info = event_data.event_dataset(name)
    n_classes = n_classes or info.n_classes
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (('train', n_train), ('test', n_test)):
        rows = []
        for k in range(n):
            label = k % n_classes
            m = events_per_sample
            t = np.sort(rng.integers(0, duration_us, m))
            t[0], t[-1] = 0, duration_us - 1
            noise = rng.random(m) < 0.1
            if name == 'nmnist':
                band = 34 // n_classes
                y = np.where(noise, rng.integers(0, 34, m), label * band + rng.integers(0, max(band, 1), m))
                x = rng.integers(0, 34, m)
                p = rng.integers(0, 2, m)
                rows.append((label, x, y, t, p))
            else:
                band = 700 // n_classes
                u = np.where(noise, rng.integers(0, 700, m), label * band + rng.integers(0, band, m))
                rows.append((label, u, t / 1e6))
        out[split] = rows
    return out
