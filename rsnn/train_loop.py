"""The one training loop of both protocols: updates grouped into evaluation periods (an epoch of trial batches,
or a stretch of stream between two held-out evaluations), a batches.csv row per update, a metrics.csv row
and a checkpoint per period, resume, the learning curves and summary.json at the end.

What differs between the protocols is a `source`, declared by the protocol `Source` below (TrialSource below
and stream_protocol.StreamSource implement it): the updates of a period, how one update is trained and
accounted, the evaluation row, what the checkpoint holds besides the weights and the optimizer (a stream: its
states and traces), and the summary's own fields.

`fit(settings, trainer, run_dir, train_batches, test_batches, step_weights, config)` trains on trials;
`stream_protocol.fit_stream` on a stream; both end in `run(settings, trainer, run_dir, source, config)`.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from typing import Protocol, Callable, Iterable, Optional

import numpy as np
from tqdm import tqdm

from rsnn import interrupts, methods
from rsnn.grad_check import GradientCheck
from rsnn.run_folder import (GRAD_FIDELITY_FILE, Checkpoints, RunLog, plot_learning_curves, read_grad_fidelity, read_summary,
                             run_log, values_finite, write_failure, write_failure_message, write_grad_fidelity)
from rsnn.distributed import is_main_process
from rsnn.errors import UserError
from rsnn.files import peak_rss_mb


@dataclasses.dataclass
class LoopSettings:
    """What the loop needs to know of a run (the task scripts fill it from their flags)."""
    epochs: int                            # the last epoch (evaluation period) to train
    method: str                            # a --method of the table (names the figure, the progress bar)
    experiment: str = ''                   # names the figure
    resume: bool = False                   # continue from the run folder's last checkpoint
    acc_th: Optional[float] = None         # stop when the mean accuracy of the last `smooth` batches reaches it
    smooth: int = 20
    check_grad_every: int = 0              # epochs between --check_grad comparisons (0 = none)
    progress_bars: bool = True

    @classmethod
    def from_args(cls, args, acc_th: Optional[float] = None, smooth: int = 20) -> 'LoopSettings':
        every = args.check_grad_every
        if every is None and args.check_grad:
            every = 1  # --check_grad alone: every epoch
        return cls(epochs=args.epochs, method=args.method, experiment=args.experiment, resume=bool(args.resume),
                   acc_th=acc_th, smooth=smooth, check_grad_every=every or 0,
                   progress_bars=not args.no_progress)


@dataclasses.dataclass(frozen=True)
class SourceTerms:
    """How a protocol's periods read in the log, when its run stops and how a finished run goes on."""
    period_name: str          # a period between two evaluations: 'epoch' (trials), 'evaluation' (stream)
    default_stop: str         # summary.json's stopped_because when the periods run out
    stops_at_acc_th: bool     # the smoothed training-accuracy stop (--acc_th) applies
    best_on_ties: bool        # a test accuracy equal to the best so far saves the 'best' checkpoint too
    further: str              # what to give to train a finished run further, '{done}' = periods done
    figure_title: str = ''    # the title of learning_curves.png


class Source(Protocol):
    """What the loop (`run`) needs of a protocol: its periods, one update, the rows it logs, what its checkpoint
    holds besides the trainer, and its summary. TrialSource (below) and stream_protocol.StreamSource implement
    it; a new protocol is one class with these members."""
    terms: SourceTerms

    def last_period(self, settings: LoopSettings) -> int:
        """The last period of the run (periods are numbered from 1)."""

    def updates(self, period: int) -> Optional[Iterable]:
        """The items of one period, each one `train` call; None when there is nothing left."""

    def train(self, item) -> dict:
        """One update from `item`: at least loss (float) and grad_norm; timed by the loop."""

    def account(self, ep: EpochStats, progress: Progress, item, result: dict, smooth: int) -> dict:
        """Book one update's result into the period's statistics; returns its batches.csv row."""

    def evaluation_row(self, period: int, ep: EpochStats, progress: Progress, seconds: float, total: float) -> dict:
        """The metrics.csv row after a period (test_loss, test_acc, ...)."""

    def describe(self, row: dict) -> str:
        """The printed line of an evaluation row."""

    def checkpoint(self) -> tuple:
        """(extra, meta): the arrays the checkpoint keeps besides the trainer's (None: none), and the
        JSON entries of its meta."""

    def restore(self, extra, meta: dict, done: int, settings: LoopSettings) -> Optional[str]:
        """Take back what `checkpoint` saved after `done` periods; returns why the run is finished, or None."""

    def gradient_check(self, settings: LoopSettings, run_dir: str):
        """A callable check(period) of the rule's gradient against BPTT's (--check_grad), or None."""

    def summary(self, settings: LoopSettings, metrics: list, state: 'RunState', progress: Progress, stopped: str,
                seconds: float, run_dir: str) -> dict:
        """summary.json of the run."""


