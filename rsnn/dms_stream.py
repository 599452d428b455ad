"""The DMS task as endless streams: rsnn/trial_stream.py's TrialStream of the DMS trial task
(rsnn/tasks/dms.py), under the names the DMS stream always had (DMSStream(cfg, ...), Trial, Chunk,
TrialScorer, parse_iti, the salts)."""
from __future__ import annotations

from rsnn import datasets
from rsnn.trial_stream import (HELD_OUT_SALT, PHASE_TRIAL, TRAIN_SALT, VALIDATION_SALT, Chunk, Trial,  # noqa: F401
                               TrialScorer, TrialStream, parse_iti)


class DMSStream(TrialStream):
    """TrialStream(DMSTask(cfg), ...): the DMS stream of a datasets.DMSConfig."""

    def __init__(self, cfg: datasets.DMSConfig, n_streams: int, chunk_steps: int, seed: int,
                 iti_ms: tuple = (100., 500.), salt: int = TRAIN_SALT):
        from rsnn.tasks.dms import DMSTask
        super().__init__(DMSTask(cfg), n_streams, chunk_steps, seed, iti_ms, salt)
        self.cfg = cfg


__all__ = ['DMSStream', 'TrialStream', 'Trial', 'Chunk', 'TrialScorer', 'parse_iti', 'TRAIN_SALT', 'HELD_OUT_SALT',
           'VALIDATION_SALT', 'PHASE_TRIAL']
