"""FPTT (rsnn/rules/fptt.py) where theory gives an exact answer, on the tiny DMS network of tests/test_stream.py:

1. with one window covering the trial, FPTT's first update is BPTT's (the regulariser is 0 at theta = theta_bar,
   lambda = 0, whatever alpha), and with alpha = 0 every update is;
2. with alpha = 0 and windows of K steps, a batch of trials is TBPTT over its windows in sequence: the updates of
   a BPTT stream trainer fed the batch's windows as chunks (and FPTT on the stream is BPTT on the stream);
3. the lambda, theta_bar recursions against a hand computation on a 2-parameter quadratic for 3 SGD steps, and
   through the trainer after one update;
4. lambda and theta_bar are in the checkpoint and restored; a run stopped after 2 epochs and resumed to 4 has
   the batches of the uninterrupted 4-epoch run; --check_grad is a one-line note for FPTT.
"""
import csv
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rsnn import run_folder
from rsnn.rules import fptt
from test_dms import TINY_FLAGS
from test_stream import CFG, B, build

T = CFG.n_steps  # 65: 5 fixation, 20 sample, 20 delay, 20 test (from step 45)


def trainer(method, alpha=0., window=1000, protocol='trials'):
    if method == 'fptt':  # with the rule's own options, as the task scripts give them
        return build_fptt(alpha, window, protocol)[0]
    return build(method, protocol=protocol)[0]


def build_fptt(alpha, window, protocol):
    import brainstate
    import models
    from rsnn.trainer import Trainer
    brainstate.environ.set(dt=1.)
    model = models.DMSNet(CFG.n_input, 12, 2, dt=1., tau_neu=20., tau_syn=20., tau_I2=100., A2=1., ff_scale=6.,
                          rec_scale=2., syn_gain=1., seed=0)
    tr = Trainer(model, 'fptt', CFG.n_input, B, protocol=protocol,
                 rule_options=dict(fptt_alpha=alpha, fptt_window=window))
    return tr, tr


def batch(seed=0):
    rng = np.random.default_rng(seed)
    xs = (rng.random((T, B, CFG.n_input)) < 0.2).astype(np.float32)
    return xs, rng.integers(0, 2, B).astype(np.int32), CFG.loss_weights().astype(np.float32)


def assert_weights_close(a, b, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a.param_values()), jax.tree.leaves(b.param_values())):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


def weights_differ(a, b):
    return any(not np.allclose(np.asarray(x), np.asarray(y), atol=1e-7)
               for x, y in zip(jax.tree.leaves(a.param_values()), jax.tree.leaves(b.param_values())))


# -- 1. one window over the trial ------------------------------------------------------------------

@pytest.mark.parametrize('alpha', [0., 0.1])
def test_one_window_over_the_trial_is_bptt(alpha):
    ref, tr = trainer('bptt'), trainer('fptt', alpha=alpha, window=T)
    assert tr.updates_per_batch(T, batch()[2]) == 1
    for seed in (0, 1):
        ref.train_step(*batch(seed))
        tr.train_step(*batch(seed))
        if seed == 0:  # the regulariser is 0 at the first update (theta = theta_bar, lambda = 0)
            assert_weights_close(ref, tr)
    if alpha == 0.:
        assert_weights_close(ref, tr)
    else:  # from the second update on the regulariser pulls towards theta_bar + lambda / alpha
        assert weights_differ(ref, tr)


# -- 2. windows of K steps: TBPTT(K) in sequence ------------------------------------------------

def chunks_of(xs, labels, ws, K):
    for s in range(0, xs.shape[0], K):
        x = xs[s:s + K]
        U = x.shape[0]
        yield types.SimpleNamespace(xs=x.astype(np.uint8), labels=np.broadcast_to(labels, (U, B)).astype(np.int32),
                                    weights=np.broadcast_to(ws[s:s + K, None], (U, B)).astype(np.float32),
                                    resets=np.zeros((U, B), bool))


