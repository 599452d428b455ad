"""The trial tasks of rsnn/tasks: the cue-accumulation and store-recall generators (labels, cue statistics,
timing, seeds), the DMS row giving the trials it always gave, the readout-only control, --preset smoke, and
a toy task registered from outside the package (tests/toy/toy_trial_task.py) trained on trials and as a
stream, listed in --help and in the results table."""
import json
import os

import numpy as np
import pytest

import datasets
from rsnn import tasks
from rsnn.tasks.cue_accumulation import CueAccumulation
from rsnn.tasks.store_recall import StoreRecall

SURE = dict(rate=1000., bg_rate=0.)  # spike probability 1 when on, 0 when off: the spikes show the rates exactly


# -- cue accumulation --------------------------------------------------------------------------------

def test_cue_accumulation_labels_are_the_majority_side_of_the_cues():
    task = CueAccumulation(t_delay=30., **SURE)
    x, y = task.trials(64, np.random.default_rng(0))
    P, T = task.pop, task.n_steps
    assert x.shape == (T, 64, 4 * P) and x.dtype == np.uint8 and y.dtype == np.int32
    left, right = x[:, :, :P].sum((0, 2)), x[:, :, P:2 * P].sum((0, 2))
    cue = task.steps(task.t_cue) * P
    assert np.all((left + right) == task.n_cues * cue)  # every cue a full window of one side
    assert np.array_equal(y, (right > left).astype(np.int32))
    assert 0 < y.mean() < 1


def test_cue_accumulation_timing_and_recall_window():
    task = CueAccumulation(t_delay=30., **SURE)
    x, _ = task.trials(16, np.random.default_rng(1))
    P = task.pop
    cues = x[:, :, :2 * P].any((1, 2))
    on = np.zeros(task.n_steps, bool)
    for i in range(task.n_cues):
        on[task.cue_start(i):task.cue_start(i) + task.steps(task.t_cue)] = True
    assert np.array_equal(cues, on)  # cues exactly in their windows: 100 ms on, 50 ms gap, none in the delay
    recall = x[:, :, 2 * P:3 * P].all((1, 2))
    assert not recall[:task.decision_start].any() and recall[task.decision_start:].all()
    assert task.decision_start == 7 * 150 + 30 and task.n_steps == task.decision_start + 150
    w = task.loss_weights()
    assert w[:task.decision_start].sum() == 0 and np.isclose(w.sum(), 1.)


def test_cue_sides_are_fair_and_independent():
    task = CueAccumulation()
    rng = np.random.default_rng(2)
    sides = np.array([task.draw(rng)[0] for _ in range(4000)])
    assert abs(sides.mean() - 0.5) < 0.01  # 28000 cues: s.e. 0.003
    assert abs(np.corrcoef(sides[:, 0], sides[:, 1])[0, 1]) < 0.05


def test_background_noise_population_rate():
    task = CueAccumulation(rate=40., bg_rate=100., t_delay=100.)
    x, _ = task.trials(32, np.random.default_rng(3))
    noise = x[:, :, 3 * task.pop:].mean()
    assert abs(noise - 0.1) < 0.005  # 100 Hz at dt = 1 ms
    assert x[task.cue_start(task.n_cues):task.decision_start, :, :3 * task.pop].sum() == 0  # the delay is silent


# -- store-recall ------------------------------------------------------------------------------------

def test_store_recall_label_is_the_value_shown_with_the_store_cue():
    task = StoreRecall(n_periods=6, t_period=10., min_delay=2, **SURE)
    x, y = task.trials(200, np.random.default_rng(0))
    P, S = task.pop, task.period_steps
    per = x.reshape(task.n_periods, S, 200, 5, P).all((1, 4))  # (period, trial, population) fully on
    store = per[:, :, task.STORE]
    assert np.all(store.sum(0) == 1)  # one store cue per trial
    k = store.argmax(0)
    assert np.array_equal(y, per[k, np.arange(200), task.VALUE1].astype(np.int32))
    delays = task.n_periods - 1 - k
    assert delays.min() == task.min_delay and delays.max() == task.n_periods - 1  # random delay, full range
    assert per[-1, :, task.RECALL].all() and not per[:-1, :, task.RECALL].any()
    assert not per[-1, :, :task.STORE].any()  # no value during the recall
    assert np.all(per[:-1, :, task.VALUE0] ^ per[:-1, :, task.VALUE1])  # one value in every other period
    assert 0.4 < y.mean() < 0.6


