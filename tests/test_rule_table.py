"""The table of methods (rsnn/methods.py): one row and one class make a rule. A toy rule, "readout only"
(the readout's gradient, zero elsewhere), registered through the public interfaces here and nowhere else,
trains on the DMS trials and on the stream, and appears in --help, the memory report and the figures; an
unknown name is one line everywhere."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, load_script
import utils
from rsnn import memory_report, methods
from rsnn.rules.base import Result, Rule
from rsnn.rules.bptt import BPTT


class ReadoutOnly(Rule):
    """BPTT's gradient of the readout's weights; every other weight gets 0."""

    def gradients(self, xs, targets, objective, step_hook=None, keep_outputs=False, hook_inputs=None) -> Result:
        full = BPTT(self.model, self.params, self.options).gradients(xs, targets, objective, step_hook,
                                                                     keep_outputs, hook_inputs)
        grads = {k: (g if k[0] == 'out' else jax.tree.map(jnp.zeros_like, g)) for k, g in full.grads.items()}
        return Result(grads, full.loss, full.wout, full.outs)


@pytest.fixture
def toy_rule():
    row = methods.register(methods.Method(
        'readout_only', 'Readout only', 'tab:gray', f'{__name__}:ReadoutOnly', carries='nothing',
        memory_order='O(T B n)', memory=lambda s: float(s.T * s.batch * s.readout[0]), note='a toy'))
    yield row
    del methods.TABLE['readout_only']


TINY = ['--t_fixation', '5', '--t_sample', '20', '--t_delay', '20', '--t_test', '20', '--n_rec', '12',
        '--batch_size', '4', '--n_test_trials', '8', '--devices', 'cpu', '--no_progress', '--tau_neu', '20',
        '--tau_syn', '20', '--tau_I2', '100', '--method', 'readout_only']


def weights(run_dir):
    import orbax.checkpoint as ocp
    last = os.path.join(run_dir, 'checkpoints', 'last')
    step = max(int(s) for s in os.listdir(last) if s.isdigit())
    state = ocp.StandardCheckpointer().restore(os.path.join(last, str(step), 'state'))
    return {f'{k}/{leaf}': np.asarray(v) for k, d in state['params'].items() for leaf, v in d.items()}


def test_a_registered_rule_trains_on_trials_and_on_the_stream(toy_rule, tmp_path):
    task = load_script('task-rsnn-long-term-dependency.py')
    assert 'readout_only' in task.build_parser().format_help()
    runs = {}
    for protocol, more in (('trials', ['--batches_per_epoch', '3', '--epochs', '2', '--acc_th', '1.1']),
                           ('stream', ['--protocol', 'stream', '--t_iti', '5-15', '--update_every', '30',
                                       '--stream_trials', '4', '--eval_every_trials', '2'])):
        run_dir = str(tmp_path / protocol)
        assert task.main(TINY + more + ['--out_dir', run_dir, '--seed', '1']) == 0
        runs[protocol] = run_dir
        metrics = utils.read_csv(os.path.join(run_dir, 'metrics.csv'))
        assert len(metrics) >= 2 and all(np.isfinite(float(r['test_loss'])) for r in metrics)
        assert os.path.getsize(os.path.join(run_dir, 'learning_curves.png')) > 0
    # only the readout moved: the initial weights are the same for both runs (same seed)
    trained, streamed = weights(runs['trials']), weights(runs['stream'])
    rec = [k for k in trained if not k.startswith('out')]
    out = [k for k in trained if k.startswith('out')]
    assert rec and out
    for k in rec:
        np.testing.assert_array_equal(trained[k], streamed[k])  # untouched by either protocol
    assert any(np.abs(trained[k] - streamed[k]).max() > 0 for k in out)  # moved (differently) in each


def test_a_registered_rule_has_its_memory_row_and_figure(toy_rule, tmp_path):
    cfg = dict(batch_size=4, n_in=10, n_rec=8, n_layer=1, n_out=2, model='lif-delta', methods=['bptt', 'readout_only'],
               preset='cpu')
    assert memory_report.predicted_state_bytes(cfg, 'readout_only', 10) == 4. * 10 * 4 * 8
    rows = [memory_report.complete_row(dict(method=m, T=T, status='ok', step_mb=1. + T, step_s=0.1), cfg, {})
            for m in cfg['methods'] for T in (10, 20)]
    assert {r['method_name'] for r in rows} == {'BPTT', 'Readout only'}
    memory_report.plot(rows, cfg, {'device': 'cpu'}, str(tmp_path / 'memory.png'))
    assert os.path.getsize(tmp_path / 'memory.png') > 0
    mem = load_script('task-memory-and-speed-evaluation-tpu.py')
    assert mem.method_list('bptt,readout_only') == ['bptt', 'readout_only']


def test_an_unknown_method_is_one_line_everywhere():
    with pytest.raises(methods.UnknownMethod, match='choose one of bptt'):
        methods.get('eprop-typo')
    cfg = dict(batch_size=4, n_in=10, n_rec=8, n_layer=1, n_out=2, model='lif-delta')
    with pytest.raises(methods.UnknownMethod):
        memory_report.predicted_state_bytes(cfg, 'nope', 10)  # never another method's formula
    for script, flag in (('task-rsnn-long-term-dependency.py', '--method'),
                         ('task-image-classification.py', '--method'),
                         ('task-memory-and-speed-evaluation-tpu.py', '--methods')):
        proc = subprocess.run([sys.executable, os.path.join(ROOT, script), flag, 'nope'], capture_output=True,
                              text=True, cwd=ROOT)
        assert proc.returncode == 2 and 'Traceback' not in proc.stderr and 'nope' in proc.stderr, proc.stderr


def test_every_row_is_complete_and_importable_without_jax():
    code = ('import sys; from rsnn import methods; '
            'assert "jax" not in sys.modules, "the table imported jax"; '
            'print(",".join(methods.names()))')
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    sizes = methods.Sizes(layers=((30, 20, 2),), readout=(20, 3), batch=4, T=50)
    for name in proc.stdout.strip().split(','):
        m = methods.get(name)
        assert m.title and m.color and m.carries and m.memory_order and m.memory(sizes) > 0, name
        assert callable(methods.rule_class(name)), name
    # the formulas count what each rule keeps: BPTT's tape grows with T, the online traces do not
    longer = methods.Sizes(sizes.layers, sizes.readout, sizes.batch, T=500)
    assert methods.memory_floats('bptt', longer) == 10 * methods.memory_floats('bptt', sizes)
    for name in ('diag', 'expsm_diag'):
        assert methods.memory_floats(name, longer) == methods.memory_floats(name, sizes)
    assert methods.memory_floats('diag', sizes) == 4 * (2 * (30 * 20 + 20) + 20 * 3 + 3)
    assert methods.memory_floats('expsm_diag', sizes) == 4 * (30 + 2 * 20 + 20 + 3)


def test_the_table_of_datasets_agrees_with_the_loaders():
    import datasets
    from rsnn import tonic_data
    assert {'dms', 'nmnist', 'shd', 'cue-accumulation', 'store-recall'} <= set(datasets.DATASETS)
    cfg = datasets.DMSConfig()
    assert (datasets.DATASETS['dms'].n_in, datasets.DATASETS['dms'].n_out) == (cfg.n_input, cfg.n_output)
    assert cfg.n_steps == 2010 and '2010' in datasets.DATASETS['dms'].steps
    for name in ('nmnist', 'shd'):
        info = tonic_data.event_dataset(name)
        assert (datasets.DATASETS[name].n_in, datasets.DATASETS[name].n_out) == (info.n_in, info.n_classes)
    for d in datasets.DATASETS.values():
        module, fn = d.loader.split(':')
        import importlib
        assert callable(getattr(importlib.import_module(module), fn)), d.loader
        assert os.path.isfile(os.path.join(ROOT, d.script))
