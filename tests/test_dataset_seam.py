"""The table of datasets (rsnn/datasets.py DATASETS) is what the scripts read: sizes, --dataset choices,
loaders, the event datasets' rows; tonic's private names are touched in rsnn/tonic_adapter.py only."""
import importlib
import os
import re

import numpy as np
import pytest

import datasets
from rsnn import tasks, tonic_data
from conftest import ROOT, load_script


def test_every_row_has_a_loader_a_script_and_a_stand_in():
    for d in datasets.DATASETS.values():
        module, fn = d.loader.split(':')
        assert callable(getattr(importlib.import_module(module), fn)), d.loader
        assert os.path.isfile(os.path.join(ROOT, d.script)), d.script
        assert d.synthetic == 'generated' or os.path.isfile(os.path.join(ROOT, d.synthetic)), d.synthetic
        assert d.n_classes == d.n_out > 1 and d.n_in > 0


def test_the_trial_tasks_agree_with_their_rows_and_are_the_scripts_choices():
    values = vars(load_script('task-rsnn-long-term-dependency.py').build_parser().parse_args([]))
    assert set(tasks.TASKS) <= set(datasets.names(datasets.TRIAL_SCRIPT))
    for name in tasks.TASKS:
        task = tasks.make_task(dict(values, dataset=name))
        row = datasets.dataset(name)
        assert (row.n_in, row.n_out) == (task.n_in, task.n_out), name
        assert f'({task.n_steps})' in row.steps, (name, row.steps)  # the default sizes, as the table says
        assert datasets.input_size(name) == task.n_in


def test_the_event_datasets_read_their_rows():
    assert datasets.names(datasets.IMAGE_SCRIPT) == ['nmnist', 'shd']
    for name, info in tonic_data.EVENT_DATASETS.items():
        row = datasets.dataset(name)
        assert (info.n_in, info.n_classes, info.title) == (row.n_in, row.n_out, row.title)
        assert int(np.prod(info.sensor_size)) == row.n_in  # tonic's sensor agrees with the table
    with pytest.raises(ValueError, match='choose one of'):
        datasets.dataset('mnist')


def test_the_image_script_offers_the_tables_datasets():
    help_text = load_script('task-image-classification.py').build_parser().format_help()
    for name in datasets.names(datasets.IMAGE_SCRIPT):
        assert name in help_text


def test_only_the_adapter_touches_tonics_private_names():
    private = re.compile(r'\._(check_exists|is_file_present|folder_contains_at_least_n_files_of_type)\b')
    hits = []
    for folder, _, files in os.walk(os.path.join(ROOT, 'rsnn')):
        for name in files:
            if name.endswith('.py'):
                path = os.path.join(folder, name)
                if private.search(open(path).read()):
                    hits.append(os.path.relpath(path, ROOT))
    assert hits == ['rsnn/tonic_adapter.py']
