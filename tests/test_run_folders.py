"""Run folders that nothing can corrupt (issue 17): a foreign folder is never emptied, one process per
folder (a lock), a damaged checkpoint is skipped, the log rewrite on resume is atomic, a run killed before
summary.json gets one on resume, and bad input is one line."""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from rsnn import train_loop
import utils
from rsnn import run_folder
from conftest import ROOT, load_script
from test_dms import TINY_FLAGS, interrupt_at_call, read_metrics, run_cli, lines_besides_usage


def snapshot(folder) -> dict:
    """{relative path: bytes} of every file under folder."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = open(path, 'rb').read()
    return out


def batch_numbers(run_dir) -> list:
    return [int(r['batch']) for r in utils.read_csv(os.path.join(run_dir, 'batches.csv'))]


def summary_of(run_dir) -> dict:
    return json.load(open(os.path.join(run_dir, 'summary.json')))


# --------------------------------------------------------------------------------------------
# 1, 3: a folder this repository did not create is never written or emptied
# --------------------------------------------------------------------------------------------


@pytest.fixture
def foreign(tmp_path):
    """Another project's folder: a checkpoints/ without numbered steps, a metrics.csv, a config.json."""
    folder = tmp_path / 'other'
    (folder / 'checkpoints').mkdir(parents=True)
    (folder / 'checkpoints' / 'model-epoch=3.ckpt').write_bytes(b'weights of another project')
    (folder / 'metrics.csv').write_text('step,val_loss\n1,0.5\n')
    (folder / 'summary.json').write_text('{"val_loss": 0.5}')
    (folder / 'config.json').write_text(json.dumps({'lr': 0.5, 'n_rec': 16}))
    return str(folder)


@pytest.mark.parametrize('how', ['out_dir', 'resume'])
def test_a_foreign_folder_is_refused_and_left_as_it_was(dms_script, foreign, how):
    before = snapshot(foreign)
    argv = TINY_FLAGS + ['--epochs', '1', '--out_dir', foreign] if how == 'out_dir' else ['--resume', foreign]
    with pytest.raises(utils.UserError, match='did not write|not a run folder of this repository'):
        dms_script.main(argv)
    assert snapshot(foreign) == before


def test_a_new_folder_is_marked_and_a_start_over_removes_only_run_files(dms_script, tmp_path, monkeypatch):
    """Item 7 as well: the batches.csv row of the interrupted first epoch does not survive the start over."""
    run_dir = str(tmp_path / 'mine')
    with monkeypatch.context() as m:
        interrupt_at_call(m, 2)  # Ctrl-C in the 2nd batch of epoch 1: no checkpoint yet, batch 1 logged
        with pytest.raises(KeyboardInterrupt):
            dms_script.main(TINY_FLAGS + ['--epochs', '1', '--out_dir', run_dir])
    assert os.path.isfile(os.path.join(run_dir, run_folder.RUN_MARKER)) and batch_numbers(run_dir) == [1]
    with open(os.path.join(run_dir, 'notes.txt'), 'w') as f:
        f.write('a file of the user')
    assert dms_script.main(['--resume', run_dir]) == 0
    assert batch_numbers(run_dir) == [1, 2, 3]
    assert open(os.path.join(run_dir, 'notes.txt')).read() == 'a file of the user'


# --------------------------------------------------------------------------------------------
# 2: one process per run folder
# --------------------------------------------------------------------------------------------


def start_blocked_run(run_dir, ready, go, argv):
    """A child running the DMS script that waits at its first training step until `go` exists."""
    child = textwrap.dedent(f'''
        import os, sys, time
        from rsnn.trainer import Trainer
        from conftest import load_script
        real = Trainer.train_step
        def step(self, *a):
            open({ready!r}, 'a').close()
            while not os.path.exists({go!r}):
                time.sleep(0.05)
            return real(self, *a)
        Trainer.train_step = step
        sys.exit(load_script('task-rsnn-long-term-dependency.py').main({argv!r}))
    ''')
    proc = subprocess.Popen([sys.executable, '-c', child], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not os.path.exists(ready):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.1)
    return proc


def test_a_second_process_is_refused_and_a_killed_one_leaves_no_lock(dms_script, tmp_path):
    run_dir, ready, go = str(tmp_path / 'run'), str(tmp_path / 'ready'), str(tmp_path / 'go')
    first = start_blocked_run(run_dir, ready, go, TINY_FLAGS + ['--epochs', '2', '--out_dir', run_dir])
    try:
        files = snapshot(run_dir)
        for argv in (TINY_FLAGS + ['--epochs', '2', '--out_dir', run_dir], ['--resume', run_dir]):
            with pytest.raises(utils.UserError, match='is in use by process'):
                dms_script.main(argv)
        assert snapshot(run_dir) == files  # the second start deleted nothing of the first's
        open(go, 'w').close()
        out, err = first.communicate(timeout=240)
    finally:
        first.kill()
    assert first.returncode == 0, err[-3000:]
    assert [r['epoch'] for r in read_metrics(run_dir)] == [1, 2]  # each epoch logged once
    assert batch_numbers(run_dir) == list(range(1, 7))
    # kill -9 in epoch 1: the OS releases the lock, and --resume starts the run over at once
    other, ready2, go2 = str(tmp_path / 'killed'), str(tmp_path / 'ready2'), str(tmp_path / 'go2')
    victim = start_blocked_run(other, ready2, go2, TINY_FLAGS + ['--epochs', '1', '--out_dir', other])
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    assert dms_script.main(['--resume', other]) == 0
    assert [r['epoch'] for r in read_metrics(other)] == [1]


