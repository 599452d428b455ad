"""Any trial task (rsnn/tasks: TrialTask) as endless streams: B parallel streams of trials separated by random
inter-trial intervals.

Each stream is one sequence with no end: [phase] trial ITI trial ITI ... where a trial is one trial of the
task (task.draw, task.rates) and the inter-trial interval (ITI) is the task's background input only, its
length drawn uniformly from [iti_min, iti_max] ms. A stream starts after a random phase (uniform over one
trial plus the longest ITI; none when iti_max is 0) so that the decision windows of the B streams are spread
over time and almost every update has some loss in it.

The stream is cut into chunks of `chunk_steps` steps. Everything is a pure function of (seed, salt,
chunk index): trial j of stream b is drawn from default_rng([seed, salt, b, j]) (the task's draw, then the
ITI) and the spikes of chunk k from default_rng([seed, salt, chunk_steps, k]), so a resumed run regenerates
exactly the chunk it stopped at, and a held-out stream (another salt) is the same for every method.
"""
from __future__ import annotations

import dataclasses

import numpy as np

TRAIN_SALT = 1
HELD_OUT_SALT = 2 ** 31 - 2
VALIDATION_SALT = 2 ** 31 - 3  # --validation: a third stream, disjoint from the training and held-out ones
PHASE_TRIAL = 2 ** 31 - 1  # the trial index whose rng draws a stream's initial phase


def parse_iti(text: str) -> tuple:
    """'100-500' -> (100., 500.) ms; '300' -> (300., 300.); '0' -> no interval."""
    parts = str(text).split('-')
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values) < 0 or values[0] > values[-1]:
        raise ValueError(f"--t_iti expects MS or MIN-MAX in ms with 0 <= MIN <= MAX (e.g. 100-500), got {text!r}")
    return values[0], values[-1]


@dataclasses.dataclass
class Trial:
    stream: int
    index: int
    start: int          # absolute step of the trial's first step
    label: int
    spec: object        # the task's parameters of the trial (task.draw)
    n_steps: int
    decision_start: int

    def test_range(self, cfg=None):
        """The absolute steps [first, stop) of the trial's decision window (`cfg` is not read)."""
        return self.start + self.decision_start, self.start + self.n_steps

    @property
    def sample(self):
        """DMS: the sample direction (spec (sample, test))."""
        return self.spec[0]

    @property
    def test(self):
        """DMS: the test direction."""
        return self.spec[1]


@dataclasses.dataclass
class Chunk:
    """Steps [start, start + len) of every stream."""
    start: int
    xs: np.ndarray        # (U, B, n_in) uint8 spikes
    labels: np.ndarray    # (U, B) int32: the label of the trial whose decision window holds the step (else 0)
    weights: np.ndarray   # (U, B) float32: 1 / decision steps inside a decision window, 0 elsewhere
    resets: np.ndarray    # (U, B) bool: a trial starts at this step (the reset-per-trial control)
    tests: list           # (trial, first, stop, ends_here): local step ranges of decision windows, in time order