@dataclasses.dataclass
class RunState:
    """Where a run stands between periods (restored from the checkpoint's meta on a resume)."""
    start_epoch: int = 1
    best_test_acc: float = -1.0
    recent: list = dataclasses.field(default_factory=list)
    seconds_before: float = 0.
    batches_done: Optional[int] = None     # optimizer updates so far, from the checkpoint (None: count them)
    meta: dict = dataclasses.field(default_factory=dict)  # the checkpoint's meta (a source's own entries)


@dataclasses.dataclass
class Progress:
    """What the periods of a run carry from one to the next."""
    batches_done: int = 0                  # optimizer updates so far (kept across a resume)
    recent: list = dataclasses.field(default_factory=list)  # the last batch accuracies (acc_th)
    first_step_s: Optional[float] = None   # the first step of this process: compilation included
    step_times: list = dataclasses.field(default_factory=list)  # this process's steady steps (after the first)


@dataclasses.dataclass
class EpochStats:
    """The updates of one period."""
    stopped: Optional[str] = None          # None, 'acc_th' or 'nan'
    losses: list = dataclasses.field(default_factory=list)
    accs: list = dataclasses.field(default_factory=list)
    gnorms: list = dataclasses.field(default_factory=list)
    sizes: list = dataclasses.field(default_factory=list)  # real samples per batch
    wait_s: float = 0.
    step_s: float = 0.
    timed_steps: int = 0
    step_times: list = dataclasses.field(default_factory=list)  # the steady steps' seconds (not the compiling one)

    def step_s_per_batch(self) -> float:
        """The median seconds of this period's steady steps (NaN when it had none): a step that compiled
        or waited on something else does not move it."""
        return float(np.median(self.step_times)) if self.step_times else float('nan')


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def run(settings: LoopSettings, trainer, run_dir: str, source, config: dict) -> dict:
    """Train `source`'s updates period after period, evaluating after each; writes config.json, metrics.csv,
    batches.csv, learning_curves.png, checkpoints and summary.json into run_dir. Returns the summary."""
    interrupts.reassert()
    log = run_log(run_dir)  # process 0 alone writes the folder (a --distributed run)
    check = source.gradient_check(settings, run_dir)
    ckpt = None
    try:
        ckpt = Checkpoints(run_dir)
        state = RunState()
        if settings.resume:
            state, finished = resume(ckpt, trainer, log, settings, run_dir, source)
            if finished is not None:
                return finished
        log.write_config(config)  # the configuration the run goes on with (a resume's overrides included)
        if check and state.start_epoch == 1:
            check(0)  # the initial weights
        return run_periods(settings, trainer, run_dir, source, log, ckpt, state, config, check)
    except OSError as e:  # a full disk, a read-only or forbidden file: one line, what is kept, what to do
        if write_failure(e) is None:
            raise
        raise UserError(write_failure_message(run_dir, e, f'a file in {run_dir}')) from None
    finally:
        if ckpt is not None:
            try:
                ckpt.close()
            except Exception as e:  # closing waits for writes that failed: the error above says it
                if write_failure(e) is None:
                    raise


