"""One benchmark worker on a toy study (tests/test_benchmark_workers.py): rsnn.tuning's worker loop, staged
trials of tests/toy/toy_task.py in run folders named by the original trial number.

    python tests/toy/toy_worker.py STORAGE_URL OUT N_TRIALS WORKER_ID
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import optuna  # noqa: E402

from rsnn import tuning  # noqa: E402

url, out, n_trials, worker = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
optuna.logging.set_verbosity(optuna.logging.WARNING)
storage = tuning.open_storage(url, heartbeat_s=1, grace_s=3)
study = optuna.create_study(study_name='toy', storage=storage, direction='maximize', load_if_exists=True,
                            sampler=optuna.samplers.RandomSampler(seed=worker))
script = os.path.join(ROOT, 'tests', 'toy', 'toy_task.py')


def objective(trial):
    lr = trial.suggest_float('lr', 1e-4, 1., log=True)
    run_dir = os.path.join(out, f'trial-{tuning.original_number(tuning.frozen(trial)):04d}')
    with open(os.path.join(out, 'workers.log'), 'a') as f:
        f.write(f'{worker} {trial.number} {run_dir}\n')
    return tuning.staged_trial(trial, script, ['--lr', repr(lr), '--sleep', os.environ.get('TOY_SLEEP', '0.5')],
                               run_dir, run_dir + '.log', ROOT, '--epochs', [1, 2, 3])


tuning.work(study, storage, objective, n_trials, grace_s=3, heartbeat_s=1, poll_s=0.5)
