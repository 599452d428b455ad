"""Orbax checkpoints of a run ({params, opt_state, epoch, rng_key} + a protocol's extra state + JSON meta,
checksummed), with the fallback past a damaged step and the refusal of stray files named like steps.

jax, brainstate and orbax are imported where a checkpoint is written or read. Works on any object with the
Trainer's `param_values()`, `set_param_values()`, `opt_state`, `weights_sharding()` and `place()`.
"""
from __future__ import annotations

import hashlib
import logging
import os
import sys
from typing import Optional

import numpy as np

from rsnn.distributed import is_main_process, sync_processes
from rsnn import errors
from rsnn.errors import UserError
from rsnn.run_marker import listdir
from rsnn.write_failures import write_failure, write_failure_message


def rng_key_data(key):
    """The raw uint32 data of a PRNG key: brainstate >= 0.5 holds a typed key (dtype key<fry>), which
    cannot become a numpy array; older brainstate holds the raw uint32 array already."""
    import jax
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    return key


def rng_key_like(data, like):
    """`data` (raw key data) in the form of `like` (typed key or raw array)."""
    import jax
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
    """Orbax checkpoints of {params, opt_state, epoch, rng_key} (+ rule_state where the rule keeps state with the
    optimizer: FPTT) + JSON meta in RUN_DIR/checkpoints/{last,best}.

    Orbax writes each step to a temporary folder and renames it when complete, and `last` keeps the two
    newest steps, so a process killed while saving still leaves a usable earlier checkpoint.
    """

    def __init__(self, run_dir: str):
        root = os.path.abspath(os.path.join(run_dir, 'checkpoints'))
        check_no_stray_steps(root, run_dir)
        with quiet_orbax():
            self._open(root)

    def _open(self, root: str):
        import orbax.checkpoint as ocp
        self.last = ocp.CheckpointManager(os.path.join(root, 'last'),
                                          options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
        self.best = ocp.CheckpointManager(os.path.join(root, 'best'),
                                          options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))

    def save(self, trainer, epoch: int, meta: dict, best: bool, extra: dict = None):
        """`extra`: arrays the protocol needs to go on (a stream: its states and traces, the chunk index,
        the partial test-period sums), saved and checksummed with the rest."""
        import brainstate
        import orbax.checkpoint as ocp
        state = {'params': trainer.param_values(), 'opt_state': trainer.opt_state,
                 'epoch': np.asarray(epoch, np.int32),
                 # brainstate's global key (weight init, any stochastic layer); the data streams are
                 # seeded by (seed, epoch, batch) and need nothing else to continue identically
                 'rng_key': np.asarray(rng_key_data(brainstate.random.DEFAULT.value))}
        # what the rule keeps with the optimizer (FPTT's lambda, theta_bar): absent for the other rules
        rule_state = getattr(trainer, 'rule_state_values', dict)()
        if rule_state:
            state['rule_state'] = rule_state
        if extra is not None:
            state['extra'] = extra
        if not values_finite(trainer.param_values()):
            raise RuntimeError(f'refusing to save non-finite weights as epoch {epoch}')
        # a checksum of the arrays as saved: a resume verifies what it reads against it
        meta = dict(meta, state_sha256=state_checksum(state))
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                       meta=ocp.args.JsonSave(meta))
        self.write([self.last] + ([self.best] if best else []), epoch, args)

    def write(self, managers: list, epoch: int, args):
        """Save step `epoch` with each manager; what orbax's and tensorstore's threads print while writing
        (nothing, unless it fails) is held back and shown after, except for a failed write (a full disk),
        which is one UserError line."""
        import contextlib
        import io
        held = io.StringIO()
        try:
            with quiet_orbax(), contextlib.redirect_stderr(held):
                try:
                    # one after the other, never sharing a barrier: on several processes, `last` and `best`
                    # saving the same step at once stopped orbax with "Barrier _async_write_complete.1 is
                    # already ongoing" (docs/devices.md, "Several hosts")
                    for m in managers:
                        m.save(epoch, args=args, force=True)
                        m.wait_until_finished()
                except Exception as e:
                    if write_failure(e) is None:
                        raise
                    self.failed_write(managers, epoch, e)
        except UserError:
            raise
        except BaseException:
            sys.stderr.write(held.getvalue())
            raise
        sys.stderr.write(held.getvalue())

    def failed_write(self, managers: list, epoch: int, error: BaseException):
        """The run ends here: orbax's other writer threads fail the same way and print it, from now until
        exit (before the one line is printed, too): stderr is silenced now (errors.silence_until_exit)."""
        errors.silence_until_exit()
        logging.getLogger('absl').setLevel(logging.CRITICAL)
        for m in managers:
            try:
                m.wait_until_finished()
            except Exception:
                pass
        run_dir = os.path.dirname(os.path.dirname(str(self.last.directory)))
        raise UserError(write_failure_message(run_dir, error, f'the checkpoint of epoch {epoch} in '
                                                              f'{os.path.dirname(str(self.last.directory))}'),
                        last_words=True)

    def restore(self, trainer, which: str = 'last', extra: dict = None):
        """Load params and optimizer state into `trainer` from the newest step that restores and matches
        its checksum, newest first; returns (epoch, meta). A damaged newer step is set aside (moved to
        checkpoints/damaged/) with one warning line, and steps newer than the one restored are dropped,
        since their epochs will be trained again. `extra` (what save was given, as targets of the right
        shapes) is updated in place with the restored values."""
        with quiet_orbax():
            return self._restore(trainer, which, extra)

    def _restore(self, trainer, which: str, extra: dict):
        import brainstate
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
        if 'rule_state' in restored['state']:
            trainer.set_rule_state_values(restored['state']['rule_state'])
        trainer.place()  # on the devices of this run, whichever devices saved it
        brainstate.random.DEFAULT.value = rng_key_like(restored['state']['rng_key'], brainstate.random.DEFAULT.value)
        if extra is not None:
            extra.update(restored['state']['extra'])
        return int(restored['state']['epoch']), dict(restored['meta'])

    @staticmethod
    def read_step(manager, trainer, step: int, extra: dict = None):
        """(restored, None), or (None, what is wrong) for a step whose files are damaged."""
        import brainstate
        import jax
        import orbax.checkpoint as ocp
        target = {'params': trainer.param_values(), 'opt_state': trainer.opt_state,
                  'epoch': np.asarray(0, np.int32),
                  'rng_key': np.asarray(rng_key_data(brainstate.random.DEFAULT.value))}
        rule_state = getattr(trainer, 'rule_state_values', dict)()
        if rule_state:
            target['rule_state'] = rule_state
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
        if is_main_process():
            self._set_aside(damaged, restored_step)
        sync_processes('checkpoints set aside')
        for manager in (self.last, self.best):
            manager.reload()

    def _set_aside(self, damaged: list, restored_step: int):
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

    def close(self):
        with quiet_orbax():  # after a failed write orbax logs each thread's traceback again: ours is one line
            self.last.close()
            self.best.close()


