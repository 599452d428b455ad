"""Reproduce the paper's DMS result on one CPU: the three methods, the A2 = 0 control and a delay sweep.

    python scripts/reproduce_dms.py                 # everything, about 40 minutes on 2 cores
    python scripts/reproduce_dms.py --parts main    # only the three-method comparison
    python scripts/reproduce_dms.py --tiny          # the same code path at toy sizes (seconds; CI)

Every run is the README command of its method, as written, with the CPU settings of `make demo` added
after it (explicit flags win): batch 32, 25 batches per epoch, on the CPU, and the stopping rule
--acc_th 0.98 --acc_th_window 50 (the training accuracy of the last 50 batches, 1600 trials; docs/dms.md,
"The paper's task on a CPU", says why). Each run is its own process (its peak RSS is the process's), in its own run folder under
OUT/runs/; a run folder that already holds a finished run is reused, an interrupted one is resumed, so
the script can be stopped and started again. Written to OUT (default results/dms/reproduce/):

  table.md, table.csv     method, seed, batches and seconds to acc_th, best/final test accuracy,
                          s/batch, peak RSS (main comparison)
  test_accuracy.png       test accuracy against training batches, mean and range over seeds
  controls.md, controls.csv, delay_sweep.png
                          --A2 0 (no adaptation current) and the delay sweep at a fixed budget
"""
from __future__ import annotations

import argparse
import csv
import os
import shlex
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from rsnn.child_runs import run_or_resume
from rsnn import methods
SCRIPT = os.path.join(ROOT, 'task-rsnn-long-term-dependency.py')

# The README commands, verbatim (README.md, "Delayed match-to-sample").
README_FLAGS = {
    'bptt': '--epochs 2000 --method bptt --dataset dms --t_delay 1000 --tau_I2 1500 --tau_neu 100 '
            '--tau_syn 100 --n_rec 200 --lr 0.001 --A2 1 --optimizer adam --devices 3 --t_fixation 10. '
            '--spk_fun relu --acc_th 0.95 --n_data_worker 4  --dt 1. --ff_scale 6 --rec_scale 2',
    'expsm_diag': '--epochs 2000 --method expsm_diag --etrace_decay 0.99 --vjp_time t --dataset dms '
                  '--t_delay 1000 --tau_I2 1500 --tau_neu 100 --tau_syn 100 --n_rec 200 --lr 0.001 --A2 1  '
                  '--optimizer adam --devices 3 --t_fixation 10. --spk_fun relu --acc_th 0.95  '
                  '--n_data_worker 4  --dt 1. --ff_scale 6 --rec_scale 2',
    'diag': '--epochs 2000   --method diag --dataset dms  --t_delay 1000 --tau_I2 1500 --tau_neu 100 '
            '--tau_syn 100 --n_rec 200 --lr 0.001 --A2 1   --optimizer adam --devices 3 --t_fixation 10. '
            '--spk_fun relu --acc_th 0.95  --n_data_worker 4  --dt 1. --ff_scale 6 --rec_scale 2',
}

# What `make demo` adds to the README command (the preset `cpu-demo` of the task script), spelled out.
CPU_FLAGS = ['--batch_size', '32', '--batches_per_epoch', '25', '--devices', 'cpu', '--n_data_worker', '1',
             '--no_progress']

FULL = dict(
    seeds=[0, 1, 2], epochs=40, acc_th=0.98, acc_th_window=50,
    drtrl_seeds=[0], drtrl_epochs=1,            # D-RTRL: about 40x slower per batch; a capped budget
    control_epochs=12, delays=[0, 250, 500, 1000, 2000], sweep_epochs=10, sweep_methods=['expsm_diag', 'bptt'],
    extra=['--n_test_trials', '512'],
)
# Same code path, toy sizes: what CI runs.
TINY = dict(
    seeds=[0, 1], epochs=2, acc_th=0.98, acc_th_window=50, drtrl_seeds=[0], drtrl_epochs=1,
    control_epochs=1, delays=[0, 20], sweep_epochs=1, sweep_methods=['expsm_diag'],
    extra=['--n_test_trials', '16', '--t_sample', '20', '--t_test', '20', '--t_delay', '20', '--n_rec', '16',
           '--batch_size', '8', '--batches_per_epoch', '3', '--n_data_worker', '0'],
)


def launch(run_dir: str, flags: list, log_path: str) -> dict:
    """Run the task script once (or resume it); returns its summary plus the process's peak RSS."""
    return run_or_resume(SCRIPT, flags, run_dir, log_path, ROOT)


