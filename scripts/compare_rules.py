"""Every learning rule of rsnn/methods.py on the same tasks (make compare-rules; docs/online-rules.md):

    python scripts/compare_rules.py --jobs 2             # the full comparison (make compare-rules; see FULL)
    python scripts/compare_rules.py --tiny               # the same code path at toy sizes (CI)
    python scripts/compare_rules.py --reduced            # short-delay DMS, short image runs
    python scripts/compare_rules.py --rules ottt,eprop --tasks dms --seeds 0

Tasks: `dms` (the 1000 ms DMS trials with make demo's settings, the preset cpu-demo), `dms-stream` (the same
task as a stream, --protocol stream), `nmnist` and `shd` (the synthetic stand-ins of scripts/synthetic_events.py,
3 x 128 LIF-delta), `shd-adlif` (the SHD stand-in with adaptive neurons, --model adlif, 3 x 128), `cue-accumulation`
and `store-recall` (the GIF presets of docs/tasks.md, cue-accumulation-gif and store-recall-gif, on trials), `credit` (the credit task on a stream). Each (task, rule, seed) is one run of the task script in its own process and run folder
under OUT/runs/: a finished folder is reused, an interrupted one resumed, so the script can be stopped and
started again. The trial tasks run with --check_grad (the cosine to BPTT's gradient on the first test batch,
before training and at the last epoch). Written to OUT (default results/compare-rules/):

  table.csv   rule, task, seed, final_test_acc, best_test_acc, batches, s_per_batch, step_memory_mb,
              grad_cosine_init, grad_cosine_trained (and step_memory_formula_mb, stopped)
  table.md    the same as a table
  accuracy_vs_memory_<task>.png   held-out accuracy against the step memory, one point per run

batches: the optimizer updates until the held-out accuracy first reached --acc (at an evaluation), blank if
never. step_memory_mb: XLA's memory analysis of the compiled update, less its input (trials: compiled here,
in this process, for the run's sizes; stream: the run's own update_memory_mb). step_memory_formula_mb: the
rule's own state by its formula in the table of methods. grad_cosine_*: the mean over weights of each weight's
cosine to BPTT (grad_fidelity.csv; a weight with a zero gradient left out; blank for BPTT itself and for the
stream).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from rsnn.cli import rule_options
from rsnn.files import write_json
from rsnn import methods
from rsnn.benchmark_report import grad_cosines, read_csv  # (the benchmark's: one reading of a run folder)
from rsnn.child_runs import run_folder_state, run_or_resume

DMS = os.path.join(ROOT, 'task-rsnn-long-term-dependency.py')
IMAGE = os.path.join(ROOT, 'task-image-classification.py')
COLUMNS = ['rule', 'task', 'seed', 'final_test_acc', 'best_test_acc', 'batches', 's_per_batch', 'step_memory_mb',
           'grad_cosine_init', 'grad_cosine_trained', 'step_memory_formula_mb', 'budget', 'stopped']
TASKS = ('dms', 'dms-stream', 'nmnist', 'shd', 'shd-adlif', 'cue-accumulation', 'store-recall', 'credit')
# the trial tasks run by task-rsnn-long-term-dependency.py from their preset (rsnn/tasks/), one seed
NEW_TRIAL_TASKS = ('cue-accumulation', 'store-recall')
# the image stand-ins: the task name -> (its --dataset, its --model in place of the setting's)
IMAGE_TASKS = {'nmnist': ('nmnist', None), 'shd': ('shd', None), 'shd-adlif': ('shd', 'adlif')}
# the order in which rules get the extra DMS seeds: the cheaper first, so that a spent budget leaves the dearest out
BY_COST = ('bptt', 'fptt', 'expsm_diag', 'ottt', 'diag', 'snap1', 'eprop', 'uoro')

# Sized for one 2-core CPU: 53 runs whose training time summed to 186 minutes of one core each (measured on the
# 2026-12-03 runs), so about 100 minutes with --jobs 2 once the memory analysis of each row is added:
# the DMS trials get 250 updates (make demo's settings otherwise, its accuracy stop included), the stream 150
# trials per stream; UORO, step by step, 50 updates on DMS and 40 on the images (its budget column says so).
# the credit task as make reproduce-credit runs it (scripts/reproduce_credit.py), an update every 500 ms
CREDIT_STREAM = ['--preset', 'credit', '--protocol', 'stream', '--t_iti', '100-500', '--n_test_trials', '1024',
                 '--eval_every_trials', '25', '--update_every', '500', '--lr', '0.001']
FULL = dict(
    dms=['--preset', 'cpu-demo', '--epochs', '10'],
    stream=['--preset', 'cpu-demo', '--protocol', 'stream', '--stream_trials', '150'],
    image=['--n_layer', '3', '--n_rec', '128', '--model', 'lif-delta', '--data_length', '400', '--epochs', '2',
           '--batches_per_epoch', '40', '--batch_size', '32', '--warmup_ratio', '0.', '--devices', 'cpu'],
    synth=dict(nmnist=(6000, 1000), shd=(4000, 1000)),
    caps={('uoro', 'dms'): ['--epochs', '2'], ('uoro', 'image'): ['--epochs', '1'],
          ('uoro', 'cue-accumulation'): ['--epochs', '2'], ('uoro', 'store-recall'): ['--epochs', '2']},
    credit=CREDIT_STREAM + ['--t_delay', '1000', '--stream_trials', '150'],
    trial_tasks={'cue-accumulation': ['--preset', 'cue-accumulation-gif'], 'store-recall': ['--preset', 'store-recall-gif']},
)
# the new trial tasks at toy size: a few steps, 8 neurons (2 of them memory neurons), one batch of 4
TINY_TRIAL = ['--n_rec', '8', '--n_memory', '2', '--batch_size', '4', '--batches_per_epoch', '2', '--epochs', '1',
              '--n_test_trials', '8']
TINY = dict(
    dms=['--preset', 'short-delay', '--n_rec', '8', '--t_sample', '20', '--t_delay', '20', '--t_test', '20',
         '--batch_size', '4', '--batches_per_epoch', '2', '--epochs', '1', '--n_test_trials', '8'],
    stream=['--preset', 'short-delay', '--n_rec', '8', '--t_sample', '20', '--t_delay', '20', '--t_test', '20',
            '--batch_size', '2', '--protocol', 'stream', '--stream_trials', '2', '--eval_every_trials', '1',
            '--t_iti', '20-40'],
    image=['--n_layer', '2', '--n_rec', '8', '--model', 'lif-delta', '--data_length', '12', '--epochs', '1',
           '--batches_per_epoch', '2', '--batch_size', '4', '--warmup_ratio', '0.', '--devices', 'cpu'],
    synth=dict(nmnist=(16, 8), shd=(16, 8)),
    caps={},
    credit=['--preset', 'credit', '--protocol', 'stream', '--t_fixation', '5', '--t_sample', '20', '--t_test', '20',
            '--n_rec', '12', '--n_memory', '3', '--batch_size', '4', '--t_iti', '5-15', '--n_test_trials', '8',
            '--eval_every_trials', '2', '--t_delay', '20', '--stream_trials', '3', '--update_every', '20'],
    trial_tasks={'cue-accumulation': ['--preset', 'cue-accumulation-gif', '--cue_n', '1', '--cue_t_cue', '5',
                                      '--cue_t_gap', '2', '--cue_t_delay', '5', '--cue_t_recall', '5'] + TINY_TRIAL,
                 'store-recall': ['--preset', 'store-recall-gif', '--sr_periods', '4', '--sr_t_period', '5',
                                  '--sr_min_delay', '1'] + TINY_TRIAL},
)
# A reduced comparison that fits a shared 2-core CPU in about half an hour: the short-delay DMS preset (100 ms
# delay, 100 GIF neurons, 310 steps) for 4 epochs of 50 batches, its stream for 100 trials, the image stand-ins
# at 3 x 128 with 100 bins for 10 batches.
REDUCED = dict(
    dms=['--preset', 'short-delay', '--epochs', '4', '--acc_th', '2'],
    stream=['--preset', 'short-delay', '--protocol', 'stream', '--stream_trials', '100'],
    image=['--n_layer', '3', '--n_rec', '128', '--model', 'lif-delta', '--data_length', '100', '--epochs', '1',
           '--batches_per_epoch', '10', '--batch_size', '32', '--warmup_ratio', '0.', '--devices', 'cpu'],
    synth=dict(nmnist=(2000, 500), shd=(2000, 500)),
    caps={},
    credit=CREDIT_STREAM + ['--t_delay', '1000', '--stream_trials', '50'],
    trial_tasks={t: ['--preset', t, '--epochs', '4', '--n_test_trials', '512'] for t in NEW_TRIAL_TASKS},
)
# each rule's own flags (the ES-D-RTRL decay of the README image commands; UORO: step by step). FPTT runs with
# its defaults: --fptt_window 100 steps on trials (the 2010-step DMS trial: 21 windows, the 400-bin images: 4;
# the tiny trials are shorter than one window: one update per batch), --update_every on the streams.
RULE_FLAGS = {'expsm_diag': ['--etrace_decay', '0.9'], 'ottt': ['--etrace_decay', '0.9'],
              'uoro': ['--trace_chunk', '1']}


def flags_for(task, rule, seed, cfg, data_dir):
    common = ['--method', rule, '--seed', str(seed), '--no_progress']
    own = RULE_FLAGS.get(rule, []) if task in IMAGE_TASKS else (['--trace_chunk', '1'] if rule == 'uoro' else [])
    cap = cfg['caps'].get((rule, 'image' if task in IMAGE_TASKS else task), [])
    if task == 'dms':
        return DMS, cfg['dms'] + ['--check_grad'] + common + own + cap
    if task == 'dms-stream':
        return DMS, cfg['stream'] + common + own + cap
    if task == 'credit':
        return DMS, cfg['credit'] + common + own + cap
    if task in NEW_TRIAL_TASKS:
        return DMS, cfg['trial_tasks'][task] + ['--check_grad'] + common + own + cap
    dataset, model = IMAGE_TASKS[task]
    image = cfg['image'] if model is None else with_flag(cfg['image'], '--model', model)
    return IMAGE, image + ['--dataset', dataset, '--data_dir', os.path.join(data_dir, dataset),
                           '--check_grad'] + common + own + cap


def with_flag(argv, flag, value):
    """argv with flag's value replaced (or the flag added)."""
    argv = list(argv)
    if flag in argv:
        argv[argv.index(flag) + 1] = value
        return argv
    return argv + [flag, value]