def resume(ckpt: Checkpoints, trainer, log: RunLog, settings: LoopSettings, run_dir: str, source):
    """Load the newest checkpoint that verifies; returns (RunState, None), or (RunState, summary) when the
    run is finished."""
    extra, _ = source.checkpoint()
    done, meta = ckpt.restore(trainer, extra=extra)
    finished = source.restore(extra, meta, done, settings)
    log.truncate_after(done)  # the rows of periods after the checkpoint are trained again
    fidelity_path = os.path.join(run_dir, GRAD_FIDELITY_FILE)
    kept = [r for r in read_grad_fidelity(fidelity_path) if r['epoch'] <= done]
    if is_main_process() and (kept or os.path.exists(fidelity_path)):
        write_grad_fidelity(fidelity_path, kept, append=False)
    state = RunState(start_epoch=done + 1, best_test_acc=meta.get('best_test_acc', -1.0),
                     recent=list(meta.get('recent_train_acc', [])), seconds_before=meta.get('seconds', 0.),
                     batches_done=meta.get('batches_done'), meta=meta)
    if finished:
        print(f'{run_dir} is finished ({finished}); nothing to train. '
              f'Its results are in {run_dir}/summary.json'
              + ('' if meta.get('stopped_because') == 'acc_th' else f'; give {source.terms.further.format(done=done)} to train it further'),
              flush=True)
        summary = read_summary(run_dir)
        if not summary:  # stopped after its last checkpoint, before summary.json was written: write it now
            stopped = meta.get('stopped_because') or source.terms.default_stop
            summary = finish_run(settings, run_dir, log, state, Progress(state.batches_done or 0, state.recent),
                                 stopped, state.seconds_before, source)
            print(f'wrote the missing {run_dir}/summary.json', flush=True)
        summary.setdefault('stopped_because', meta.get('stopped_because') or source.terms.default_stop)
        return RunState(), dict(summary, finished=True)
    print(f'resumed {run_dir} after {source.terms.period_name} {done}', flush=True)
    return state, None


def run_periods(settings: LoopSettings, trainer, run_dir: str, source, log: RunLog, ckpt: Checkpoints,
                state: RunState, config: dict, check) -> dict:
    """The periods from state.start_epoch on: train, evaluate, log a metrics.csv row, checkpoint."""
    stopped = source.terms.default_stop
    t0 = time.time()
    metrics = log.read_metrics()
    # optimizer updates so far, the last `smooth` batch accuracies (acc_th), the compiling step's time
    done = state.batches_done if state.batches_done is not None else int(metrics[-1].get('batches', 0)) if metrics else 0
    progress = Progress(batches_done=done, recent=state.recent)
    for epoch in range(state.start_epoch, source.last_period(settings) + 1):
        ep_t0 = time.time()
        updates = source.updates(epoch)
        if updates is None:
            break
        bar = tqdm(total=len(updates) if hasattr(updates, '__len__') else None,
                   desc=f'{source.terms.period_name} {epoch}/{source.last_period(settings)} [{settings.method}]',
                   disable=not settings.progress_bars, leave=False, dynamic_ncols=True)
        ep = train_period(trainer, source, updates, log, progress, epoch=epoch, acc_th=settings.acc_th,
                          smooth=settings.smooth, bar=bar)
        bar.close()
        interrupts.check()
        stopped = ep.stopped or source.terms.default_stop
        if stopped != 'nan' and not values_finite(trainer.param_values()):
            stopped = 'nan'
        if stopped == 'nan':
            print(f'{source.terms.period_name} {epoch}: the loss, the gradient norm or the weights became NaN or infinite; '
                  f'stopping (the last good checkpoint is kept)', flush=True)
            break
        row = source.evaluation_row(epoch, ep, progress, time.time() - ep_t0, state.seconds_before + time.time() - t0)
        is_best = (row['test_acc'] >= state.best_test_acc if source.terms.best_on_ties
                   else row['test_acc'] > state.best_test_acc)
        state.best_test_acc = max(state.best_test_acc, row['test_acc'])
        log.append(row)
        metrics.append(row)
        if check and epoch % settings.check_grad_every == 0:
            check(epoch)
        meta = dict(best_test_acc=state.best_test_acc, recent_train_acc=list(progress.recent),
                    seconds=state.seconds_before + time.time() - t0, config=config,
                    stopped_because=stopped if stopped == 'acc_th' else None, epochs=settings.epochs,
                    batches_done=progress.batches_done)
        extra, own_meta = source.checkpoint()
        with interrupts.deferred():  # a signal during the write stops the run once the checkpoint is complete
            ckpt.save(trainer, epoch, dict(meta, **own_meta), best=is_best, extra=extra)
        print(source.describe(row), flush=True)
        if stopped == 'acc_th':
            print(f'smoothed training accuracy {np.mean(progress.recent):.3f} >= acc_th {settings.acc_th}: stopping')
            break
    return finish_run(settings, run_dir, log, state, progress, stopped, state.seconds_before + time.time() - t0,
                      source)


