"""The benchmark (make benchmark; docs/benchmark.md): every rule tuned on a validation split, then final runs
over seeds at matched budgets, with paired statistics against BPTT.

    python scripts/benchmark.py --jobs 2                    # the whole benchmark, two local workers (make benchmark)
    python scripts/benchmark.py --tiny --jobs 2             # toy sizes, the same code path (make benchmark TINY=1)
    python scripts/benchmark.py --storage postgresql://user@host/db --worker   # one more worker, any machine
    python scripts/benchmark.py --report                    # rebuild the outputs from the storage and run folders

1. Tuning: one Optuna study per (task, rule) over the learning rate (log scale, LR_RANGE) and the rule's own
   knob (KNOBS: ES-D-RTRL's and OTTT's decay, e-prop's kappa, FPTT's alpha; TBPTT's window on a stream). A trial
   is a run folder (OUT/trials/<task>-<rule>/trial-NNNN) trained in stages up to each budget of the task's
   rungs (a resume with a larger --epochs / --stream_trials); at each rung its last validation accuracy
   (--validation: other generator keys on DMS, training samples held apart on the images; never the test set)
   goes to the pruner; the objective is the validation accuracy at the last rung.
2. Final runs: each rule at the selected configuration (the best complete trial), the task's seeds, the last
   rung's budget for every rule, no accuracy stop, in OUT/final/<task>-<rule>-s<seed>: queued as trials of a
   study of their own, so the same workers, heartbeat and retry run them.
3. Outputs in OUT (default results/benchmark/): table.csv, table.md, selected.json, learning_curves_<task>.png
   (rsnn/benchmark_report.py).

Every worker (the --jobs N local ones, each pinned to its own core, or one --worker per machine / SLURM array
task) takes the next trial to start from the shared storage; a stopped benchmark goes on where it stopped.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from rsnn import methods

DMS = os.path.join(ROOT, 'task-rsnn-long-term-dependency.py')
IMAGE = os.path.join(ROOT, 'task-image-classification.py')
LR_RANGE = (1e-4, 1e-1)
# each rule's own knob: (flag, low, high, log scale)
KNOBS = {'expsm_diag': ('etrace_decay', 0.5, 0.999, False), 'ottt': ('etrace_decay', 0.5, 0.999, False),
         'eprop': ('eprop_kappa', 0.0, 0.99, False), 'fptt': ('fptt_alpha', 0.01, 1.0, True)}
ALWAYS = {'uoro': ['--trace_chunk', '1']}  # UORO runs step by step (its chunked form does not exist)

_image = ['--n_layer', '3', '--n_rec', '128', '--model', 'lif-delta', '--data_length', '400', '--batches_per_epoch',
          '20', '--batch_size', '32', '--warmup_ratio', '0.', '--devices', 'cpu']
_tiny_dms = ['--preset', 'short-delay', '--lr_schedule', 'constant', '--n_rec', '8', '--t_sample', '20',
             '--t_delay', '20', '--t_test', '20', '--batch_size', '4']
_tiny_image = ['--n_layer', '2', '--n_rec', '8', '--model', 'lif-delta', '--data_length', '12',
               '--batches_per_epoch', '2', '--batch_size', '4', '--warmup_ratio', '0.', '--devices', 'cpu']
_cue = ['--preset', 'cue-accumulation', '--acc_th', '2']
_adlif = [f if f != 'lif-delta' else 'adlif' for f in _image]
# task: script, flags, the budget's flag, its rungs (the last is the budget of the final runs), --validation N,
# seeds of the final runs, TBPTT windows (ms) to tune over on a stream, synthetic data (n_train, n_test), the
# image script's --dataset (default: the task's name)
FULL = dict(
    dms=dict(script=DMS, flags=['--preset', 'cpu-demo', '--acc_th', '2'], budget='--epochs', rungs=[2, 5, 10],
             validation=512, seeds=5, grad_check=True),
    **{'dms-stream': dict(script=DMS, flags=['--preset', 'cpu-demo', '--protocol', 'stream', '--eval_every_trials',
                                             '25'], budget='--stream_trials', rungs=[50, 100, 150],
                          validation=256, seeds=3, windows=[500., 1000., 2000.])},
    nmnist=dict(script=IMAGE, flags=_image, budget='--epochs', rungs=[1, 2, 4], validation=500, seeds=3,
                synth=(6000, 1000), grad_check=True),
    shd=dict(script=IMAGE, flags=_image, budget='--epochs', rungs=[1, 2, 4], validation=500, seeds=3,
             synth=(4000, 1000), grad_check=True),
    **{'cue-accumulation': dict(script=DMS, flags=_cue, budget='--epochs', rungs=[2, 5, 10], validation=512, seeds=5,
                                grad_check=True),
       'shd-adlif': dict(script=IMAGE, flags=_adlif, dataset='shd', budget='--epochs', rungs=[1, 2, 4], validation=500,
                         seeds=3, synth=(4000, 1000), grad_check=True)},
)
TINY = dict(
    dms=dict(script=DMS, flags=_tiny_dms + ['--batches_per_epoch', '2', '--n_test_trials', '8', '--acc_th', '2'],
             budget='--epochs', rungs=[1, 2], validation=8, seeds=2, grad_check=True),
    **{'dms-stream': dict(script=DMS, flags=_tiny_dms[:-2] + ['--batch_size', '2', '--protocol', 'stream',
                                                              '--eval_every_trials', '1', '--t_iti', '20-40',
                                                              '--n_test_trials', '4'],
                          budget='--stream_trials', rungs=[1, 2], validation=4, seeds=2, windows=[40., 80.])},
    nmnist=dict(script=IMAGE, flags=_tiny_image, budget='--epochs', rungs=[1, 2], validation=4, seeds=2,
                synth=(16, 8), grad_check=True),
    shd=dict(script=IMAGE, flags=_tiny_image, budget='--epochs', rungs=[1, 2], validation=4, seeds=2,
             synth=(16, 8), grad_check=True),
)
# --reduced (make benchmark REDUCED=1): the DMS trials only, on the short-delay preset (100 GIF neurons, a 100 ms
# delay, 310 steps), 100 updates: sized for a 3-hour session of a 2-core machine (8 trials per study by default;
# benchmarks/benchmark_estimate.py projects the full size at about 13 hours of 2 workers before the new tasks)
REDUCED = dict(
    dms=dict(script=DMS, flags=['--preset', 'short-delay', '--lr_schedule', 'constant', '--acc_th', '2',
                                '--batches_per_epoch', '25', '--n_test_trials', '512'],
             budget='--epochs', rungs=[1, 2, 4], validation=256, seeds=5, grad_check=True),
)
TUNING_SEED = 100  # the tuning trials' network seed: none of the final runs' seeds (0, 1, ...)


def suggest(trial, task: str, rule: str, cfg: dict) -> list:
    """The trial's flags: its learning rate, the rule's knob, TBPTT's window on a stream."""
    lr = trial.suggest_float('lr', *LR_RANGE, log=True)
    flags = ['--lr', repr(lr)]
    if rule in KNOBS:
        name, lo, hi, log = KNOBS[rule]
        flags += [f'--{name}', repr(trial.suggest_float(name, lo, hi, log=log))]
    if rule == 'bptt' and cfg.get('windows'):
        flags += ['--tbptt_window', repr(trial.suggest_categorical('tbptt_window', cfg['windows']))]
    return flags