def cells(tasks, rules, seeds):
    """(task, rule, seed) in the order they run: seed 0 of every rule on the trial tasks, then the other seeds
    of DMS (the cheaper rules first), then the streams; the credit task's BPTT (TBPTT), D-RTRL and ES-D-RTRL
    cells are read from make reproduce-credit's table (CREDIT_FROM), the other rules run here as it runs them."""
    first, rest = [], []
    streams = ('dms-stream', 'credit')
    for task in [t for t in ('dms', 'nmnist', 'shd', 'shd-adlif') + NEW_TRIAL_TASKS + streams if t in tasks]:
        for rule in methods.ordered(rules):
            if task in streams and not methods.get(rule).stream or task == 'credit' and rule in CREDIT_FROM.values():
                continue
            (first if task not in streams else rest).append((task, rule, seeds[0]))
            if task == 'dms':
                rest += [(task, rule, s) for s in seeds[1:]]
    rest.sort(key=lambda c: (c[0] in streams, c[0] == 'credit', c[2], BY_COST.index(c[1]) if c[1] in BY_COST else 99))
    return first + rest


CREDIT_FROM = {'TBPTT': 'bptt', 'D-RTRL': 'diag', 'ES-D-RTRL (0.99)': 'expsm_diag'}   # its method -> our rule