def train_period(trainer, source, updates: Iterable, log: RunLog, progress: Progress, *, epoch: int,
                 acc_th: Optional[float], smooth: int, bar=None) -> EpochStats:
    """The updates of one period: a batches.csv row each; stops early at a non-finite update ('nan') or when
    the mean accuracy of the last `smooth` updates reaches acc_th ('acc_th')."""
    ep = EpochStats()
    it = iter(updates)
    while True:
        interrupts.check()  # a Ctrl-C whose KeyboardInterrupt was lost (raised inside a gc callback) stops here
        tw = time.time()
        try:
            item = next(it)
        except StopIteration:
            break
        ts = time.time()
        ep.wait_s += ts - tw
        result = source.train(item)
        if progress.first_step_s is None:  # compilation happens here: keep it out of the per-update time
            progress.first_step_s = time.time() - ts
        else:
            ep.step_s += time.time() - ts
            ep.timed_steps += 1
            ep.step_times.append(time.time() - ts)
            progress.step_times.append(ep.step_times[-1])
        if not math.isfinite(result['loss']) or not getattr(trainer, 'last_update_finite', True):
            ep.stopped = 'nan'
            break
        progress.batches_done += 1
        row = source.account(ep, progress, item, result, smooth)
        log.append_batch(dict(epoch=epoch, **row, seconds=round(time.time() - ts, 4)))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{result['loss']:.4f}", acc_avg=f'{np.mean(progress.recent):.3f}'
                            if progress.recent else 'nan')
        if (acc_th is not None and source.terms.stops_at_acc_th and len(progress.recent) == smooth
                and np.mean(progress.recent) >= acc_th):
            ep.stopped = 'acc_th'
            break
    return ep


def finish_run(settings: LoopSettings, run_dir: str, log: RunLog, state: RunState, progress: Progress,
               stopped: str, seconds: float, source) -> dict:
    """The learning curves and summary.json of a run that has stopped (also written by a resume that finds
    them missing)."""
    metrics = log.read_metrics()
    if is_main_process():
        plot_learning_curves(metrics, os.path.join(run_dir, 'learning_curves.png'), source.terms.figure_title)
    summary = source.summary(settings, metrics, state, progress, stopped, seconds, run_dir)
    if metrics and not math.isfinite(metrics[-1]['test_acc']):
        print('warning: test_acc is not a number (no test sample was evaluated); summary.json holds null',
              file=sys.stderr, flush=True)
    log.write_summary(summary)
    return summary


# --------------------------------------------------------------------------------------------
# Trials
# --------------------------------------------------------------------------------------------


def fit(settings: LoopSettings, trainer, run_dir: str, train_batches: Callable[[int], Iterable],
        test_batches: Callable[[], Iterable], step_weights, config: dict,
        validation_batches: Optional[Callable[[], Iterable]] = None) -> dict:
    """Train on trials, evaluating after every epoch; train_batches(epoch) yields (xs, labels) numpy batches,
    test_batches() the held-out ones, validation_batches() (optional, --validation) a validation set whose
    loss and accuracy go into metrics.csv as val_loss, val_acc. `config` is written to config.json (a later
    --resume reads it). Returns the summary (also written to summary.json)."""
    source = TrialSource(trainer, train_batches, test_batches, step_weights,
                         title=f'{settings.experiment} {methods.title(settings.method)}')
    source.validation_batches = validation_batches
    return run(settings, trainer, run_dir, source, config)


