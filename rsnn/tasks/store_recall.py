"""Store-recall (Bellec et al. 2018, LSNN) as a trial task, with its flags, defaults and presets.

Inputs: five populations of --sr_pop Poisson neurons: value 0, value 1, the store cue, the recall cue, and
background noise (--sr_bg_rate, at every step and between trials). A trial is --sr_periods periods of
--sr_t_period ms. In every period but the last one a random value (0 or 1) is shown (its population at
--sr_rate Hz); in one of them, drawn uniformly among those at least --sr_min_delay periods before the last,
the store cue fires too. The last period is the recall cue: the network answers the value shown with the
store cue. The delay between store and recall is therefore random (--sr_min_delay to --sr_periods - 1
periods), with distractor values in it. The loss and the accuracy are read on the recall period only.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from rsnn import cli
from rsnn.tasks.base import Flag, TaskRow, decision_weights, rate_trials, register
from rsnn.tasks.cue_accumulation import ALIF_NETWORK

FLAGS = (
    Flag('sr_periods', cli.positive_int, 8, 'store-recall: periods per trial (the last is the recall cue)'),
    Flag('sr_t_period', cli.positive_float, 100., 'store-recall: ms of one period'),
    Flag('sr_min_delay', cli.positive_int, 1, 'store-recall: fewest periods from the store cue to the recall cue'),
    Flag('sr_rate', cli.positive_float, 50., 'store-recall: Hz of a value or cue population when it is on'),
    Flag('sr_bg_rate', cli.nonneg_float, 10., 'store-recall: Hz of the background-noise population'),
    Flag('sr_pop', cli.positive_int, 10, 'store-recall: Poisson neurons per input population (5 populations)'),
)

# Sized for a 2-core CPU (docs/tasks.md): 10 periods of 100 ms (1000 steps), the store cue 5 to 9 periods
# before the recall cue (4 to 8 distractor values between them), BPTT at batch 32, 10 epochs of 25 batches,
# 2560 held-out trials.
# --preset store-recall: the network of --preset cue-accumulation (rsnn/tasks/cue_accumulation.py: Bellec's ALIF
# neurons in the credit layout, 20 slow memory neurons with weak initial weights, 80 fast; Adam lr 5e-3).
# Controls: --beta 0 (adaptation off: at chance) and --freeze_rec 1 (readout only: at chance on 2 seeds of 3).
# --preset store-recall-gif: the earlier preset, the credit layout of the GIF network (as cue-accumulation-gif;
# its adaptation-off control --A2 0 is not at chance: docs/tasks.md).
NETWORK = dict(model='gif', n_rec=100, n_memory=20, tau_memory=3000., tau_I2=50., tau_fast_min=20.,
               memory_in_scale=0.1, memory_rec_scale=0.1, tau_neu=100., tau_syn=100., A2=1., ff_scale=6.,
               rec_scale=2., readout_scale=0.1, tau_o=10.)
TRAINING = dict(method='bptt', sr_periods=10, sr_min_delay=5, batch_size=32, batches_per_epoch=25, epochs=10,
                lr_schedule='constant', acc_th=0.98, acc_th_window=25, n_test_trials=2560, devices='cpu')
PRESETS = {
    'store-recall': dict(ALIF_NETWORK, **TRAINING, diff_spike=1, lr=5e-3, exp_name='store-recall'),
    'store-recall-gif': dict(NETWORK, **TRAINING, lr=1e-3, exp_name='store-recall-gif'),
}


@dataclasses.dataclass(frozen=True)
class StoreRecall:
    """The store-recall trial task (TrialTask). spec of a trial: (the values shown, the store period)."""
    dt: float = 1.
    n_periods: int = 8
    t_period: float = 100.
    min_delay: int = 1
    rate: float = 50.
    bg_rate: float = 10.
    pop: int = 10
    name: str = 'store-recall'
    n_out: int = 2

    VALUE0, VALUE1, STORE, RECALL, NOISE = range(5)  # the input populations, in order

    def steps(self, ms: float) -> int:
        return int(round(ms / self.dt))

    @property
    def n_in(self) -> int:
        return 5 * self.pop

    @property
    def period_steps(self) -> int:
        return self.steps(self.t_period)

    @property
    def decision_start(self) -> int:
        return (self.n_periods - 1) * self.period_steps

    @property
    def n_steps(self) -> int:
        return self.n_periods * self.period_steps

    def validate(self):
        if self.period_steps < 1:
            raise ValueError(f'--sr_t_period must last at least one step of dt={self.dt} ms, got {self.t_period}')
        if self.min_delay > self.n_periods - 1:
            raise ValueError(f'--sr_min_delay {self.min_delay} leaves no period for the store cue in '
                             f'--sr_periods {self.n_periods}; give --sr_min_delay <= {self.n_periods - 1}')

    def loss_weights(self) -> np.ndarray:
        return decision_weights(self.n_steps, self.decision_start)

    def draw(self, rng: np.random.Generator) -> tuple:
        values = rng.integers(0, 2, self.n_periods - 1)
        store = int(rng.integers(0, self.n_periods - self.min_delay))
        return (tuple(int(v) for v in values), store), int(values[store])

    def background(self) -> np.ndarray:
        p = np.zeros(self.n_in, np.float32)
        p[self.NOISE * self.pop:] = self.bg_rate * self.dt / 1000.
        return p

    def rates(self, spec) -> np.ndarray:
        values, store = spec
        prob = np.tile(self.background(), (self.n_steps, 1))
        p, P, S = self.rate * self.dt / 1000., self.pop, self.period_steps
        for i, v in enumerate(values):
            prob[i * S:(i + 1) * S, v * P:(v + 1) * P] = p
        prob[store * S:(store + 1) * S, self.STORE * P:(self.STORE + 1) * P] = p
        prob[self.decision_start:, self.RECALL * P:(self.RECALL + 1) * P] = p
        return prob

    def trials(self, batch_size: int, rng: np.random.Generator, rows: slice = None) -> tuple:
        return rate_trials(self, batch_size, rng, rows)


def make(values: dict) -> StoreRecall:
    return StoreRecall(dt=values['dt'], n_periods=values['sr_periods'], t_period=values['sr_t_period'],
                       min_delay=values['sr_min_delay'], rate=values['sr_rate'], bg_rate=values['sr_bg_rate'],
                       pop=values['sr_pop'])


ROW = register(TaskRow('store-recall', 'store a value on a store cue, recall it on a recall cue after a random '
                       'delay (Bellec et al. 2018)', FLAGS, make, PRESETS))
