"""The user's layer of the data: everything of rsnn/datasets.py (the table of datasets, the DMS trial
generator, the loaders), re-exported so that a task script or a notebook says `import datasets`."""
from __future__ import annotations

from rsnn.datasets import *  # noqa: F401,F403
