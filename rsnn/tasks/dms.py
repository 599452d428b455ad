"""Delayed match-to-sample (DMS) as a trial task, with its flags, its defaults and its presets in one place
(the paper's task; the credit variant of issue #24 is its preset 'credit'). The generator itself is
rsnn/datasets.py's dms_trials (unchanged: the same seeds give the same trials)."""
from __future__ import annotations

import dataclasses

import numpy as np

from rsnn import cli, datasets
from rsnn.tasks.base import Flag, TaskRow, register

FLAGS = (
    Flag('t_fixation', cli.finite_float, 10., 'DMS: fixation period before the sample (ms)'),
    Flag('t_sample', cli.positive_float, 500., 'DMS: sample period (ms)'),
    Flag('t_delay', cli.finite_float, 1000., 'DMS: delay between sample and test (ms)'),
    Flag('t_test', cli.positive_float, 500., 'DMS: test period (ms); the loss is here'),
)

# The paper's task and network (the README commands' values, spelled out so that config.json shows them).
PAPER_TASK = dict(dataset='dms', dt=1., t_fixation=10., t_sample=500., t_delay=1000., t_test=500., n_rec=200,
                  tau_neu=100., tau_syn=100., tau_I2=1500., A2=1., ff_scale=6., rec_scale=2., spk_fun='relu',
                  optimizer='adam', lr=1e-3)
PRESETS = {
    # `make demo`: the paper's 1000 ms task with ES-D-RTRL; only the batch size, the budget (a cosine lr
    # over it) and the stopping rule are chosen for a 2-core CPU (docs/dms.md, "The paper's task on a CPU").
    'cpu-demo': dict(PAPER_TASK, method='expsm_diag', etrace_decay=0.99, vjp_time='t', batch_size=32,
                     batches_per_epoch=25, epochs=40, lr_schedule='constant', acc_th=0.98, acc_th_window=50,
                     n_test_trials=512, n_data_worker=1, devices='cpu', exp_name='cpu-demo'),
    # Issue #24, the credit task: a task that needs credit through the delay (docs/stream.md, "The credit
    # task"): 180 neurons whose adaptation forgets within the delay (tau_I2 ~ U(20, 75) ms) and 20 memory
    # neurons with slow adaptation (3000 ms) and weak initial input and recurrent weights.
    'credit': dict(PAPER_TASK, method='expsm_diag', etrace_decay=0.99, vjp_time='t', batch_size=32, tau_I2=50.,
                   n_memory=20, tau_memory=3000., tau_fast_min=20., memory_in_scale=0.1, memory_rec_scale=0.1,
                   batches_per_epoch=25, epochs=40, lr_schedule='constant', acc_th=0.98, acc_th_window=50,
                   n_test_trials=1024, n_data_worker=1, devices='cpu', exp_name='credit'),
    # The earlier CPU demo: a 100 ms delay, 100 neurons with 20 ms membrane and synapse (310 steps).
    'short-delay': dict(method='expsm_diag', etrace_decay=0.99, t_fixation=10., t_sample=100., t_delay=100.,
                        t_test=100., n_rec=100, tau_neu=20., tau_syn=20., syn_gain=1., batch_size=32,
                        batches_per_epoch=50, epochs=10, lr=1e-3, lr_schedule='cosine', acc_th=0.99,
                        devices='cpu', exp_name='short-delay'),
    # Seconds on a CPU: a 65-step DMS, 16 neurons, 2 epochs of 3 batches. BPTT and ES-D-RTRL give different
    # numbers here (tests/test_tasks.py); a check that a change left the training path running.
    'smoke': dict(method='expsm_diag', t_fixation=5., t_sample=20., t_delay=20., t_test=20., n_rec=16,
                  tau_neu=20., tau_syn=20., tau_I2=100., syn_gain=1., batch_size=8, batches_per_epoch=3, epochs=2,
                  n_test_trials=16, acc_th=1.01, devices='cpu', exp_name='smoke', no_progress=True,
                  stream_trials=4, eval_every_trials=2, t_iti='5-15', update_every=30., tbptt_window=30.),
}


@dataclasses.dataclass(frozen=True)
class DMSTask:
    """The trial-task view of datasets.DMSConfig (TrialTask): the trials of dms_trials, the test period as
    the decision window."""
    cfg: datasets.DMSConfig
    name: str = 'dms'

    @property
    def dt(self) -> float:
        return self.cfg.dt

    @property
    def n_in(self) -> int:
        return self.cfg.n_input

    @property
    def n_out(self) -> int:
        return self.cfg.n_output

    @property
    def n_steps(self) -> int:
        return self.cfg.n_steps

    @property
    def decision_start(self) -> int:
        return self.cfg.test_start

    def steps(self, ms: float) -> int:
        return self.cfg.steps(ms)

    def loss_weights(self) -> np.ndarray:
        return self.cfg.loss_weights()

    def validate(self):
        self.cfg.validate()

    def trials(self, batch_size: int, rng: np.random.Generator, rows: slice = None) -> tuple:
        x, y, _, _ = datasets.dms_trials(self.cfg, batch_size, rng, rows)
        return x, y

    def draw(self, rng: np.random.Generator) -> tuple:
        """(sample, test) directions and the label (1 = match), drawn as the DMS stream always drew them."""
        cfg = self.cfg
        match = bool(rng.random() < 0.5)
        sample = int(rng.integers(0, cfg.n_direction))
        test = sample if match else int((sample + rng.integers(1, cfg.n_direction)) % cfg.n_direction)
        return (sample, test), int(match)

    def background(self):
        return np.float32(self.cfg.rate_background * self.cfg.dt / 1000.)

    def rates(self, spec) -> np.ndarray:
        cfg = self.cfg
        p_stim = cfg.rate_stimulus * cfg.dt / 1000.
        tune = datasets.dms_tuning(cfg, np.array(spec))
        prob = np.full((cfg.n_steps, cfg.n_input), self.background(), np.float32)
        prob[cfg.sample_start:cfg.delay_start] += p_stim * tune[0]
        prob[cfg.test_start:cfg.n_steps] += p_stim * tune[1]
        return prob


def make(values: dict) -> DMSTask:
    return DMSTask(datasets.DMSConfig(dt=values['dt'], t_fixation=values['t_fixation'], t_sample=values['t_sample'],
                                      t_delay=values['t_delay'], t_test=values['t_test']))


ROW = register(TaskRow('dms', 'delayed match-to-sample (the paper\'s task; presets cpu-demo, credit, short-delay)',
                       FLAGS, make, PRESETS))
