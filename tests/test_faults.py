"""The fault suite of issue 31: a run or a dataset is never silently wrong. Each fault gives a non-zero exit
where the run cannot go on, one line (no traceback), and changes or loses nothing (byte snapshots of the run
folder and the data). docs/run-folders.md lists each guarantee with its test here."""
import errno
import glob
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import fake_data as fakes
import utils
from conftest import ROOT, load_script
from rsnn import event_data, run_folder, train_loop
from rsnn.trainer import Trainer
from test_dms import TINY_FLAGS, lines_besides_usage, read_metrics, run_cli
from test_image_classification import _nmnist_check_small
from test_run_folders import batch_numbers, snapshot


def one_line(text: str) -> str:
    lines = [l for l in text.splitlines() if l.strip()]
    assert len(lines) == 1 and 'Traceback' not in text, text
    return lines[0]


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory, dms_script):
    """A tiny DMS run (ES-D-RTRL, 16 neurons) of one epoch, checkpointed."""
    run_dir = str(tmp_path_factory.mktemp('faults') / 'run')
    assert dms_script.main(TINY_FLAGS + ['--epochs', '1', '--out_dir', run_dir]) == 0
    return run_dir


def copy_of(run_dir, tmp_path, name='copy'):
    copy = str(tmp_path / name)
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns(run_folder.RUN_LOCK))
    return copy


def edit_config(run_dir, **values):
    path = os.path.join(run_dir, 'config.json')
    config = json.load(open(path))
    config.update(values)
    json.dump(config, open(path, 'w'))


# --------------------------------------------------------------------------------------------
# 1. A run folder's configuration is part of what its checkpoints mean
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize('field, value', [('method', 'bptt'), ('n_rec', 32), ('seed', 5)])
def test_an_edited_config_json_is_refused_naming_the_field(dms_script, finished_run, tmp_path, capsys, field, value):
    run_dir = copy_of(finished_run, tmp_path)
    edit_config(run_dir, **{field: value})
    before = snapshot(run_dir)
    capsys.readouterr()
    with pytest.raises(utils.UserError) as e:
        dms_script.main(['--resume', run_dir, '--epochs', '2'])
    message = one_line(str(e.value))
    assert f'config.json has {field} = {json.dumps(value)}' in message and 'checkpoint last/1' in message
    assert 'damaged' not in capsys.readouterr().err  # intact checkpoints are not called damaged
    assert snapshot(run_dir) == before


def test_a_missing_config_json_is_recovered_from_the_checkpoint(dms_script, finished_run, tmp_path, capsys):
    run_dir = copy_of(finished_run, tmp_path)
    saved = json.load(open(os.path.join(run_dir, 'config.json')))
    os.remove(os.path.join(run_dir, 'config.json'))
    capsys.readouterr()
    assert dms_script.main(['--resume', run_dir, '--epochs', '2']) == 0
    assert 'taken from checkpoint last/1' in capsys.readouterr().err
    config = json.load(open(os.path.join(run_dir, 'config.json')))
    assert config['method'] == saved['method'] == 'expsm_diag' and config['n_rec'] == 16
    assert [r['epoch'] for r in read_metrics(run_dir)] == [1, 2] and batch_numbers(run_dir) == list(range(1, 7))


def test_a_stray_file_named_like_a_checkpoint_is_left_alone(dms_script, finished_run, tmp_path):
    run_dir = copy_of(finished_run, tmp_path)
    stray = os.path.join(run_dir, 'checkpoints', 'last', '2')
    open(stray, 'w').write('notes of the user')
    before = snapshot(run_dir)
    with pytest.raises(utils.UserError, match=f'{stray} is named like a checkpoint but is not one') as e:
        dms_script.main(['--resume', run_dir, '--epochs', '2'])
    one_line(str(e.value))
    assert snapshot(run_dir) == before


# --------------------------------------------------------------------------------------------
# 2. Event data checked before it is trained on
# --------------------------------------------------------------------------------------------

T = 8
NMNIST, SHD = event_data.event_dataset('nmnist'), event_data.event_dataset('shd')


@pytest.fixture
def small_nmnist_ok(monkeypatch):
    import tonic.datasets
    monkeypatch.setattr(tonic.datasets.NMNIST, '_check_exists', _nmnist_check_small)