def credit_rows(rules, credit_table):
    """The credit task's cells from make reproduce-credit's table.csv (its headline delay, the stream; TBPTT in
    BPTT's row at the best learning rate's seeds), the rules it does not run marked so."""
    have, name_of, rows = read_csv(credit_table), CREDIT_FROM, []
    for rule in methods.ordered(r for r in rules if r in CREDIT_FROM.values()):
        # TBPTT's row is TBPTT(500, 1000), the table's headline window (its short-window control, TBPTT(500, 500),
        # is in make reproduce-credit's table); the online methods' window is their update interval, 500 ms
        window = 1000. if rule == 'bptt' else 500.
        mine = [r for r in have if name_of.get(r['method']) == rule and float(r['delay_ms']) == 1000.
                and r.get('window_ms') and float(r['window_ms']) == window]
        if rule == 'bptt' and mine:   # the learning rate that the seeds were run at
            lrs = {}
            for r in mine:
                lrs.setdefault(r['lr'], []).append(r)
            mine = max(lrs.values(), key=len)
        for r in mine:
            s1000 = float(r['s_per_1000_steps']) if r['s_per_1000_steps'] else None
            rows.append(dict(rule=rule, task='credit', seed=int(r['seed']), final_test_acc=float(r['final_test_acc']),
                             best_test_acc=float(r['best_test_acc']), s_per_batch=s1000 and s1000 * 500 / 1000.,
                             step_memory_mb=float(r['update_memory_mb']), budget='150 trials / stream',
                             stopped='make reproduce-credit' + (f' (TBPTT(500, {r["window_ms"]}) lr {r["lr"]})'
                                                               if rule == 'bptt' else '')))
        if not mine:
            rows.append(dict(rule=rule, task='credit', seed=0, stopped=f'not run: no finished run in {credit_table}'))
    return rows


