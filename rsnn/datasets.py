"""The datasets of the experiments: the table below (sizes, where each is read, which script trains on it),
the delayed match-to-sample (DMS) trial generator, and the torch DataLoader helpers that every dataset uses
(N-MNIST and SHD are read through tonic in rsnn/event_data.py; their files and sensor sizes in
rsnn/tonic_data.py).

Every batch is returned time-major: inputs (T, batch, n_in), labels (batch,).
"""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Dataset:
    """One row of the table of datasets: what a script and the docs need to know of a --dataset.

    name: the --dataset value; title; n_in: inputs per time step; n_out: classes (n_classes); train, test:
    the sizes of the training and held-out sets (text); steps: time steps of one sample (text); loader:
    'module:function' that generates or reads it; script: the task script that trains on it; synthetic: the
    stand-in with no download ('generated': the task is its own generator; else the script that writes a
    synthetic copy of the files)."""
    name: str
    title: str
    n_in: int
    n_out: int
    train: str
    test: str
    steps: str
    loader: str
    script: str
    synthetic: str = 'generated'

    @property
    def n_classes(self) -> int:
        return self.n_out


TRIAL_SCRIPT, IMAGE_SCRIPT = 'task-rsnn-long-term-dependency.py', 'task-image-classification.py'
_FRESH = 'fresh trials every batch (seeded by seed, epoch, batch)'

DATASETS = {
    'dms': Dataset('dms', 'delayed match-to-sample', n_in=100, n_out=2, train=_FRESH,
                   test='--n_test_trials fixed held-out trials', steps='t_fixation + t_sample + t_delay + t_test (2010)',
                   loader='datasets:dms_train_loader', script=TRIAL_SCRIPT),
    'cue-accumulation': Dataset('cue-accumulation', 'cue accumulation (Bellec et al. 2020)', n_in=40, n_out=2,
                                train=_FRESH, test='--n_test_trials fixed held-out trials',
                                steps='cue_n (cue_t_cue + cue_t_gap) + cue_t_delay + cue_t_recall (2200)',
                                loader='rsnn.tasks.base:train_loader', script=TRIAL_SCRIPT),
    'store-recall': Dataset('store-recall', 'store-recall (Bellec et al. 2018)', n_in=50, n_out=2, train=_FRESH,
                            test='--n_test_trials fixed held-out trials', steps='sr_periods x sr_t_period (800)',
                            loader='rsnn.tasks.base:train_loader', script=TRIAL_SCRIPT),
    'nmnist': Dataset('nmnist', 'N-MNIST', n_in=2 * 34 * 34, n_out=10, train='60000 recordings', test='10000',
                      steps='--data_length frames (400)', loader='rsnn.event_data:load_framed_split',
                      script=IMAGE_SCRIPT, synthetic='scripts/synthetic_events.py'),
    'shd': Dataset('shd', 'SHD', n_in=700, n_out=20, train='8156 recordings', test='2264',
                   steps='--data_length frames (400)', loader='rsnn.event_data:load_framed_split',
                   script=IMAGE_SCRIPT, synthetic='scripts/synthetic_events.py'),
}


def register_dataset(row: Dataset) -> Dataset:
    """Add a row to DATASETS (a new trial task registers its row through rsnn.tasks.register)."""
    DATASETS[row.name] = row
    return row


def dataset(name: str) -> Dataset:
    """The row of --dataset `name`; ValueError naming the choices for an unknown one."""
    if name not in DATASETS:
        raise ValueError(f'unknown dataset {name!r}; choose one of {", ".join(sorted(DATASETS))}')
    return DATASETS[name]


def names(script: str) -> list:
    """The --dataset choices of a task script (its file name, e.g. IMAGE_SCRIPT), in table order."""
    return [d.name for d in DATASETS.values() if d.script == script]


def input_size(name: str) -> int:
    """Inputs per time step of --dataset `name` (what a script sizes its batches by before any data is read)."""
    return dataset(name).n_in


