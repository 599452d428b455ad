"""What a run leaves in its folder: orbax checkpoints ({params, opt_state, epoch, rng_key} + JSON meta),
the run log (config.json, metrics.csv, batches.csv, summary.json), the learning-curve figure and the
gradient-fidelity file of --check_grad.

Works on any object with the Trainer's `param_values()`, `set_param_values()`, `opt_state`,
`weights_sharding()` and `place()`; imports nothing of the training code.
"""
from __future__ import annotations

import csv
import hashlib
import logging
import os
import sys
from typing import Optional

import brainstate
import jax
import numpy as np
import orbax.checkpoint as ocp

from rsnn import methods
from utils import UserError, append_csv_row, read_csv, write_json

def rng_key_data(key):
    """The raw uint32 data of a PRNG key: brainstate >= 0.5 holds a typed key (dtype key<fry>), which
    cannot become a numpy array; older brainstate holds the raw uint32 array already."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    return key


def rng_key_like(data, like):
    """`data` (raw key data) in the form of `like` (typed key or raw array)."""
    if jax.dtypes.issubdtype(like.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(jax.numpy.asarray(data), impl=jax.random.key_impl(like))
    return data


class quiet_orbax:
    """`with quiet_orbax():` orbax's own ERROR log lines for a damaged file are kept out of the output: the
    one warning line about the damaged checkpoint is ours."""

    def __enter__(self):
        self.logger = logging.getLogger('absl')
        self.level = self.logger.level
        self.logger.setLevel(logging.CRITICAL)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)


class Checkpoints:
    """Orbax checkpoints of {params, opt_state, epoch, rng_key} + JSON meta in RUN_DIR/checkpoints/{last,best}.

    Orbax writes each step to a temporary folder and renames it when complete, and `last` keeps the two
    newest steps, so a process killed while saving still leaves a usable earlier checkpoint.
    """

    def __init__(self, run_dir: str):
        root = os.path.abspath(os.path.join(run_dir, 'checkpoints'))
        with quiet_orbax():
            self._open(root)

    def _open(self, root: str):
        self.last = ocp.CheckpointManager(os.path.join(root, 'last'),
                                          options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
        self.best = ocp.CheckpointManager(os.path.join(root, 'best'),
                                          options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))

    def save(self, trainer, epoch: int, meta: dict, best: bool, extra: dict = None):
        """`extra`: arrays the protocol needs to go on (a stream: its states and traces, the chunk index,
        the partial test-period sums), saved and checksummed with the rest."""
        state = {'params': trainer.param_values(), 'opt_state': trainer.opt_state,
                 'epoch': np.asarray(epoch, np.int32),
                 # brainstate's global key (weight init, any stochastic layer); the data streams are
                 # seeded by (seed, epoch, batch) and need nothing else to continue identically
                 'rng_key': np.asarray(rng_key_data(brainstate.random.DEFAULT.value))}
        if extra is not None:
            state['extra'] = extra
        if not values_finite(trainer.param_values()):
            raise RuntimeError(f'refusing to save non-finite weights as epoch {epoch}')
        # a checksum of the arrays as saved: a resume verifies what it reads against it
        meta = dict(meta, state_sha256=state_checksum(state))
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                       meta=ocp.args.JsonSave(meta))
        managers = [self.last] + ([self.best] if best else [])
        for m in managers:
            m.save(epoch, args=args, force=True)
        for m in managers:
            m.wait_until_finished()

    def restore(self, trainer, which: str = 'last', extra: dict = None):
        """Load params and optimizer state into `trainer` from the newest step that restores and matches
        its checksum, newest first; returns (epoch, meta). A damaged newer step is set aside (moved to
        checkpoints/damaged/) with one warning line, and steps newer than the one restored are dropped,
        since their epochs will be trained again. `extra` (what save was given, as targets of the right
        shapes) is updated in place with the restored values."""
        with quiet_orbax():
            return self._restore(trainer, which, extra)

    def _restore(self, trainer, which: str, extra: dict):
        manager = self.last if which == 'last' else self.best
        steps = sorted(manager.all_steps(), reverse=True)
        if not steps:
            raise UserError(f'no checkpoint in {manager.directory}')
        damaged = []
        for step in steps:
            restored, problem = self.read_step(manager, trainer, step, extra)
            if problem is None:
                break
            damaged.append(step)
            print(f'warning: checkpoint {which}/{step} is damaged ({problem}); trying an older one',
                  file=sys.stderr, flush=True)
        else:
            raise UserError(f'no checkpoint in {manager.directory} restores and matches its checksum (steps '
                            f'{", ".join(map(str, steps))}); the run cannot be resumed: start a new one')
        if damaged:
            print(f'resuming from checkpoint {which}/{step}, the newest one that restores and verifies',
                  file=sys.stderr, flush=True)
        self.set_aside(damaged, step)
        trainer.set_param_values(restored['state']['params'])
        trainer.opt_state = restored['state']['opt_state']
        trainer.place()  # on the devices of this run, whichever devices saved it
        brainstate.random.DEFAULT.value = rng_key_like(restored['state']['rng_key'], brainstate.random.DEFAULT.value)
        if extra is not None:
            extra.update(restored['state']['extra'])
        return int(restored['state']['epoch']), dict(restored['meta'])

    @staticmethod
    def read_step(manager, trainer, step: int, extra: dict = None):
        """(restored, None), or (None, what is wrong) for a step whose files are damaged."""
        target = {'params': trainer.param_values(), 'opt_state': trainer.opt_state,
                  'epoch': np.asarray(0, np.int32),
                  'rng_key': np.asarray(rng_key_data(brainstate.random.DEFAULT.value))}
        if extra is not None:
            target['extra'] = extra
        # restored onto this run's devices (replicated there), whichever devices saved the checkpoint
        where = trainer.weights_sharding()
        abstract = jax.tree.map(lambda v: jax.ShapeDtypeStruct(np.shape(v), v.dtype if hasattr(v, 'dtype') else np.asarray(v).dtype,
                                                       sharding=where),
                                target)
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        except Exception as e:  # truncated or emptied files fail in orbax, tensorstore or json, each its own way
            return None, f'{type(e).__name__}: {(str(e).strip().splitlines() or [""])[0][:200]}'

        expected = (restored['meta'] or {}).get('state_sha256')
        if not isinstance(restored['meta'], dict) or 'epoch' not in restored['state']:
            return None, 'its metadata is missing'
        if expected and state_checksum(restored['state']) != expected:
            return None, 'its arrays differ from the checksum saved with them'
        return restored, None

    def set_aside(self, damaged: list, restored_step: int):
        """Move damaged steps to checkpoints/damaged/ (kept for inspection, never read again) and delete
        the steps newer than the restored one in last/ and best/ (this run's own files: their epochs are
        trained again)."""
        import shutil
        root = os.path.dirname(str(self.last.directory))
        for step in damaged:
            target = os.path.join(root, 'damaged', f'last-{step}')
            while os.path.exists(target):
                target += '+'
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(os.path.join(str(self.last.directory), str(step)), target)
        for manager in (self.last, self.best):
            for step in manager.all_steps():
                if step > restored_step and os.path.isdir(os.path.join(str(manager.directory), str(step))):
                    shutil.rmtree(os.path.join(str(manager.directory), str(step)))
            manager.reload()

    def close(self):
        self.last.close()
        self.best.close()


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


def state_checksum(state) -> Optional[str]:
    """sha256 of every array of a checkpoint's state (dtype, shape and bytes, in tree order); None where an
    array is not all on this host (a multi-host run: orbax checks its own files there)."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(state):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return None
        a = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f'{a.dtype}{a.shape}'.encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def values_finite(values: dict) -> bool:
    """Every weight finite (checked on the host before a checkpoint is written)."""
    return all(bool(np.all(np.isfinite(np.asarray(v)))) for v in jax.tree.leaves(values))