class TrialSource:
    """The trial protocol: a period is an epoch of batches, each an update from zero states."""
    validation_batches = None  # fit(validation_batches=...): val_loss, val_acc in each evaluation row

    def __init__(self, trainer, train_batches, test_batches, step_weights, title: str = ''):
        self.terms = SourceTerms(period_name='epoch', default_stop='epochs', stops_at_acc_th=True,
                                 best_on_ties=False, further='--epochs N > {done}', figure_title=title)
        self.trainer, self.train_batches, self.test_batches = trainer, train_batches, test_batches
        self.step_weights = step_weights
        self.per_batch = None  # optimizer updates per batch where the rule updates within it (FPTT), else None

    # -- the periods
    def last_period(self, settings) -> int:
        return settings.epochs

    def updates(self, epoch: int):
        return self.train_batches(epoch)

    def train(self, batch) -> dict:
        xs, labels = batch
        if self.per_batch is None and getattr(self.trainer, 'in_sequence_updates', lambda: False)():
            self.per_batch = self.trainer.updates_per_batch(np.shape(xs)[0], self.step_weights)
        loss, acc, gnorm = self.trainer.train_step(np.asarray(xs), np.asarray(labels), self.step_weights)
        return dict(loss=loss, acc=acc, grad_norm=gnorm)

    def account(self, ep: EpochStats, progress: Progress, batch, result: dict, smooth: int) -> dict:
        ep.losses.append(result['loss'])
        ep.accs.append(result['acc'])
        ep.sizes.append(np.shape(batch[1])[0])  # real samples (a short batch is padded and masked)
        ep.gnorms.append(result['grad_norm'])
        progress.recent = (progress.recent + [result['acc']])[-smooth:]
        row = dict(batch=progress.batches_done, loss=result['loss'], acc=result['acc'],
                   grad_norm=result['grad_norm'])
        if self.per_batch:  # FPTT: batch counts trial batches; updates the optimizer steps (batches x windows)
            row['updates'] = progress.batches_done * self.per_batch
        return row

    # -- evaluation and checkpoints
    def evaluation_row(self, epoch: int, ep: EpochStats, progress: Progress, seconds: float, total: float) -> dict:
        row = epoch_row(self.trainer, self.test_batches, self.step_weights, epoch, ep, progress, seconds)
        if self.validation_batches is not None:
            row['val_loss'], row['val_acc'] = evaluate(self.trainer, self.validation_batches(), self.step_weights)
            self.trainer.pop_eval_rates()  # the firing rates of the row are the test set's
        if self.per_batch:
            row['updates'] = row['batches'] * self.per_batch
        return row

    @staticmethod
    def describe(row: dict) -> str:
        return (f'epoch {row["epoch"]}: train loss {row["train_loss"]:.4f} acc {row["train_acc"]:.3f} | test loss '
                f'{row["test_loss"]:.4f} acc {row["test_acc"]:.3f} | {row["step_s_per_batch"]:.3f} s/batch step, '
                f'{row["data_wait_s_per_batch"]:.3f} s/batch data')

    # -- checkpoints and resume: the trainer's state is all a trial run keeps
    @staticmethod
    def checkpoint() -> tuple:
        return None, {}

    @staticmethod
    def restore(extra, meta: dict, done: int, settings) -> Optional[str]:
        return finished_because(meta, done, settings.epochs)

    # -- the end
    def gradient_check(self, settings, run_dir: str):
        return GradientCheck.for_run(settings, self.trainer, run_dir, self.test_batches, self.step_weights)

    def summary(self, settings, metrics, state, progress, stopped, seconds, run_dir) -> dict:
        summary = run_summary(settings.method, metrics, state, progress, stopped, seconds, run_dir)
        if self.per_batch:  # batches_run counts trial batches; the optimizer took updates_per_batch per batch
            summary.update(updates_per_batch=self.per_batch, updates=summary['batches_run'] * self.per_batch)
        return summary


def epoch_row(trainer, test_batches, step_weights, epoch: int, ep: EpochStats, progress: Progress,
              seconds: float) -> dict:
    """The metrics.csv row of an epoch: the training means (batches weighted by their real samples, like
    the test means), the held-out evaluation, timings and each layer's firing rate."""
    n_batches = max(len(ep.losses), 1)
    train_loss = float(np.average(ep.losses, weights=ep.sizes)) if ep.losses else float('nan')
    train_acc = float(np.average(ep.accs, weights=ep.sizes)) if ep.accs else float('nan')
    trainer.pop_eval_rates()
    test_loss, test_acc = evaluate(trainer, test_batches(), step_weights)
    rates = trainer.pop_eval_rates()
    row = dict(epoch=epoch, batches=progress.batches_done, train_loss=train_loss, train_acc=train_acc,
               test_loss=test_loss, test_acc=test_acc,
               grad_norm=float(np.mean(ep.gnorms)) if ep.gnorms else float('nan'),
               seconds=seconds, data_wait_s_per_batch=ep.wait_s / n_batches,
               step_s_per_batch=ep.step_s_per_batch(),
               **{f'rate_layer{i}': r for i, r in enumerate(rates)})
    if epoch == 1:
        warning = silence_warning(rates, ep.losses, getattr(getattr(trainer.model, 'out', None), 'n_out', 0),
                                  getattr(trainer, 'loss', 'cel'))
        if warning:
            print(warning, flush=True)
    return row