# --------------------------------------------------------------------------------------------
# Delayed match-to-sample
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DMSConfig:
    dt: float = 1.              # ms per step
    t_fixation: float = 10.     # ms
    t_sample: float = 500.      # ms
    t_delay: float = 1000.      # ms
    t_test: float = 500.        # ms
    n_input: int = 100          # Poisson input neurons, preferred angles 2 pi j / n_input
    n_direction: int = 8        # stimulus directions 2 pi k / n_direction
    kappa: float = 3.           # von Mises tuning width
    rate_background: float = 1.  # Hz, everywhere
    rate_stimulus: float = 100.  # Hz x tuning, during sample and test

    @property
    def n_output(self) -> int:
        """The answers: match / non-match."""
        return 2

    def steps(self, ms: float) -> int:
        return int(round(ms / self.dt))

    @property
    def sample_start(self) -> int:
        return self.steps(self.t_fixation)

    @property
    def delay_start(self) -> int:
        return self.sample_start + self.steps(self.t_sample)

    @property
    def test_start(self) -> int:
        return self.delay_start + self.steps(self.t_delay)

    @property
    def n_steps(self) -> int:
        return self.test_start + self.steps(self.t_test)

    def validate(self):
        for name in ('dt', 't_sample', 't_test'):
            if getattr(self, name) <= 0:
                raise ValueError(f'--{name} must be > 0, got {getattr(self, name)}')
        for name in ('t_fixation', 't_delay'):
            if getattr(self, name) < 0:
                raise ValueError(f'--{name} must be >= 0, got {getattr(self, name)}')
        if self.steps(self.t_test) < 1:
            raise ValueError(f'the test period must last at least one step of dt={self.dt} ms')

    def loss_weights(self) -> np.ndarray:
        """Per-step loss weight: 1/n_test over the test period, 0 before it."""
        w = np.zeros(self.n_steps, np.float32)
        w[self.test_start:] = 1. / (self.n_steps - self.test_start)
        return w


def dms_tuning(cfg: DMSConfig, directions: np.ndarray) -> np.ndarray:
    """exp(kappa cos(theta - phi)) / exp(kappa) for each trial's direction and each input neuron."""
    preferred = 2 * np.pi * np.arange(cfg.n_input) / cfg.n_input
    theta = 2 * np.pi * directions / cfg.n_direction
    return np.exp(cfg.kappa * (np.cos(theta[:, None] - preferred[None, :]) - 1.))


def dms_trials(cfg: DMSConfig, batch_size: int, rng: np.random.Generator, rows: slice = None):
    """One batch of DMS trials.

    Returns spikes (T, batch, n_input) uint8, labels (batch,) int32 (1 = match), and the sample and test
    directions (batch,) for inspection. `rows` (a slice of the batch): only those trials' spikes are drawn
    (the others stay 0), equal to the whole batch's (uniform_f32_rows): the part of one process of a
    --distributed run.
    """
    match = rng.random(batch_size) < 0.5
    sample = rng.integers(0, cfg.n_direction, batch_size)
    # A non-match test is one of the other n_direction - 1 directions, uniformly.
    offset = rng.integers(1, cfg.n_direction, batch_size)
    test = np.where(match, sample, (sample + offset) % cfg.n_direction)

    p_bg = cfg.rate_background * cfg.dt / 1000.
    p_stim = cfg.rate_stimulus * cfg.dt / 1000.
    T = cfg.n_steps
    part = slice(0, batch_size) if rows is None else rows
    prob = np.full((T, part.stop - part.start, cfg.n_input), p_bg, np.float32)
    prob[cfg.sample_start:cfg.delay_start] += (p_stim * dms_tuning(cfg, sample[part])).astype(np.float32)
    prob[cfg.test_start:] += (p_stim * dms_tuning(cfg, test[part])).astype(np.float32)
    if rows is None:
        return (rng.random(prob.shape, dtype=np.float32) < prob).astype(np.uint8), match.astype(np.int32), sample, test
    spikes = np.zeros((T, batch_size, cfg.n_input), np.uint8)
    spikes[:, rows] = uniform_f32_rows(rng, (T, batch_size, cfg.n_input), rows) < prob
    return spikes, match.astype(np.int32), sample, test


def uniform_f32_rows(rng: np.random.Generator, shape: tuple, rows: slice) -> np.ndarray:
    """rng.random(shape, dtype=np.float32)[:, rows] without drawing the other rows, and rng left where that
    whole draw leaves it. numpy draws float32 from 32-bit halves of PCG64's 64-bit outputs, in C order, so
    each time step's rows are a run of draws reached by jumping (PCG64.advance). Another bit generator:
    the whole draw, sliced."""
    bg = rng.bit_generator
    if not isinstance(bg, np.random.PCG64):
        return rng.random(shape, dtype=np.float32)[:, rows]
    T, B = shape[:2]
    per_row = int(np.prod(shape[2:]))
    start = bg.state
    out = np.empty((T, rows.stop - rows.start) + tuple(shape[2:]), np.float32)
    for t in range(T):
        _skip_uint32(bg, start, (t * B + rows.start) * per_row)
        out[t] = rng.random(out.shape[1:], dtype=np.float32)
    _skip_uint32(bg, start, T * B * per_row)
    return out


