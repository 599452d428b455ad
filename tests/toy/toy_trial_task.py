"""A toy trial task registered from outside the package, through the public seam only (rsnn.tasks.register,
rsnn.datasets.Dataset): importing this module makes --dataset toy-cue a choice of task-rsnn-long-term-dependency.py
(its flags, its --help line, its row of the table of datasets), on trials and as a stream.

A trial: a cue of --toy_t_cue ms in one of two input populations (the label), --toy_t_delay ms of background,
then --toy_t_answer ms in which the network answers which population had the cue."""
from __future__ import annotations

import dataclasses

import numpy as np

from rsnn import cli, datasets, tasks


@dataclasses.dataclass(frozen=True)
class ToyCue:
    dt: float = 1.
    t_cue: float = 5.
    t_delay: float = 5.
    t_answer: float = 5.
    pop: int = 4
    name: str = 'toy-cue'
    n_out: int = 2

    def steps(self, ms: float) -> int:
        return int(round(ms / self.dt))

    @property
    def n_in(self) -> int:
        return 2 * self.pop

    @property
    def decision_start(self) -> int:
        return self.steps(self.t_cue) + self.steps(self.t_delay)

    @property
    def n_steps(self) -> int:
        return self.decision_start + self.steps(self.t_answer)

    def validate(self):
        if self.steps(self.t_answer) < 1:
            raise ValueError('--toy_t_answer must last at least one step')

    def loss_weights(self):
        return tasks.decision_weights(self.n_steps, self.decision_start)

    def draw(self, rng):
        side = int(rng.integers(0, 2))
        return side, side

    def background(self):
        return np.full(self.n_in, 0.01, np.float32)

    def rates(self, side):
        prob = np.tile(self.background(), (self.n_steps, 1))
        prob[:self.steps(self.t_cue), side * self.pop:(side + 1) * self.pop] = 0.8
        return prob

    def trials(self, batch_size, rng, rows=None):
        return tasks.rate_trials(self, batch_size, rng, rows)


FLAGS = (tasks.Flag('toy_t_cue', cli.positive_float, 5., 'toy-cue: ms of the cue'),
         tasks.Flag('toy_t_delay', cli.nonneg_float, 5., 'toy-cue: ms between the cue and the answer'),
         tasks.Flag('toy_t_answer', cli.positive_float, 5., 'toy-cue: ms of the answer (the loss is here)'))


def make(values: dict) -> ToyCue:
    return ToyCue(dt=values['dt'], t_cue=values['toy_t_cue'], t_delay=values['toy_t_delay'],
                  t_answer=values['toy_t_answer'])


ROW = tasks.register(tasks.TaskRow(
    'toy-cue', 'a toy: which of two populations had the cue (tests/toy/toy_trial_task.py)', FLAGS, make,
    data=datasets.Dataset('toy-cue', 'toy cue', n_in=8, n_out=2, train='fresh trials every batch',
                          test='--n_test_trials', steps='toy_t_cue + toy_t_delay + toy_t_answer (15)',
                          loader='rsnn.tasks.base:train_loader', script=datasets.TRIAL_SCRIPT)))
