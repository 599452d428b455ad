"""What marks a folder as a run of this repository, and what can be read from it without jax: the marker and
lock file names, the files a run writes, whether it holds a checkpoint (and the newest), its summary.

The bottom of the run-folder modules (rsnn/run_folder.py, rsnn/resume.py, rsnn/checkpoints.py,
rsnn/run_log.py, rsnn/write_failures.py import it); imports nothing of the training code.
"""
from __future__ import annotations

import json
import os
from typing import Optional

RUN_MARKER = '.brainscale-run'          # written into every run folder this repository creates
RUN_LOCK = '.brainscale-run.lock'       # flock()ed by the process that trains in the folder
# the files a run writes (besides config.json and checkpoints/): the only ones a start over deletes
RUN_FILES = ('metrics.csv', 'batches.csv', 'summary.json', 'learning_curves.png', 'grad_fidelity.csv')


def has_checkpoint(run_dir: str) -> bool:
    """A completed checkpoint step in RUN_DIR/checkpoints/last (orbax renames a step's temporary
    folder to the bare step number when it is complete)."""
    last = os.path.join(run_dir, 'checkpoints', 'last')
    return os.path.isdir(last) and any(name.isdigit() for name in os.listdir(last))


def is_run_folder(run_dir: str) -> bool:
    """A folder this repository created for a run: it holds RUN_MARKER, or (runs made before the marker
    existed) a checkpoint and a config.json with the fields this repository writes."""
    if os.path.isfile(os.path.join(run_dir, RUN_MARKER)):
        return True
    if not has_checkpoint(run_dir):
        return False
    try:
        with open(os.path.join(run_dir, 'config.json')) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and {'run_dir', 'experiment', 'method', 'n_params'} <= set(config)


def listdir(path: str) -> list:
    return os.listdir(path) if os.path.isdir(path) else []

def newest_checkpoint(run_dir: str) -> Optional[int]:
    last = os.path.join(run_dir, 'checkpoints', 'last')
    steps = [int(n) for n in listdir(last) if n.isdigit()]
    return max(steps) if steps else None

def read_summary(run_dir: str) -> dict:
    path = os.path.join(run_dir, 'summary.json')
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)