def ensure_data(data_dir, cfg, datasets=None):
    for ds, (n_train, n_test) in cfg['synth'].items():
        if datasets is not None and ds not in datasets:
            continue
        out = os.path.join(data_dir, ds)
        if not os.path.isdir(out):
            import subprocess
            subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'synthetic_events.py'), '--dataset', ds,
                            '--out', out, '--n_train', str(n_train), '--n_test', str(n_test), '--seed', '0',
                            '--no_baselines'], check=True, cwd=ROOT)


def batches_to(run_dir, acc):
    for r in read_csv(os.path.join(run_dir, 'metrics.csv')):
        if r.get('test_acc') not in (None, '') and float(r['test_acc']) >= acc:
            return int(float(r['batches']))
    return None


def argv_value(argv, flag, default=None):
    return argv[argv.index(flag) + 1] if flag in argv else default


def trial_step_memory(task, rule, config):
    """(measured step memory MB less the input, formula MB) of the run's compiled trial update: the network
    and trainer built as the task script builds them from the run's config.json, nothing allocated."""
    import brainstate
    import jax
    import jax.numpy as jnp
    from rsnn import models
    from rsnn.trainer import Trainer
    c = config
    B = int(c['batch_size'])
    brainstate.environ.set(dt=float(c.get('dt', 1.)))
    if task == 'dms' or task in NEW_TRIAL_TASKS:
        model, n_in, T, n_out = trial_network(task, c)
        S = 3
        layers = ((n_in + c['n_rec'], c['n_rec'], 3),)
    else:
        from rsnn.tonic_data import EVENT_DATASETS
        info = EVENT_DATASETS[IMAGE_TASKS[task][0]]
        n_in, T, n_out = info.n_in, int(c['data_length']), info.n_classes
        model = models.SpikingStack(n_in, c['n_rec'], n_out, c['n_layer'], model=c['model'], seed=c['seed'])
        S = len(model.layers[0].state_names())
        layers = tuple((n_in + c['n_rec'] if i == 0 else 2 * c['n_rec'], c['n_rec'], S) for i in range(c['n_layer']))
    tr = Trainer(model, rule, n_in, B, etrace_decay=c.get('etrace_decay', 0.99),
                          trace_chunk=c.get('trace_chunk'), rule_options=rule_options(argparse.Namespace(**c)))
    from rsnn.update_memory import update_memory
    sds = jax.ShapeDtypeStruct
    xs = sds((T, B, n_in), jnp.float32)
    mem = update_memory(tr, xs, sds((B,), jnp.int32), sds((B,), jnp.float32), sds((T,), jnp.float32))
    total = mem['temp_bytes'] + mem['argument_bytes'] + mem['output_bytes'] - mem['alias_bytes']
    measured = (total - 4 * T * B * n_in - 4 * T) / 2 ** 20
    formula = methods.memory_floats(rule, methods.Sizes(layers=layers, readout=(int(c['n_rec']), n_out), batch=B,
                                                        T=T)) * 4 / 2 ** 20
    return measured, formula


