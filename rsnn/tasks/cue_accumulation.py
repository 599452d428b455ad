"""Evidence (cue) accumulation (Bellec et al. 2020, e-prop, Fig. 3) as a trial task, with its flags, defaults
and presets.

Inputs: four populations of --cue_pop Poisson neurons: left cues, right cues, the recall cue, and background
noise (--cue_bg_rate at every step of the trial and between trials). A trial: --cue_n cues, each --cue_t_cue ms
of --cue_rate Hz in the left or the right population (its side drawn uniformly, independently), followed by
--cue_t_gap ms of silence; then a delay of --cue_t_delay ms; then the recall cue for --cue_t_recall ms, in which
the network answers the side that had the majority of the cues (--cue_n odd: no ties). The loss and the
accuracy are read on the recall window only.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from rsnn import cli
from rsnn.tasks.base import Flag, TaskRow, decision_weights, rate_trials, register

FLAGS = (
    Flag('cue_n', cli.positive_int, 7, 'cue-accumulation: cues per trial (odd: the majority is defined)'),
    Flag('cue_t_cue', cli.positive_float, 100., 'cue-accumulation: ms of one cue'),
    Flag('cue_t_gap', cli.nonneg_float, 50., 'cue-accumulation: ms of silence after each cue'),
    Flag('cue_t_delay', cli.nonneg_float, 1000., 'cue-accumulation: ms between the last cue and the recall cue'),
    Flag('cue_t_recall', cli.positive_float, 150., 'cue-accumulation: ms of the recall cue (the loss is here)'),
    Flag('cue_rate', cli.positive_float, 40., 'cue-accumulation: Hz of a cue population during its cue'),
    Flag('cue_bg_rate', cli.nonneg_float, 10., 'cue-accumulation: Hz of the background-noise population'),
    Flag('cue_pop', cli.positive_int, 10, 'cue-accumulation: Poisson neurons per input population (4 populations)'),
)

# Sized for a 2-core CPU (docs/tasks.md): Bellec's timing, the 1000 ms delay (2200 steps), BPTT at batch 32,
# 10 epochs of 25 batches, Adam lr 5e-3 (Bellec's), 2560 held-out trials.
# --preset cue-accumulation: Bellec's adaptive-threshold LIF neurons (--model alif-delta: tau_m 20 ms, beta 1.8)
# in the credit layout (rsnn/neurons/lif.py memory_layout): 20 memory neurons adapt slowly (tau_a 2000 ms,
# Bellec's) and their input and recurrent weights start 10 x weaker; the other 80 adapt fast (tau_a ~ U(20, 75)
# ms). Delta synapses, the input weights sized for 20 ms (--ff_scale 100), the gradient through the reset
# (--diff_spike 1). Controls: --beta 0 (adaptation off: the same network without its threshold adaptation) and
# --freeze_rec 1 (readout only); both stay near chance (docs/tasks.md). Without the layout (--n_memory 0, all
# neurons adapting slowly) the readout-only control reads 0.675: the untrained thresholds carry the cues.
# --preset cue-accumulation-gif: the earlier preset, on the credit task's layout of the paper's GIF network
# (rsnn/neurons/gif_exp.py credit_layout, as --preset credit): 80 neurons whose adaptation forgets within the
# delay, 20 memory neurons (tau_I2 3000 ms) with 10 x weaker input and recurrent weights; --diff_spike 1 (without
# it the gradient through 2200 steps grows without bound: docs/tasks.md). Its adaptation-off control (--A2 0)
# learns the task too (0.971 +- 0.003, docs/tasks.md): the GIF network's 100 ms membranes and synapses hold the
# cues without adaptation, so it does not show that the memory is in the adaptation.
MEMORY = dict(n_memory=20, tau_memory=3000., tau_I2=50., tau_fast_min=20., memory_in_scale=0.1,
              memory_rec_scale=0.1)
NETWORK = dict(MEMORY, model='gif', n_rec=100, tau_neu=100., tau_syn=100., A2=1., ff_scale=6., rec_scale=2.,
               readout_scale=0.1, tau_o=10.)
ALIF_NETWORK = dict(model='alif-delta', n_rec=100, n_memory=20, memory_others='fast', tau_memory=2000., tau_I2=50.,
                    tau_fast_min=20., memory_in_scale=0.1, memory_rec_scale=0.1, tau_neu=20., tau_adapt=2000.,
                    beta=1.8, ff_scale=100., rec_scale=2., readout_scale=0.1, tau_o=10.)
TRAINING = dict(method='bptt', diff_spike=1, cue_t_delay=1000., batch_size=32, batches_per_epoch=25, epochs=10,
                lr_schedule='constant', acc_th=0.98, acc_th_window=25, n_test_trials=2560, devices='cpu')
PRESETS = {
    'cue-accumulation': dict(ALIF_NETWORK, **TRAINING, lr=5e-3, exp_name='cue-accumulation'),
    'cue-accumulation-gif': dict(NETWORK, **TRAINING, lr=1e-3, exp_name='cue-accumulation-gif'),
}


@dataclasses.dataclass(frozen=True)
class CueAccumulation:
    """The cue-accumulation trial task (TrialTask). spec of a trial: the side of each cue (0 left, 1 right)."""
    dt: float = 1.
    n_cues: int = 7
    t_cue: float = 100.
    t_gap: float = 50.
    t_delay: float = 1000.
    t_recall: float = 150.
    rate: float = 40.
    bg_rate: float = 10.
    pop: int = 10
    name: str = 'cue-accumulation'
    n_out: int = 2

    def steps(self, ms: float) -> int:
        return int(round(ms / self.dt))

    @property
    def n_in(self) -> int:
        return 4 * self.pop

    def cue_start(self, i: int) -> int:
        return i * (self.steps(self.t_cue) + self.steps(self.t_gap))

    @property
    def decision_start(self) -> int:
        return self.cue_start(self.n_cues) + self.steps(self.t_delay)

    @property
    def n_steps(self) -> int:
        return self.decision_start + self.steps(self.t_recall)

    def validate(self):
        if self.n_cues % 2 == 0:
            raise ValueError(f'--cue_n must be odd (a majority side), got {self.n_cues}')
        for flag, ms in (('cue_t_cue', self.t_cue), ('cue_t_recall', self.t_recall)):
            if self.steps(ms) < 1:
                raise ValueError(f'--{flag} must last at least one step of dt={self.dt} ms, got {ms}')

    def loss_weights(self) -> np.ndarray:
        return decision_weights(self.n_steps, self.decision_start)

    def draw(self, rng: np.random.Generator) -> tuple:
        sides = rng.integers(0, 2, self.n_cues)
        return tuple(int(s) for s in sides), int(2 * sides.sum() > self.n_cues)

    def background(self) -> np.ndarray:
        p = np.zeros(self.n_in, np.float32)
        p[3 * self.pop:] = self.bg_rate * self.dt / 1000.
        return p

    def rates(self, spec) -> np.ndarray:
        prob = np.tile(self.background(), (self.n_steps, 1))
        p, P = self.rate * self.dt / 1000., self.pop
        for i, side in enumerate(spec):
            a = self.cue_start(i)
            prob[a:a + self.steps(self.t_cue), side * P:(side + 1) * P] = p
        prob[self.decision_start:, 2 * P:3 * P] = p
        return prob

    def trials(self, batch_size: int, rng: np.random.Generator, rows: slice = None) -> tuple:
        return rate_trials(self, batch_size, rng, rows)


def make(values: dict) -> CueAccumulation:
    return CueAccumulation(dt=values['dt'], n_cues=values['cue_n'], t_cue=values['cue_t_cue'],
                           t_gap=values['cue_t_gap'], t_delay=values['cue_t_delay'], t_recall=values['cue_t_recall'],
                           rate=values['cue_rate'], bg_rate=values['cue_bg_rate'], pop=values['cue_pop'])


ROW = register(TaskRow('cue-accumulation', 'evidence accumulation over 7 left/right cues (Bellec et al. 2020)',
                       FLAGS, make, PRESETS))