def event_files(name, root, damage=None):
    data = fakes.synthetic_event_samples(name, 6, 4, n_classes=4, events_per_sample=50, seed=3)
    if damage:
        damage(data)
    if name == 'nmnist':
        fakes.write_nmnist_files(root, data, zip_folders=False)
    else:
        fakes.write_shd_files(root, data)
    return data


def frame(info, root, train=True):
    return event_data.load_framed_split(info, root, train, T, cache_dir=os.path.join(root, 'cache'), progress=False)


def data_snapshot(root):
    return {k: v for k, v in snapshot(root).items() if not k.startswith('cache')}


def reverse_times(data):
    label, u, t = data['train'][1]
    data['train'][1] = (label, u, t[::-1].copy())


def nan_time(data):
    label, u, t = data['train'][2]
    t = np.array(t, np.float64)
    t[5] = np.nan
    data['train'][2] = (label, u, t)


def one_event(data):
    label, u, t = data['train'][3]
    data['train'][3] = (label, u[:1], t[:1])


@pytest.mark.parametrize('damage, fragment', [
    (reverse_times, r'shd_train\.h5 \(sample 1\) cannot be read: ValueError: the event times go backwards'),
    (nan_time, r'shd_train\.h5 \(sample 2\) cannot be read: ValueError: event 5 has a negative \(or non-finite\) time'),
    (one_event, r'shd_train\.h5 \(sample 3\) cannot be read: ValueError: none of its 1 events survives framing'),
])
def test_odd_shd_recordings_are_named(tmp_path, damage, fragment):
    root = str(tmp_path)
    event_files('shd', root, damage)
    before = data_snapshot(root)
    with pytest.raises(utils.UserError, match=fragment) as e:
        frame(SHD, root)
    one_line(str(e.value))
    assert data_snapshot(root) == before


def test_shd_labels_shorter_than_the_spike_trains_are_refused(tmp_path):
    import h5py
    root = str(tmp_path)
    event_files('shd', root)
    path = os.path.join(root, 'SHD', 'shd_train.h5')
    with h5py.File(path, 'a') as f:
        labels = f['labels'][:-2]
        del f['labels']
        f['labels'] = labels
    before = data_snapshot(root)
    with pytest.raises(utils.UserError, match='labels holds 4 entries, spikes/times 6 and spikes/units 6') as e:
        frame(SHD, root)
    assert path in one_line(str(e.value)) and data_snapshot(root) == before


def test_an_empty_nmnist_recording_is_named(tmp_path, small_nmnist_ok):
    root = str(tmp_path)
    event_files('nmnist', root)
    path = sorted(glob.glob(os.path.join(root, 'NMNIST', 'Train', '*', '*.bin')))[2]
    open(path, 'wb').close()  # 0 bytes
    before = data_snapshot(root)
    with pytest.raises(utils.UserError, match=f'{path} cannot be read: ValueError: the recording holds no events') as e:
        frame(NMNIST, root)
    one_line(str(e.value))
    assert data_snapshot(root) == before