def test_store_recall_refuses_a_delay_longer_than_the_trial():
    with pytest.raises(ValueError, match='sr_min_delay'):
        StoreRecall(n_periods=3, min_delay=3).validate()


# -- seeds, the held-out set, the DMS row -----------------------------------------------------------

@pytest.mark.parametrize('task', [CueAccumulation(t_delay=20.), StoreRecall(n_periods=4, t_period=20.)])
def test_trials_are_seeded_and_the_held_out_set_is_fixed(task):
    a = task.trials(4, datasets.dms_batch_rng(0, 1, 2))
    b = task.trials(4, datasets.dms_batch_rng(0, 1, 2))
    c = task.trials(4, datasets.dms_batch_rng(0, 1, 3))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and not np.array_equal(a[0], c[0])
    held = tasks.test_set(task, 10, 4, seed=0)
    again = tasks.test_set(task, 10, 4, seed=0)
    assert [len(y) for _, y in held] == [4, 4, 2]
    assert all(np.array_equal(p[0], q[0]) for p, q in zip(held, again))
    val = tasks.test_set(task, 10, 4, seed=0, key=datasets.VALIDATION_KEY)
    assert not np.array_equal(held[0][0], val[0][0])
    loader = tasks.train_loader(task, 4, 2, seed=0, n_workers=0)
    first = next(iter(loader(1)))
    assert np.array_equal(first[0], task.trials(4, datasets.dms_batch_rng(0, 1, 0))[0])


def test_rows_of_a_batch_are_those_of_the_whole_batch():
    task = StoreRecall(n_periods=4, t_period=10.)
    whole = task.trials(6, np.random.default_rng(5))
    part = task.trials(6, np.random.default_rng(5), rows=slice(2, 5))
    assert np.array_equal(part[0][:, 2:5], whole[0][:, 2:5]) and part[0][:, :2].sum() == 0
    assert np.array_equal(part[1], whole[1])


def test_the_dms_row_gives_the_trials_and_the_held_out_set_dms_always_had():
    cfg = datasets.DMSConfig(t_fixation=5., t_sample=20., t_delay=20., t_test=20.)
    task = tasks.make_task(dict(dataset='dms', dt=1., t_fixation=5., t_sample=20., t_delay=20., t_test=20.))
    assert (task.n_in, task.n_out, task.n_steps, task.decision_start) == (100, 2, cfg.n_steps, cfg.test_start)
    old = list(datasets.dms_train_loader(cfg, 4, 2, seed=3, n_workers=0)(1))
    new = list(tasks.train_loader(task, 4, 2, seed=3, n_workers=0)(1))
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(old, new))
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(datasets.dms_test_set(cfg, 10, 4, 0),
                                                          tasks.test_set(task, 10, 4, 0)))
    assert np.array_equal(task.loss_weights(), cfg.loss_weights())


@pytest.mark.parametrize('task', [CueAccumulation(t_delay=20.), StoreRecall(n_periods=4, t_period=20.)])
def test_a_stream_of_the_task_holds_its_trials(task):
    from rsnn import trial_stream
    s = trial_stream.TrialStream(task, 3, 97, seed=1, iti_ms=(5., 15.))
    chunks = [s.chunk(k) for k in range(s.chunks_for_trials(3))]
    labels = np.concatenate([c.labels for c in chunks])
    weights = np.concatenate([c.weights for c in chunks])
    for b in range(3):
        for j in range(3):
            t = s.trial(b, j)
            first, end = t.test_range()
            assert np.all(labels[first:end, b] == t.label) and np.isclose(weights[first:end, b].sum(), 1.)
            assert weights[t.start:first, b].sum() == 0
    again = trial_stream.TrialStream(task, 3, 97, seed=1, iti_ms=(5., 15.)).chunk(2)
    assert np.array_equal(again.xs, chunks[2].xs)


# -- training through the script ------------------------------------------------------------------

SMOKE = ['--preset', 'smoke']


def summary_of(run_dir):
    with open(os.path.join(run_dir, 'summary.json')) as f:
        return json.load(f)


