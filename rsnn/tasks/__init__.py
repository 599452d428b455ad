"""The trial tasks of task-rsnn-long-term-dependency.py: the seam (rsnn/tasks/base.py: the TrialTask protocol,
the table TASKS, register) and one module per task holding its generator, flags, defaults and presets.
A new task is one module that calls register(TaskRow(...)) (tests/toy/toy_trial_task.py does it from outside
the package)."""
from __future__ import annotations

from rsnn.tasks.base import (TASKS, Flag, TaskRow, TrialTask, add_task_flags, all_presets,  # noqa: F401
                             decision_weights, make_task, rate_trials, register, test_set, train_loader)
from rsnn.tasks import dms, cue_accumulation, store_recall, credit_split  # noqa: F401,E402  (each registers its row)

__all__ = ['TASKS', 'Flag', 'TaskRow', 'TrialTask', 'add_task_flags', 'all_presets', 'decision_weights', 'make_task',
           'rate_trials', 'register', 'test_set', 'train_loader', 'dms', 'cue_accumulation', 'store_recall', 'credit_split']