class TrialStream:
    def __init__(self, task, n_streams: int, chunk_steps: int, seed: int, iti_ms: tuple = (100., 500.),
                 salt: int = TRAIN_SALT):
        self.task, self.n_streams, self.chunk_steps, self.seed, self.salt = task, n_streams, chunk_steps, seed, salt
        self.iti_steps = (task.steps(iti_ms[0]), task.steps(iti_ms[1]))
        self._trials = [[] for _ in range(n_streams)]  # each stream's trials drawn so far, in order
        self._next_start = [self._phase(b) for b in range(n_streams)]
        self._rates = {}  # (stream, trial index) -> the task's rates of that trial, while chunks overlap it

    @property
    def dt(self) -> float:
        return self.task.dt

    @property
    def n_in(self) -> int:
        return self.task.n_in

    def _phase(self, b: int) -> int:
        if self.iti_steps[1] == 0:
            return 0
        rng = np.random.default_rng([self.seed, self.salt, b, PHASE_TRIAL])
        return int(rng.integers(0, self.task.n_steps + self.iti_steps[1]))

    def _draw(self, b: int):
        j = len(self._trials[b])
        rng = np.random.default_rng([self.seed, self.salt, b, j])
        spec, label = self.task.draw(rng)
        iti = int(rng.integers(self.iti_steps[0], self.iti_steps[1] + 1))
        trial = Trial(b, j, self._next_start[b], int(label), spec, self.task.n_steps, self.task.decision_start)
        self._trials[b].append(trial)
        self._next_start[b] = trial.start + trial.n_steps + iti

    def trials_overlapping(self, b: int, start: int, stop: int) -> list:
        """Stream b's trials that have a step in [start, stop)."""
        while self._next_start[b] < stop:
            self._draw(b)
        trials = self._trials[b]
        # trials are in time order; walk back from the end (a chunk holds few trials)
        out = []
        for t in reversed(trials):
            if t.start + t.n_steps <= start:
                break
            if t.start < stop:
                out.append(t)
        return out[::-1]

    def trial(self, b: int, j: int) -> Trial:
        while len(self._trials[b]) <= j:
            self._draw(b)
        return self._trials[b][j]

    def _trial_rates(self, t: Trial, stop: int) -> np.ndarray:
        key = (t.stream, t.index)
        if key not in self._rates:
            self._rates[key] = self.task.rates(t.spec)
        rates = self._rates[key]
        if t.start + t.n_steps <= stop:  # the trial ends in this chunk: no later chunk reads it
            del self._rates[key]
        return rates

    def chunk(self, k: int) -> Chunk:
        task, U, B = self.task, self.chunk_steps, self.n_streams
        start, stop = k * U, (k + 1) * U
        prob = np.empty((U, B, task.n_in), np.float32)
        prob[:] = task.background()
        labels = np.zeros((U, B), np.int32)
        weights = np.zeros((U, B), np.float32)
        resets = np.zeros((U, B), bool)
        tests = []
        for b in range(B):
            for t in self.trials_overlapping(b, start, stop):
                lo, hi = max(t.start, start), min(t.start + t.n_steps, stop)
                prob[lo - start:hi - start, b] = self._trial_rates(t, stop)[lo - t.start:hi - t.start]
                first, end = t.test_range()
                lo, hi = max(first, start) - start, min(end, stop) - start
                if lo < hi:
                    labels[lo:hi, b] = t.label
                    weights[lo:hi, b] = 1. / (t.n_steps - t.decision_start)
                    tests.append((t, lo, hi, end <= stop))
                if start <= t.start < stop:
                    resets[t.start - start, b] = True
        rng = np.random.default_rng([self.seed, self.salt, U, k])
        xs = (rng.random(prob.shape, dtype=np.float32) < prob).astype(np.uint8)
        tests.sort(key=lambda item: (item[0].test_range()[0], item[0].stream))
        return Chunk(start, xs, labels, weights, resets, tests)

    def chunks_for_trials(self, n_trials: int) -> int:
        """Chunks until every stream has finished its first n_trials trials."""
        end = max(self.trial(b, n_trials - 1).start + self.task.n_steps for b in range(self.n_streams))
        return -(-end // self.chunk_steps)

    def mean_period_steps(self) -> float:
        return self.task.n_steps + sum(self.iti_steps) / 2.


class TrialScorer:
    """Per-trial accuracy on a stream: the readout summed over each trial's decision window (argmax of the
    weighted average, as in the trial protocol), scored when the window ends. The partial sums of the
    windows in progress are its state (saved in a checkpoint)."""

    def __init__(self, n_streams: int, n_out: int = 2):
        self.partial = np.zeros((n_streams, n_out), np.float64)
        self.loss_partial = np.zeros(n_streams, np.float64)

    def add(self, chunk: Chunk, outs: np.ndarray, step_losses: np.ndarray = None) -> list:
        """outs (U, B, n_out) of a chunk (step_losses (U, B): weighted per-step losses, optional) -> list of
        (trial, correct, loss) for the trials whose decision window ended in this chunk."""
        done = []
        for t, lo, hi, ends_here in chunk.tests:
            b = t.stream
            self.partial[b] += outs[lo:hi, b].sum(0)
            if step_losses is not None:
                self.loss_partial[b] += step_losses[lo:hi, b].sum()
            if ends_here:
                done.append((t, int(np.argmax(self.partial[b]) == t.label), float(self.loss_partial[b])))
                self.partial[b] = 0.
                self.loss_partial[b] = 0.
        return done