def check_no_stray_steps(root: str, run_dir: str):
    """A file named like a checkpoint step (checkpoints/last/3 that is not a folder) was not written by a run:
    orbax would take it for a step, overwrite it or set it aside. Refused in one line before anything is read
    or written."""
    for which in ('last', 'best'):
        folder = os.path.join(root, which)
        for name in sorted(listdir(folder)):
            if name.isdigit() and not os.path.isdir(os.path.join(folder, name)):
                raise UserError(f'{os.path.join(folder, name)} is named like a checkpoint but is not one (a file, '
                                f'not a step folder); nothing was changed: move it out of {folder}, then start '
                                f'again (--resume {run_dir})')


def state_checksum(state) -> Optional[str]:
    """sha256 of every array of a checkpoint's state (dtype, shape and bytes, in tree order); None where an
    array is split across hosts (orbax checks its own files there). A replicated array is read from this
    host's copy: the checksum of a run on several hosts is the one a single process computes."""
    import jax
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(state):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            if not leaf.is_fully_replicated:
                return None
            leaf = leaf.addressable_data(0)
        a = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f'{a.dtype}{a.shape}'.encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def values_finite(values: dict) -> bool:
    """Every weight finite (checked on the host before a checkpoint is written)."""
    import jax
    return all(bool(np.all(np.isfinite(np.asarray(v)))) for v in jax.tree.leaves(values))