def trial_network(task, c):
    """(the GIF DMSNet, n_in, n_steps, n_out) of a trial task's run, built from its config.json as the task
    script builds it (the credit layout's memory neurons with --n_memory)."""
    from rsnn import models, tasks
    trial = tasks.make_task(dict(c, dataset=task))
    memory = (dict(n_memory=c['n_memory'], tau_memory=c['tau_memory'], tau_fast_min=c['tau_fast_min'],
                   in_scale=c['memory_in_scale'], rec_scale=c['memory_rec_scale']) if c.get('n_memory') else None)
    model = models.DMSNet(trial.n_in, c['n_rec'], trial.n_out, dt=c['dt'], tau_neu=c['tau_neu'],
                          tau_syn=c['tau_syn'], tau_I2=c['tau_I2'], A2=c['A2'], ff_scale=c['ff_scale'],
                          rec_scale=c['rec_scale'], spk_fun=c['spk_fun'], diff_spike=bool(c['diff_spike']),
                          syn_gain=c['syn_gain'], tau_o=c['tau_o'], readout_scale=c['readout_scale'],
                          seed=c['seed'], memory=memory)
    return model, trial.n_in, trial.n_steps, trial.n_out


def cached_step_memory(run_dir, task, rule, config):
    """trial_step_memory, kept in OUT/step-memory.json under the run's name and its config (compiling each row's
    update again took most of a rebuilt table's 10 minutes); a changed config.json is measured again."""
    path = os.path.join(os.path.dirname(os.path.dirname(run_dir)), 'step-memory.json')
    try:
        with open(path) as f:
            cache = json.load(f)
    except (OSError, ValueError):  # none yet, or damaged: measured again
        cache = {}
    key = os.path.basename(run_dir)
    stamp = json.dumps(config, sort_keys=True, default=str)
    if key in cache and cache[key].get('config') == stamp:
        return tuple(cache[key]['mb'])
    mb = trial_step_memory(task, rule, config)
    cache[key] = dict(config=stamp, mb=list(mb))
    write_json(path, cache)
    return mb


def stream_formula(rule, config):
    from rsnn import datasets
    c = config
    cfg = datasets.DMSConfig(dt=c['dt'], t_fixation=c['t_fixation'], t_sample=c['t_sample'], t_delay=c['t_delay'],
                             t_test=c['t_test'])
    steps = int(round(float(c.get('chunk_ms') or c.get('tbptt_window') or 500) / float(c['dt'])))
    return methods.memory_floats(rule, methods.Sizes(layers=((cfg.n_input + c['n_rec'], c['n_rec'], 3),),
                                                     readout=(int(c['n_rec']), cfg.n_output),
                                                     batch=int(c['batch_size']), T=steps)) * 4 / 2 ** 20


def row_for(task, rule, seed, run_dir, summary, acc):
    config = json.load(open(os.path.join(run_dir, 'config.json')))
    row = dict(rule=rule, task=task, seed=seed, final_test_acc=summary.get('test_acc'),
               best_test_acc=summary.get('best_test_acc'), batches=batches_to(run_dir, acc),
               stopped=summary.get('stopped_because'),
               budget=(f'{config.get("stream_trials")} trials / stream' if task in ('dms-stream', 'credit') else
                       f'{int(config["epochs"]) * int(config["batches_per_epoch"])} batches'))
    if task in ('dms-stream', 'credit'):
        steps = summary.get('chunk_steps') or 1
        s1000 = summary.get('s_per_1000_steps')
        row.update(s_per_batch=s1000 * steps / 1000. if s1000 else None, step_memory_mb=summary.get('update_memory_mb'),
                   step_memory_formula_mb=stream_formula(rule, dict(config, chunk_ms=summary.get('chunk_ms'))))
        row['batches'] = None
        for r in read_csv(os.path.join(run_dir, 'metrics.csv')):
            if float(r['test_acc']) >= acc:
                row['batches'] = int(float(r['batches']))
                break
    else:
        row['s_per_batch'] = summary.get('step_s_per_batch')
        row['step_memory_mb'], row['step_memory_formula_mb'] = cached_step_memory(run_dir, task, rule, config)
        if rule != 'bptt' and methods.get(rule).estimator:  # FPTT: not a gradient estimator, no check
            row['grad_cosine_init'], row['grad_cosine_trained'] = grad_cosines(run_dir)
    return row


