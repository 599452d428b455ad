"""The benchmark's outputs (scripts/benchmark.py; docs/benchmark.md) from its studies and run folders:
selected.json (each rule's chosen configuration, its validation accuracy, the trials behind it), table.csv and
table.md (mean +- s.e. over seeds; the paired difference to BPTT with its 95 % t interval, bold where it
excludes zero), learning_curves_<task>.png (held-out accuracy against updates, the band one s.e. over seeds).
"""
from __future__ import annotations

import csv
import json
import math
import os

from rsnn import methods
from rsnn.benchmark_stats import mean_se, paired_difference

INSIDE = 0.05   # a selected learning rate within this fraction of the log range of an end is "at the edge"
COLUMNS = ['task', 'rule', 'seeds', 'test_acc_mean', 'test_acc_se', 'diff_to_bptt', 'diff_low', 'diff_high',
           'diff_excludes_zero', 'lr', 'lr_inside', 'knob', 'knob_value', 'tbptt_window', 'val_acc', 'trials_complete',
           'trials_pruned', 'trials_failed', 'budget', 'updates', 's_per_update', 'grad_cosine_init',
           'grad_cosine_end']


def best_trial(study):
    """The complete trial with the highest value (the first of equals), or None."""
    from optuna.trial import TrialState
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    return max(done, key=lambda t: (t.value, -t.number)) if done else None


def lr_position(lr: float, lo: float, hi: float) -> float:
    """Where lr lies in [lo, hi] on a log scale: 0 at lo, 1 at hi."""
    return (math.log(lr) - math.log(lo)) / (math.log(hi) - math.log(lo))