def last_metrics(run_dir):
    import csv
    with open(os.path.join(run_dir, 'metrics.csv')) as f:
        return list(csv.DictReader(f))[-1]


def test_preset_smoke_runs_in_seconds_and_two_methods_differ(dms_script, tmp_path):
    losses = {}
    for method in ('bptt', 'expsm_diag'):
        run_dir = str(tmp_path / method)
        assert dms_script.main(SMOKE + ['--method', method, '--out_dir', run_dir]) == 0
        s = summary_of(run_dir)
        assert s['stopped_because'] == 'epochs' and s['epochs_run'] == 2 and s['seconds'] < 60
        losses[method] = float(last_metrics(run_dir)['test_loss'])
    assert all(np.isfinite(v) for v in losses.values())
    assert abs(losses['bptt'] - losses['expsm_diag']) > 1e-4, losses


@pytest.fixture()
def toy():
    import toy.toy_trial_task as module
    yield module
    tasks.TASKS.pop('toy-cue', None)
    datasets.DATASETS.pop('toy-cue', None)


TOY = ['--dataset', 'toy-cue', '--n_rec', '12', '--tau_neu', '20', '--tau_syn', '20', '--syn_gain', '1',
       '--batch_size', '8', '--batches_per_epoch', '3', '--n_test_trials', '16', '--devices', 'cpu', '--no_progress']


def test_a_toy_task_registered_from_outside_trains_on_trials_and_as_a_stream(toy, dms_script, tmp_path):
    assert 'toy-cue' in dms_script.build_parser().format_help() and '--toy_t_delay' in dms_script.build_parser().format_help()
    trials = str(tmp_path / 'runs' / 'trials')
    assert dms_script.main(TOY + ['--epochs', '2', '--out_dir', trials]) == 0
    assert summary_of(trials)['epochs_run'] == 2
    with open(os.path.join(trials, 'config.json')) as f:
        config = json.load(f)
    assert config['dataset'] == 'toy-cue' and config['n_steps'] == 15 and config['test_start'] == 10
    stream = str(tmp_path / 'runs' / 'stream')
    assert dms_script.main(TOY + ['--protocol', 'stream', '--method', 'expsm_diag', '--stream_trials', '6',
                                  '--eval_every_trials', '3', '--t_iti', '2-6', '--update_every', '10',
                                  '--out_dir', stream]) == 0
    s = summary_of(stream)
    assert s['protocol'] == 'stream' and s['trials'] > 0 and 0 <= s['test_acc'] <= 1
    from conftest import load_script
    table = load_script('scripts/results_table.py')
    rows = table.build_table(str(tmp_path / 'runs'))
    assert sorted(r['dataset'] for r in rows) == ['toy-cue', 'toy-cue']
    assert all(r['T'] == 15 and r['experiment'] == 'toy-cue' for r in rows)
    assert 'toy-cue' in open(tmp_path / 'runs' / 'results.md').read()


def test_readout_only_control_stays_at_chance_and_keeps_the_recurrent_weights(dms_script):
    """A toy task whose cue is gone long before the answer (a 20 ms LIF network without adaptation, 60 ms
    of delay): only the readout learns, the recurrent weights stay, and the held-out accuracy is chance."""
    import brainstate
    from rsnn.trainer import Trainer
    args = dms_script.build_parser().parse_args(
        ['--dataset', 'cue-accumulation', '--model', 'lif-delta', '--freeze_rec', '1', '--method', 'bptt',
         '--n_rec', '16', '--tau_neu', '5', '--ff_scale', '10', '--cue_n', '3', '--cue_t_cue', '10', '--cue_t_gap', '5',
         '--cue_t_delay', '60', '--cue_t_recall', '10'])
    brainstate.environ.set(dt=1.)
    task = dms_script.make_task(args)
    model = dms_script.build_network(args, task)
    trainer = Trainer(model, 'bptt', task.n_in, 32, lr=1e-2)
    before = {k: np.asarray(v['weight'] if isinstance(v, dict) else v).copy() for k, v in trainer.param_values().items()}
    for i in range(15):
        trainer.train_step(*task.trials(32, datasets.dms_batch_rng(0, 0, i)), task.loss_weights())
    after = trainer.param_values()
    for k, w in before.items():
        new = np.asarray(after[k]['weight'] if isinstance(after[k], dict) else after[k])
        assert np.array_equal(w, new) == k.startswith('layers'), k  # the readout moved, the layer did not
    held = tasks.test_set(task, 1024, 32, seed=0)
    acc = float(np.mean([trainer.evaluate(x, y, task.loss_weights())[1] for x, y in held]))
    assert abs(acc - 0.5) < 0.047, acc  # 1024 trials: 3 s.e. of chance


