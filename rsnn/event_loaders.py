"""The event datasets' batches: sparse frames densified to float32 (T, B, n_in), the epoch sampler (seeded
by (seed, epoch)), and the torch DataLoaders of the training and test splits (rsnn/event_data.py frames and
caches the splits; it re-exports these names)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from rsnn.datasets import worker_loader
from rsnn.errors import UserError

if TYPE_CHECKING:
    from rsnn.event_data import FramedSplit


def densify(pos, cnt, labels, shape):
    """A sparse batch (see FramedSplit.sparse_batch) -> float32 (T, B, n_in), int32 labels."""
    pos, cnt, labels = np.asarray(pos), np.asarray(cnt), np.asarray(labels)
    shape = tuple(int(n) for n in shape)
    xs = np.zeros(int(np.prod(shape)), np.float32)  # calloc: untouched pages cost nothing
    xs[pos] = cnt
    return xs.reshape(shape), labels


class EpochBatchSampler:
    """Index batches of one epoch; set `.epoch` before iterating. Shuffled with a permutation seeded by
    (seed, epoch), so a resumed run sees the batches of an uninterrupted one; `max_batches` caps an
    epoch (quick runs). A last short batch is kept unless drop_last."""

    def __init__(self, n: int, batch_size: int, *, shuffle: bool, drop_last: bool, seed: int,
                 max_batches: int = None):
        self.n, self.batch_size, self.shuffle, self.drop_last = n, batch_size, shuffle, drop_last
        self.seed, self.max_batches, self.epoch = seed, max_batches, 0

    def __len__(self):
        full, rest = divmod(self.n, self.batch_size)
        n = full + (1 if rest and not self.drop_last else 0)
        return min(n, self.max_batches) if self.max_batches else n

    def __iter__(self):
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch, 7]).permutation(self.n)
        else:
            order = np.arange(self.n)
        for b in range(len(self)):
            yield order[b * self.batch_size:(b + 1) * self.batch_size]


class FrameBatches:
    """Map-style dataset for a DataLoader with batch_size=None: an index array -> one sparse batch.

    Workers send the sparse batch (about 1 MB for N-MNIST at B = 128) and the main process densifies it
    (DenseBatches): a dense 473 MB batch (T = 400) through the workers' shared memory took 0.6 s here,
    densifying in the main process 0.05-0.1 s."""

    def __init__(self, split: FramedSplit):
        self.split = split

    def __len__(self):
        return len(self.split)

    def __getitem__(self, indices):
        return self.split.sparse_batch(indices)


class _Failed:
    def __init__(self, error):
        self.error = error


_END = object()


class DenseBatches:
    """Iterate a DataLoader of sparse batches as numpy (xs float32 (T, B, n_in), labels int32); keeps len().

    A background thread densifies the next batch while the current one trains (jax releases the GIL
    while it computes): the dense array is what costs (473 MB of fresh pages per N-MNIST batch at
    T = 400, B = 128), the sparse batch is small. `prefetch` batches wait at most (0: no thread)."""

    def __init__(self, loader, prefetch: int = 1):
        self.loader, self.prefetch = loader, prefetch

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        if self.prefetch <= 0:
            for item in self.loader:
                yield densify(*item)
            return
        import queue
        import threading
        q, stop = queue.Queue(maxsize=self.prefetch), threading.Event()

        def put(item):
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        def produce():
            try:
                for item in self.loader:
                    if not put(densify(*item)):
                        return
                put(_END)
            except BaseException as e:  # handed to the consumer
                put(_Failed(e))

        thread = threading.Thread(target=produce, name='densify-batches', daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is _END:
                    return
                if isinstance(item, _Failed):
                    raise item.error
                yield item
        finally:
            stop.set()          # a consumer that stops early: let the producer finish its batch and quit
            thread.join()


def event_loaders(train_split: FramedSplit, test_split: FramedSplit, *, batch_size: int, seed: int,
                  n_workers: int = 0, drop_last: bool = False, batches_per_epoch: int = None,
                  eval_batches: int = None):
    """train_batches(epoch) and test_batches() for train_loop.fit, each an iterable of numpy
    (xs float32 (T, B, n_in), labels int32 (B,)), loaded by `n_workers` spawned workers.

    Training batches are a permutation seeded by (seed, epoch), at most `batches_per_epoch` of them;
    the test batches a fixed permutation, at most `eval_batches`."""
    train_sampler = EpochBatchSampler(len(train_split), batch_size, shuffle=True,
                                      drop_last=bool(drop_last), seed=seed, max_batches=batches_per_epoch)
    # The test order is a fixed permutation: --eval_batches then evaluates a random, fixed subset
    # (tonic lists N-MNIST sorted by digit).
    test_sampler = EpochBatchSampler(len(test_split), batch_size, shuffle=True, drop_last=False,
                                     seed=seed, max_batches=eval_batches)
    if len(test_split) == 0:
        raise UserError(f'the test split ({test_split.folder}) has no samples: there is nothing to measure '
                        f'test accuracy on; check the dataset files')
    if len(train_sampler) == 0:
        raise UserError(f'the training split has {len(train_split)} samples: no full batch of '
                          f'{batch_size} (drop --drop_last or lower --batch_size)')
    train_loader = worker_loader(FrameBatches(train_split), n_workers, batch_size=None,
                                 sampler=train_sampler)
    test_loader = worker_loader(FrameBatches(test_split), n_workers, batch_size=None,
                                sampler=test_sampler)

    def train_batches(epoch: int):
        train_sampler.epoch = epoch
        return DenseBatches(train_loader)

    def test_batches():
        return DenseBatches(test_loader)

    return train_batches, test_batches