def fmt(v):
    if v is None or v == '':
        return ''
    if isinstance(v, float):
        return f'{v:.4g}'
    return str(v)


def mean_se(values):
    """'mean +- standard error (n)' of the values, or the one value."""
    v = [float(x) for x in values]
    if not v:
        return ''
    m = sum(v) / len(v)
    if len(v) == 1:
        return f'{m:.3f}'
    se = (sum((x - m) ** 2 for x in v) / (len(v) - 1) / len(v)) ** 0.5
    return f'{m:.3f} +- {se:.3f} ({len(v)})'


def write_summary(out, rows, tasks):
    """summary.md: one line per rule, per task the held-out accuracy at the end (the mean over seeds +- its
    standard error, with n, where there are several) and the step memory (MB), blank where not run."""
    tasks = [t for t in TASKS if t in tasks]
    with open(os.path.join(out, 'summary.md'), 'w') as f:
        f.write('| rule | ' + ' | '.join(f'{t}: acc | {t}: MB' for t in tasks) + ' |\n|---|' + '---|---|' * len(tasks) + '\n')
        for rule in methods.ordered({r['rule'] for r in rows}):
            cells = []
            for t in tasks:
                done = [r for r in rows if r['rule'] == rule and r['task'] == t and r.get('final_test_acc') is not None]
                mem = [float(r['step_memory_mb']) for r in done if r.get('step_memory_mb')]
                cells += [mean_se(r['final_test_acc'] for r in done) or 'not run',
                          f'{sum(mem) / len(mem):.3g}' if mem else '']
            f.write(f'| {methods.title(rule)} | ' + ' | '.join(cells) + ' |\n')


BLANK_CELLS = '''
Blank cells: `batches`, the held-out accuracy never reached the threshold (--acc) at an evaluation;
`grad_cosine_*`, BPTT is the reference, FPTT is not a gradient estimator (--check_grad skips it), and the
streams (dms-stream, credit) have no --check_grad (the stream protocol carries its states across updates, so
no trial starts from the states BPTT's gradient would start from); `step_memory_formula_mb` of the credit rows read from make reproduce-credit's table (it has no formula
column); every other blank row says in `stopped` why it was not run.
'''


def write_outputs(out, rows, tasks):
    order = list(methods.names())
    rows = sorted(rows, key=lambda r: (TASKS.index(r['task']), order.index(r['rule']), r['seed']))
    with open(os.path.join(out, 'table.csv'), 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: fmt(r.get(k)) for k in COLUMNS})
    with open(os.path.join(out, 'table.md'), 'w') as f:
        f.write('| ' + ' | '.join(COLUMNS) + ' |\n|' + '---|' * len(COLUMNS) + '\n')
        for r in rows:
            f.write('| ' + ' | '.join(methods.title(r[k]) if k == 'rule' else fmt(r.get(k)) for k in COLUMNS) + ' |\n')
        f.write(BLANK_CELLS)
    write_summary(out, rows, tasks)
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    for task in tasks:
        rs = [r for r in rows if r['task'] == task and r.get('final_test_acc') is not None and r.get('step_memory_mb')]
        if not rs:
            continue
        fig, ax = plt.subplots(figsize=(6, 4.2))
        for rule in methods.ordered({r['rule'] for r in rs}):
            pts = [r for r in rs if r['rule'] == rule]
            ax.scatter([r['step_memory_mb'] for r in pts], [r['final_test_acc'] for r in pts],
                       color=methods.color(rule), label=methods.title(rule), s=40)
        ax.set_xscale('log')
        ax.set_xlabel('step memory (MB, XLA memory analysis, less the input)')
        ax.set_ylabel('held-out accuracy at the end')
        ax.set_title(task)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out, f'accuracy_vs_memory_{task}.png'), dpi=110)
        plt.close(fig)