def read_csv(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def num(v):
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def selection(storage, task: str, rule: str, lr_range) -> dict:
    """What the tuning study of (task, rule) chose and the trials behind it."""
    import optuna
    from rsnn import tuning
    try:
        study = optuna.load_study(study_name=f'tune/{task}/{rule}', storage=storage)
    except KeyError:
        return dict(status='no study yet')
    trials = [dict(number=t.number, state=t.state.name, params=t.params, value=t.value,
                   intermediate={str(k): v for k, v in sorted(t.intermediate_values.items())},
                   run_dir=t.user_attrs.get('run_dir'), retries=tuning.original_number(t))
              for t in study.get_trials(deepcopy=False)]
    for t in trials:
        if t['retries'] == t['number']:
            del t['retries']
        else:
            t['retry_of'] = t.pop('retries')
    best = best_trial(study)
    out = dict(study=study.study_name, lr_range=list(lr_range), trials=trials)
    if best is None:
        return dict(out, status='no complete trial yet')
    pos = lr_position(best.params['lr'], *lr_range)
    return dict(out, status='selected', config=best.params, val_acc=best.value, trial=best.number,
                lr_position=pos, lr_inside=INSIDE < pos < 1 - INSIDE)


def grad_cosines(run_dir):
    """(mean per-weight cosine to BPTT at the first check, at the last) from grad_fidelity.csv."""
    by_epoch = {}
    for r in read_csv(os.path.join(run_dir, 'grad_fidelity.csv')):
        c = num(r.get('cosine'))
        if c is not None:
            by_epoch.setdefault(int(r['epoch']), []).append(c)
    if not by_epoch:
        return None, None
    mean = {e: sum(v) / len(v) for e, v in by_epoch.items()}
    return mean[min(mean)], (mean[max(mean)] if len(mean) > 1 else None)


def final_runs(out: str, task: str, rule: str, seeds: int) -> dict:
    """{seed: the finished final run's numbers}: held-out accuracy at the end, its curve, updates, seconds per
    update, gradient cosines."""
    runs = {}
    for seed in range(seeds):
        run_dir = os.path.join(out, 'final', f'{task}-{rule}-s{seed}')
        path = os.path.join(run_dir, 'summary.json')
        if not os.path.exists(path):
            continue
        with open(path) as f:
            summary = json.load(f)
        metrics = read_csv(os.path.join(run_dir, 'metrics.csv'))
        curve = [(num(r['batches']), num(r['test_acc'])) for r in metrics if num(r.get('test_acc')) is not None]
        if not curve:
            continue
        if summary.get('s_per_1000_steps') and summary.get('chunk_steps'):  # a stream: one update per chunk
            s_upd = summary['s_per_1000_steps'] * summary['chunk_steps'] / 1000.
        else:
            s_upd = summary.get('step_s_per_batch')
            if s_upd and summary.get('updates_per_batch'):  # FPTT: several optimizer steps per batch
                s_upd /= summary['updates_per_batch']
        runs[seed] = dict(test_acc=curve[-1][1], curve=curve, updates=summary.get('updates', summary.get('batches_run')),
                          s_per_update=s_upd, stopped=summary.get('stopped_because'),
                          cos=grad_cosines(run_dir))
    return runs


def mean_of(values):
    v = [x for x in values if x is not None]
    return sum(v) / len(v) if v else None


def rows_for(out, storage, table, cells, lr_range):
    """(selected.json's dict, the table's rows, {task: {rule: runs}}, complete)"""
    selected, rows, curves, complete = {}, [], {}, True
    for task, rule in cells:
        cfg = table[task]
        sel = selection(storage, task, rule, lr_range)
        selected.setdefault(task, {})[rule] = sel
        runs = final_runs(out, task, rule, cfg['seeds'])
        curves.setdefault(task, {})[rule] = runs
        complete &= sel.get('status') == 'selected' and len(runs) == cfg['seeds']
        ms = mean_se([r['test_acc'] for r in runs.values()])
        config = sel.get('config', {})
        knob = next((k for k in config if k not in ('lr', 'tbptt_window')), None)
        states = [t['state'] for t in sel.get('trials', [])]
        row = dict(task=task, rule=rule, seeds=ms.n, test_acc_mean=ms.mean if ms.n else None, test_acc_se=ms.se,
                   lr=config.get('lr'), lr_inside=sel.get('lr_inside'), knob=knob, knob_value=config.get(knob),
                   tbptt_window=config.get('tbptt_window'), val_acc=sel.get('val_acc'),
                   trials_complete=states.count('COMPLETE'), trials_pruned=states.count('PRUNED'),
                   trials_failed=states.count('FAIL'), budget=f"{cfg['budget']} {cfg['rungs'][-1]}",
                   updates=mean_of(r['updates'] for r in runs.values()),
                   s_per_update=mean_of(r['s_per_update'] for r in runs.values()),
                   grad_cosine_init=mean_of(r['cos'][0] for r in runs.values()),
                   grad_cosine_end=mean_of(r['cos'][1] for r in runs.values()))
        rows.append(row)
    for row in rows:  # the paired difference to BPTT on the seeds both have
        ref = curves[row['task']].get('bptt')
        if row['rule'] == 'bptt' or not ref:
            continue
        d = paired_difference({s: r['test_acc'] for s, r in curves[row['task']][row['rule']].items()},
                              {s: r['test_acc'] for s, r in ref.items()})
        if d.n:
            row.update(diff_to_bptt=d.mean, diff_low=d.low, diff_high=d.high, diff_excludes_zero=d.excludes_zero)
    return selected, rows, curves, complete


def fmt(v, digits=4):
    if v is None or v == '':
        return ''
    if isinstance(v, bool):
        return 'yes' if v else 'no'
    if isinstance(v, float):
        return f'{v:.{digits}g}'
    return str(v)


def write_markdown(path, rows, complete: bool, note: str):
    with open(path, 'w') as f:
        f.write(f'# Benchmark table{"" if complete else " (incomplete: runs or trials are missing)"}\n\n{note}\n')
        for task in dict.fromkeys(r['task'] for r in rows):
            f.write(f'\n## {task}\n\n| rule | held-out acc, mean +- s.e. (seeds) | minus BPTT, 95 % t interval | '
                    'lr (inside the range) | own knob | val acc | trials done / pruned / failed | updates | '
                    's / update | grad cosine init / end |\n|' + '---|' * 10 + '\n')
            for r in (r for r in rows if r['task'] == task):
                acc = '' if not r['seeds'] else (f"{r['test_acc_mean']:.3f} +- {r['test_acc_se']:.3f} ({r['seeds']})"
                                                 if r['test_acc_se'] is not None else f"{r['test_acc_mean']:.3f} (1)")
                diff = ''
                if r.get('diff_to_bptt') is not None:
                    diff = (f"{r['diff_to_bptt']:+.3f} [{r['diff_low']:+.3f}, {r['diff_high']:+.3f}]"
                            if r.get('diff_low') is not None else f"{r['diff_to_bptt']:+.3f} (1 seed)")
                    if r.get('diff_excludes_zero'):
                        diff = f'**{diff}**'
                knob = ', '.join(f'{k} {fmt(r[v], 3)}' for k, v in ((r['knob'], 'knob_value'),
                                                                   ('window', 'tbptt_window')) if r[v] is not None and k)
                lr = f"{r['lr']:.2g} ({fmt(r['lr_inside'])})" if r['lr'] is not None else 'not tuned yet'
                cos = ' / '.join(fmt(r[k], 3) or '-' for k in ('grad_cosine_init', 'grad_cosine_end'))
                f.write(f"| {methods.title(r['rule'])} | {acc or 'not run'} | {diff} | {lr} | {knob} | "
                        f"{fmt(r['val_acc'], 3)} | {r['trials_complete']} / {r['trials_pruned']} / {r['trials_failed']} | "
                        f"{fmt(r['updates'])} | {fmt(r['s_per_update'], 3)} | {cos} |\n")


def plot_curves(out, curves):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    for task, by_rule in curves.items():
        fig, ax = plt.subplots(figsize=(6, 4.2))
        drawn = False
        for rule in methods.ordered(by_rule):
            runs = list(by_rule[rule].values())
            if not runs:
                continue
            n = min(len(r['curve']) for r in runs)
            xs = [sum(r['curve'][i][0] for r in runs) / len(runs) for i in range(n)]
            stats = [mean_se([r['curve'][i][1] for r in runs]) for i in range(n)]
            ys = [s.mean for s in stats]
            se = [s.se or 0. for s in stats]
            ax.plot(xs, ys, color=methods.color(rule), label=f'{methods.title(rule)} ({len(runs)})', marker='.')
            ax.fill_between(xs, [y - e for y, e in zip(ys, se)], [y + e for y, e in zip(ys, se)],
                            color=methods.color(rule), alpha=0.2)
            drawn = True
        if drawn:
            ax.set_xlabel('updates (trial batches; stream: chunks)')
            ax.set_ylabel('held-out accuracy (mean +- s.e. over seeds)')
            ax.set_title(f'{task}: final runs at the selected configurations')
            ax.legend(fontsize=8)
            fig.tight_layout()
            fig.savefig(os.path.join(out, f'learning_curves_{task}.png'), dpi=110)
        plt.close(fig)


def write(out: str, storage_url: str, table: dict, cells: list, lr_range, note: str = '') -> bool:
    """Write every output into `out`; returns whether the benchmark is complete."""
    from rsnn import tuning
    storage = tuning.open_storage(storage_url)
    selected, rows, curves, complete = rows_for(out, storage, table, cells, lr_range)
    with open(os.path.join(out, 'selected.json'), 'w') as f:
        json.dump(selected, f, indent=1)
    with open(os.path.join(out, 'table.csv'), 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: fmt(r.get(k), 6) for k in COLUMNS})
    write_markdown(os.path.join(out, 'table.md'), rows, complete, note)
    plot_curves(out, curves)
    return complete
