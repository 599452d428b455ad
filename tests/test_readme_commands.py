"""Every command of the README's "The experiments" section, run as written.

The commands are read from README.md (the first bash block of each experiment), so an edit of the README
is what runs here, and a command that disappears fails the count. Each runs in-process through the script's
main(argv) with only size flags appended (a tiny network, a few short steps, a tiny fake data folder for the
image commands, a run folder in tmp); every other flag keeps the README's value or the script's default,
--devices included (on a machine without the authors' GPUs 0-3 the run warns and goes on on the device that
exists).
"""
import csv
import json
import os
import re
import shlex

import jax
import pytest

import fake_data as fakes
import utils
from rsnn import argparse_adapter, run_folder
from rsnn import methods
from conftest import ROOT, load_script

DMS, IMAGE, MEMORY = ('task-rsnn-long-term-dependency.py', 'task-image-classification.py',
                      'task-memory-and-speed-evaluation-tpu.py')

DMS_SIZES = ['--n_rec', '8', '--t_sample', '20', '--t_delay', '20', '--t_test', '20', '--batch_size', '8',
             '--batches_per_epoch', '2', '--epochs', '1', '--n_test_trials', '8']
IMAGE_SIZES = ['--data_length', '8', '--n_layer', '1', '--n_rec', '8', '--batch_size', '8',
               '--batches_per_epoch', '2', '--eval_batches', '1', '--epochs', '1']
MEMORY_LENGTHS = (4, 8)
MEMORY_SIZES = ['--lengths', ','.join(map(str, MEMORY_LENGTHS)), '--n_in', '20', '--n_rec', '8', '--n_layer', '1',
                '--n_out', '3', '--batch_size', '4', '--repeats', '1']


def readme_commands() -> list:
    """The `python task-...` lines (backslash continuations joined) of the first bash block under each
    `###` heading of the README's "## The experiments" section, as argv lists."""
    text = open(os.path.join(ROOT, 'README.md')).read()
    section = re.search(r'^## The experiments.*?(?=^## )', text, re.S | re.M).group(0)
    commands = []
    for sub in re.split(r'^### ', section, flags=re.M)[1:]:
        block = re.search(r'^```bash\n(.*?)^```', sub, re.S | re.M)
        if block is None:
            continue
        joined = block.group(1).replace('\\\n', ' ')
        commands += [shlex.split(line, comments=True) for line in joined.splitlines()
                     if line.startswith('python task-')]
    return commands


COMMANDS = readme_commands()


def command_id(argv) -> str:
    flags = dict(zip(argv, argv[1:]))
    return '-'.join(v for v in (argv[1].split('-')[1], flags.get('--dataset'), flags.get('--method')) if v)


def test_the_ten_readme_commands_are_there():
    found = sorted(command_id(c) for c in COMMANDS)
    assert found == sorted(['rsnn-dms-bptt', 'rsnn-dms-expsm_diag', 'rsnn-dms-diag', 'memory']
                           + [f'image-{d}-{m}' for d in ('nmnist', 'shd') for m in ('bptt', 'expsm_diag', 'diag')]), found


@pytest.fixture(scope='module')
def fake_data_dir(tmp_path_factory):
    """Tiny fake N-MNIST and SHD (16 train / 8 test samples each) in one --data_dir."""
    root = str(tmp_path_factory.mktemp('data'))
    fakes.write_nmnist_files(root, fakes.synthetic_event_samples('nmnist', 16, 8, n_classes=4,
                                                                 events_per_sample=100, seed=1))
    fakes.write_shd_files(root, fakes.synthetic_event_samples('shd', 16, 8, n_classes=4,
                                                              events_per_sample=100, seed=2))
    return root


@pytest.fixture
def small_nmnist_ok(monkeypatch):
    """tonic demands 10000 .bin files per N-MNIST split before reading any (tonic's own tests patch this)."""
    import tonic.datasets
    monkeypatch.setattr(tonic.datasets.NMNIST, '_check_exists', lambda self: self._is_file_present()
                        and self._folder_contains_at_least_n_files_of_type(1, '.bin'))


