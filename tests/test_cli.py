"""The command lines of the three task scripts: one precedence rule for presets and --resume, and
--help / argument errors that answer before any heavy import."""
import json
import subprocess
import sys
import time

import pytest

import utils

from rsnn import run_folder
from conftest import ROOT, load_script

DMS, IMAGE, MEMORY = ('task-rsnn-long-term-dependency.py', 'task-image-classification.py',
                      'task-memory-and-speed-evaluation-tpu.py')


@pytest.mark.parametrize('script', [DMS, IMAGE, MEMORY])
def test_help_and_argument_errors_answer_at_once(script):
    """A generous bound (it takes about 0.1 s): the scripts import jax only after parsing."""
    for argv, code in ((['--help'], 0), (['--no_such_flag'], 2)):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, script, *argv], cwd=ROOT, capture_output=True, text=True,
                              timeout=60)
        seconds = time.perf_counter() - t0
        assert proc.returncode == code, proc.stderr
        assert seconds < 2.0, (script, argv, seconds)
        assert ('usage:' in proc.stdout) if code == 0 else ('error:' in proc.stderr)


@pytest.fixture
def saved_run(tmp_path):
    """A run folder as fit leaves it before its first checkpoint: config.json only."""
    run = tmp_path / 'run'
    run.mkdir()
    (run / 'config.json').write_text(json.dumps(dict(batch_size=7, lr=0.5, run_dir=str(run), n_steps=99)))
    (run / run_folder.RUN_MARKER).write_text('{}')  # as run_folder.prepare_run_dir leaves it
    return str(run)


def parse(script, argv):
    mod = load_script(script)
    if script == MEMORY:
        return mod.parse_args(argv)
    return run_folder.parse_args(mod.build_parser(), argv, getattr(mod, 'PRESETS', None))


@pytest.mark.parametrize('script,argv,batch_size', [
    (DMS, [], 128),                                                  # the parser's default
    (DMS, ['--preset', 'cpu-demo'], 32),                             # the preset beats the default
    (DMS, ['--preset', 'cpu-demo', '--batch_size', '8'], 8),         # an explicit flag beats the preset
    (DMS, ['--resume', 'RUN'], 7),                                   # the saved config beats the default
    (DMS, ['--resume', 'RUN', '--preset', 'cpu-demo'], 7),           # ... and the preset
    (DMS, ['--batch_size', '8', '--resume', 'RUN'], 8),              # an explicit flag beats the saved config
    (IMAGE, [], 128),
    (IMAGE, ['--resume', 'RUN'], 7),
    (IMAGE, ['--resume', 'RUN', '--batch_size', '8'], 8),
    (MEMORY, [], 128),                                               # auto before the probe: the paper's
    (MEMORY, ['--preset', 'cpu'], 32),
    (MEMORY, ['--preset', 'cpu', '--batch_size', '8'], 8),
])
def test_flag_beats_saved_config_beats_preset_beats_default(script, argv, batch_size, saved_run):
    args = parse(script, [saved_run if a == 'RUN' else a for a in argv])
    assert args.batch_size == batch_size
    if 'RUN' in argv:
        assert args.lr == 0.5 and args.out_dir == saved_run  # the rest of the saved config, in place
        assert not hasattr(args, 'n_steps') and not hasattr(args, 'run_dir')  # derived values stay out
    elif '--preset' in argv and script == DMS:
        assert args.epochs == 40 and args.lr == 1e-3                      # the rest of the preset


def test_memory_auto_preset_follows_the_platform():
    mem = load_script(MEMORY)
    args = mem.parse_args(['--n_rec', '16'])
    cpu, gpu = mem.resolve_config(args, 'cpu'), mem.resolve_config(args, 'gpu')
    assert (cpu['preset'], cpu['batch_size'], cpu['lengths'], cpu['n_rec']) == ('cpu', 32, [25, 50, 100, 200], 16)
    assert (gpu['preset'], gpu['batch_size'], gpu['n_in'], gpu['n_rec']) == ('paper', 128, 32768, 16)


def test_memory_devices_auto_is_the_probed_device():
    """--devices auto (the default) becomes the device the probe found before anything needs a device list
    (issue 18: utils.check_batch_for_devices refused 'auto'); a bad value fails at parse time."""
    mem = load_script(MEMORY)
    args = mem.parse_args(['--n_rec', '16'])
    assert args.devices == 'auto'
    for platform, devices in (('cpu', 'cpu'), ('gpu', '0'), ('tpu', '0')):
        cfg = mem.resolve_config(args, platform)
        assert cfg['devices'] == devices
        utils.check_batch_for_devices(cfg['batch_size'], cfg['devices'])  # no error
    assert mem.resolve_config(mem.parse_args(['--devices', '0,1']), 'gpu')['devices'] == '0,1'
    with pytest.raises(utils.UserError, match="'all', 'cpu' or 'auto', got 'gpu0'"):
        mem.parse_args(['--devices', 'gpu0'])