def test_a_recording_changed_after_the_cache_was_built_is_framed_again(tmp_path, small_nmnist_ok, capsys):
    root = str(tmp_path)
    event_files('nmnist', root)
    first = frame(NMNIST, root)
    path = sorted(glob.glob(os.path.join(root, 'NMNIST', 'Train', '*', '*.bin')))[0]
    events = open(path, 'rb').read()
    with open(path, 'wb') as f:
        f.write(events[:len(events) // 2 // 5 * 5])  # the same file, half of its events
    capsys.readouterr()
    again = frame(NMNIST, root)
    assert 'files changed since the frame cache' in capsys.readouterr().out
    assert again.folder != first.folder
    i = 0  # the changed file is sample 0 of the split (tonic lists them sorted)
    assert again.n_events(i) < first.n_events(i)
    fresh = event_data.load_framed_split(NMNIST, root, True, T, cache_dir=str(tmp_path / 'fresh'), progress=False)
    assert np.array_equal(again[i][0], fresh[i][0])


def test_a_file_in_place_of_the_cache_folder_is_one_line(tmp_path):
    root = str(tmp_path)
    event_files('shd', root)
    cache = os.path.join(root, 'cache')
    open(cache, 'w').write('not a folder')
    with pytest.raises(utils.UserError, match='is a file where the frame cache keeps a folder') as e:
        frame(SHD, root)
    one_line(str(e.value))
    assert open(cache).read() == 'not a folder'


def test_shd_without_its_zip_says_which_file_is_missing(tmp_path):
    root = str(tmp_path)
    event_files('shd', root)
    os.remove(os.path.join(root, 'SHD', 'shd_train.h5.zip'))
    before = data_snapshot(root)
    with pytest.raises(utils.UserError, match=r'shd_train\.h5 is there but not shd_train\.h5\.zip beside it') as e:
        event_data.open_tonic_dataset(SHD, root, True)
    one_line(str(e.value))
    assert data_snapshot(root) == before


# --------------------------------------------------------------------------------------------
# 3. SIGINT and SIGTERM stop a run, wherever they land
# --------------------------------------------------------------------------------------------


FAST = TINY_FLAGS + ['--method', 'bptt']  # where the rule does not matter: the quickest to compile


def run_child(run_dir, body, argv, timeout=240):
    """The DMS script through utils.cli_main (the signal handling of the command line) in a child, with
    `body` (Python source) run first to plant the fault."""
    child = textwrap.dedent(f'''
        import gc, os, signal, sys, time
        sys.argv = ['task-rsnn-long-term-dependency.py'] + {argv!r}
        import utils
        from rsnn import interrupts, run_folder, train_loop
        from rsnn.trainer import Trainer
        from conftest import load_script
    ''') + textwrap.dedent(body) + textwrap.dedent('''
        utils.cli_main(load_script('task-rsnn-long-term-dependency.py').main)
    ''')
    t0 = time.time()
    proc = subprocess.run([sys.executable, '-c', child], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    return proc, time.time() - t0


SIGNAL_AT_STEP = '''
real_step = Trainer.train_step
calls = []
def step(self, *a):
    calls.append(1)
    if len(calls) == {n}:
        {action}
    return real_step(self, *a)
Trainer.train_step = step
'''

# SIGINT sent from inside a garbage-collector callback: Python raises its KeyboardInterrupt there, where
# it is printed as "Exception ignored in ..." and lost (what happened under jax's _xla_gc_callback)
IN_GC_CALLBACK = '''
def in_gc(phase, info):
    if phase == 'start' and len(calls) >= 5 and not getattr(in_gc, 'done', False):
        in_gc.done = True
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000): pass  # the handler runs here, inside the callback
gc.callbacks.append(in_gc)
'''


def test_sigint_inside_a_gc_callback_still_stops_the_run(tmp_path):
    run_dir = str(tmp_path / 'run')
    body = SIGNAL_AT_STEP.format(n=5, action='gc.collect()') + IN_GC_CALLBACK
    proc, _ = run_child(run_dir, body, FAST + ['--epochs', '4', '--out_dir', run_dir])
    assert proc.returncode == 130, proc.stderr
    assert one_line(proc.stderr) == (f'interrupted (SIGINT): {run_dir} keeps its checkpoint of epoch 1; continue with '
                                     f'--resume {run_dir}')
    assert [r['epoch'] for r in read_metrics(run_dir)] == [1]  # stopped in epoch 2 (its batch 5), not trained on


def test_sigint_before_the_first_checkpoint_names_the_real_folder(tmp_path, dms_script):
    run_dir = str(tmp_path / 'run')
    body = SIGNAL_AT_STEP.format(n=1, action='os.kill(os.getpid(), signal.SIGINT)')
    proc, _ = run_child(run_dir, body, FAST + ['--epochs', '2', '--out_dir', run_dir])
    assert proc.returncode == 130, proc.stderr
    assert one_line(proc.stderr) == (f'interrupted (SIGINT) before the first checkpoint of {run_dir}: nothing trained '
                                     f'was kept; --resume {run_dir} starts it over with its configuration')
    assert dms_script.main(['--resume', run_dir]) == 0  # what the line says works
    assert [r['epoch'] for r in read_metrics(run_dir)] == [1, 2]


def test_sigterm_during_a_checkpoint_write_ends_after_the_write(tmp_path):
    run_dir = str(tmp_path / 'run')
    body = '''
    real_save = run_folder.Checkpoints.save
    def save(self, trainer, epoch, *a, **kw):
        if epoch == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_save(self, trainer, epoch, *a, **kw)
    run_folder.Checkpoints.save = save
    '''
    proc, _ = run_child(run_dir, body, FAST + ['--epochs', '3', '--out_dir', run_dir])
    assert proc.returncode == 143, proc.stderr
    assert one_line(proc.stderr) == (f'interrupted (SIGTERM): {run_dir} keeps its checkpoint of epoch 2; continue with '
                                     f'--resume {run_dir}')
    assert sorted(os.listdir(os.path.join(run_dir, 'checkpoints', 'last'))) == ['1', '2']


@pytest.mark.parametrize('how', ['second_signal', 'grace'])
def test_a_run_that_cannot_stop_by_itself_is_ended_at_once(tmp_path, how):
    """Busy where no handler runs (a long compile; here a checkpoint write that takes 60 s): a second SIGINT,
    or GRACE_S seconds after the first, end the process with its one line."""
    run_dir = str(tmp_path / 'run')
    second = 'os.kill(os.getpid(), signal.SIGINT)' if how == 'second_signal' else 'pass'
    body = f'''
    interrupts.GRACE_S = 3
    def save(self, trainer, epoch, *a, **kw):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)
        {second}
        time.sleep(60)
    run_folder.Checkpoints.save = save
    '''
    proc, seconds = run_child(run_dir, body, FAST + ['--epochs', '2', '--out_dir', run_dir])
    assert proc.returncode == 130, proc.stderr
    why = 'a second signal' if how == 'second_signal' else 'still running 3 s after the signal'
    assert one_line(proc.stderr) == (f'interrupted (SIGINT) before the first checkpoint of {run_dir}: nothing trained '
                                     f'was kept; --resume {run_dir} starts it over with its configuration '
                                     f'(ended at once: {why})')
    assert seconds < 50


def test_sigint_before_anything_is_written_leaves_no_folder(tmp_path, dms_script):
    """Ctrl-C while the data are made (before config.json): the folder held only the marker and the lock."""
    run_dir = str(tmp_path / 'run')
    body = '''
    from rsnn import tasks
    real = tasks.test_set
    def test_set(*a, **kw):
        os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **kw)
    tasks.test_set = test_set
    '''
    proc, _ = run_child(run_dir, body, FAST + ['--epochs', '1', '--out_dir', run_dir])
    assert proc.returncode == 130, proc.stderr
    assert one_line(proc.stderr) == (f'interrupted (SIGINT) before the run wrote anything; nothing was kept (its empty '
                                     f'folder {run_dir} was removed)')
    assert not os.path.exists(run_dir)


# --------------------------------------------------------------------------------------------
# 4. A full disk, a read-only folder
# --------------------------------------------------------------------------------------------


def test_a_full_disk_while_checkpointing_is_one_line_and_resume_rebuilds_it(tmp_path, dms_script):
    """RLIMIT_FSIZE makes every file over 10 kB fail to grow (EFBIG), as a full disk fails a write: the first
    checkpoint (its ocdbt data file is about 14 kB) cannot be written."""
    run_dir = str(tmp_path / 'run')
    argv = [sys.executable, os.path.join(ROOT, 'task-rsnn-long-term-dependency.py'), *FAST, '--epochs', '2',
            '--out_dir', run_dir]
    # SIGXFSZ ignored (its default kills), files limited to 10 x 1024 bytes, then the script; without the tests'
    # shared XLA cache (conftest.py), whose writes would fail too, each with jax's warning
    env = {k: v for k, v in os.environ.items() if not k.startswith('JAX_COMPILATION_CACHE')}
    proc = subprocess.run(['bash', '-c', 'trap "" XFSZ; ulimit -f 10; exec "$@"', 'bash', *argv], capture_output=True,
                          text=True, timeout=240, cwd=ROOT, env=env)
    assert proc.returncode == 2, proc.stderr
    assert one_line(proc.stderr) == (f'error: cannot write the checkpoint of epoch 1 in {run_dir}/checkpoints: File too '
                                     f'large; no checkpoint was complete yet, nothing trained was kept; free space or '
                                     f'make it writable, then --resume {run_dir} starts it over')
    assert dms_script.main(['--resume', run_dir]) == 0  # space freed: the line's command works
    assert [r['epoch'] for r in read_metrics(run_dir)] == [1, 2] and batch_numbers(run_dir) == list(range(1, 7))


@pytest.mark.parametrize('last_words', [True, False])
def test_last_words_silence_what_threads_print_at_exit(last_words):
    """orbax's writer threads, after a failed checkpoint write, print 'Event loop is closed' tracebacks at
    interpreter exit; a UserError(last_words=True) keeps the one line alone (both through sys.stderr and fd 2)."""
    code = textwrap.dedent(f'''
        import atexit, os, sys, threading
        from rsnn.cli import cli_main
        from rsnn.errors import UserError
        atexit.register(lambda: (print('Traceback: from atexit', file=sys.stderr), os.write(2, b'fd noise\\n')))
        def main(argv):
            raise UserError('cannot write the checkpoint', last_words={last_words})
        cli_main(main)
    ''')
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    if last_words:
        assert one_line(proc.stderr) == 'error: cannot write the checkpoint'
    else:
        assert proc.stderr.splitlines() == ['error: cannot write the checkpoint', 'Traceback: from atexit', 'fd noise']


def test_last_words_silence_threads_that_print_before_the_line():
    """orbax's writer threads print their tracebacks as soon as the write fails, while the UserError is still
    unwinding: silence_until_exit (called where the write failed) keeps stderr to the one line, printed after."""
    code = textwrap.dedent('''
        import os, sys, threading
        from rsnn import errors
        from rsnn.cli import cli_main
        def noise():
            print('Traceback: from a writer thread', file=sys.stderr, flush=True)
            os.write(2, b'RuntimeError: Event loop is closed\\n')
        def main(argv):
            errors.silence_until_exit()
            t = threading.Thread(target=noise)
            t.start(); t.join()
            raise errors.UserError('cannot write the checkpoint', last_words=True)
        cli_main(main)
    ''')
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr == 'error: cannot write the checkpoint\n'


def test_silence_until_exit_leaves_an_in_process_caller_alone(capfd):
    from rsnn import errors
    errors.silence_until_exit()  # not under cli_main: a test calling main() keeps its stderr
    os.write(2, b'still here\n')
    assert capfd.readouterr().err == 'still here\n'


def test_a_full_disk_while_logging_keeps_the_checkpoint(tmp_path, dms_script, monkeypatch):
    run_dir = str(tmp_path / 'run')
    real = run_folder.RunLog.append_batch

    def append_batch(self, row):
        if row['batch'] == 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.batches_path)
        return real(self, row)
    with monkeypatch.context() as m:
        m.setattr(run_folder.RunLog, 'append_batch', append_batch)
        with pytest.raises(utils.UserError) as e:
            dms_script.main(FAST + ['--epochs', '2', '--out_dir', run_dir])
    assert one_line(str(e.value)) == (f'cannot write {run_dir}/batches.csv: No space left on device; {run_dir} keeps '
                                      f'its checkpoint of epoch 1 (and the log rows up to it); free space or make it '
                                      f'writable, then --resume {run_dir}')
    assert dms_script.main(['--resume', run_dir]) == 0
    assert batch_numbers(run_dir) == list(range(1, 7))


def test_a_read_only_resume_is_not_sent_to_out_dir(dms_script, finished_run, tmp_path, monkeypatch):
    run_dir = copy_of(finished_run, tmp_path)
    before = snapshot(run_dir)

    def read_only(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
    monkeypatch.setattr(run_folder, 'lock_run_dir', read_only)
    with pytest.raises(utils.UserError) as e:
        dms_script.main(['--resume', run_dir, '--epochs', '2'])
    message = one_line(str(e.value))
    assert 'Read-only file system' in message and 'copy it to a writable place and --resume the copy' in message
    assert '--out_dir' not in message and snapshot(run_dir) == before


# --------------------------------------------------------------------------------------------
# 5, 6. Run folders of concurrent starts, paths that leave results/, refusals, --etrace_decay
# --------------------------------------------------------------------------------------------


def test_two_starts_in_the_same_second_get_two_folders(dms_script, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(run_folder, 'default_run_dir', lambda args: os.path.join('results', 'dms', 'default',
                                                                                 'bptt-20260101-000000'))
    args = run_folder.parse_args(dms_script.build_parser(), ['--method', 'bptt'])
    first, second = run_folder.claim_default_run_dir(args), run_folder.claim_default_run_dir(args)
    assert (first, second) == ('results/dms/default/bptt-20260101-000000', 'results/dms/default/bptt-20260101-000000-2')
    assert os.path.isdir(first) and os.path.isdir(second)


@pytest.mark.parametrize('flags, fragment', [
    (['--exp_name', '../../x'], "leads out of results/<experiment>/ ('..')"),
    (['--etrace_decay', '1'], "'1' is rank 1, which is decay 0"),
    (['--etrace_decay', '1.0'], "'1.0' is rank 1, which is decay 0"),
    (['--etrace_decay', '0'], 'expected a decay strictly between 0 and 1'),
])
def test_bad_flags_are_one_line(flags, fragment):
    proc = run_cli(*flags)
    assert proc.returncode == 2, proc.stderr
    lines = lines_besides_usage(proc.stderr)
    assert len(lines) == 1 and fragment in lines[0], lines


def test_an_out_dir_that_climbs_out_is_refused_before_anything_is_made(dms_script, tmp_path, monkeypatch):
    (tmp_path / 'here').mkdir()
    monkeypatch.chdir(tmp_path / 'here')
    with pytest.raises(utils.UserError, match=r"--out_dir \.\./escaped leads out of the current folder"):
        dms_script.main(TINY_FLAGS + ['--out_dir', '../escaped'])
    assert sorted(os.listdir(tmp_path)) == ['here'] and os.listdir(tmp_path / 'here') == []


def test_a_refusal_after_the_folder_was_made_leaves_no_folder(dms_script, tmp_path):
    run_dir = tmp_path / 'run'
    with pytest.raises(utils.UserError, match=r'--n_memory 32 > --n_rec 16'):
        dms_script.main(TINY_FLAGS + ['--n_memory', '32', '--out_dir', str(run_dir)])
    assert not run_dir.exists()


def test_etrace_decay_rank_2_trains():
    assert utils.decay_or_rank('2') == 2 and utils.decay_or_rank('0.9') == 0.9


# --------------------------------------------------------------------------------------------
# 7. The step time is the step
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize('method', ['bptt', 'expsm_diag'])
def test_the_training_step_compiles_once(dms_script, tmp_path, monkeypatch, method):
    """jax_log_compiles (JAX_LOG_COMPILES=1) logs every XLA compilation; those logged inside train_step are
    the training step's: one, however many batches (two before: the first call's weak-typed arguments)."""
    import jax
    compiles, inside = [], []

    class Count(logging.Handler):
        def emit(self, record):
            if inside and 'Finished XLA compilation' in record.getMessage():
                compiles.append(record.getMessage())
    real = Trainer.train_step

    def step(self, *a):
        inside.append(1)
        try:
            return real(self, *a)
        finally:
            inside.pop()
    monkeypatch.setattr(Trainer, 'train_step', step)
    handler, logger = Count(), logging.getLogger('jax._src.dispatch')
    logger.addHandler(handler)
    jax.config.update('jax_log_compiles', True)
    try:
        run_dir = str(tmp_path / 'run')
        assert dms_script.main(TINY_FLAGS + ['--method', method, '--epochs', '2', '--out_dir', run_dir]) == 0
    finally:
        jax.config.update('jax_log_compiles', False)
        logger.removeHandler(handler)
    assert len(compiles) == 1, compiles
    summary = json.load(open(os.path.join(run_dir, 'summary.json')))
    seconds = [float(r['seconds']) for r in utils.read_csv(os.path.join(run_dir, 'batches.csv'))]
    # the median of the steady steps: between the fastest and the slowest logged step after the first
    assert min(seconds[1:]) * 0.5 <= summary['step_s_per_batch'] <= max(seconds[1:])
    assert summary['step_s_per_batch'] < summary['compile_and_first_step_s']


def test_step_s_per_batch_is_the_median_of_the_steady_steps():
    ep = train_loop.EpochStats(step_times=[0.002, 0.003, 5.0, 0.004])
    assert ep.step_s_per_batch() == pytest.approx(0.0035)
    progress = train_loop.Progress(step_times=[0.001, 0.002, 9.0])
    assert train_loop.steady_step_s(progress, []) == 0.002
    assert train_loop.steady_step_s(train_loop.Progress(), [dict(step_s_per_batch=0.1), dict(step_s_per_batch=0.3),
                                                            dict(step_s_per_batch=float('nan'))]) == pytest.approx(0.2)


def test_two_hard_exits_at_once_write_one_line():
    """The handler and the watcher thread both ending the process (a second signal seen by both, under load):
    one line, not two. The exit is slowed so that, without the lock, both lines would be written."""
    child = textwrap.dedent('''
        import os, signal, threading, time
        from rsnn import interrupts
        real_exit = os._exit
        os._exit = lambda code: (time.sleep(0.5), real_exit(code))
        start = threading.Barrier(2)
        def end():
            start.wait()
            interrupts.hard_exit(signal.SIGINT, 'a second signal')
        threading.Thread(target=end).start()
        end()
    ''')
    proc = subprocess.run([sys.executable, '-c', child], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130, proc.stderr
    assert one_line(proc.stderr) == 'interrupted (SIGINT) (ended at once: a second signal)'

