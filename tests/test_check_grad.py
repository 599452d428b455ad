"""--check_grad: the online gradient of every weight against BPTT's, per run (grad_fidelity.csv)."""
import csv
import os

import numpy as np

from rsnn import train_loop
from rsnn.trainer import Trainer
import utils
from rsnn import run_folder
from test_dms import TINY_FLAGS, assert_png
from test_gradients import FeedForwardLIF, T, batch

COLUMNS = ['epoch', 'method', 'weight', 'shape', 'cosine', 'norm_ratio', 'sign_agreement']
DMS_WEIGHTS = {'rec/linear/weight_op/weight': '116x16', 'rec/linear/weight_op/bias': '16',
               'out/linear/weight_op/weight': '16x2', 'out/linear/weight_op/bias': '2'}


def read_rows(run_dir):
    with open(os.path.join(run_dir, 'grad_fidelity.csv')) as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        return list(reader)


def test_check_grad_writes_one_row_per_weight_and_checked_epoch(dms_script, tmp_path):
    run_dir = str(tmp_path / 'diag')
    assert dms_script.main(TINY_FLAGS + ['--method', 'diag', '--check_grad', '--epochs', '2', '--out_dir', run_dir]) == 0
    rows = read_rows(run_dir)
    assert [(int(r['epoch']), r['weight']) for r in rows] == [(e, w) for e in (0, 1, 2) for w in sorted(DMS_WEIGHTS)]
    for r in rows:
        assert r['method'] == 'diag' and r['shape'] == DMS_WEIGHTS[r['weight']], r
        cos, ratio, sign = float(r['cosine']), float(r['norm_ratio']), float(r['sign_agreement'])
        assert -1 <= cos <= 1 and ratio > 0 and 0 <= sign <= 1, r
        if r['weight'].startswith('out/'):  # D-RTRL's leaky-readout gradient is exact (tests/test_gradients.py)
            assert cos >= 0.9999 and abs(ratio - 1) < 1e-3 and sign >= 0.99, r
        else:  # the recurrent layer: an approximation, but the same direction roughly
            assert cos > 0.5 and ratio < 1, r
    assert_png(os.path.join(run_dir, 'learning_curves.png'), (1500, 400))  # third panel: the cosines
    # every 2 epochs: the initial weights and epoch 2 (ES-D-RTRL)
    every = str(tmp_path / 'every')
    assert dms_script.main(TINY_FLAGS + ['--check_grad_every', '2', '--epochs', '3', '--out_dir', every]) == 0
    assert sorted({int(r['epoch']) for r in read_rows(every)}) == [0, 2]
    assert {r['method'] for r in read_rows(every)} == {'expsm_diag'}


def test_check_grad_with_bptt_is_a_note(dms_script, tmp_path, capsys):
    run_dir = str(tmp_path / 'bptt')
    assert dms_script.main(TINY_FLAGS + ['--method', 'bptt', '--check_grad', '--epochs', '1', '--out_dir', run_dir]) == 0
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith('note:')]
    assert len(err) == 1 and 'nothing to compare' in err[0]
    assert not os.path.exists(os.path.join(run_dir, 'grad_fidelity.csv'))
    assert_png(os.path.join(run_dir, 'learning_curves.png'), (1000, 400))


def test_check_grad_finds_drtrl_exact_where_theory_says(dms_script, tmp_path):
    """No recurrent weights and a memoryless readout (tests/test_gradients.py): D-RTRL is BPTT, so every
    weight's cosine must be >= 0.9999 and its norm ratio 1, through fit's --check_grad path."""
    import brainstate
    run_dir = str(tmp_path / 'ff')
    args = run_folder.parse_args(dms_script.build_parser(),
                            TINY_FLAGS + ['--method', 'diag', '--check_grad', '--epochs', '2', '--out_dir', run_dir])
    brainstate.environ.set(dt=1.)
    xs, labels = batch()
    trainer = Trainer(FeedForwardLIF(False), 'diag', xs.shape[-1], xs.shape[1], lr=1e-2)
    ws = np.full(T, 1. / T, np.float32)
    run_dir = run_folder.prepare_run_dir(args)
    train_loop.fit(train_loop.LoopSettings.from_args(args), trainer, run_dir, lambda epoch: [batch(seed=epoch + 10)],
                   lambda: [(xs, labels)], ws, config=dict(vars(args), run_dir=run_dir))
    rows = read_rows(run_dir)
    assert len(rows) == 3 * 4  # epochs 0, 1, 2 x (hidden weight, bias, readout weight, bias)
    for r in rows:
        assert float(r['cosine']) >= 0.9999 and abs(float(r['norm_ratio']) - 1) < 1e-3, r
        assert float(r['sign_agreement']) >= 0.99, r
