"""The benchmark's studies on Optuna (scripts/benchmark.py; docs/benchmark.md): the storage many workers
share, the worker loop that runs a study's trials until it has its number, and a trial as an ordinary run
folder trained in stages (the pruner reads the validation accuracy at each stage's end).

Storage: an RDB URL (SQLite by default: nothing to start; PostgreSQL / MySQL for many machines) with Optuna's
heartbeat, so a trial whose worker was killed is failed once its heartbeat is GRACE_S old and put back in the
queue with the same parameters (RetryHeartbeatStaleTrialCallback); or a journal file (`journal:PATH` or a
path ending in .journal / .log) on a shared filesystem, where Optuna 5.0 has no heartbeat: the workers keep
one of their own (a trial's user attribute `heartbeat`, the same failing and re-queueing).

A retried trial trains in the folder of the trial it retries (named by the original trial's number), so it
resumes from that run's last checkpoint instead of starting over.
"""
from __future__ import annotations

import json
import os
import threading
import time
from typing import Callable, Optional

import warnings

import optuna
from optuna.trial import TrialState

# the heartbeat and its retry are marked experimental in Optuna 5.0 (stable since 2.8); pinned in requirements.txt
warnings.filterwarnings('ignore', category=optuna.exceptions.ExperimentalWarning)

from rsnn import child_runs, run_folder

HEARTBEAT_S = 30      # a running trial's heartbeat interval (seconds)
GRACE_S = 120         # a running trial with no heartbeat for this long is failed and retried
MAX_RETRY = 3         # retries of one trial (a trial that kills its worker every time is not retried forever)
POLL_S = 5.           # a worker with nothing to start waits this long before it looks again
DONE = (TrialState.COMPLETE, TrialState.PRUNED)


def is_journal(url: str) -> bool:
    return url.startswith('journal:') or url.endswith(('.journal', '.log'))


def open_storage(url: str, heartbeat_s: int = HEARTBEAT_S, grace_s: int = GRACE_S):
    """The storage of `url`: an RDB URL (sqlite:///PATH, postgresql://..., mysql://...) or a journal file
    (journal:PATH, or a path ending in .journal / .log; Optuna's open-file lock, which works on NFS)."""
    from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
    if is_journal(url):
        path = url[len('journal:'):] if url.startswith('journal:') else url
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))
    if url.startswith('sqlite:///'):
        os.makedirs(os.path.dirname(os.path.abspath(url[len('sqlite:///'):])), exist_ok=True)
    engine = {'connect_args': {'timeout': 300}} if url.startswith('sqlite') else None  # many writers wait
    for attempt in range(5):  # workers that start together race to create the tables: the losers try again
        try:
            return RDBStorage(url, engine_kwargs=engine, heartbeat_interval=heartbeat_s, grace_period=grace_s,
                              heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY))
        except Exception as e:  # sqlalchemy's OperationalError / IntegrityError ('already exists')
            if attempt == 4 or 'already exists' not in str(e) and 'UNIQUE' not in str(e):
                raise
            time.sleep(0.5 + attempt)


def has_optuna_heartbeat(storage) -> bool:
    """open_storage gives every RDB storage Optuna's heartbeat; a journal storage has none."""
    from optuna.storages import RDBStorage
    return isinstance(storage, RDBStorage)


def original_number(trial) -> int:
    """The number of the trial that `trial` (a FrozenTrial) retries, or its own number."""
    first = trial.system_attrs.get('failed_trial')  # Optuna's retry of a heartbeat-stale trial
    if first is None:
        first = trial.user_attrs.get('retry_of')     # ours (journal storage)
    return trial.number if first is None else int(first)


def frozen(trial: optuna.Trial):
    """The stored record (a FrozenTrial) of a running trial."""
    return next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)


# ---- our own heartbeat (a journal storage) -----------------------------------------------------------------


class Heartbeat:
    """While a trial runs, its user attribute 'heartbeat' is set to the time every `every` seconds."""

    def __init__(self, trial: optuna.Trial, every: float):
        self.trial, self.every, self.stop = trial, every, threading.Event()
        trial.set_user_attr('heartbeat', time.time())
        self.thread = threading.Thread(target=self._beat, daemon=True)
        self.thread.start()

    def _beat(self):
        while not self.stop.wait(self.every):
            try:
                self.trial.set_user_attr('heartbeat', time.time())
            except Exception:  # the trial finished meanwhile
                return

    def close(self):
        self.stop.set()
        self.thread.join()


def fail_stale(study: optuna.Study, grace_s: float) -> list:
    """Fail the running trials whose own heartbeat is older than grace_s and queue each again with its
    parameters (up to MAX_RETRY times). Of two workers that find the same stale trial only the one whose
    'fail' the storage accepts re-queues it. Returns the numbers of the trials failed here."""
    failed = []
    now = time.time()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        beat = t.user_attrs.get('heartbeat', t.datetime_start.timestamp() if t.datetime_start else now)
        if now - beat <= grace_s:
            continue
        try:
            study.tell(t.number, state=TrialState.FAIL)
        except (ValueError, RuntimeError):  # another worker failed it first, or it just finished
            continue
        failed.append(t.number)
        retries = int(t.user_attrs.get('retries', 0))
        if retries < MAX_RETRY:
            study.enqueue_trial(t.params, user_attrs=dict(retry_of=original_number(t), retries=retries + 1,
                                                          **{k: v for k, v in t.user_attrs.items()
                                                             if k not in ('heartbeat', 'retry_of', 'retries')}))
    return failed