def test_freeze_rec_of_a_spiking_stack_needs_bptt(dms_script):
    import utils
    args = dms_script.build_parser().parse_args(['--model', 'alif-delta', '--freeze_rec', '1', '--method', 'expsm_diag'])
    with pytest.raises(utils.UserError, match='--method bptt'):
        dms_script.build_network(args, dms_script.make_task(args))


@pytest.mark.parametrize('name,sizes', [
    ('cue-accumulation', ['--cue_n', '3', '--cue_t_cue', '10', '--cue_t_gap', '5', '--cue_t_delay', '10', '--cue_t_recall', '10']),
    ('store-recall', ['--sr_periods', '4', '--sr_t_period', '10'])])
def test_each_new_task_trains_as_a_stream(dms_script, tmp_path, name, sizes):
    run_dir = str(tmp_path / name)
    assert dms_script.main(['--dataset', name, *sizes, '--protocol', 'stream', '--method', 'expsm_diag', '--n_rec', '12',
                            '--batch_size', '4', '--stream_trials', '4', '--eval_every_trials', '2', '--t_iti', '5-10',
                            '--update_every', '20', '--n_test_trials', '8', '--devices', 'cpu', '--no_progress',
                            '--out_dir', run_dir]) == 0
    s = summary_of(run_dir)
    assert s['protocol'] == 'stream' and s['trials'] >= 4 * 3 and 0 <= s['test_acc'] <= 1


@pytest.mark.parametrize('preset', ['cue-accumulation-gif', 'store-recall-gif'])
def test_the_presets_network_does_not_hold_the_memory_before_training(dms_script, preset):
    """The presets run on the credit layout (docs/tasks.md): 80 neurons whose adaptation forgets within
    75 ms and 20 memory neurons (tau_I2 3000 ms) with 10 x weaker initial input and recurrent weights, so that
    the readout-only control cannot read the cues off the untrained network; the memory must last 500 ms
    (store-recall: the store cue 5 to 9 periods before the recall cue) or 1000 ms (cue accumulation)."""
    import brainstate
    p = dms_script.build_parser()
    p.set_defaults(**dms_script.PRESETS[preset])
    args = p.parse_args([])
    brainstate.environ.set(dt=1.)
    task = dms_script.make_task(args)
    layer = dms_script.build_network(args, task).rec
    tau, n_in = np.asarray(layer.tau_I2), task.n_in
    assert np.all(tau[80:] == 3000.) and tau[:80].max() <= 75. and tau[:80].min() >= 20.
    w = np.asarray(layer.linear.weight_op.value['weight'])
    for rows in (slice(0, n_in), slice(n_in, None)):  # input, recurrent: into memory neurons 10 x weaker
        ratio = np.abs(w[rows, 80:]).mean() / np.abs(w[rows, :80]).mean()
        assert 0.07 < ratio < 0.14, (rows, ratio)
    if preset == 'store-recall-gif':
        assert task.min_delay * task.period_steps == 500 and task.n_periods == 10
        assert not layer.diff_spike
    else:
        assert task.decision_start - task.cue_start(task.n_cues) == 1000  # the delay: 1000 ms of silence
        assert layer.diff_spike  # the gradient through the reset: without it BPTT's gradient diverges


