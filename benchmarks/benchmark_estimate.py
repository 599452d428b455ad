"""How long `make benchmark` takes at its full sizes, projected from measured seconds per update (a `make
compare-rules` table: results/compare-rules/table.md, or the table in docs/online-rules.md), before running it.

    python benchmarks/benchmark_estimate.py --table docs/online-rules.md --table results/compare-rules/table.md
    python benchmarks/benchmark_estimate.py --table docs/online-rules.md --trials 4 --tasks dms,cue-accumulation

Per (task, rule): the training seconds of one run at the benchmark's last rung = its updates x the median
s_per_batch over the table's rows of that (task, rule) (a stream: its updates from the stream's length and the
update interval: 150 trials x (2010 ms + the mean inter-trial 300 ms) / 500 ms for the online rules, / the TBPTT
window for BPTT, taken at 1000 ms); runs = tuning trials + final seeds. An upper bound in that no trial is
pruned, a lower bound in that compile, evaluation, validation and the gradient checks are not counted. The
sum over rules, divided by --jobs, is the wall time if the workers stay busy. Rows missing from the tables
are listed as not estimated.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics

from rsnn import methods

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STREAM_TRIAL_MS = 2010. + 300.     # the cpu-demo trial and the mean of --t_iti 100-500
STREAM_UPDATE_MS = dict(online=500., bptt=1000.)


def benchmark_config():
    spec = importlib.util.spec_from_file_location('benchmark', os.path.join(ROOT, 'scripts', 'benchmark.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FULL


def flag(flags: list, name: str, default=None):
    return flags[flags.index(name) + 1] if name in flags else default


def updates(task: str, cfg: dict, rule: str) -> float:
    """Weight updates (batches on trials) of one run at the last rung."""
    last = cfg['rungs'][-1]
    if cfg['budget'] == '--stream_trials':
        return last * STREAM_TRIAL_MS / STREAM_UPDATE_MS['bptt' if rule == 'bptt' else 'online']
    per_epoch = int(flag(cfg['flags'], '--batches_per_epoch', 25))
    return last * per_epoch


def read_tables(paths: list) -> dict:
    """{(task, method): [s_per_batch, ...]} from the markdown tables with rule, task, s_per_batch and budget
    columns (make compare-rules' table.md; the reduced comparison's table, without budget, is not read)."""
    by_title = {m.title: m.name for m in methods.TABLE.values()}
    out = {}
    for path in paths:
        header = None
        for line in open(path):
            cells = [c.strip() for c in line.strip().strip('|').split('|')]
            if not line.startswith('|'):
                header = None
                continue
            if {'rule', 'task', 's_per_batch', 'budget'} <= set(cells):
                header = cells
                continue
            if header is None or set(line.strip()) <= set('|-: '):
                continue
            row = dict(zip(header, cells))
            rule = by_title.get(row['rule'], row['rule'])
            try:
                out.setdefault((row['task'], rule), []).append(float(row['s_per_batch']))
            except ValueError:
                pass
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--table', action='append', required=True, help='a markdown table with rule, task, s_per_batch, budget '
                                                                   '(repeatable; later tables win per task and rule)')
    p.add_argument('--trials', type=int, default=16, help='tuning trials per study (scripts/benchmark.py --trials)')
    p.add_argument('--tasks', default=None, help='comma-separated benchmark tasks (default: all)')
    p.add_argument('--jobs', type=int, default=2, help='workers side by side')
    a = p.parse_args(argv)
    full = benchmark_config()
    measured = {}
    for path in a.table:
        measured.update(read_tables([path]))
    tasks = a.tasks.split(',') if a.tasks else list(full)
    print('| task | rule | s/update | updates per run | runs | hours |')
    print('|---|---|---|---|---|---|')
    total, missing = 0., []
    for task in tasks:
        cfg = full[task]
        for rule in methods.names():
            s = measured.get((task, rule))
            if not s:
                missing.append(f'{task}/{rule}')
                continue
            runs = a.trials + cfg['seeds']
            hours = statistics.median(s) * updates(task, cfg, rule) * runs / 3600.
            total += hours
            print(f'| {task} | {rule} | {statistics.median(s):.3g} | {updates(task, cfg, rule):.0f} | {runs} | '
                  f'{hours:.2f} |')
    print(f'\ntotal: {total:.1f} core-hours of training, {total / a.jobs:.1f} hours with {a.jobs} workers '
          f'({a.trials} trials per study, none pruned; compile and evaluation not counted)')
    if missing:
        print(f'not estimated (no measured row): {", ".join(missing)}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