# --------------------------------------------------------------------------------------------
# 4: a damaged newest checkpoint
# --------------------------------------------------------------------------------------------


def damage(step_dir, how):
    files = [os.path.join(r, n) for r, _, ns in os.walk(step_dir) for n in ns]
    data = max((p for p in files if os.sep + 'state' + os.sep in p), key=os.path.getsize)
    if how == 'truncated':
        with open(data, 'r+b') as f:
            f.truncate(os.path.getsize(data) // 2)
    elif how == 'emptied':
        for p in files:
            open(p, 'w').close()
    else:  # 8 bytes flipped in the middle of the array data
        with open(data, 'r+b') as f:
            f.seek(os.path.getsize(data) // 2)
            chunk = f.read(8)
            f.seek(os.path.getsize(data) // 2)
            f.write(bytes(b ^ 0xFF for b in chunk))


@pytest.mark.parametrize('how', ['truncated', 'emptied', 'flipped'])
def test_resume_falls_back_past_a_damaged_checkpoint(dms_script, tmp_path, capsys, how):
    run_dir = str(tmp_path / how)
    assert dms_script.main(TINY_FLAGS + ['--epochs', '2', '--out_dir', run_dir]) == 0
    damage(os.path.join(run_dir, 'checkpoints', 'last', '2'), how)
    capsys.readouterr()
    assert dms_script.main(['--resume', run_dir, '--epochs', '3']) == 0
    err = capsys.readouterr().err
    assert 'checkpoint last/2 is damaged' in err and 'resuming from checkpoint last/1' in err, err
    # epoch 2 is trained again from epoch 1's state: its rows are replaced, not doubled
    assert [r['epoch'] for r in read_metrics(run_dir)] == [1, 2, 3]
    assert batch_numbers(run_dir) == list(range(1, 10))
    summary = summary_of(run_dir)
    assert summary['epochs_run'] == 3 and summary['batches_run'] == 9
    assert sorted(os.listdir(os.path.join(run_dir, 'checkpoints', 'last'))) == ['2', '3']
    assert os.listdir(os.path.join(run_dir, 'checkpoints', 'damaged')) == ['last-2']
    if how == 'emptied':  # nothing left that verifies: one error line, not a traceback
        for step in ('2', '3'):
            damage(os.path.join(run_dir, 'checkpoints', 'last', step), how)
        with pytest.raises(utils.UserError, match='no checkpoint in .* restores'):
            dms_script.main(['--resume', run_dir, '--epochs', '4'])


# --------------------------------------------------------------------------------------------
# 5, 6: killed after the last checkpoint; killed while the logs are rewritten
# --------------------------------------------------------------------------------------------


def test_killed_before_summary_json_the_resume_writes_it(dms_script, tmp_path, monkeypatch):
    run_dir = str(tmp_path / 'run')

    def killed(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(train_loop, 'plot_learning_curves', killed)  # stopped while drawing the last figure
        with pytest.raises(KeyboardInterrupt):
            dms_script.main(TINY_FLAGS + ['--epochs', '2', '--out_dir', run_dir])
    assert not os.path.exists(os.path.join(run_dir, 'summary.json'))
    assert dms_script.main(['--resume', run_dir]) == 0
    summary = summary_of(run_dir)
    assert summary['epochs_run'] == 2 and summary['batches_run'] == 6 and summary['stopped_because'] == 'epochs'
    assert summary['test_acc'] == read_metrics(run_dir)[-1]['test_acc']
    assert os.path.getsize(os.path.join(run_dir, 'learning_curves.png')) > 1000


def test_log_rewrite_on_resume_is_atomic_and_counters_come_from_the_checkpoint(dms_script, tmp_path, monkeypatch):
    run_dir = str(tmp_path / 'run')
    with monkeypatch.context() as m:
        interrupt_at_call(m, 8)  # the 2nd batch of epoch 3: batch 7 is logged, epoch 3 has no checkpoint
        with pytest.raises(KeyboardInterrupt):
            dms_script.main(TINY_FLAGS + ['--epochs', '3', '--out_dir', run_dir])
    assert batch_numbers(run_dir) == list(range(1, 8))
    real_writerow, calls = csv.DictWriter.writerow, []

    def writerow(self, row):
        calls.append(1)
        if len(calls) == 3:  # killed in the middle of the rewrite (header, one row, then this)
            raise KeyboardInterrupt
        return real_writerow(self, row)

    with monkeypatch.context() as m:
        m.setattr(csv.DictWriter, 'writerow', writerow)
        with pytest.raises(KeyboardInterrupt):
            dms_script.main(['--resume', run_dir])
    assert [r['epoch'] for r in read_metrics(run_dir)] == [1, 2]  # nothing lost
    assert batch_numbers(run_dir)[:6] == list(range(1, 7))
    os.remove(os.path.join(run_dir, 'metrics.csv'))  # even without the log, the counters are right
    assert dms_script.main(['--resume', run_dir]) == 0
    assert batch_numbers(run_dir) == list(range(1, 10))
    assert summary_of(run_dir)['batches_run'] == 9


# --------------------------------------------------------------------------------------------
# 11, 12, 13: one line, not a traceback
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize('flags, fragment', [
    (['--t_delay', 'nan'], 'finite'),
    (['--t_fixation', 'inf'], 'finite'),
    (['--etrace_decay', 'inf'], 'expected a decay'),
    (['--rec_scale', 'nan'], 'finite'),
    (['--lr', 'inf'], 'finite'),
])
def test_non_finite_flags_are_one_line(flags, fragment):
    proc = run_cli(*flags)
    assert proc.returncode == 2, proc.stderr
    lines = lines_besides_usage(proc.stderr)
    assert len(lines) == 1 and fragment in lines[0], lines


def test_image_warmup_nan_is_one_line():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'task-image-classification.py'), '--warmup_ratio', 'nan'],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2 and 'finite' in lines_besides_usage(proc.stderr)[0], proc.stderr


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory, dms_script):
    run_dir = str(tmp_path_factory.mktemp('finished') / 'run')
    assert dms_script.main(TINY_FLAGS + ['--epochs', '1', '--out_dir', run_dir]) == 0
    return run_dir


def edited_copy(run_dir, tmp_path, edit):
    copy = str(tmp_path / 'copy')
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns(run_folder.RUN_LOCK))
    path = os.path.join(copy, 'config.json')
    text = open(path).read()
    with open(path, 'w') as f:
        f.write(edit(text))
    return copy