def params_flags(params: dict) -> list:
    return [x for k, v in sorted(params.items()) if k != 'seed' for x in (f'--{k}', repr(v))]


def base_flags(task: str, rule: str, cfg: dict, data_dir: str) -> list:
    flags = list(cfg['flags']) + ['--method', rule, '--no_progress'] + ALWAYS.get(rule, [])
    if cfg['script'] == IMAGE:
        dataset = cfg.get('dataset', task)
        flags += ['--dataset', dataset, '--data_dir', os.path.join(data_dir, dataset)]
    return flags


def ensure_data(tasks, table, data_dir):
    for task in tasks:
        synth, dataset = table[task].get('synth'), table[task].get('dataset', task)
        out = os.path.join(data_dir, dataset)
        if synth and not os.path.isdir(out):
            subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'synthetic_events.py'), '--dataset', dataset,
                            '--out', out, '--n_train', str(synth[0]), '--n_test', str(synth[1]), '--seed', '0',
                            '--no_baselines'], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


# ---- studies and workers ---------------------------------------------------------------------------------------


def tune_name(task, rule):
    return f'tune/{task}/{rule}'


def final_name(task, rule):
    return f'final/{task}/{rule}'


def make_study(name, storage, worker: int = 0, pruner: str = 'median', rungs=(1,)):
    import optuna
    pruners = dict(median=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0),
                   halving=optuna.pruners.SuccessiveHalvingPruner(min_resource=rungs[0], reduction_factor=3),
                   none=optuna.pruners.NopPruner())
    import zlib
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(study_name=name, storage=storage, direction='maximize', load_if_exists=True,
                               sampler=optuna.samplers.TPESampler(seed=1000 * worker + zlib.crc32(name.encode()) % 1000),
                               pruner=pruners[pruner])