# ---- the worker loop -------------------------------------------------------------------------------------


def work(study: optuna.Study, storage, objective: Callable, n_trials: int, *, grace_s: float = GRACE_S,
         heartbeat_s: float = HEARTBEAT_S, poll_s: float = POLL_S, catch=(RuntimeError,), wait: bool = True,
         sample: bool = True) -> None:
    """Run trials of `study` until it holds n_trials finished ones (complete or pruned) and nothing queued or
    running: a worker with nothing left to start waits for the others' running trials (one of them may die
    and be queued again); with wait=False it returns then instead (to start another study's trials). With
    sample=False it runs only queued trials (the final runs), and returns when none is queued or running. Several workers (processes, machines) may run this on one study; between two
    workers that start at the same moment the study can get one trial more than n_trials."""
    own_beat = not has_optuna_heartbeat(storage)

    def run_one(trial):
        beat = Heartbeat(trial, heartbeat_s) if own_beat else None
        try:
            return objective(trial)
        finally:
            if beat:
                beat.close()

    while True:
        if own_beat:
            fail_stale(study, grace_s)
        else:
            optuna.storages.fail_stale_trials(study)
        trials = study.get_trials(deepcopy=False)
        count = {s: sum(t.state == s for t in trials) for s in TrialState}
        done = count[TrialState.COMPLETE] + count[TrialState.PRUNED]
        waiting, running = count[TrialState.WAITING], count[TrialState.RUNNING]
        if done >= n_trials and not waiting and not running:
            return
        if count[TrialState.FAIL] > 2 * n_trials + 3:  # a run that crashes whatever its parameters
            raise RuntimeError(f'study {study.study_name}: {count[TrialState.FAIL]} failed trials; see the run logs '
                               f'beside their run folders')
        if not waiting and (done + running >= n_trials or not sample):
            if not wait or not running:
                return
            time.sleep(poll_s)
            continue
        study.optimize(run_one, n_trials=1, catch=catch)


# ---- a trial as a run folder trained in stages -------------------------------------------------------------


def last_value(run_dir: str, column: str) -> Optional[float]:
    """The last finite value of a metrics.csv column, or None."""
    import csv
    import math
    path = os.path.join(run_dir, 'metrics.csv')
    if not os.path.exists(path):
        return None
    value = None
    with open(path) as f:
        for row in csv.DictReader(f):
            try:
                v = float(row.get(column) or 'nan')
            except ValueError:
                continue
            if math.isfinite(v):
                value = v
    return value


def run_to_budget(script: str, flags: list, run_dir: str, log_path: str, cwd: str, budget_flag: str,
                  budget: int) -> dict:
    """Train the run folder up to `budget` (the value of budget_flag, e.g. --epochs or --stream_trials): start
    it, resume it, or extend a finished run with a smaller budget (a resume with the larger value). A run
    stopped at a non-finite value is not extended. Returns its summary."""
    key = budget_flag.lstrip('-')
    state = child_runs.run_folder_state(run_dir)
    if state == 'finished':
        summary = run_folder.read_summary(run_dir)
        try:
            with open(os.path.join(run_dir, 'config.json')) as f:
                have = int(json.load(f)[key])
        except (OSError, ValueError, KeyError):
            have = -1
        if have >= budget or summary.get('stopped_because') == 'nan':
            return summary
    if state == 'new':
        argv = list(flags) + [budget_flag, str(budget), '--out_dir', run_dir]
    else:
        argv = ['--resume', run_dir, budget_flag, str(budget), '--no_progress']
    try:
        return child_runs.run_task(script, argv, run_dir, log_path, cwd, preexec_fn=child_runs.die_with_parent)
    except RuntimeError:
        summary = run_folder.read_summary(run_dir)  # a non-finite value ends a run with exit 1: a result
        if not summary or summary.get('stopped_because') != 'nan':
            raise
        return summary


def staged_trial(trial: optuna.Trial, script: str, flags: list, run_dir: str, log_path: str, cwd: str,
                 budget_flag: str, rungs: list, column: str = 'val_acc') -> float:
    """Train in stages up to each budget of `rungs`, reporting the last `column` (the validation accuracy)
    to the pruner at the budget; returns the value at the last rung (a pruned trial raises TrialPruned). A run
    stopped at a non-finite value scores its last evaluation (0 if none)."""
    value = 0.
    for budget in rungs:
        summary = run_to_budget(script, flags, run_dir, log_path, cwd, budget_flag, budget)
        v = last_value(run_dir, column)
        value = v if v is not None else 0.
        trial.report(value, budget)
        if summary.get('stopped_because') == 'nan':
            trial.set_user_attr('stopped', 'nan')
            return value
        if budget != rungs[-1] and trial.should_prune():
            raise optuna.TrialPruned()
    return value
