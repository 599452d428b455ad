"""--check_grad: the online gradient of every weight against BPTT's on the first test batch (same weights,
same initial states), one grad_fidelity.csv row per weight and epoch."""
from __future__ import annotations

import math
import os
import sys

import jax
import numpy as np

from rsnn import methods
from rsnn.run_folder import GRAD_FIDELITY_FILE, write_grad_fidelity
from rsnn.distributed import is_main_process


class GradientCheck:
    """--check_grad: the online gradient of every weight against BPTT's on the first test batch (same
    weights, same initial states), one grad_fidelity.csv row per weight and epoch."""

    def __init__(self, trainer, test_batches, step_weights, path: str):
        self.trainer, self.test_batches, self.step_weights, self.path = trainer, test_batches, step_weights, path
        self.batch = None

    @classmethod
    def for_run(cls, settings, trainer, run_dir: str, test_batches, step_weights):
        """The check of this run, or None (no --check_grad, or nothing to compare with BPTT)."""
        if not settings.check_grad_every:
            return None
        if not methods.get(settings.method).online:
            print(f'note: --check_grad compares an online method with BPTT; with --method {settings.method} there is nothing to '
                  'compare (no grad_fidelity.csv)', file=sys.stderr, flush=True)
            return None
        if not methods.get(settings.method).estimator:
            print(f'note: --check_grad compares a gradient with BPTT\'s; {methods.title(settings.method)} is not a '
                  'gradient estimator (windowed BPTT plus a regulariser, several updates per sequence): nothing to '
                  'compare (no grad_fidelity.csv)', file=sys.stderr, flush=True)
            return None
        return cls(trainer, test_batches, step_weights, os.path.join(run_dir, GRAD_FIDELITY_FILE))

    def __call__(self, epoch: int):
        if self.batch is None:
            self.batch = next(iter(self.test_batches()))
        xs, labels = self.batch
        rows = [dict(r, epoch=epoch) for r in
                grad_fidelity(self.trainer, np.asarray(xs), np.asarray(labels), self.step_weights)]
        if is_main_process():  # a --distributed run: process 0 writes the folder
            write_grad_fidelity(self.path, rows)
        worst = min(rows, key=lambda r: r['cosine'] if math.isfinite(r['cosine']) else 2.)
        print(f"gradient check, epoch {epoch}: cosine with BPTT {min(r['cosine'] for r in rows):.4f} "
              f"({worst['weight']}) to {max(r['cosine'] for r in rows):.4f}, norm ratio "
              f"{min(r['norm_ratio'] for r in rows):.3g} to {max(r['norm_ratio'] for r in rows):.3g} "
              f"({self.path})", flush=True)


def grad_fidelity(trainer, xs, labels, ws) -> list:
    """Each weight's gradient on one batch by the trainer's online method against BPTT's, from the same
    weights and initial states: rows of weight name, shape, cosine, norm ratio (online / BPTT) and sign
    agreement (the fraction of the elements where BPTT's gradient is not 0 that have its sign)."""
    online = jax.tree_util.tree_flatten_with_path(trainer.gradients(xs, labels, ws))[0]
    reference = jax.tree.leaves(trainer.gradients(xs, labels, ws, method='bptt'))
    rows = []
    for (path, g), r in zip(online, reference):
        shape = np.shape(g)
        g, r = np.asarray(g, np.float64).ravel(), np.asarray(r, np.float64).ravel()
        ng, nr = np.linalg.norm(g), np.linalg.norm(r)
        nz = r != 0
        rows.append(dict(method=trainer.method,
                         weight='/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path),
                         shape='x'.join(str(d) for d in shape),
                         cosine=float(np.clip(g @ r / (ng * nr), -1, 1)) if ng > 0 and nr > 0 else float('nan'),
                         norm_ratio=float(ng / nr) if nr > 0 else float('nan'),
                         sign_agreement=float(np.mean(np.sign(g[nz]) == np.sign(r[nz]))) if nz.any() else float('nan')))
    return rows


