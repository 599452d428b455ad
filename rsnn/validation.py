"""The validation split of the image task (--validation N): N training samples held apart, the same N for
every run on the same data (a permutation by a fixed key, not by --seed), so that the rules and seeds of a
benchmark are tuned on one validation set and never on the test split. The DMS task draws its validation trials
from a generator key of their own (datasets.VALIDATION_KEY, dms_stream.VALIDATION_SALT).
"""
from __future__ import annotations

import numpy as np

HOLD_APART_KEY = 20261204  # the permutation that picks the held-apart samples


class SubsetSplit:
    """Samples `indices` of a framed split (rsnn.event_data.FramedSplit) as a split of their own."""

    def __init__(self, split, indices):
        self.split, self.indices = split, np.asarray(indices, np.int64)
        self.folder, self.meta = split.folder, split.meta
        self.n_time_bins, self.n_in = split.n_time_bins, split.n_in
        self.labels = np.asarray(split.labels)[self.indices]

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.split[int(self.indices[i])]

    def n_events(self, i: int) -> int:
        return self.split.n_events(int(self.indices[i]))

    def sparse_batch(self, indices):
        return self.split.sparse_batch(self.indices[np.asarray(indices, np.int64)])

    def batch(self, indices):
        return self.split.batch(self.indices[np.asarray(indices, np.int64)])


def hold_apart(split, n: int):
    """(the training samples left, the n held apart) of a training split; n must leave at least one."""
    if not 0 < n < len(split):
        raise ValueError(f'--validation {n}: the training split has {len(split)} samples; hold apart between 1 '
                         f'and {len(split) - 1}')
    order = np.random.default_rng(HOLD_APART_KEY).permutation(len(split))
    return SubsetSplit(split, np.sort(order[n:])), SubsetSplit(split, np.sort(order[:n]))