def run_cells(todo, args, cfg, data_dir, tasks):
    """Run (or reuse) every cell, --jobs at a time, each job pinned to its own CPU core where the machine has
    as many (a child process inherits the affinity of the thread that starts it), so that a run's seconds
    per batch are one core's; the table is rewritten after every run, so a stopped comparison keeps it."""
    rows, failed, t0, lock, queue = [], [], time.time(), threading.Lock(), iter(todo)
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else []

    def worker(index):
        if args.jobs > 1 and len(cores) >= args.jobs:
            os.sched_setaffinity(0, {cores[index]})
        while True:
            with lock:
                cell = next(queue, None)
            if cell is None:
                return
            task, rule, seed = cell
            run_dir = os.path.join(args.out, 'runs', f'{task}-{rule}-s{seed}')
            script, flags = flags_for(task, rule, seed, cfg, data_dir)
            if (args.budget_min is not None and time.time() - t0 > 60 * args.budget_min
                    and run_folder_state(run_dir) != 'finished'):
                row = dict(rule=rule, task=task, seed=seed, stopped=f'not run: the budget (--budget_min '
                           f'{args.budget_min:g}) was spent; run again to go on')
            else:
                try:
                    summary = run_or_resume(script, flags, run_dir,
                                            os.path.join(args.out, 'runs', f'{task}-{rule}-s{seed}.log'), ROOT)
                except RuntimeError as e:  # the other runs go on; main() says which failed
                    with lock:
                        failed.append(f'{task}-{rule}-s{seed}: {e}')
                    continue
                row = None
            with lock:  # row_for compiles in this process (brainstate's settings are global): one at a time
                rows.append(row or row_for(task, rule, seed, run_dir, summary, args.acc))
                write_outputs(args.out, rows, tasks)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failed:
        raise RuntimeError('; '.join(failed) + ' (the table holds the runs that finished)')
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--out', default=os.path.join(ROOT, 'results', 'compare-rules'),
                   help='the comparison folder: table.csv, table.md, summary.md, figures, runs/ (default '
                        'results/compare-rules)')
    p.add_argument('--tiny', action='store_true', help='toy sizes (seconds per run): the code path, for CI')
    p.add_argument('--reduced', action='store_true', help='the short-delay DMS preset and short image runs '
                                                          '(about half an hour on 2 CPU cores)')
    p.add_argument('--rules', default=','.join(methods.names()),
                   help='comma-separated --method names (default: every rule of rsnn/methods.py); the table '
                        'then holds only these rules, so run the default again to rebuild the whole table')
    p.add_argument('--tasks', default=','.join(TASKS),
                   help=f"comma-separated tasks from {','.join(TASKS)} (default: all)")
    p.add_argument('--seeds', default=None, help='the DMS trials run every seed, the other tasks the first '
                                                 '(default 0,1,2; with --tiny or --reduced 0)')
    p.add_argument('--budget_min', type=float, default=None,
                   help='start no run after this many minutes (the rest marked not run); run again to go on')
    p.add_argument('--credit_table', default=os.path.join(ROOT, 'results', 'dms', 'credit', 'table.csv'),
                   help="make reproduce-credit's table.csv, the source of the credit task's cells")
    p.add_argument('--jobs', type=int, default=1,
                   help='runs side by side, each pinned to its own CPU core (make compare-rules: 2)')
    p.add_argument('--acc', type=float, default=0.9, help='the accuracy threshold of the batches column')
    p.add_argument('--data_dir', default=None, help='the synthetic N-MNIST / SHD (default OUT/data)')
    args = p.parse_args(argv)
    rules = [r for r in args.rules.split(',') if r]
    for r in rules:
        methods.get(r)
    tasks = [t for t in args.tasks.split(',') if t]
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        p.error(f'unknown task(s) {bad}; choose from {TASKS}')
    if args.jobs < 1:
        p.error(f'--jobs must be at least 1, got {args.jobs}')
    cfg = TINY if args.tiny else REDUCED if args.reduced else FULL
    os.makedirs(os.path.join(args.out, 'runs'), exist_ok=True)
    data_dir = args.data_dir or os.path.join(args.out, 'data')
    if any(t in IMAGE_TASKS for t in tasks):
        ensure_data(data_dir, cfg, {IMAGE_TASKS[t][0] for t in tasks if t in IMAGE_TASKS})
    seeds = [int(x) for x in (args.seeds or ('0' if args.tiny or args.reduced else '0,1,2')).split(',')]
    rows = run_cells(cells(tasks, rules, seeds), args, cfg, data_dir, tasks)
    if 'credit' in tasks:
        rows += credit_rows(rules, args.credit_table)
    write_outputs(args.out, rows, tasks)
    print(f'wrote {os.path.join(args.out, "table.md")}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