def assert_readme_values_kept(script, readme_argv, sizes, config):
    """Every README flag that no size flag replaced reached the run's config.json with the README's value."""
    parser = script.build_parser()
    readme = vars(run_folder.parse_args(parser, readme_argv))
    dest = argparse_adapter.dest_of(parser)
    resized = {dest[f] for f in sizes if f.startswith('--')}
    for flag in (a for a in readme_argv if a.startswith('--')):
        key = dest[flag]
        if key not in resized:
            assert config[key] == readme[key], (flag, config[key], readme[key])


def assert_device_warning(stderr, readme_argv):
    """--devices N: on a machine without accelerator N, one warning line and the run goes on."""
    n = int(readme_argv[readme_argv.index('--devices') + 1])
    if n >= len([d for d in jax.devices() if d.platform != 'cpu']):
        assert f'warning: --devices {n} not found' in stderr


@pytest.mark.parametrize('readme_argv', [c for c in COMMANDS if c[1] == DMS], ids=command_id)
def test_dms_command(readme_argv, tmp_path, capsys):
    script = load_script(DMS)
    run_dir = str(tmp_path / 'run')
    assert script.main(readme_argv[2:] + DMS_SIZES + ['--out_dir', run_dir]) == 0
    assert_device_warning(capsys.readouterr().err, readme_argv)
    config = json.load(open(os.path.join(run_dir, 'config.json')))
    assert_readme_values_kept(script, readme_argv[2:], DMS_SIZES, config)
    assert config['n_data_worker'] == 4 and config['n_steps'] == 10 + 20 + 20 + 20
    summary = json.load(open(os.path.join(run_dir, 'summary.json')))
    assert summary['method'] == config['method'] and summary['epochs_run'] == 1
    rows = utils.read_csv(os.path.join(run_dir, 'metrics.csv'))
    assert len(rows) == 1 and 0 <= float(rows[0]['test_acc']) <= 1
    assert len(utils.read_csv(os.path.join(run_dir, 'batches.csv'))) == 2


@pytest.mark.parametrize('readme_argv', [c for c in COMMANDS if c[1] == IMAGE], ids=command_id)
def test_image_command(readme_argv, fake_data_dir, small_nmnist_ok, tmp_path, capsys):
    script = load_script(IMAGE)
    run_dir = str(tmp_path / 'run')
    sizes = IMAGE_SIZES + ['--data_dir', fake_data_dir]
    assert script.main(readme_argv[2:] + sizes + ['--out_dir', run_dir]) == 0
    assert_device_warning(capsys.readouterr().err, readme_argv)
    config = json.load(open(os.path.join(run_dir, 'config.json')))
    assert_readme_values_kept(script, readme_argv[2:], sizes, config)
    assert config['n_in'] == {'nmnist': 2312, 'shd': 700}[config['dataset']] and config['n_train'] == 16
    summary = json.load(open(os.path.join(run_dir, 'summary.json')))
    assert summary['method'] == config['method'] and summary['epochs_run'] == 1
    rows = utils.read_csv(os.path.join(run_dir, 'metrics.csv'))
    assert len(rows) == 1 and 0 <= float(rows[0]['test_acc']) <= 1


@pytest.mark.parametrize('readme_argv', [c for c in COMMANDS if c[1] == MEMORY], ids=command_id)
def test_memory_command(readme_argv, tmp_path):
    """The default --devices auto and --preset auto: the probe's device (the CPU here), the CPU preset's
    values where no size flag is given."""
    script = load_script(MEMORY)
    out = str(tmp_path / 'run')
    assert script.main(readme_argv[2:] + MEMORY_SIZES + ['--out_dir', out]) == 0
    with open(os.path.join(out, 'results.csv')) as f:
        rows = list(csv.DictReader(f))
    # the online methods in both configurations (--trace_chunk 1,auto, the default): K = 1 and auto
    assert sorted((r['method'], int(r['T']), r['trace_chunk_requested'] or '-') for r in rows) == sorted(
        (m, T, K) for m in methods.PAPER for T in MEMORY_LENGTHS
        for K in (['1', 'auto'] if methods.get(m).chunked else ['-']))
    for r in rows:
        assert r['status'] == 'ok' and float(r['step_s']) > 0 and float(r['step_mb']) > 0, r
    data = json.load(open(os.path.join(out, 'results.json')))
    accelerators = [d for d in jax.devices() if d.platform != 'cpu']
    assert data['config']['devices'] == ('0' if accelerators else 'cpu')
    assert data['machine']['platform'] == (accelerators[0].platform if accelerators else 'cpu')
    if not accelerators:
        assert data['config']['preset'] == 'cpu' and data['config']['density'] == 0.1
    assert os.path.getsize(os.path.join(out, 'memory_and_time.png')) > 0


