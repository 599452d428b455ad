import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The top level (task scripts, models, datasets, utils) and tests/ importable here (pytest.ini's pythonpath)
# and in every child process a test starts (PYTHONPATH, inherited).
os.environ['PYTHONPATH'] = os.pathsep.join([ROOT, os.path.join(ROOT, 'tests')]
                                           + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p])


def load_script(filename: str):
    """Import a task script (its file name has dashes) as a module."""
    name = os.path.basename(filename).replace('-', '_').removesuffix('.py')
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, filename))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='session')
def dms_script():
    return load_script('task-rsnn-long-term-dependency.py')