def tuning_objective(task, rule, cfg, args):
    from rsnn import tuning

    def objective(trial):
        flags = base_flags(task, rule, cfg, args.data_dir) + suggest(trial, task, rule, cfg) + [
            '--seed', str(TUNING_SEED), '--validation', str(cfg['validation'])]
        folder = os.path.join(args.out, 'trials', f'{task}-{rule}')
        os.makedirs(folder, exist_ok=True)
        run_dir = os.path.join(folder, f'trial-{tuning.original_number(tuning.frozen(trial)):04d}')
        trial.set_user_attr('run_dir', os.path.relpath(run_dir, args.out))
        return tuning.staged_trial(trial, cfg['script'], flags, run_dir, run_dir + '.log', ROOT, cfg['budget'],
                                   cfg['rungs'])
    return objective


def final_objective(task, rule, cfg, args):
    from rsnn import tuning

    def objective(trial):
        seed = trial.suggest_int('seed', 0, 10 ** 6)
        flags = (base_flags(task, rule, cfg, args.data_dir) + params_flags(trial.user_attrs['config'])
                 + ['--seed', str(seed)] + (['--check_grad'] if cfg.get('grad_check') else []))
        os.makedirs(os.path.join(args.out, 'final'), exist_ok=True)
        run_dir = os.path.join(args.out, 'final', f'{task}-{rule}-s{seed}')
        tuning.run_to_budget(cfg['script'], flags, run_dir, run_dir + '.log', ROOT, cfg['budget'], cfg['rungs'][-1])
        return tuning.last_value(run_dir, 'test_acc') or 0.
    return objective


def queue_finals(task, rule, cfg, storage, tune_study, worker):
    """The final runs' study of (task, rule): one queued trial per seed at the selected configuration (the best
    complete tuning trial), queued once."""
    from optuna.trial import TrialState
    from rsnn.benchmark_report import best_trial
    study = make_study(final_name(task, rule), storage, worker)
    trials = study.get_trials(deepcopy=False)
    if trials:  # the configuration chosen when the first seed was queued
        config = trials[0].user_attrs['config']
    else:
        best = best_trial(tune_study)
        if best is None:  # every tuning trial failed: nothing to run (the table says so)
            return study
        config = dict(best.params)
    # a queued trial holds its seed among Optuna's fixed parameters until it starts
    live = {t.params.get('seed', t.system_attrs.get('fixed_params', {}).get('seed')) for t in trials
            if t.state in (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE)}
    for seed in range(cfg['seeds']):  # a seed whose run failed is queued again (the next pass or command)
        if seed not in live:
            study.enqueue_trial({'seed': seed}, user_attrs={'config': config})
    return study