def read_metrics(run_dir: str) -> list:
    with open(os.path.join(run_dir, 'metrics.csv')) as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def batches_run(run_dir: str, batches_per_epoch: int) -> list:
    """Cumulative training batches at the end of each epoch (the last may be cut short by acc_th)."""
    rows = read_metrics(run_dir)
    if rows and 'batches' in rows[0]:
        return [int(r['batches']) for r in rows]
    return [int(r['epoch']) * batches_per_epoch for r in rows]


def row_of(group: str, method: str, seed: int, run_dir: str, summary: dict, flags: list, bpe: int) -> dict:
    metrics = read_metrics(run_dir)
    n_batches = batches_run(run_dir, bpe)[-1] if metrics else 0
    reached = summary.get('stopped_because') == 'acc_th'
    return dict(
        group=group, method=methods.title(method), seed=seed,
        stopped_because=summary.get('stopped_because'), batches=n_batches,
        batches_to_acc_th=n_batches if reached else None,
        seconds=round(summary.get('seconds') or 0., 1),
        seconds_to_acc_th=round(summary['seconds'], 1) if reached else None,
        best_test_acc=summary.get('best_test_acc'), final_test_acc=summary.get('test_acc'),
        s_per_batch=summary.get('step_s_per_batch'),
        peak_rss_mb=round(summary['peak_rss_mb']) if summary.get('peak_rss_mb') else None,
        run_dir=os.path.relpath(run_dir, ROOT))


def fmt(v, digits=3):
    if v is None or v == '':
        return '-'
    if isinstance(v, float):
        return f'{v:.{digits}f}' if abs(v) < 100 else f'{v:.0f}'
    return str(v)


