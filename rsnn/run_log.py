"""The run log of a run folder: config.json, metrics.csv (one row per epoch), batches.csv (one row per
training batch), summary.json, the learning-curve figure and the gradient-fidelity file of --check_grad."""
from __future__ import annotations

import csv
import os
from typing import Optional

from rsnn import methods
from rsnn.distributed import is_main_process
from rsnn.files import append_csv_row, read_csv, write_json


class RunLog:
    """config.json, metrics.csv (one row per epoch, flushed), batches.csv (one row per training batch)
    and summary.json of a run folder."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.metrics_path = os.path.join(run_dir, 'metrics.csv')
        self.batches_path = os.path.join(run_dir, 'batches.csv')
        self.fields = None

    def write_config(self, config: dict):
        os.makedirs(self.run_dir, exist_ok=True)
        write_json(os.path.join(self.run_dir, 'config.json'), config)

    def read_metrics(self) -> list:
        if not os.path.exists(self.metrics_path):
            return []
        with open(self.metrics_path) as f:
            return [{k: float(v) if k != 'epoch' else int(v) for k, v in row.items()} for row in csv.DictReader(f)]

    def truncate_after(self, epoch: int):
        """Drop rows newer than the checkpoint we resume from (written after it, then interrupted). Each
        file is rewritten whole into a temporary file and renamed over the old one, so a kill at any moment
        leaves either the old rows or the new ones."""
        for path in (self.metrics_path, self.batches_path):
            rows = read_csv(path)
            kept = [r for r in rows if epoch_of(r) is not None and epoch_of(r) <= epoch]
            if len(kept) < len(rows):
                rewrite_csv(path, kept)

    def append_batch(self, row: dict):
        """One training batch (not synced: a crash loses at most the rows of the last epoch, which the
        resume drops anyway)."""
        append_csv_row(self.batches_path, row, sync=False)

    def append(self, row: dict):
        append_csv_row(self.metrics_path, row, sync=True)

    def write_summary(self, summary: dict):
        write_json(os.path.join(self.run_dir, 'summary.json'), summary)


class OtherProcessRunLog(RunLog):
    """The run log of a process other than 0 in a --distributed run: it writes nothing (process 0 writes
    the folder) and reads back only the rows it was given, never the files process 0 is writing."""

    def __init__(self, run_dir: str):
        super().__init__(run_dir)
        self.rows = []

    def write_config(self, config: dict):
        pass

    def read_metrics(self) -> list:
        return list(self.rows)

    def truncate_after(self, epoch: int):
        pass

    def append_batch(self, row: dict):
        pass

    def append(self, row: dict):
        self.rows.append(dict(row))

    def write_summary(self, summary: dict):
        pass


def run_log(run_dir: str) -> RunLog:
    """The run log this process keeps: process 0 (or the only one) writes the folder."""
    return RunLog(run_dir) if is_main_process() else OtherProcessRunLog(run_dir)


def epoch_of(row: dict) -> Optional[int]:
    """A CSV row's epoch, or None for a row cut short (a full disk) or not of this repository."""
    try:
        return int(row['epoch'])
    except (KeyError, TypeError, ValueError):
        return None


def rewrite_csv(path: str, rows: list):
    """Replace the rows of the CSV file at `path` (its header kept) atomically: tmp file, fsync, rename."""
    if not os.path.exists(path):
        return
    with open(path, newline='') as f:
        header = next(csv.reader(f), None)
    if header is None:
        return
    tmp = path + '.tmp'
    try:
        with open(tmp, 'w', newline='') as f:
            w = csv.DictWriter(f, fieldnames=header)
            w.writeheader()
            for row in rows:
                w.writerow(row)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


GRAD_FIDELITY_FILE = 'grad_fidelity.csv'
GRAD_FIDELITY_FIELDS = ['epoch', 'method', 'weight', 'shape', 'cosine', 'norm_ratio', 'sign_agreement']


def plot_learning_curves(metrics: list, path: str, title: str = ''):
    """loss and accuracy per epoch, train and test; with a grad_fidelity.csv next to `path`, a third
    panel: each weight's cosine between the online and the BPTT gradient over the epochs."""
    if not metrics:
        return
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    epochs = [r['epoch'] for r in metrics]
    fidelity = read_grad_fidelity(os.path.join(os.path.dirname(path) or '.', GRAD_FIDELITY_FILE))
    fig, axes = plt.subplots(1, 3 if fidelity else 2, figsize=(15 if fidelity else 10, 4))
    if fidelity:
        ax = axes[2]
        for weight in dict.fromkeys(r['weight'] for r in fidelity):
            rs = [r for r in fidelity if r['weight'] == weight]
            ax.plot([r['epoch'] for r in rs], [r['cosine'] for r in rs], marker='.', label=weight)
        ax.set_xlabel('epoch')
        ax.set_ylabel(f"cosine({methods.get(fidelity[0]['method']).title} gradient, BPTT gradient)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for key, ax in (('loss', axes[0]), ('acc', axes[1])):
        for split in ('train', 'test'):
            col = f'{split}_{key}'
            if col in metrics[0]:
                ax.plot(epochs, [r[col] for r in metrics], marker='.', label=split)
        ax.set_xlabel('epoch')
        ax.set_ylabel('accuracy' if key == 'acc' else 'loss')
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path + '.tmp.png'  # whole or not at all: a kill while drawing leaves the earlier figure
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def read_grad_fidelity(path: str) -> list:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [dict(r, epoch=int(r['epoch']), cosine=float(r['cosine']), norm_ratio=float(r['norm_ratio']),
                     sign_agreement=float(r['sign_agreement'])) for r in csv.DictReader(f)]


def write_grad_fidelity(path: str, rows: list, append: bool = True):
    if append and os.path.exists(path):
        with open(path, 'a', newline='') as f:
            csv.DictWriter(f, fieldnames=GRAD_FIDELITY_FIELDS).writerows(rows)
        return
    tmp = path + '.tmp'  # a new file or a rewrite on resume: whole, then renamed
    with open(tmp, 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=GRAD_FIDELITY_FIELDS)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)