def set_value(key, value):
    return lambda text: json.dumps(dict(json.loads(text), **{key: value}))


@pytest.mark.parametrize('case, fragment', [
    ('corrupt_config', 'not readable JSON'),
    ('config_n_rec_-3', "--n_rec -3 is refused"),
    ('n_rec_changed', '--n_rec 32 differs'),
    ('method_bptt', '--method bptt differs'),
    ('out_dir_elsewhere', 'stays in its own folder'),
    ('image_script', 'resume it with task-rsnn-long-term-dependency.py'),
    ('shd_run_with_dms_script', 'resume it with task-image-classification.py'),
])
def test_a_resume_that_would_change_the_run_is_refused(dms_script, finished_run, tmp_path, case, fragment):
    run_dir = finished_run
    argv = ['--resume', run_dir, '--epochs', '2']
    if case == 'corrupt_config':
        run_dir = argv[1] = edited_copy(finished_run, tmp_path, lambda text: text[:len(text) // 2])
    elif case == 'config_n_rec_-3':
        run_dir = argv[1] = edited_copy(finished_run, tmp_path, set_value('n_rec', -3))
    elif case == 'shd_run_with_dms_script':
        run_dir = argv[1] = edited_copy(finished_run, tmp_path, set_value('dataset', 'shd'))
    elif case == 'n_rec_changed':  # the tiny runs have 16 neurons
        argv += ['--n_rec', '32']
    elif case == 'method_bptt':
        argv += ['--method', 'bptt']
    elif case == 'out_dir_elsewhere':
        argv += ['--out_dir', str(tmp_path / 'elsewhere')]
    before = snapshot(run_dir)
    script = load_script('task-image-classification.py') if case == 'image_script' else dms_script
    with pytest.raises(utils.UserError, match=fragment.replace('(', r'\(')):
        script.main(argv)
    assert snapshot(run_dir) == before
    assert not os.path.exists(tmp_path / 'elsewhere')


def test_an_out_dir_that_cannot_be_a_folder_is_one_line(dms_script, tmp_path):
    a_file = tmp_path / 'file'
    a_file.write_text('x')
    with pytest.raises(utils.UserError, match='is a file'):
        dms_script.main(TINY_FLAGS + ['--out_dir', str(a_file)])
    with pytest.raises(utils.UserError, match='cannot write the run folder'):
        dms_script.main(TINY_FLAGS + ['--out_dir', str(a_file / 'run')])
    assert a_file.read_text() == 'x'


@pytest.mark.parametrize('flag, value', [('--n_test_trials', 10 ** 8), ('--batch_size', 10 ** 7)])
def test_huge_sizes_are_refused_before_allocating(dms_script, tmp_path, flag, value):
    t0 = time.time()
    with pytest.raises(utils.UserError, match=f'{flag} {value}: .* GiB'):
        dms_script.main(TINY_FLAGS + [flag, str(value), '--out_dir', str(tmp_path / 'r')])
    assert time.time() - t0 < 10 and not os.path.exists(tmp_path / 'r')
