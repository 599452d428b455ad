"""--protocol stream: the plan of a stream run (the training and held-out streams, the chunks), its
evaluation on the held-out stream and its checkpoint contents, for a Trainer built with protocol='stream'
(rsnn/trainer.py: one update per chunk of stream, the neuron states and the rule's traces carried from one
chunk to the next; online rules step by step or chunked, BPTT truncated to the chunk).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Optional

import numpy as np

from rsnn import methods, trial_stream
from rsnn.errors import UserError
from rsnn.files import peak_rss_mb


BURN_IN_TRIALS = 1  # the held-out stream's first trial of every stream is run but not scored


def evaluate_stream(st, stream, n_trials_per_stream: int, burn_in: int = BURN_IN_TRIALS):
    """Held-out accuracy and loss of the current weights, frozen, on n_trials_per_stream trials of every
    stream of `stream` (a TrialStream) after `burn_in` trials per stream that are run but not scored (the
    first trial starts from zero states, which the training stream never has), run from zero states without
    any reset (unless the trainer's reset_per_trial control). The training states and traces are put back
    afterwards. Returns (loss, accuracy, trials scored)."""
    saved = st.get_states()
    st.reset(with_rule=False)
    scorer = trial_stream.TrialScorer(stream.n_streams, stream.task.n_out)
    correct, losses = [], []
    for k in range(stream.chunks_for_trials(n_trials_per_stream + burn_in)):
        chunk = stream.chunk(k)
        outs, per_stream = st.eval_chunk(chunk)
        for t, ok, loss in scorer.add(chunk, outs, per_stream):
            if burn_in <= t.index < n_trials_per_stream + burn_in:
                correct.append(ok)
                losses.append(loss)
    st.set_states(saved)
    return float(np.mean(losses)), float(np.mean(correct)), len(correct)


# --------------------------------------------------------------------------------------------
# The stream loop: run folder, checkpoints (with the stream's state), evaluation
# --------------------------------------------------------------------------------------------

TRIALS_TO = 0.9  # summary: the training trials after which the held-out accuracy first reached this


def stream_extra(trainer, chunks_done: int, scorer) -> dict:
    """What a stream's checkpoint holds besides the weights and the optimizer: the states and traces the
    stream carries (by their names), the chunk index and the partial test-period sums of the scorer."""
    # 32-bit, as jax restores them (x64 off): the checksum compares dtypes too
    return {'stream_state': trainer.get_states(), 'chunks_done': np.asarray(chunks_done, np.int32),
            'partial': np.asarray(scorer.partial, np.float32), 'loss_partial': np.asarray(scorer.loss_partial, np.float32)}


@dataclasses.dataclass(frozen=True)
class StreamConfig:
    """What the stream protocol reads of a run's flags (task-rsnn-long-term-dependency.py's stream group).

    n_streams: --batch_size parallel streams; t_iti: '--t_iti' text (MIN-MAX ms); update_every / tbptt_window:
    ms of stream per update (online rules / bptt; TBPTT's k2 is the rule's option); stream_trials: training length in trials per
    stream; eval_every_trials: trials per stream between held-out evaluations; n_test_trials, validation: held-out
    and validation trials (divided among the streams); stream_reset: the reset-per-trial control; grad_clip:
    for the clipped fraction in metrics.csv; resume, no_progress, check_grad: as the flags; title: the task's
    name in the figure title."""
    method: str
    n_streams: int
    seed: int
    t_iti: str = '100-500'
    update_every: float = 500.
    tbptt_window: float = 1000.
    stream_trials: int = 500
    eval_every_trials: int = 25
    n_test_trials: int = 512
    validation: int = 0
    stream_reset: int = 0
    grad_clip: float = 1.
    resume: Optional[str] = None
    no_progress: bool = False
    check_grad: bool = False
    title: str = 'DMS'

    @classmethod
    def from_flags(cls, values: dict, title: str = 'DMS') -> 'StreamConfig':
        """From the parsed flags (a dict: vars(args)); flags this protocol does not read are ignored."""
        names = {f.name for f in dataclasses.fields(cls)} - {'n_streams', 'check_grad', 'title'}
        return cls(n_streams=values['batch_size'], title=title,
                   check_grad=bool(values.get('check_grad') or values.get('check_grad_every')),
                   **{k: values[k] for k in names if k in values})

    @property
    def chunk_ms(self) -> float:
        """The stretch of stream per update: the TBPTT window for bptt, --update_every for the online methods."""
        return self.tbptt_window if self.method == 'bptt' else self.update_every


def chunk_ms(cfg: StreamConfig) -> float:
    """The stretch of stream per update (StreamConfig.chunk_ms)."""
    return cfg.chunk_ms


def stream_plan(cfg: StreamConfig, task):
    """The training stream, the held-out stream and the number of chunks of the run, for any trial task."""
    try:
        iti = trial_stream.parse_iti(cfg.t_iti)
    except ValueError as e:
        raise UserError(str(e))
    steps = task.steps(cfg.chunk_ms)
    if steps < 1:
        raise UserError(f'--{"tbptt_window" if cfg.method == "bptt" else "update_every"} must be at '
                        f'least one step of dt={task.dt} ms')
    train = trial_stream.TrialStream(task, cfg.n_streams, steps, cfg.seed, iti)
    held_out = trial_stream.TrialStream(task, cfg.n_streams, task.steps(EVAL_CHUNK_MS), cfg.seed, iti,
                                        salt=trial_stream.HELD_OUT_SALT)
    n_chunks = int(np.ceil(cfg.stream_trials * train.mean_period_steps() / steps))
    return train, held_out, n_chunks


EVAL_CHUNK_MS = 2000.  # the held-out stream is cut into chunks of this length (the same for every method)


def fit_stream(cfg: StreamConfig, trainer, run_dir: str, task, flags: dict, extra_config: dict = None) -> dict:
    """Train on the stream of `task` (a TrialTask) for cfg.stream_trials trials per stream; evaluate on the
    held-out stream every cfg.eval_every_trials trials per stream (train_loop.run: the loop of the trial
    protocol too). config.json holds `flags` (the run's flags), the plan and `extra_config`. Writes
    config.json, batches.csv (one row per update), metrics.csv (one row per evaluation), learning_curves.png,
    checkpoints and summary.json."""
    from rsnn import train_loop
    train, held_out, n_chunks = stream_plan(cfg, task)
    n_test = int(np.ceil(cfg.n_test_trials / cfg.n_streams))
    period = train.mean_period_steps()
    config = dict(flags, run_dir=run_dir, chunk_steps=train.chunk_steps, n_chunks=n_chunks,
                  mean_period_steps=period, n_test_trials_used=n_test * cfg.n_streams,
                  held_out_burn_in_trials=BURN_IN_TRIALS, trace_chunk_used=trainer.trace_chunk,
                  **(extra_config or {}))
    if cfg.resume:
        with open(os.path.join(run_dir, 'config.json')) as f:
            saved = json.load(f)
        if saved.get('batch_size', cfg.n_streams) != cfg.n_streams:
            raise UserError(f'--resume {run_dir}: --batch_size is the number of streams; it cannot change '
                            f'in a resumed stream run (the run has {saved["batch_size"]})')
    settings = train_loop.LoopSettings(epochs=n_chunks, method=cfg.method, experiment=f'{task.name} stream',
                                       resume=bool(cfg.resume), progress_bars=not cfg.no_progress,
                                       check_grad_every=int(cfg.check_grad))
    source = StreamSource(cfg, trainer, train, held_out, n_chunks, n_test, cfg.eval_every_trials * period)
    if cfg.validation:  # a third stream, its own generator key: val_loss, val_acc in metrics.csv
        source.validation = (trial_stream.TrialStream(task, cfg.n_streams, task.steps(EVAL_CHUNK_MS), cfg.seed,
                                                      trial_stream.parse_iti(cfg.t_iti),
                                                      salt=trial_stream.VALIDATION_SALT),
                             int(np.ceil(cfg.validation / cfg.n_streams)))
    return train_loop.run(settings, trainer, run_dir, source, config)


def update_stats(gnorms, grad_clip: float) -> dict:
    """The gradient norms (before the clip) of the updates applied since the last evaluation: median,
    maximum and the fraction that the clip to --grad_clip shortened."""
    g = np.asarray(gnorms, np.float64)
    if not g.size:
        return dict(grad_norm_median=float('nan'), grad_norm_max=float('nan'), clipped_frac=float('nan'))
    return dict(grad_norm_median=float(np.median(g)), grad_norm_max=float(g.max()),
                clipped_frac=float(np.mean(g > grad_clip)))


def weight_norms(st) -> dict:
    """Frobenius norms of the recurrent layer's input and recurrent weights (rows [x, s] of W) and of the
    readout, where the network is a DMSNet; {} otherwise."""
    rec = getattr(st.model, 'rec', None)
    if rec is None or not hasattr(rec, 'n_in'):
        return {}
    values = st.param_values()
    w = values.get('rec/linear/weight_op')
    w = np.asarray(w['weight'] if isinstance(w, dict) else w)
    out = dict(w_in_norm=float(np.linalg.norm(w[:rec.n_in])), w_rec_norm=float(np.linalg.norm(w[rec.n_in:])))
    r = values.get('out/linear/weight_op')
    if r is not None:
        out['w_out_norm'] = float(np.linalg.norm(np.asarray(r['weight'] if isinstance(r, dict) else r)))
    return out


ROLLING_TRIALS = 256  # the rolling training accuracy: the last trials that ended, over all streams


class StreamSource:
    """The stream protocol for train_loop.run: a period is the stretch of stream between two held-out
    evaluations (every --eval_every_trials trials per stream, and at the end), one update per chunk, the
    states and traces carried on (the trainer does not reset them)."""
    validation = None  # (the validation TrialStream, trials per stream): val_loss, val_acc in each evaluation row

    def __init__(self, cfg: StreamConfig, trainer, train, held_out, n_chunks: int, n_test: int, eval_steps: float):
        self.cfg, self.trainer, self.train_stream, self.held_out = cfg, trainer, train, held_out
        self.n_chunks, self.n_test, self.eval_steps = n_chunks, n_test, eval_steps
        self.scorer = trial_stream.TrialScorer(cfg.n_streams, train.task.n_out)
        self.next_chunk, self.trials_done, self.periods_done = 0, 0, 0
        from rsnn.train_loop import SourceTerms
        self.terms = SourceTerms(
            period_name='evaluation', default_stop='stream_trials', stops_at_acc_th=False, best_on_ties=True,
            further=f'--stream_trials N > {cfg.stream_trials}',
            figure_title=f'{cfg.title} stream, {methods.title(cfg.method)}, {cfg.chunk_ms:g} ms per update')

    # -- the periods
    def _ends_here(self, k: int) -> bool:
        U = self.train_stream.chunk_steps
        return int((k + 1) * U // self.eval_steps) > int(k * U // self.eval_steps) or k == self.n_chunks - 1

    def last_period(self, settings) -> int:
        return self.periods_done + sum(self._ends_here(k) for k in range(self.next_chunk, self.n_chunks))

    def updates(self, period: int):
        if self.next_chunk >= self.n_chunks:
            return None
        stop = next(k for k in range(self.next_chunk, self.n_chunks) if self._ends_here(k)) + 1
        return range(self.next_chunk, stop)

    def train(self, k: int) -> dict:
        chunk = self.train_stream.chunk(k)
        loss, gnorm, applied, outs, per_stream = self.trainer.train_chunk(chunk)
        return dict(loss=loss, grad_norm=gnorm, applied=applied, chunk=chunk, outs=outs, per_stream=per_stream)

    def account(self, ep, progress, k: int, result: dict, smooth: int) -> dict:
        for _, ok, trial_loss in self.scorer.add(result['chunk'], result['outs'], result['per_stream']):
            progress.recent = (progress.recent + [ok])[-ROLLING_TRIALS:]
            ep.accs.append(ok)
            ep.losses.append(trial_loss)
            self.trials_done += 1
        if result['applied']:
            ep.gnorms.append(result['grad_norm'])
        self.next_chunk = k + 1
        recent = progress.recent
        return dict(batch=k + 1, stream_s=(k + 1) * self.train_stream.chunk_steps * self.train_stream.dt / 1000.,
                    trials=self.trials_done, loss=result['loss'],
                    acc=float(np.mean(recent)) if recent else float('nan'), grad_norm=result['grad_norm'],
                    updated=int(result['applied']))

    # -- evaluation and checkpoints
    def evaluation_row(self, epoch: int, ep, progress, seconds: float, total: float) -> dict:
        train, k = self.train_stream, self.next_chunk
        U = train.chunk_steps
        self.trainer.pop_eval_rates()
        test_loss, test_acc, _ = evaluate_stream(self.trainer, self.held_out, self.n_test)
        rates = self.trainer.pop_eval_rates()
        if self.validation is not None:
            val_loss, val_acc, _ = evaluate_stream(self.trainer, *self.validation)
            self.trainer.pop_eval_rates()  # the firing rates of the row are the held-out stream's
        self.periods_done = epoch
        row = dict(epoch=epoch, batches=k, stream_s=k * U * train.dt / 1000.,
                   trials_per_stream=k * U / train.mean_period_steps(), trials=self.trials_done,
                   train_loss=sum(ep.losses) / max(len(ep.losses), 1), train_acc=sum(ep.accs) / max(len(ep.accs), 1),
                   test_loss=test_loss, test_acc=test_acc,
                   **(dict(val_loss=val_loss, val_acc=val_acc) if self.validation is not None else {}),
                   grad_norm=float(np.mean(ep.gnorms)) if ep.gnorms else float('nan'), seconds=total,
                   step_s_per_batch=ep.step_s_per_batch())
        row['s_per_1000_steps'] = row['step_s_per_batch'] * 1000. / U
        row.update(update_stats(ep.gnorms, self.cfg.grad_clip), **weight_norms(self.trainer))
        row['test_rate_hz'] = 1000. / train.dt * float(np.mean(rates)) if rates else float('nan')
        row.update({f'rate_layer{i}': r for i, r in enumerate(rates)})
        return row

    @staticmethod
    def describe(row: dict) -> str:
        return (f'{row["trials_per_stream"]:.0f} trials per stream ({row["stream_s"]:.0f} s of stream): train '
                f'acc {row["train_acc"]:.3f} | held-out loss {row["test_loss"]:.4f} acc {row["test_acc"]:.3f} | '
                f'{row["s_per_1000_steps"]:.3f} s per 1000 steps')

    # -- checkpoints and resume: the stream's states, the scorer's partial trials and the position
    def checkpoint(self) -> tuple:
        return stream_extra(self.trainer, self.next_chunk, self.scorer), dict(trials_done=self.trials_done)

    def restore(self, extra: dict, meta: dict, done: int, settings) -> Optional[str]:
        self.trainer.set_states(dict(extra['stream_state']))
        self.scorer.partial[:] = np.asarray(extra['partial'])
        self.scorer.loss_partial[:] = np.asarray(extra['loss_partial'])
        self.next_chunk = int(extra['chunks_done'])
        self.trials_done = int(meta.get('trials_done', 0))
        self.periods_done = done
        if self.next_chunk >= self.n_chunks:
            return f'it ran its {self.n_chunks} chunks of stream'
        print(f'the stream goes on at chunk {self.next_chunk} of {self.n_chunks}', flush=True)
        return None

    # -- the end
    def gradient_check(self, settings, run_dir: str):
        if settings.check_grad_every:
            print('note: --check_grad compares gradients on independent trials; the stream protocol has none '
                  '(no grad_fidelity.csv)', file=sys.stderr, flush=True)
        return None

    def summary(self, settings, metrics, state, progress, stopped, seconds, run_dir) -> dict:
        cfg, train = self.cfg, self.train_stream
        last = metrics[-1] if metrics else {}
        reached = [r for r in metrics if r['test_acc'] >= TRIALS_TO]
        timed = [r['s_per_1000_steps'] for r in metrics if np.isfinite(r.get('s_per_1000_steps', float('nan')))]
        from rsnn.update_memory import stream_update_memory  # jax: only once a run ends
        memory = stream_update_memory(self.trainer, train.chunk_steps, train.n_in)
        best = state.best_test_acc
        return dict(method=cfg.method, protocol='stream', chunk_ms=cfg.chunk_ms, chunk_steps=train.chunk_steps,
                    trace_chunk=self.trainer.trace_chunk, stream_reset=int(cfg.stream_reset),
                    stream_trials=cfg.stream_trials, updates=int(last.get('batches', 0)),
                    stream_s=last.get('stream_s'), trials=int(last.get('trials', 0)), test_acc=last.get('test_acc'),
                    best_test_acc=best if best >= 0 else None,
                    rolling_train_acc=float(np.mean(progress.recent)) if progress.recent else None,
                    trials_per_stream_to_0_9=reached[0]['trials_per_stream'] if reached else None,
                    stopped_because=stopped, seconds=last.get('seconds'),
                    compile_and_first_step_s=progress.first_step_s,
                    s_per_1000_steps=float(np.median(timed)) if timed else None,
                    update_temp_mb=memory['temp_bytes'] / 2 ** 20,
                    update_memory_mb=(memory['temp_bytes'] + memory['argument_bytes'] + memory['output_bytes']
                                      - memory['alias_bytes']) / 2 ** 20,
                    peak_rss_mb=peak_rss_mb(), run_dir=run_dir)