def run_summary(method: str, metrics: list, state: RunState, progress: Progress, stopped: str, seconds: float,
                run_dir: str) -> dict:
    last = metrics[-1] if metrics else {}
    return dict(method=method, epochs_run=int(last.get('epoch', 0)),
                batches_run=int(last.get('batches', 0)),
                train_acc=last.get('train_acc'), test_acc=last.get('test_acc'),
                best_test_acc=state.best_test_acc if state.best_test_acc >= 0 else None,
                smoothed_train_acc=float(np.mean(progress.recent)) if progress.recent else None,
                stopped_because=stopped, seconds=seconds,
                compile_and_first_step_s=progress.first_step_s,
                step_s_per_batch=steady_step_s(progress, metrics), peak_rss_mb=peak_rss_mb(), run_dir=run_dir)


def steady_step_s(progress: Progress, metrics: list) -> Optional[float]:
    """summary.json's step_s_per_batch: the median over this process's steady steps (the compiling first
    step left out); a process that trained no step (a resume that only writes the summary) takes the median
    of the periods' rows."""
    if progress.step_times:
        return float(np.median(progress.step_times))
    rows = [r['step_s_per_batch'] for r in metrics if math.isfinite(r.get('step_s_per_batch', float('nan')))]
    return float(np.median(rows)) if rows else None


SILENT_RATE = 1e-3


def silence_warning(rates: list, losses: list, n_classes: int, loss: str = 'cel') -> Optional[str]:
    """One line when a layer is (nearly) silent (< SILENT_RATE spikes per neuron per step at the first
    evaluation), or when the cross-entropy has stayed within 2 % of ln(n_classes) over the last batches of
    the first epoch (at least 20 batches); None otherwise."""
    silent = [(i, r) for i, r in enumerate(rates) if r < SILENT_RATE]
    if silent:
        i, r = silent[0]
        flag = '--ff_scale (input weights)' if i == 0 else '--rec_scale or --ff_scale'
        more = f' (layers {", ".join(str(j) for j, _ in silent)} are all below it)' if len(silent) > 1 else ''
        return (f'warning: layer {i} fires {r:.2e} spikes per neuron per step at the first evaluation '
                f'(< {SILENT_RATE:g}){more}: nothing reaches the readout; raise {flag}, or lower --V_th')
    if loss == 'cel' and n_classes > 1 and len(losses) >= 20:
        recent, chance = sum(losses[-10:]) / 10, math.log(n_classes)
        if abs(recent - chance) <= 0.02 * chance:
            return (f'warning: the training loss {recent:.4f} is still within 2 % of ln({n_classes}) = '
                    f'{chance:.4f} after the first epoch: the network has not learned; check --lr, '
                    f'--ff_scale / --rec_scale and the firing rates (rate_layer* in metrics.csv)')
    return None


def finished_because(meta: dict, done: int, epochs: int) -> Optional[str]:
    """Why a run whose last checkpoint is epoch `done` has nothing left to train, or None."""
    if meta.get('stopped_because') == 'acc_th':
        return f'it stopped at acc_th after epoch {done}'
    if done >= epochs:
        return f'it ran its last epoch, {done} of --epochs {epochs}'
    return None


def evaluate(trainer, batches: Iterable, step_weights):
    total_loss = total_correct = total_n = 0.
    for xs, labels in batches:
        loss, acc, n = trainer.evaluate(xs, labels, step_weights)
        total_loss += loss * n
        total_correct += acc * n
        total_n += n
    if total_n == 0:
        return float('nan'), float('nan')
    return total_loss / total_n, total_correct / total_n