def benchmark_cells(tasks, rules, table):
    """(task, rule) in the order the workers take them; a rule without a stream path is left out of the streams."""
    return [(t, r) for t in tasks for r in rules if not (table[t]['budget'] == '--stream_trials'
                                                         and not methods.get(r).stream)]


def run_worker(args, table, tasks, rules, worker: int):
    """One worker: the tuning trials of every study (taking what is left to start), then, study by study once
    its tuning is finished, the final runs."""
    from rsnn import tuning
    storage = tuning.open_storage(args.storage)
    cells = benchmark_cells(tasks, rules, table)
    for wait in (False, True):
        for task, rule in cells:
            cfg = table[task]
            study = make_study(tune_name(task, rule), storage, worker, args.pruner, cfg['rungs'])
            tuning.work(study, storage, tuning_objective(task, rule, cfg, args), args.trials, wait=wait)
    for wait in (False, True):
        for task, rule in cells:
            cfg = table[task]
            study = queue_finals(task, rule, cfg, storage, make_study(tune_name(task, rule), storage, worker), worker)
            tuning.work(study, storage, final_objective(task, rule, cfg, args), cfg['seeds'], wait=wait,
                        sample=False)


def pin_to(core):
    def pin():
        if hasattr(os, 'sched_setaffinity'):
            os.sched_setaffinity(0, {core})
    return pin


