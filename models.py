"""The user's layer of the networks: everything of rsnn/models.py (the DMS network, the image networks'
stack, the layers and the readout), re-exported so that a task script or a notebook says `import models`.
A new neuron model is one file in rsnn/neurons/ and one row of its table (docs/code-organisation.md)."""
from __future__ import annotations

from rsnn.models import *  # noqa: F401,F403
