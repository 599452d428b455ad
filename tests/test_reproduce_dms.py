"""`make demo` is the paper's task; the reproduction script's code path end to end at toy sizes."""
import csv
import json
import os

import numpy as np

import utils

from rsnn import run_folder
from conftest import ROOT, load_script


def test_demo_preset_is_the_papers_task():
    dms = load_script('task-rsnn-long-term-dependency.py')
    args = run_folder.parse_args(dms.build_parser(), ['--preset', 'cpu-demo'], dms.PRESETS)
    paper = dict(t_delay=1000., t_sample=500., t_test=500., t_fixation=10., dt=1., tau_neu=100., tau_syn=100.,
                 tau_I2=1500., A2=1., n_rec=200, ff_scale=6., rec_scale=2., spk_fun='relu', lr=1e-3,
                 optimizer='adam', method='expsm_diag', etrace_decay=0.99, lr_schedule='constant')
    assert {k: getattr(args, k) for k in paper} == paper
    assert args.batch_size == 32 and args.n_test_trials == 512 and args.devices == 'cpu'
    assert args.acc_th == 0.98 and args.acc_th_window == 50 and args.epochs == 40
    # an explicit flag beats the preset
    args = run_folder.parse_args(dms.build_parser(), ['--preset', 'cpu-demo', '--t_delay', '500'], dms.PRESETS)
    assert args.t_delay == 500. and args.n_rec == 200


def test_reproduction_tiny_end_to_end(tmp_path):
    repro = load_script(os.path.join('scripts', 'reproduce_dms.py'))
    out = str(tmp_path / 'repro')
    assert repro.main(['--tiny', '--out', out]) == 0
    with open(os.path.join(out, 'table.csv')) as f:
        rows = list(csv.DictReader(f))
    assert [(r['method'], r['seed']) for r in rows] == [('BPTT', '0'), ('BPTT', '1'), ('ES-D-RTRL', '0'),
                                                       ('ES-D-RTRL', '1'), ('D-RTRL', '0')]
    for r in rows:
        summary = json.load(open(os.path.join(ROOT, r['run_dir'], 'summary.json')))
        assert float(r['final_test_acc']) == summary['test_acc']
        assert float(r['best_test_acc']) >= float(r['final_test_acc'])
        assert float(r['peak_rss_mb']) > 100  # jax alone takes more than that
        expected_batches = 3 * (1 if r['method'] == 'D-RTRL' else 2)
        assert int(r['batches']) == expected_batches
    assert open(os.path.join(out, 'table.md')).read().count('\n| ') == 1 + 5
    with open(os.path.join(out, 'controls.csv')) as f:
        controls = list(csv.DictReader(f))
    assert [(c['control'], float(c['t_delay'])) for c in controls] == [('A2 = 0', 1000.), ('delay sweep', 0.),
                                                                       ('delay sweep', 20.)]
    for name in ('test_accuracy.png', 'delay_sweep.png'):
        import matplotlib.image
        img = matplotlib.image.imread(os.path.join(out, name))
        assert img.shape[0] > 200 and img.shape[1] > 300 and np.std(img) > 0
    # a second call reuses the finished runs: nothing is trained again
    before = os.path.getmtime(os.path.join(out, 'runs', 'bptt-seed0', 'metrics.csv'))
    assert repro.main(['--tiny', '--out', out, '--parts', 'main']) == 0
    assert os.path.getmtime(os.path.join(out, 'runs', 'bptt-seed0', 'metrics.csv')) == before