@pytest.mark.parametrize('preset', ['cue-accumulation', 'store-recall'])
def test_the_alif_presets_are_the_credit_layout_and_their_control_the_same_network_without_adaptation(
        dms_script, preset):
    """--preset cue-accumulation: 100 adaptive-threshold LIF neurons (tau_m 20 ms, beta 1.8) in the credit layout:
    20 memory neurons (tau_a 2000 ms, input and recurrent weights 10 x weaker), 80 that adapt fast (tau_a in
    [20, 75] ms); the gradient through the reset; its adaptation-off control --beta 0 is the same network (the
    same initial weights, membranes and layout) without the threshold adaptation."""
    import brainstate
    nets = {}
    for flags in ([], ['--beta', '0']):
        p = dms_script.build_parser()
        p.set_defaults(**dms_script.PRESETS[preset])
        args = p.parse_args(flags)
        brainstate.environ.set(dt=1.)
        task = dms_script.make_task(args)
        nets[len(flags)] = dms_script.build_network(args, task).layers[0]
    alif, off = nets[0], nets[2]
    assert alif.neuron == 'alif' and alif.beta == 1.8 and off.beta == 0. and not alif.detach_reset
    tau_a = -1. / np.log(np.asarray(alif.adapt_decay))
    assert np.allclose(tau_a[80:], 2000., rtol=1e-3) and tau_a[:80].min() >= 20. and tau_a[:80].max() <= 75.
    assert abs(np.log(np.asarray(alif.mem_decay)).mean() + 1. / 20.) < 2e-3  # tau_m ~ N(20, 1) ms
    w = lambda layer: np.asarray(layer.linear.weight_op.value['weight'])
    assert np.array_equal(w(alif), w(off)) and np.array_equal(np.asarray(alif.adapt_decay), np.asarray(off.adapt_decay))
    n_in = task.n_in
    for rows in (slice(0, n_in), slice(n_in, None)):  # input, recurrent: into the memory neurons 10 x weaker
        ratio = np.abs(w(alif)[rows, 80:]).mean() / np.abs(w(alif)[rows, :80]).mean()
        assert 0.07 < ratio < 0.14, (rows, ratio)
    if preset == 'cue-accumulation':
        assert task.decision_start - task.cue_start(task.n_cues) == 1000
    else:
        assert task.min_delay * task.period_steps == 500 and task.n_periods == 10


@pytest.mark.parametrize('others', ['fast', 'lif'])
def test_memory_neurons_of_an_alif_layer(dms_script, others):
    """--model alif-delta --n_memory N: the last N neurons adapt with --tau_memory and their initial input /
    recurrent weights are scaled by --memory_in_scale / --memory_rec_scale; the others adapt fast (tau_a from
    U(--tau_fast_min, 1.5 --tau_I2)) or, with --memory_others lif, are LIF (beta 0: Bellec's mix)."""
    import brainstate
    import utils
    brainstate.environ.set(dt=1.)
    base = ['--dataset', 'cue-accumulation', '--model', 'alif-delta', '--n_rec', '10', '--beta', '1.5']
    p = dms_script.build_parser()
    plain = dms_script.build_network(p.parse_args(base), dms_script.make_task(p.parse_args(base))).layers[0]
    args = p.parse_args(base + ['--n_memory', '4', '--memory_in_scale', '0.25', '--memory_rec_scale', '0.5',
                                '--tau_memory', '1000', '--tau_fast_min', '10', '--tau_I2', '20',
                                '--memory_others', others])
    task = dms_script.make_task(args)
    mixed = dms_script.build_network(args, task).layers[0]
    tau_a = -1. / np.log(np.asarray(mixed.adapt_decay))
    assert np.allclose(tau_a[6:], 1000., rtol=1e-3)
    if others == 'lif':
        assert np.array_equal(np.asarray(mixed.beta), [0.] * 6 + [1.5] * 4) and np.allclose(tau_a[:6], 1000., rtol=1e-3)
    else:
        assert mixed.beta == 1.5 and tau_a[:6].min() >= 10. and tau_a[:6].max() <= 30. and np.ptp(tau_a[:6]) > 1.
    w0, w1 = (np.asarray(layer.linear.weight_op.value['weight']) for layer in (plain, mixed))
    n_in = task.n_in
    assert np.array_equal(w1[:, :6], w0[:, :6])
    assert np.allclose(w1[:n_in, 6:], 0.25 * w0[:n_in, 6:]) and np.allclose(w1[n_in:, 6:], 0.5 * w0[n_in:, 6:])
    with pytest.raises(utils.UserError, match='--n_memory 0'):
        args = p.parse_args(['--dataset', 'cue-accumulation', '--model', 'lif-delta', '--n_memory', '4'])
        dms_script.build_network(args, dms_script.make_task(args))