def write_table(rows: list, columns: list, path_stem: str, title: str):
    with open(path_stem + '.csv', 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction='ignore')
        w.writeheader()
        w.writerows(rows)
    lines = [f'### {title}', '', '| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
    lines += ['| ' + ' | '.join(fmt(r.get(c)) for c in columns) + ' |' for r in rows]
    with open(path_stem + '.md', 'w') as f:
        f.write('\n'.join(lines) + '\n')
    print('\n'.join(lines))


def curves(run_dirs: list, bpe: int):
    """Test accuracy of several runs on a common batch grid; a run that stopped keeps its last value."""
    import numpy as np
    series = []
    for d in run_dirs:
        xs = batches_run(d, bpe)
        ys = [r['test_acc'] for r in read_metrics(d)]
        series.append((np.asarray(xs), np.asarray(ys)))
    grid = np.unique(np.concatenate([s[0] for s in series]))
    values = np.stack([np.interp(grid, x, y, left=np.nan, right=y[-1]) for x, y in series])
    return grid, values


def plot_main(groups: dict, bpe: int, path: str, acc_th: float):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import numpy as np
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for method, run_dirs in groups.items():
        grid, values = curves(run_dirs, bpe)
        mean = np.nanmean(values, 0)
        label = f'{methods.title(method)} ({len(run_dirs)} seed{"s" if len(run_dirs) > 1 else ""})'
        ax.plot(grid, mean, color=methods.color(method), marker='.', label=label)
        if len(run_dirs) > 1:
            ax.fill_between(grid, np.nanmin(values, 0), np.nanmax(values, 0), color=methods.color(method), alpha=0.2)
    ax.axhline(0.5, color='gray', ls=':', label='chance')
    ax.axhline(acc_th, color='k', ls='--', lw=0.8, label=f'acc_th {acc_th}')
    ax.set_xlabel('training batches (32 trials each)')
    ax.set_ylabel('test accuracy (held-out trials)')
    ax.set_ylim(0.4, 1.0)
    ax.set_title('DMS, 1000 ms delay: mean and range over seeds')
    ax.grid(alpha=0.3)
    ax.legend(loc='lower right', fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(rows: list, path: str):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in FULL['sweep_methods']:
        pts = sorted((r['t_delay'], r['best_test_acc'], r['final_test_acc']) for r in rows
                     if r['method'] == methods.title(method))
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[2] for p in pts], marker='o', color=methods.color(method),
                label=f'{methods.title(method)} final')
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker='x', ls=':', color=methods.color(method),
                label=f'{methods.title(method)} best')
    ax.axhline(0.5, color='gray', ls=':', label='chance')
    ax.set_xlabel('delay (ms)')
    ax.set_ylabel('test accuracy')
    ax.set_ylim(0.4, 1.02)
    ax.set_title('DMS: accuracy against delay, fixed budget')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description='Reproduce the DMS result on a CPU (see the module docstring).')
    p.add_argument('--out', default=os.path.join('results', 'dms', 'reproduce'), help='output folder')
    p.add_argument('--parts', default='main,controls',
                   help='comma list: main (three methods x seeds), controls (--A2 0 and the delay sweep)')
    p.add_argument('--tiny', action='store_true', help='toy sizes: the same code path in seconds (tests, CI)')
    args = p.parse_args(argv)
    cfg = TINY if args.tiny else FULL
    parts = set(args.parts.split(','))
    if parts - {'main', 'controls'}:
        print(f'error: --parts takes main and/or controls, got {args.parts!r}', file=sys.stderr)
        return 2
    out = args.out
    os.makedirs(os.path.join(out, 'runs'), exist_ok=True)
    log_path = os.path.join(out, 'runs.log')
    bpe = int(cfg['extra'][cfg['extra'].index('--batches_per_epoch') + 1]) if '--batches_per_epoch' in cfg['extra'] \
        else 25
    t0 = time.time()

    def flags_for(method, seed, epochs, *more):
        return (shlex.split(README_FLAGS[method]) + CPU_FLAGS + ['--epochs', str(epochs), '--seed', str(seed),
                                                                 '--acc_th', str(cfg['acc_th']),
                                                                 '--acc_th_window', str(cfg['acc_th_window'])]
                + cfg['extra'] + list(more))

    if 'main' in parts:
        rows, groups = [], {}
        plan = [(m, s, cfg['epochs']) for m in ('bptt', 'expsm_diag') for s in cfg['seeds']]
        plan += [('diag', s, cfg['drtrl_epochs']) for s in cfg['drtrl_seeds']]
        for method, seed, epochs in plan:
            run_dir = os.path.join(out, 'runs', f'{method}-seed{seed}')
            flags = flags_for(method, seed, epochs)
            summary = launch(run_dir, flags, log_path)
            rows.append(row_of('main', method, seed, run_dir, summary, flags, bpe))
            groups.setdefault(method, []).append(run_dir)
        columns = ['method', 'seed', 'stopped_because', 'batches', 'batches_to_acc_th', 'seconds_to_acc_th',
                   'seconds', 'best_test_acc', 'final_test_acc', 's_per_batch', 'peak_rss_mb', 'run_dir']
        write_table(rows, columns, os.path.join(out, 'table'),
                    f'DMS, 1000 ms delay, batch 32 on the CPU (caps: {cfg["epochs"] * bpe} batches; '
                    f'D-RTRL {cfg["drtrl_epochs"] * bpe})')
        plot_main(groups, bpe, os.path.join(out, 'test_accuracy.png'), cfg['acc_th'])

    if 'controls' in parts:
        rows = []
        # No adaptation current: the memory of the sample has nowhere to live.
        run_dir = os.path.join(out, 'runs', 'expsm_diag-A2_0-seed0')
        flags = flags_for('expsm_diag', 0, cfg['control_epochs'], '--A2', '0')
        summary = launch(run_dir, flags, log_path)
        rows.append(dict(row_of('control', 'expsm_diag', 0, run_dir, summary, flags, bpe),
                         control='A2 = 0', t_delay=1000.))
        # Delay sweep, a fixed budget (no early stop) for every delay.
        for method in cfg['sweep_methods']:
            for delay in cfg['delays']:
                run_dir = os.path.join(out, 'runs', f'{method}-delay{delay}-seed0')
                flags = flags_for(method, 0, cfg['sweep_epochs'], '--t_delay', str(delay), '--acc_th', '1.1')
                summary = launch(run_dir, flags, log_path)
                rows.append(dict(row_of('sweep', method, 0, run_dir, summary, flags, bpe),
                                 control='delay sweep', t_delay=float(delay)))
        columns = ['control', 'method', 't_delay', 'batches', 'best_test_acc', 'final_test_acc', 'seconds',
                   's_per_batch', 'run_dir']
        write_table(rows, columns, os.path.join(out, 'controls'),
                    f'Controls: A2 = 0 ({cfg["control_epochs"] * bpe} batches) and the delay sweep '
                    f'({cfg["sweep_epochs"] * bpe} batches, no early stop)')
        plot_sweep([r for r in rows if r['control'] == 'delay sweep'], os.path.join(out, 'delay_sweep.png'))

    print(f'done in {time.time() - t0:.0f} s; results in {out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