def test_windows_of_k_with_alpha_0_are_tbptt_in_sequence():
    K = 20  # windows [0, 20) [20, 40) [40, 60) [60, 65): the last two hold the test period's loss
    tr = trainer('fptt', alpha=0., window=K)
    xs, labels, ws = batch()
    assert tr.updates_per_batch(T, ws) == 2
    loss, _, _ = tr.train_step(xs, labels, ws)
    # the same windows as a stream of chunks for BPTT on the stream (TBPTT: states carried, cut at each chunk)
    ref = trainer('bptt', protocol='stream')
    ref_loss = sum(ref.train_chunk(c)[0] for c in chunks_of(xs, labels, ws, K))
    assert_weights_close(ref, tr)
    assert abs(loss - ref_loss) < 1e-5 * max(1., abs(ref_loss))
    untrained = trainer('bptt')
    assert weights_differ(untrained, tr)


def test_fptt_on_a_stream_with_alpha_0_is_tbptt_and_with_alpha_differs():
    xs, labels, ws = batch()
    chunks = list(chunks_of(np.concatenate([xs, xs]), labels, np.concatenate([ws, ws]), 30))
    ref, zero, reg = trainer('bptt', protocol='stream'), trainer('fptt', 0., protocol='stream'), \
        trainer('fptt', 0.5, protocol='stream')
    for c in chunks:
        ref.train_chunk(c), zero.train_chunk(c), reg.train_chunk(c)
    assert_weights_close(ref, zero)
    assert weights_differ(ref, reg)


# -- 3. the recursions --------------------------------------------------------------------------

def test_lambda_and_theta_bar_by_hand_on_a_quadratic():
    """l(theta) = |theta - c|^2 / 2, c = (0, 2), theta_0 = (1, -1), alpha = 0.5, SGD with step 0.5; worked by hand:
    grad = theta - c + alpha (theta - theta_bar) - lambda; lambda -= alpha (theta_new - theta_bar);
    theta_bar = (theta_bar + theta_new) / 2 - lambda / (2 alpha)."""
    alpha, eta, c = 0.5, 0.5, {'w': jnp.array([0., 2.])}
    theta = {'w': jnp.array([1., -1.])}
    bar, lam = theta, {'w': jnp.zeros(2)}
    by_hand = [  # (theta, lambda, theta_bar) after each step
        ([0.5, 0.5], [0.25, -0.75], [0.5, 0.5]),
        ([0.375, 0.875], [0.3125, -0.9375], [0.125, 1.625]),
        ([0.28125, 1.15625], [0.234375, -0.703125], [-0.03125, 2.09375]),
    ]
    for want_theta, want_lam, want_bar in by_hand:
        grads = jax.tree.map(lambda p, q: p - q, theta, c)
        g = fptt.regularised(grads, theta, bar, lam, alpha)
        theta = jax.tree.map(lambda p, d: p - eta * d, theta, g)
        lam, bar = fptt.advanced(theta, bar, lam, alpha)
        np.testing.assert_allclose(theta['w'], want_theta, atol=1e-7)
        np.testing.assert_allclose(lam['w'], want_lam, atol=1e-7)
        np.testing.assert_allclose(bar['w'], want_bar, atol=1e-7)
    # alpha = 0: lambda stays 0 and theta_bar the running average (no 0/0)
    lam0, bar0 = fptt.advanced(theta, theta, {'w': jnp.zeros(2)}, 0.)
    assert np.all(np.asarray(lam0['w']) == 0) and np.all(np.isfinite(np.asarray(bar0['w'])))