# --------------------------------------------------------------------------------------------
# The smoke runs and the links
# --------------------------------------------------------------------------------------------

def smoke_commands() -> list:
    """The `python task-...` lines of the README's "## Smoke runs" block, as argv lists."""
    text = open(os.path.join(ROOT, 'README.md')).read()
    section = re.search(r'^## Smoke runs.*?(?=^## )', text, re.S | re.M).group(0)
    block = re.search(r'^```bash\n(.*?)^```', section, re.S | re.M).group(1)
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.startswith('python task-')]


def test_the_smoke_runs_are_each_script_with_two_methods():
    found = sorted((argv[1], argv[argv.index('--method') + 1] if '--method' in argv else None)
                   for argv in smoke_commands())
    assert found == sorted([(DMS, 'bptt'), (DMS, 'expsm_diag'), (IMAGE, 'bptt'), (IMAGE, 'expsm_diag'),
                            (MEMORY, None)]), found
    assert all(argv[2:4] == ['--preset', 'smoke'] for argv in smoke_commands())


@pytest.mark.parametrize('argv', smoke_commands(), ids=lambda a: '-'.join(a[1:2] + a[-1:]))
def test_each_smoke_command_takes_its_presets_values(argv):
    """Each smoke command, parsed by its script, has every value of its preset, as if the flag were given
    (the runs themselves: tests/test_image_classification.py, tests/test_memory_speed.py and the DMS
    script's tests)."""
    script = load_script(argv[1])
    presets = dict(getattr(script, 'PRESETS', {}))
    if 'smoke' not in presets:
        pytest.skip(f'{argv[1]} has no --preset smoke in this checkout')
    presets.setdefault('auto', {})  # the memory script's default preset, resolved later by the platform
    args = vars(run_folder.parse_args(script.build_parser(), argv[2:], presets))
    rest = [a for a in argv[2:] if a not in ('--preset', 'smoke')]
    for key, value in presets['smoke'].items():
        if isinstance(value, bool):
            assert args[key] is value, key
            continue
        spelled = vars(run_folder.parse_args(script.build_parser(), rest + [f'--{key}', str(value)], presets))
        assert args[key] == spelled[key], (key, args[key], spelled[key])


def heading_anchors(path: str) -> set:
    """GitHub's anchors of the markdown headings in `path`: lower case, punctuation dropped, spaces -> '-'."""
    anchors = set()
    for line in open(path):
        if line.startswith('#'):
            title = line.lstrip('#').strip().lower()
            anchors.add(re.sub(r'[^\w\- ]', '', title).replace(' ', '-'))
    return anchors


@pytest.mark.parametrize('page', ['README.md', 'docs/results.md', 'docs/code-organisation.md'])
def test_the_links_of_a_page_reach_a_file_and_a_heading(page):
    path = os.path.join(ROOT, page)
    links = re.findall(r'\]\(([^)#\s]+\.(?:md|png))(#[^)\s]+)?\)', open(path).read())
    assert links, page
    for target, anchor in links:
        if target.startswith('http'):
            continue
        file = os.path.normpath(os.path.join(os.path.dirname(path), target))
        assert os.path.isfile(file), (page, target)
        if anchor:
            assert anchor[1:] in heading_anchors(file), (page, target + anchor)
