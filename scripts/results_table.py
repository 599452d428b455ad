"""Collect every run's summary.json under a folder into one table: DIR/results.md and DIR/results.csv.

    python scripts/results_table.py [DIR]        # DIR defaults to results/  (make results-table RESULTS=DIR)

One row per run folder (a folder holding summary.json; its config.json gives the sizes), from either
training script: experiment, dataset, method, ES-D-RTRL decay, sizes, epochs run, why it stopped, best
and final test accuracy, seconds, the training step's seconds per batch (summary.json's step_s_per_batch:
the median of the steady steps, the compiling first step left out), peak RSS and the run folder.
"""
from __future__ import annotations

import csv
import json
import os
import sys

COLUMNS = ['experiment', 'dataset', 'method', 'etrace_decay', 'n_rec', 'n_layer', 'T', 'batch_size',
           'epochs_run', 'stopped_because', 'best_test_acc', 'test_acc', 'seconds', 's_per_batch',
           'peak_rss_mb', 'run_dir']
HEADERS = ['experiment', 'dataset', 'method', 'etrace decay', 'n_rec', 'n_layer', 'T', 'batch', 'epochs run',
           'stopped because', 'best test acc', 'final test acc', 'seconds', 'step s / batch', 'peak RSS (MB)',
           'run folder']


def find_runs(root: str) -> list:
    """Run folders under root (those holding summary.json), sorted."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != 'checkpoints')
        if 'summary.json' in files:
            found.append(folder)
    return sorted(found)


def read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def run_row(run_dir: str, root: str) -> dict:
    summary = read_json(os.path.join(run_dir, 'summary.json'))
    config = read_json(os.path.join(run_dir, 'config.json'))
    dataset = config.get('dataset', '')
    method = summary.get('method') or config.get('method', '')
    dms = dataset == 'dms'
    return dict(
        experiment='dms' if dms else ('image' if dataset in ('nmnist', 'shd') else config.get('experiment', '')),
        dataset=dataset, method=method,
        etrace_decay=config.get('etrace_decay') if method == 'expsm_diag' else None,
        n_rec=config.get('n_rec'), n_layer=1 if dms else config.get('n_layer'),
        T=config.get('n_steps') or config.get('data_length'),  # a trial task's steps, or the frames
        batch_size=config.get('batch_size'),
        epochs_run=summary.get('epochs_run'), stopped_because=summary.get('stopped_because'),
        best_test_acc=summary.get('best_test_acc'), test_acc=summary.get('test_acc'),
        seconds=summary.get('seconds'), s_per_batch=summary.get('step_s_per_batch'),
        peak_rss_mb=summary.get('peak_rss_mb'), run_dir=os.path.relpath(run_dir, root))


def fmt(v) -> str:
    if v is None or v == '':
        return '-'
    if isinstance(v, float):
        return f'{v:.4g}' if v == v else 'nan'
    return str(v)


def build_table(root: str) -> list:
    """Write root/results.md and root/results.csv; return the rows (dicts keyed by COLUMNS)."""
    rows = []
    for run_dir in find_runs(root):
        try:
            rows.append(run_row(run_dir, root))
        except (OSError, ValueError, AttributeError) as e:  # unreadable or not a JSON object
            print(f'warning: skipped {run_dir}: its summary.json or config.json cannot be read '
                  f'({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""})', file=sys.stderr, flush=True)
    with open(os.path.join(root, 'results.csv'), 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: '' if r[k] is None else r[k] for k in COLUMNS})
    lines = ['| ' + ' | '.join(HEADERS) + ' |', '|' + '---|' * len(HEADERS)]
    lines += ['| ' + ' | '.join(fmt(r[k]) for k in COLUMNS) + ' |' for r in rows]
    with open(os.path.join(root, 'results.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    return rows


def main(argv) -> int:
    if len(argv) > 1 or (argv and argv[0].startswith('-')):
        print(__doc__.strip().split('\n\n')[1].strip(), file=sys.stderr)
        return 2
    root = argv[0] if argv else 'results'
    if not os.path.isdir(root):
        print(f'error: {root} is not a folder; give the folder that holds the run folders '
              f'(make results-table RESULTS=DIR)', file=sys.stderr)
        return 2
    rows = build_table(root)
    print(f'{len(rows)} runs -> {os.path.join(root, "results.md")}, {os.path.join(root, "results.csv")}')
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
