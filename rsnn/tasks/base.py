"""The trial-task seam: what a trial task is (TrialTask), the row of the table of tasks that --dataset of
task-rsnn-long-term-dependency.py reads (TaskRow, TASKS, register), and what every rate-coded task shares
(its trials drawn one by one, the fixed held-out set, the training batches by (seed, epoch, batch)).

A task is a pure function of its config and a numpy Generator: the same seed gives the same trials, the
held-out set is drawn from a generator key that no training batch uses, and the stream protocol
(rsnn/trial_stream.py) builds endless streams of its trials from the same two methods (draw, rates).
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Callable, Optional, Protocol, runtime_checkable

import numpy as np

from rsnn import datasets


@runtime_checkable
class TrialTask(Protocol):
    """A trial task: fixed-length trials of Bernoulli (Poisson) input spikes, one label per trial, read out
    on the steps [decision_start, n_steps) of the trial.

    Attributes: name (--dataset), dt (ms per step), n_in (inputs per step), n_out (classes), n_steps (steps
    of one trial), decision_start (first step of the loss window).

    Methods:
      steps(ms) -> int                      ms as steps of dt.
      loss_weights() -> (n_steps,) float32  1 / decision steps in the decision window, 0 before it.
      trials(batch, rng, rows=None) -> (x (T, B, n_in) uint8, labels (B,) int32)
                                            one batch; `rows` (a slice): only those trials' spikes drawn (the
                                            part of one process of a --distributed run; the others stay 0).
      draw(rng) -> (spec, label)            one trial's parameters (anything rates() reads) and its label,
                                            from rng (the stream draws one generator per trial).
      rates(spec) -> (n_steps, n_in) float32  that trial's spike probability per step and input.
      background() -> float or (n_in,)      the spike probability between trials (the stream's interval).
      validate()                            raise ValueError (one line naming the flag) for bad sizes.
    """
    name: str
    dt: float
    n_in: int
    n_out: int
    n_steps: int
    decision_start: int

    def steps(self, ms: float) -> int: ...
    def loss_weights(self) -> np.ndarray: ...
    def trials(self, batch_size: int, rng: np.random.Generator, rows: slice = None) -> tuple: ...
    def draw(self, rng: np.random.Generator) -> tuple: ...
    def rates(self, spec) -> np.ndarray: ...
    def background(self): ...
    def validate(self): ...


@dataclasses.dataclass(frozen=True)
class Flag:
    """One task flag: --name, its type (a validator of rsnn.cli), default and one-line help."""
    name: str
    type: Callable
    default: object
    help: str


@dataclasses.dataclass(frozen=True)
class TaskRow:
    """A row of the table of trial tasks.

    name: the --dataset value; title: one line for --help; flags: the task's own flags (its config module);
    make(values: dict) -> TrialTask from the parsed flags (values = vars(args)); presets: named sets of flag
    values for --preset (each sets dataset=name); defaults: flag values this task changes from the parser's
    when it is chosen (applied as a preset is); data: the datasets.Dataset row (sizes, steps, loader)."""
    name: str
    title: str
    flags: tuple
    make: Callable[[dict], TrialTask]
    presets: dict = dataclasses.field(default_factory=dict)
    data: Optional[datasets.Dataset] = None


TASKS: dict = {}


def register(row: TaskRow) -> TaskRow:
    """Add a trial task to the table (and its data row to datasets.DATASETS): it becomes a --dataset choice
    of task-rsnn-long-term-dependency.py, runs on trials and as a stream."""
    TASKS[row.name] = row
    if row.data is not None:
        datasets.register_dataset(row.data)
    return row


def add_task_flags(parser: argparse.ArgumentParser):
    """Every registered task's flags, one argument group per task (a flag two tasks share is added once,
    with the first task's default and help)."""
    seen = set()
    for row in TASKS.values():
        g = parser.add_argument_group(f'task {row.name} (--dataset {row.name})')
        for f in row.flags:
            if f.name not in seen:
                g.add_argument(f'--{f.name}', type=f.type, default=f.default, help=f.help)
                seen.add(f.name)


def all_presets() -> dict:
    """Every task's presets, keyed by preset name (each names its dataset)."""
    out = {}
    for row in TASKS.values():
        for name, values in row.presets.items():
            out[name] = dict(values, dataset=row.name)
    return out


def make_task(values: dict) -> TrialTask:
    """The task of --dataset built from the parsed flags (a dict: vars(args)); ValueError for bad sizes."""
    task = TASKS[values['dataset']].make(values)
    task.validate()
    return task


# --------------------------------------------------------------------------------------------
# What rate-coded tasks share
# --------------------------------------------------------------------------------------------

def decision_weights(n_steps: int, decision_start: int) -> np.ndarray:
    """Per-step loss weight: 1 / decision steps over [decision_start, n_steps), 0 before it."""
    w = np.zeros(n_steps, np.float32)
    w[decision_start:] = 1. / (n_steps - decision_start)
    return w


def rate_trials(task: TrialTask, batch_size: int, rng: np.random.Generator, rows: slice = None) -> tuple:
    """A batch of a rate-coded task: each trial's (spec, label) drawn in turn from rng, then the spikes of the
    whole batch (T, B, n_in) uint8 from one uniform draw (only `rows` of it with rows, the rest 0)."""
    specs, labels = zip(*[task.draw(rng) for _ in range(batch_size)])
    part = range(batch_size) if rows is None else range(rows.start, rows.stop)
    prob = np.stack([task.rates(specs[i]) for i in part], axis=1)
    labels = np.asarray(labels, np.int32)
    if rows is None:
        return (rng.random(prob.shape, dtype=np.float32) < prob).astype(np.uint8), labels
    x = np.zeros((task.n_steps, batch_size, task.n_in), np.uint8)
    x[:, rows] = datasets.uniform_f32_rows(rng, (task.n_steps, batch_size, task.n_in), rows) < prob
    return x, labels


def test_set(task: TrialTask, n_trials: int, batch_size: int, seed: int, key: int = datasets.TEST_KEY) -> list:
    """A fixed held-out list of (x, labels) batches from default_rng([seed, key]): a generator no training
    batch uses (key datasets.VALIDATION_KEY: the validation set, disjoint from both)."""
    rng = np.random.default_rng([seed, key])
    return [task.trials(min(batch_size, n_trials - start), rng) for start in range(0, n_trials, batch_size)]


class TaskBatches:
    """Map-style dataset: global index i -> batch (i mod batches_per_epoch) of epoch (i div batches_per_epoch),
    drawn from datasets.dms_batch_rng(seed, epoch, batch) (a resumed run sees the same batches)."""

    def __init__(self, task: TrialTask, batch_size: int, batches_per_epoch: int, seed: int, rows: slice = None):
        self.task, self.batch_size, self.batches_per_epoch, self.seed = task, batch_size, batches_per_epoch, seed
        self.rows = rows

    def __len__(self):
        return 2 ** 62

    def __getitem__(self, index: int):
        epoch, batch = divmod(int(index), self.batches_per_epoch)
        return self.task.trials(self.batch_size, datasets.dms_batch_rng(self.seed, epoch, batch), self.rows)


def train_loader(task: TrialTask, batch_size: int, batches_per_epoch: int, seed: int, n_workers: int,
                 rows: slice = None):
    """train_batches(epoch) -> iterable of numpy (xs (T, B, n_in), labels (B,)), fresh trials every batch."""
    sampler = datasets.EpochSampler(batches_per_epoch)
    loader = datasets.worker_loader(TaskBatches(task, batch_size, batches_per_epoch, seed, rows), n_workers,
                                    batch_size=None, sampler=sampler)

    def train_batches(epoch: int):
        sampler.epoch = epoch
        return datasets.AsNumpy(loader)

    return train_batches