def start_workers(argv, jobs):
    """--jobs N: N worker processes (this script with --worker), each pinned to its own core where there are as
    many (os.sched_setaffinity; the runs they start inherit it)."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else []
    argv = [a for a in argv]
    procs = []
    for i in range(jobs):
        pin = pin_to(cores[i]) if len(cores) >= jobs else None
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__)] + argv
                                      + ['--worker', '--worker_index', str(i), '--jobs', '1'], cwd=ROOT,
                                      preexec_fn=pin))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f'error: worker exit codes {codes}; run the same command again to go on')


def parse(argv):
    p = argparse.ArgumentParser(description=' '.join(__doc__.split('\n\n')[0].split()))
    p.add_argument('--out', default=None, help='the benchmark folder (default results/benchmark, with --tiny '
                                               'results/benchmark-tiny)')
    p.add_argument('--tiny', action='store_true', help='toy sizes (CI): 2 seeds, 2 rungs of 1-2 epochs')
    p.add_argument('--reduced', action='store_true',
                   help='the DMS trials on the short-delay preset, 100 updates, 8 trials per study: one session '
                        '(results/benchmark-reduced)')
    p.add_argument('--storage', default=None,
                   help='the studies: an Optuna RDB URL (sqlite:///PATH, postgresql://..., mysql://...) or a journal '
                        'file (journal:PATH or PATH.journal) on a filesystem every worker sees (default '
                        'sqlite:///OUT/studies.db; SQLite is for one machine)')
    p.add_argument('--rules', default=None, help='comma-separated --method names (default: every rule; '
                                                 'with --tiny bptt,expsm_diag); bptt is the reference')
    p.add_argument('--tasks', default=None, help=f'comma-separated from {",".join(FULL)} (default: all; with '
                                                 '--tiny dms)')
    p.add_argument('--trials', type=int, default=None,
                   help='tuning trials (complete or pruned) per study (default 16; with --tiny 2)')
    p.add_argument('--seeds', type=int, default=None,
                   help="final runs' seeds per task (default the task's: 5 on the DMS trials, 3 elsewhere; 2 with --tiny)")
    p.add_argument('--pruner', choices=('median', 'halving', 'none'), default='median',
                   help="Optuna's MedianPruner (after 3 trials) or SuccessiveHalvingPruner on the validation accuracy "
                        'at each rung')
    p.add_argument('--jobs', type=int, default=1, help='local workers, each pinned to its own CPU core (default 1; '
                                                       'make benchmark: JOBS, default 2)')
    p.add_argument('--worker', action='store_true', help='run one worker in this process (another machine, a SLURM '
                                                         'array task); it writes the outputs as far as they go')
    p.add_argument('--worker_index', type=int, default=int(os.environ.get('SLURM_ARRAY_TASK_ID', 0)),
                   help="seeds this worker's sampler (default $SLURM_ARRAY_TASK_ID or 0)")
    p.add_argument('--report', action='store_true', help='only write the outputs from the storage and run folders')
    p.add_argument('--data_dir', default=None, help='the synthetic N-MNIST / SHD (default OUT/data)')
    args = p.parse_args(argv)
    if args.tiny and args.reduced:
        p.error('give --tiny or --reduced, not both')
    table = TINY if args.tiny else REDUCED if args.reduced else FULL
    if args.seeds is not None:
        if args.seeds < 1:
            p.error('--seeds must be at least 1')
        table = {t: dict(cfg, seeds=args.seeds) for t, cfg in table.items()}
    size = 'benchmark-tiny' if args.tiny else 'benchmark-reduced' if args.reduced else 'benchmark'
    args.out = os.path.abspath(args.out or os.path.join(ROOT, 'results', size))
    args.storage = args.storage or f'sqlite:///{os.path.join(args.out, "studies.db")}'
    args.data_dir = args.data_dir or os.path.join(args.out, 'data')
    args.trials = args.trials or (2 if args.tiny else 8 if args.reduced else 16)
    rules = (args.rules or ('bptt,expsm_diag' if args.tiny else ','.join(methods.names()))).split(',')
    tasks = (args.tasks or ','.join(table)).split(',') if not args.tiny else (args.tasks or 'dms').split(',')
    for r in rules:
        if r not in methods.names():
            p.error(f'unknown rule {r!r}; choose from {",".join(methods.names())}')
    for t in tasks:
        if t not in table:
            p.error(f'unknown task {t!r}; choose from {",".join(table)}')
    if args.jobs < 1 or args.trials < 1:
        p.error('--jobs and --trials must be at least 1')
    return args, table, tasks, rules


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args, table, tasks, rules = parse(argv)
    from rsnn import benchmark_report, tuning
    os.makedirs(args.out, exist_ok=True)
    if not args.report:
        ensure_data(tasks, table, args.data_dir)
        storage = tuning.open_storage(args.storage)  # the tables and studies made once, before the workers race
        for task, rule in benchmark_cells(tasks, rules, table):
            make_study(tune_name(task, rule), storage, pruner=args.pruner, rungs=table[task]['rungs'])
        if args.worker or args.jobs == 1:
            try:
                run_worker(args, table, tasks, rules, args.worker_index)
            except RuntimeError as e:  # a study whose runs crash whatever their parameters: one line
                from rsnn.errors import UserError
                raise UserError(str(e))
        else:
            start_workers(argv, args.jobs)
    size = ('TINY (toy sizes: the code path, no conclusions)' if args.tiny else
            'REDUCED (the DMS trials on the short-delay preset, 100 updates)' if args.reduced else 'Full size')
    note = (f"{size}; {args.trials} tuning "
            f"trials per study, the {args.pruner} pruner, lr from {LR_RANGE[0]:g} to {LR_RANGE[1]:g} (log); "
            'the difference to BPTT is paired by seed, bold where its interval excludes zero; command: '
            f"python scripts/benchmark.py {' '.join(argv)}")
    done = benchmark_report.write(args.out, args.storage, table, benchmark_cells(tasks, rules, table), LR_RANGE,
                                  note)
    print(f'wrote {os.path.join(args.out, "table.md")}' + ('' if done else ' (incomplete: runs are missing)'))
    return 0


if __name__ == '__main__':
    from rsnn.cli import cli_main
    cli_main(main)