def _skip_uint32(bg, start: dict, k: int):
    """PCG64 `bg` set to the state `start`, then k 32-bit draws on (the buffered high half of the last 64-bit
    output first, then two per output; advance() clears the buffer, so an odd k buffers one by hand)."""
    bg.state = start
    if k == 0:
        return
    if start['has_uint32']:
        k -= 1
        bg.state = dict(bg.state, has_uint32=0, uinteger=0)
    bg.advance(k // 2)
    if k % 2:
        high = int(bg.random_raw()) >> 32  # drawn before the state is read
        bg.state = dict(bg.state, has_uint32=1, uinteger=high)


def dms_batch_rng(seed: int, epoch: int, batch: int) -> np.random.Generator:
    # Seeded by (seed, epoch, batch): a resumed run sees exactly the batches of an uninterrupted one,
    # whatever the number of loader workers.
    return np.random.default_rng([seed, epoch, batch])


TEST_KEY, VALIDATION_KEY = 2 ** 31 - 1, 2 ** 31 - 3  # the generator keys of the held-out and validation sets


def dms_test_set(cfg: DMSConfig, n_trials: int, batch_size: int, seed: int, key: int = TEST_KEY):
    """A fixed held-out list of batches, drawn from a stream no training batch uses (key VALIDATION_KEY: the
    validation set of --validation, from a stream that neither the training batches nor the test set use)."""
    rng = np.random.default_rng([seed, key])
    batches = []
    for start in range(0, n_trials, batch_size):
        x, y, _, _ = dms_trials(cfg, min(batch_size, n_trials - start), rng)
        batches.append((x, y))
    return batches


# --------------------------------------------------------------------------------------------
# Loading batches with torch DataLoader workers
# --------------------------------------------------------------------------------------------


class DMSBatches:
    """Map-style dataset: global index i -> batch (i mod batches_per_epoch) of epoch (i div batches_per_epoch)."""

    def __init__(self, cfg: DMSConfig, batch_size: int, batches_per_epoch: int, seed: int, rows: slice = None):
        self.cfg, self.batch_size, self.batches_per_epoch, self.seed = cfg, batch_size, batches_per_epoch, seed
        self.rows = rows  # this process's trials (the others' stay 0), or None: all

    def __len__(self):
        return 2 ** 62

    def __getitem__(self, index: int):
        epoch, batch = divmod(int(index), self.batches_per_epoch)
        x, y, _, _ = dms_trials(self.cfg, self.batch_size, dms_batch_rng(self.seed, epoch, batch), self.rows)
        return x, y


class EpochSampler:
    """Yields the global batch indices of one epoch; set `.epoch` before iterating."""

    def __init__(self, batches_per_epoch: int):
        self.batches_per_epoch, self.epoch = batches_per_epoch, 0

    def __iter__(self):
        start = self.epoch * self.batches_per_epoch
        return iter(range(start, start + self.batches_per_epoch))

    def __len__(self):
        return self.batches_per_epoch


def worker_loader(dataset, n_workers: int, **kwargs):
    """A torch DataLoader whose workers are spawned, not forked: a fork of a process running JAX's
    threads can deadlock. With no workers (--n_data_worker 0, the default) and no batching or shuffling
    here, the same items read in this process (InProcessLoader), torch not even imported (about 1.5 s of
    CPU per run): a machine with jax alone runs the DMS task."""
    if n_workers == 0 and kwargs.get('batch_size', 1) is None and not kwargs.get('shuffle'):
        return InProcessLoader(dataset, kwargs.get('sampler'), kwargs.get('collate_fn'))
    import torch.utils.data
    if n_workers > 0:
        kwargs.update(num_workers=n_workers, multiprocessing_context='spawn', persistent_workers=True,
                      prefetch_factor=2)
    return torch.utils.data.DataLoader(dataset, **kwargs)


class InProcessLoader:
    """Items dataset[i] for i of the sampler (else 0 .. len - 1), collate_fn applied: what a torch
    DataLoader with batch_size=None and no workers yields, without torch (its numpy arrays stay numpy
    arrays where the DataLoader makes them tensors: AsNumpy and densify read both alike)."""

    def __init__(self, dataset, sampler=None, collate_fn=None):
        self.dataset, self.sampler, self.collate_fn = dataset, sampler, collate_fn

    def __len__(self):
        return len(self.sampler if self.sampler is not None else self.dataset)

    def __iter__(self):
        for i in (self.sampler if self.sampler is not None else range(len(self.dataset))):
            item = self.dataset[i]
            yield self.collate_fn(item) if self.collate_fn else item


class AsNumpy:
    """Iterate a DataLoader as numpy (xs, labels); keeps len()."""

    def __init__(self, loader):
        self.loader = loader

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for x, y in self.loader:
            yield np.asarray(x), np.asarray(y)


def dms_train_loader(cfg: DMSConfig, batch_size: int, batches_per_epoch: int, seed: int, n_workers: int,
                     rows: slice = None):
    """Returns train_batches(epoch) -> iterable of numpy (xs uint8 (T, B, n_in), labels (B,)); with `rows`
    only those trials' spikes are generated (the part of the batch this process's devices hold)."""
    sampler = EpochSampler(batches_per_epoch)
    loader = worker_loader(DMSBatches(cfg, batch_size, batches_per_epoch, seed, rows), n_workers,
                           batch_size=None, sampler=sampler)

    def train_batches(epoch: int):
        sampler.epoch = epoch
        return AsNumpy(loader)

    return train_batches
