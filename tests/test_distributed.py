"""Several hosts (--distributed), as two processes on localhost with one CPU device each (jax.distributed
over gloo): they train one run into one folder with the numbers of one process on two devices, and a
run killed mid-way resumes on one process. Also: the SLURM device choice and what a resume takes from
config.json."""
import csv
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

import utils
from conftest import ROOT
from rsnn import run_folder
from test_dms import TINY_FLAGS

DMS = os.path.join(ROOT, 'task-rsnn-long-term-dependency.py')
FLAGS = [f if f != 'cpu' else 'all' for f in TINY_FLAGS] + ['--method', 'expsm_diag', '--seed', '3',
                                                             '--ff_scale', '30', '--epochs', '4']


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def env(**more):
    e = {k: v for k, v in os.environ.items() if not k.startswith(('JAX_', 'SLURM_')) and k != 'XLA_FLAGS'}
    return dict(e, JAX_PLATFORMS='cpu', **more)


def losses(run_dir):
    with open(os.path.join(run_dir, 'batches.csv')) as f:
        return [(int(r['batch']), float(r['loss'])) for r in csv.DictReader(f)]


def start_two_processes(out_dir):
    port = free_port()
    return [subprocess.Popen([sys.executable, DMS, *FLAGS, '--distributed', '--out_dir', out_dir], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=env(JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}', JAX_NUM_PROCESSES='2',
                                     JAX_PROCESS_ID=str(i)))
            for i in range(2)]


def test_two_processes_train_one_run_equal_to_two_devices_and_resume_on_one(tmp_path):
    """Two processes (one CPU device each, --distributed --devices all) into one --out_dir, killed once
    the first checkpoint is complete, resumed on one process with one device: its batches' losses equal
    the uninterrupted run of one process on two devices (within 1e-6)."""
    shared, reference = str(tmp_path / 'shared'), str(tmp_path / 'reference')
    procs = start_two_processes(shared)
    ref = subprocess.Popen([sys.executable, DMS, *FLAGS, '--out_dir', reference], cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True,
                           env=env(XLA_FLAGS='--xla_force_host_platform_device_count=2'))
    first = os.path.join(shared, 'checkpoints', 'last', '1')
    deadline = time.time() + 240
    while not os.path.isdir(first) and time.time() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.05)
    for p in procs:  # as a cluster job killed mid-run
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
    outputs = [p.communicate(timeout=60)[0] for p in procs]
    assert os.path.isdir(first), outputs
    assert os.listdir(shared).count('config.json.tmp') == 0
    # process 0 alone wrote the folder: one config, one row per batch
    trained = losses(shared)
    assert len(trained) == len(set(b for b, _ in trained)) >= 3, trained
    assert 'ES-D-RTRL on cpu:0,cpu:' in outputs[1], outputs[1][-2000:]  # both processes' devices in one mesh

    resumed = subprocess.run([sys.executable, DMS, '--resume', shared], cwd=ROOT, capture_output=True, text=True,
                             timeout=240, env=env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f'resumed {shared} after epoch' in resumed.stdout and 'on cpu:0;' in resumed.stdout, resumed.stdout
    assert ref.wait(timeout=240) == 0, ref.communicate()[0][-3000:]
    got, want = losses(shared), losses(reference)
    assert [b for b, _ in got] == [b for b, _ in want] == list(range(1, 13)), (got, want)
    assert max(abs(a - b) for (_, a), (_, b) in zip(got, want)) <= 1e-6, (got, want)
    assert run_folder.read_summary(shared)['batches_run'] == 12
    # the saved config does not bind the run to several processes
    assert run_folder.args_from_checkpoint(shared).get('distributed') is False


def test_a_resume_never_takes_distributed_from_the_saved_config(tmp_path, dms_script):
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    (run_dir / run_folder.RUN_MARKER).write_text('{}')
    utils.write_json(str(run_dir / 'config.json'), dict(method='expsm_diag', distributed=True, devices='all'))
    args = run_folder.parse_args(dms_script.build_parser(), ['--resume', str(run_dir)])
    assert args.distributed is False and args.devices == 'all'
    assert not utils.wants_distributed(['--resume', str(run_dir)])
    assert utils.wants_distributed(['--resume', str(run_dir), '--distributed'])


@pytest.mark.parametrize('environ, ids', [
    (dict(SLURM_JOB_ID='7', SLURM_LOCALID='0', SLURM_NTASKS_PER_NODE='1', SLURM_GPUS_ON_NODE='8'), list(range(8))),
    (dict(SLURM_JOB_ID='7', SLURM_LOCALID='0', SLURM_TASKS_PER_NODE='1(x2)', CUDA_VISIBLE_DEVICES='0,1,2,3'),
     [0, 1, 2, 3]),
    (dict(SLURM_JOB_ID='7', SLURM_LOCALID='3', SLURM_NTASKS_PER_NODE='8', SLURM_GPUS_ON_NODE='8'), None),
    (dict(SLURM_JOB_ID='7', SLURM_LOCALID='0', SLURM_NTASKS_PER_NODE='1', SLURM_GPUS_ON_NODE='8',
          JAX_LOCAL_DEVICE_IDS='0,1'), [0, 1]),
    ({}, None),
])
def test_slurm_one_task_per_node_sees_every_gpu_of_its_node(environ, ids):
    got, note = utils.slurm_local_device_ids(environ)
    assert got == ids
    if environ.get('SLURM_NTASKS_PER_NODE') == '8':
        assert 'uses GPU 3 of its node' in note


@pytest.mark.parametrize('rows', [slice(0, 4), slice(4, 8), slice(3, 5), slice(7, 8)])
def test_a_process_generates_only_its_rows_of_the_batch_equal_to_the_whole(rows):
    """Each process of a --distributed run draws only its own trials' spikes (dms_trials(..., rows)): they
    equal those rows of the whole batch, the other rows stay 0, and the generator ends where the whole
    draw leaves it."""
    import numpy as np
    import datasets
    cfg = datasets.DMSConfig(t_fixation=5, t_sample=20, t_delay=20, t_test=20, n_input=7)  # odd: half draws
    for batch in range(4):
        whole_rng, part_rng = datasets.dms_batch_rng(3, 1, batch), datasets.dms_batch_rng(3, 1, batch)
        x, y, _, _ = datasets.dms_trials(cfg, 8, whole_rng)
        xp, yp, _, _ = datasets.dms_trials(cfg, 8, part_rng, rows)
        assert np.array_equal(xp[:, rows], x[:, rows]) and x[:, rows].any()
        assert not xp[:, :rows.start].any() and not xp[:, rows.stop:].any()
        assert np.array_equal(y, yp)
        assert part_rng.random() == whole_rng.random()