def test_the_trainer_advances_lambda_and_theta_bar_with_the_new_weights():
    alpha = 0.1
    tr = trainer('fptt', alpha=alpha, window=T)
    theta0 = tr.param_values()
    tr.train_step(*batch())
    theta1, state = tr.param_values(), tr.rule_state_values()
    lam = jax.tree.map(lambda a, b: -alpha * (a - b), theta1, theta0)
    bar = jax.tree.map(lambda a, b, l: 0.5 * (a + b) - l / (2 * alpha), theta0, theta1, lam)
    for got, want in ((state['fptt/lambda'], lam), (state['fptt/theta_bar'], bar)):
        for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)
    assert any(np.abs(np.asarray(x)).max() > 0 for x in jax.tree.leaves(state['fptt/lambda']))


# -- 4. checkpoints and resume ------------------------------------------------------------------

def test_lambda_and_theta_bar_are_saved_and_restored(tmp_path):
    tr = trainer('fptt', alpha=0.1, window=20)
    tr.train_step(*batch())
    saved = jax.tree.map(np.asarray, tr.rule_state_values())
    ckpt = run_folder.Checkpoints(str(tmp_path))
    ckpt.save(tr, 1, dict(epoch=1), best=False)
    ckpt.close()
    fresh = trainer('fptt', alpha=0.1, window=20)
    ckpt = run_folder.Checkpoints(str(tmp_path))
    ckpt.restore(fresh)
    ckpt.close()
    for x, y in zip(jax.tree.leaves(saved), jax.tree.leaves(fresh.rule_state_values())):
        np.testing.assert_array_equal(x, np.asarray(y))
    assert not weights_differ(tr, fresh)


def batch_rows(run_dir):
    with open(os.path.join(run_dir, 'batches.csv')) as f:
        return [(r['epoch'], r['batch'], r['loss'], r['grad_norm']) for r in csv.DictReader(f)]


def test_a_resumed_fptt_run_continues_identically(dms_script, tmp_path, capsys):
    flags = TINY_FLAGS + ['--method', 'fptt', '--fptt_window', '20', '--batches_per_epoch', '2']
    straight, split = str(tmp_path / 'straight'), str(tmp_path / 'split')
    assert dms_script.main(flags + ['--epochs', '4', '--out_dir', straight]) == 0
    assert dms_script.main(flags + ['--epochs', '2', '--out_dir', split, '--check_grad']) == 0
    err = capsys.readouterr().err
    assert 'FPTT is not a gradient estimator' in err and not os.path.exists(os.path.join(split, 'grad_fidelity.csv'))
    assert dms_script.main(['--resume', split, '--epochs', '4']) == 0
    assert batch_rows(split) == batch_rows(straight)
    summary = run_folder.read_summary(split)
    assert summary['updates_per_batch'] == 2 and summary['updates'] == 2 * summary['batches_run'] == 16


def test_fptt_trains_through_the_image_script(tmp_path):
    """The image script's --method choices come from the table: FPTT there, windows of 5 of a 12-bin sample
    whose first 3 bins have no loss (--warmup_ratio 0.25): 5, 5, 2, all three updates."""
    import fake_data as fakes
    from conftest import load_script
    task = load_script('task-image-classification.py')
    root = str(tmp_path / 'data')
    os.makedirs(root)
    fakes.write_shd_files(root, fakes.synthetic_event_samples('shd', 32, 16, n_classes=4, events_per_sample=200,
                                                              seed=2))
    run_dir = str(tmp_path / 'run')
    argv = (f'--devices cpu --dataset shd --data_dir {root} --data_length 12 --epochs 1 --n_layer 1 --n_rec 16 '
            f'--method fptt --fptt_window 5 --batch_size 16 --lr 0.01 --warmup_ratio 0.25 --out_dir {run_dir} '
            '--no_progress --exp_name t').split()
    summary = task.train_and_evaluate(run_folder.parse_args(task.build_parser(), argv), run_dir)
    assert summary['stopped_because'] == 'epochs' and np.isfinite(summary['test_acc'])
    assert summary['updates_per_batch'] == 3 and summary['updates'] == 3 * summary['batches_run'] == 6
