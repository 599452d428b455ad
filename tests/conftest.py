import importlib.util
import os
import shutil
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The top level (task scripts, models, datasets, utils) and tests/ importable here (pytest.ini's pythonpath)
# and in every child process a test starts (PYTHONPATH, inherited).
os.environ['PYTHONPATH'] = os.pathsep.join([ROOT, os.path.join(ROOT, 'tests')]
                                           + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p])

# One XLA compilation cache for the child processes the tests start (task scripts, reproduction scripts,
# sweep workers): many compile the same programs (the same toy network with another seed, run folder or
# control flag), and each child would compile them again. The folder is made once per session (by the xdist
# controller; its workers inherit it) and removed at the end. The test processes themselves compile without
# it: jax reads its settings when first imported, which happens here before the cache is named (in-process
# compile counts and timings stay as they were). A JAX_COMPILATION_CACHE_DIR set by the user is left alone.
XLA_CACHE = os.environ.get('RSNN_TESTS_XLA_CACHE')
OWN_XLA_CACHE = XLA_CACHE is None and 'JAX_COMPILATION_CACHE_DIR' not in os.environ
if OWN_XLA_CACHE:
    XLA_CACHE = os.environ['RSNN_TESTS_XLA_CACHE'] = tempfile.mkdtemp(prefix='rsnn-tests-xla-cache-')
if XLA_CACHE is not None and os.environ.get('JAX_COMPILATION_CACHE_DIR') == XLA_CACHE:
    del os.environ['JAX_COMPILATION_CACHE_DIR']   # an xdist worker: inherited from the controller
import jax  # noqa: E402,F401  (before the cache is named: this process compiles without it)
if XLA_CACHE is not None:
    # every program, however quick to compile; a size limit (never reached) makes jax lock the folder for
    # each read and write (without one, a child could read an entry that another is still writing)
    os.environ.update(JAX_COMPILATION_CACHE_DIR=XLA_CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='-1', JAX_COMPILATION_CACHE_MAX_SIZE=str(2 ** 33))


def pytest_unconfigure(config):
    if OWN_XLA_CACHE:  # the process that made the folder
        shutil.rmtree(XLA_CACHE, ignore_errors=True)


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
