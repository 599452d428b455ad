"""The credit task with disjoint sample and test channels (--dataset dms-split; issue 33): delayed
match-to-sample where the sample arrives on its own n_input channels, silent outside the sample period (no
background there), and the test on another n_input channels (background throughout, the stimulus during the
test). So a truncated window that does not reach back to the sample period sees exactly zero input on the
sample channels, and its gradient on every weight out of them is exactly 0 (tests/test_credit_split.py). With
the memory neurons' input weights at exactly 0 (--memory_in_scale 0) the sample reaches them, at the start,
only through the recurrent weights. The trials come from datasets.DMSConfig's timing and tuning; the draw of
(sample, test, label) is the DMS task's."""
from __future__ import annotations

import dataclasses

import numpy as np

from rsnn import datasets
from rsnn.tasks.base import TaskRow, rate_trials, register
from rsnn.tasks.dms import FLAGS, DMSTask

PRESETS = {}  # the ablation's settings are ABLATION below, run by scripts/credit_ablation.py

# The small credit task of the ablation (docs/stream.md, "The credit task with split channels"): 510 ms trials
# (sample 100, delay 300, test 100); 50 GIF neurons with 20 ms membrane and synapse, 40 fast-adapting
# (tau_I2 ~ U(20, 75) ms) and 10 memory neurons (tau_I2 3000 ms) whose weights from the sample channels
# (zero_in_rows) and from the other neurons (rec_scale 0) start at exactly 0: at the start they hold nothing
# of the sample, and only their slow adaptation current can carry it across the delay.
ABLATION = dict(dataset='dms-split', dt=1., t_fixation=10., t_sample=100., t_delay=300., t_test=100., n_rec=50,
                tau_neu=20., tau_syn=20., syn_gain=1., tau_I2=15., A2=1., ff_scale=6., rec_scale=0.5, spk_fun='relu',
                memory=dict(n_memory=10, tau_memory=3000., tau_fast_min=10., in_scale=1., rec_scale=0.))


@dataclasses.dataclass(frozen=True)
class SplitDMSTask(DMSTask):
    """DMS with the sample on channels [0, n_input) and the test on [n_input, 2 n_input)."""
    name: str = 'dms-split'

    @property
    def n_in(self) -> int:
        return 2 * self.cfg.n_input

    @property
    def sample_channels(self) -> slice:
        return slice(0, self.cfg.n_input)

    def trials(self, batch_size: int, rng: np.random.Generator, rows: slice = None) -> tuple:
        return rate_trials(self, batch_size, rng, rows)

    def background(self):
        """Between trials: the test channels' background; the sample channels silent."""
        bg = np.full(self.n_in, DMSTask.background(self), np.float32)
        bg[self.sample_channels] = 0.
        return bg

    def rates(self, spec) -> np.ndarray:
        cfg, n = self.cfg, self.cfg.n_input
        p_stim = cfg.rate_stimulus * cfg.dt / 1000.
        tune = datasets.dms_tuning(cfg, np.array(spec))
        prob = np.zeros((cfg.n_steps, self.n_in), np.float32)
        prob[:, n:] = DMSTask.background(self)
        prob[cfg.sample_start:cfg.delay_start, :n] = DMSTask.background(self) + p_stim * tune[0]
        prob[cfg.test_start:, n:] += p_stim * tune[1]
        return prob


def make(values: dict) -> SplitDMSTask:
    return SplitDMSTask(datasets.DMSConfig(dt=values['dt'], t_fixation=values['t_fixation'],
                                           t_sample=values['t_sample'], t_delay=values['t_delay'],
                                           t_test=values['t_test']))


TITLE = ('DMS with disjoint sample and test channels, the sample channels silent outside the sample (the credit '
         'ablation: scripts/credit_ablation.py)')
ROW = register(TaskRow('dms-split', TITLE, FLAGS, make, PRESETS, data=datasets.Dataset(
    'dms-split', 'DMS, split sample / test channels', n_in=200, n_out=2, train='fresh trials every batch (seeded by seed, epoch, batch)',
    test='--n_test_trials fixed held-out trials', steps='t_fixation + t_sample + t_delay + t_test (2010)',
    loader='rsnn.tasks.base:train_loader', script=datasets.TRIAL_SCRIPT)))
