"""Learning curves of several run folders in one figure: training accuracy per batch (batches.csv,
smoothed), test accuracy after each epoch (metrics.csv), and each layer's firing rate (metrics.csv).

    python scripts/plot_runs.py RUN_DIR [RUN_DIR ...] --out curves.png [--title TEXT] [--smooth 10]

A run is labelled by its method (summary.json / config.json) unless --labels gives the labels.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys

from rsnn import methods  # (the table of methods: names and colours)


def read_csv(path: str) -> list:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def moving_average(values, n: int):
    import numpy as np
    values = np.asarray(values, float)
    if n <= 1 or len(values) < 2:
        return values
    c = np.cumsum(np.insert(values, 0, 0.))
    out = np.empty_like(values)
    for i in range(len(values)):
        lo = max(0, i + 1 - n)
        out[i] = (c[i + 1] - c[lo]) / (i + 1 - lo)
    return out


def plot_runs(run_dirs: list, out: str, title: str = '', labels: list = None, smooth: int = 10,
              chance: float = None):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, (ax_acc, ax_rate) = plt.subplots(1, 2, figsize=(11, 4.2))
    for k, run_dir in enumerate(run_dirs):
        config = read_json(os.path.join(run_dir, 'config.json'))
        method = config.get('method', '')
        label = labels[k] if labels else (methods.title(method) if method in methods.TABLE else method)
        color = (methods.color(method) if method in methods.TABLE else None) if not labels else None
        batches = read_csv(os.path.join(run_dir, 'batches.csv'))
        metrics = read_csv(os.path.join(run_dir, 'metrics.csv'))
        line = None
        if batches:
            xs = [int(r['batch']) for r in batches]
            line, = ax_acc.plot(xs, moving_average([float(r['acc']) for r in batches], smooth), color=color,
                                alpha=0.6, lw=1, label=f'{label}: train (mean of {smooth} batches)')
            color = line.get_color()
        if metrics:
            xs = [int(float(r.get('batches') or 0)) for r in metrics]
            ax_acc.plot(xs, [float(r['test_acc']) for r in metrics], marker='o', color=color, ls='--',
                        label=f'{label}: test')
            rate_cols = sorted(c for c in metrics[0] if c.startswith('rate_layer'))
            init = config.get('init_rates')
            for j, col in enumerate(rate_cols):
                ys = [float(r[col]) for r in metrics]
                x_rate = xs
                if init and j < len(init):
                    x_rate, ys = [0] + xs, [init[j]] + ys
                ax_rate.plot(x_rate, ys, marker='o', color=color, alpha=1. - 0.25 * j,
                             ls=['-', '--', ':', '-.'][j % 4], label=f'{label}: layer {j}')
    if chance is not None:
        ax_acc.axhline(chance, color='gray', ls=':', label='chance')
    ax_acc.set_xlabel('training batches')
    ax_acc.set_ylabel('accuracy')
    ax_acc.set_ylim(0, 1)
    ax_acc.grid(alpha=0.3)
    ax_acc.legend(fontsize=7)
    ax_rate.set_xlabel('training batches (0: after the initialization)')
    ax_rate.set_ylabel('spikes per neuron per step (test batches)')
    ax_rate.set_yscale('log')
    ax_rate.grid(alpha=0.3)
    ax_rate.legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('runs', nargs='+', help='run folders')
    p.add_argument('--out', required=True, help='PNG file to write')
    p.add_argument('--title', default='', help='figure title')
    p.add_argument('--labels', default=None, help='comma list of labels, one per run (default: the method)')
    p.add_argument('--smooth', type=int, default=10, help='moving average of the per-batch training accuracy')
    p.add_argument('--chance', type=float, default=None, help='draw the chance level')
    args = p.parse_args(argv)
    missing = [r for r in args.runs if not os.path.isdir(r)]
    if missing:
        print(f'error: no run folder {missing[0]}; give folders written by the task scripts', file=sys.stderr)
        return 2
    labels = args.labels.split(',') if args.labels else None
    if labels and len(labels) != len(args.runs):
        print(f'error: --labels has {len(labels)} labels for {len(args.runs)} runs', file=sys.stderr)
        return 2
    plot_runs(args.runs, args.out, args.title, labels, args.smooth, args.chance)
    print(f'wrote {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
