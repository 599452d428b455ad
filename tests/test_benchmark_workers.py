"""Two benchmark workers on one study storage (rsnn/tuning.py), at toy size: a toy task script
(tests/toy/toy_task.py, no jax) in staged run folders. Worker A is killed (SIGKILL) in the middle of a trial,
after the trial's first checkpoint; worker B finishes the study: every trial ran once (one fresh start per
run folder), the killed trial was failed by its stale heartbeat and retried with its parameters, resuming
its run folder from the checkpoint, and none is lost."""
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, 'tests', 'toy', 'toy_worker.py')
N_TRIALS = 4


def start(url, out, worker, env):
    return subprocess.Popen([sys.executable, WORKER, url, str(out), str(N_TRIALS), str(worker)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=open(os.path.join(out, f'worker{worker}.err'), 'w'))


def lines(path):
    return open(path).read().split('\n')[:-1] if os.path.exists(path) else []


@pytest.mark.parametrize('kind', ['sqlite', 'journal'])
def test_two_workers_one_killed_no_trial_twice_none_lost(tmp_path, kind):
    from rsnn import tuning
    url = f'sqlite:///{tmp_path}/studies.db' if kind == 'sqlite' else f'journal:{tmp_path}/studies.journal'
    env = dict(os.environ, TOY_LOG=str(tmp_path / 'toy.log'), TOY_SLEEP='0.4')
    a = start(url, tmp_path, 0, env)
    b = start(url, tmp_path, 1, env)
    try:
        # kill A in the middle of a trial, after the trial's first checkpoint (epoch 1 of 3): A is stopped
        # (SIGSTOP) while its log and run folder are read, so the trial read is the trial killed (a slow poll
        # could otherwise see a finished trial's checkpoint while A had moved on to its next trial)
        deadline, victim = time.time() + 60, None
        while time.time() < deadline and victim is None:
            a.send_signal(signal.SIGSTOP)
            mine = [l.split() for l in lines(tmp_path / 'workers.log') if l.startswith('0 ')]
            last = os.path.join(mine[-1][2], 'checkpoints', 'last') if mine else None
            if last and os.path.isdir(os.path.join(last, '1')) and not os.path.isdir(os.path.join(last, '3')):
                victim = mine[-1]
                break
            a.send_signal(signal.SIGCONT)
            time.sleep(0.05)
        assert victim is not None, 'worker A never reached a checkpoint'
        a.send_signal(signal.SIGKILL)
        a.wait()
        assert b.wait(timeout=120) == 0, open(tmp_path / 'worker1.err').read()
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.kill()
    storage = tuning.open_storage(url)
    trials = optuna.load_study(study_name='toy', storage=storage).get_trials()
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    # none lost: the study has its trials, and nothing is left running or queued
    assert len(done) >= N_TRIALS and all(t.state in (TrialState.COMPLETE, TrialState.FAIL) for t in trials)
    # the killed trial failed, and its retry completed with its parameters in its run folder
    victim_number, victim_dir = int(victim[1]), victim[2]
    assert [t.number for t in failed] == [victim_number]
    retry = [t for t in done if tuning.original_number(t) == victim_number]
    assert len(retry) == 1 and retry[0].params == failed[0].params
    # no trial run twice: one fresh start per run folder, the retried one resumed after its checkpoint
    log = [l.split() for l in lines(tmp_path / 'toy.log')]
    fresh = [l[1] for l in log if l[0] == 'fresh']
    assert sorted(fresh) == sorted(set(fresh)) and len(fresh) == len(done)
    resumed_victim = [int(l[2]) for l in log if l[0] == 'resume' and l[1] == victim_dir]
    assert resumed_victim and resumed_victim[-1] >= 1
    epochs = [int(r.split(',')[0]) for r in lines(os.path.join(victim_dir, 'metrics.csv'))[1:]]
    assert epochs[-1] == 3 and sorted(set(epochs)) == [1, 2, 3]


def test_final_runs_run_only_their_queued_seeds_and_a_failed_seed_is_queued_again():
    """The final runs' study (scripts/benchmark.py queue_finals and tuning.work(sample=False)): one queued trial
    per seed at the tuning study's best configuration, queued once; a seed whose run failed is not replaced by
    a sampled seed but queued again by the next pass."""
    import importlib.util
    from rsnn import tuning
    spec = importlib.util.spec_from_file_location('benchmark', os.path.join(ROOT, 'scripts', 'benchmark.py'))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    storage = optuna.storages.InMemoryStorage()
    tune = bench.make_study('tune/dms/bptt', storage)
    for lr, value in ((1e-3, 0.6), (1e-2, 0.8), (3e-2, 0.7)):
        tune.enqueue_trial({'lr': lr})
        t = tune.ask({'lr': optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)})
        tune.tell(t, value)
    cfg = dict(seeds=3)
    final = bench.queue_finals('dms', 'bptt', cfg, storage, tune, 0)
    bench.queue_finals('dms', 'bptt', cfg, storage, tune, 0)  # again: nothing more queued
    assert len(final.get_trials()) == 3
    ran = []

    def objective(trial):
        seed = trial.suggest_int('seed', 0, 10 ** 6)
        ran.append((seed, trial.user_attrs['config']['lr']))
        if seed == 1 and sum(s == 1 for s, _ in ran) == 1:
            raise RuntimeError('the run crashed')
        return float(seed)
    tuning.work(final, storage, objective, 3, sample=False, poll_s=0.01)
    assert sorted(ran) == [(0, 1e-2), (1, 1e-2), (2, 1e-2)]  # the best configuration; no sampled seed
    bench.queue_finals('dms', 'bptt', cfg, storage, tune, 0)
    tuning.work(final, storage, objective, 3, sample=False, poll_s=0.01)
    done = sorted(t.params['seed'] for t in final.get_trials() if t.state == TrialState.COMPLETE)
    assert done == [0, 1, 2] and len(ran) == 4
