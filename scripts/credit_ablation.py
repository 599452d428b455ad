"""The credit ablation on the split-channel credit task (rsnn/tasks/credit_split.py's ABLATION;
docs/stream.md, "The credit task with split channels"): one run of one rule on trials, in this process, and
one row of results appended to --out (CSV):

  method, trace_reset_every_ms, seed, lr, batches, val_acc, test_acc, probe_init, probe_final,
  probe_fast_init, probe_fast_final, w_sample_memory, seconds, window_ms

val_acc / test_acc: accuracy on --n_val validation trials and --n_test held-out trials after the last update
(the generator keys of rsnn.datasets, disjoint from training); probe_*: the decodability of the sample
direction (8 classes, chance 0.125) from the memory neurons' states (V, g, I2) at the end of the delay, a
logistic-regression probe fitted on the validation trials and scored on the held-out ones, before training
and after it; probe_fast_*: the same from the other (fast-adapting) neurons; w_sample_memory: the largest
|weight| from the sample channels into the memory neurons after training (0 at the start). BPTT on trials
backpropagates through the whole trial (fixation + sample + delay + test steps); with --window W through its
last W ms only (TBPTT(W): the steps before run forward without gradient; window_ms, 'whole' without)."""
from __future__ import annotations

import argparse
import csv
import os
import time

import brainstate
import numpy as np

from rsnn import datasets, models, tasks
from rsnn.tasks import credit_split
from rsnn.trainer import Trainer

FIELDS = ('method', 'trace_reset_every_ms', 'seed', 'lr', 'batches', 'val_acc', 'test_acc', 'probe_init',
          'probe_final', 'probe_fast_init', 'probe_fast_final', 'w_sample_memory', 'seconds', 'window_ms')


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--method', default='diag', help='the learning rule (diag, expsm_diag, bptt, ...)')
    p.add_argument('--trace_reset_every', type=float, default=None, help='H ms (default: never)')
    p.add_argument('--window', type=float, default=None,
                   help='bptt: TBPTT(W) on trials, the gradient of the last W ms only (default: the whole trial)')
    p.add_argument('--seed', type=int, default=0, help='network and data seed')
    p.add_argument('--lr', type=float, default=1e-3, help='Adam learning rate')
    p.add_argument('--batches', type=int, default=100, help='updates (batches of --batch trials)')
    p.add_argument('--batch', type=int, default=16, help='trials per batch')
    p.add_argument('--n_val', type=int, default=256, help='validation trials (also the probe fit)')
    p.add_argument('--n_test', type=int, default=256, help='held-out trials (also the probe score)')
    p.add_argument('--out', required=True, help='CSV file the row is appended to')
    p.add_argument('--table', action='store_true',
                   help='run nothing: print --out as a markdown table, mean +- s.e. (seeds) per method, H and lr, '
                        'with paired differences of test_acc to whole-trial BPTT and to the uncut method')
    return p.parse_args(argv)


def table(path: str) -> str:
    """The rows of `path` grouped by (method, H, lr): each column's mean +- s.e. over the seeds (n), and two
    paired differences of test_acc with their 95 % intervals over the seeds both have: to whole-trial BPTT at
    the same lr, and to the same method without reset and window (its full trace or the whole trial)."""
    from rsnn.benchmark_stats import mean_se, paired_difference
    with open(path) as f:
        rows = list(csv.DictReader(f))
    cols = ('val_acc', 'test_acc', 'probe_init', 'probe_final', 'probe_fast_final', 'seconds')
    groups = {}
    for r in rows:
        cut = r.get('window_ms') not in (None, '', 'whole')
        method = r['method'] + (f' (window {r["window_ms"]} ms)' if cut else '')
        groups.setdefault((method, r['trace_reset_every_ms'], r['lr']), []).append(r)
    full = {(rs[0]['method'], lr): rs for (m, H, lr), rs in groups.items() if H == 'never' and m == rs[0]['method']}

    def paired(rs, ref) -> str:
        if ref is None or ref is rs:
            return ''
        test = lambda group: {r['seed']: float(r['test_acc']) for r in group}
        return paired_difference(test(rs), test(ref)).text(3)
    out = ['| method | H (ms) | lr | seeds | ' + ' | '.join(cols) + ' | test_acc - BPTT | test_acc - no cut |',
           '|' + '---|' * (6 + len(cols))]
    for (m, H, lr), rs in groups.items():
        out.append(f'| {m} | {H} | {lr} | {",".join(r["seed"] for r in rs)} | ' + ' | '.join(
            mean_se([float(r[c]) for r in rs]).text(1 if c == 'seconds' else 3).rsplit(' (', 1)[0] for c in cols)
            + f' | {paired(rs, full.get(("bptt", lr)))} | {paired(rs, full.get((rs[0]["method"], lr)))} |')
    return '\n'.join(out)


def build(values: dict, seed: int):
    brainstate.environ.set(dt=values['dt'])
    task = tasks.make_task(values)
    memory = dict(values['memory'], zero_in_rows=task.sample_channels.stop)
    model = models.DMSNet(task.n_in, values['n_rec'], task.n_out, dt=values['dt'], tau_neu=values['tau_neu'],
                          tau_syn=values['tau_syn'], tau_I2=values['tau_I2'], A2=values['A2'],
                          ff_scale=values['ff_scale'], rec_scale=values['rec_scale'], spk_fun=values['spk_fun'],
                          syn_gain=values['syn_gain'], seed=seed, memory=memory)
    return task, model


def labelled_trials(task, n: int, seed: int, key: int):
    """n trials (x (T, n, n_in) uint8, match labels, sample directions) from default_rng([seed, key])."""
    rng = np.random.default_rng([seed, key])
    specs, labels = zip(*[task.draw(rng) for _ in range(n)])
    prob = np.stack([task.rates(s) for s in specs], axis=1)
    x = (rng.random(prob.shape, dtype=np.float32) < prob).astype(np.uint8)
    return x, np.asarray(labels, np.int32), np.array([s[0] for s in specs])


def layer_states(trainer, model, x, B: int, T_end: int) -> np.ndarray:
    """Every neuron's (V, g, I2) after T_end steps of each trial: (n, 3, n_rec)."""
    @brainstate.transform.jit
    def run(xs):
        brainstate.transform.for_loop(lambda xt: model(xt.astype(np.float32)), xs)
        return [getattr(model.rec, s).value for s in ('V', 'g', 'I2')]

    feats = []
    for start in range(0, x.shape[1], B):
        trainer.reset()
        feats.append(np.stack([np.asarray(v) for v in run(x[:T_end, start:start + B])], axis=1))
    trainer.reset()
    return np.concatenate(feats, 0)


def probes(fv, sv, ft, st, n_memory: int) -> tuple:
    """(memory neurons' probe, the other neurons' probe) accuracies."""
    flat = lambda f: f.reshape(f.shape[0], -1)
    return (probe(flat(fv[..., -n_memory:]), sv, flat(ft[..., -n_memory:]), st),
            probe(flat(fv[..., :-n_memory]), sv, flat(ft[..., :-n_memory]), st))


def probe(f_fit, y_fit, f_score, y_score) -> float:
    """Held-out accuracy of a logistic-regression probe (L2, C = 1) on the raw states, in the units the
    network works in (the threshold is 1): a difference of 1e-6 that noise-free decay leaves after the delay
    is not read (with standardised features it is: the fast neurons' probe was 0.77 before training)."""
    from sklearn.linear_model import LogisticRegression
    clf = LogisticRegression(max_iter=2000)
    return float(clf.fit(f_fit, y_fit).score(f_score, y_score))


def w_sample_memory(model, task, n_memory: int) -> float:
    """max |W| from the sample channels into the memory neurons (0 at the start)."""
    w = np.asarray(model.rec.linear.weight_op.value['weight'])
    return float(np.abs(w[task.sample_channels, -n_memory:]).max())


def accuracy(trainer, x, labels, ws, B: int) -> float:
    correct = 0.
    for start in range(0, x.shape[1], B):
        _, acc, n = trainer.evaluate(x[:, start:start + B], labels[start:start + B], ws)
        correct += acc * n
    return correct / x.shape[1]


def main(argv=None) -> dict:
    a = parse(argv)
    if a.table:
        print(table(a.out))
        return {}
    if os.path.exists(a.out):
        with open(a.out) as f:
            header = f.readline().strip().split(',')
        if header != list(FIELDS):
            raise SystemExit(f'error: {a.out} has other columns ({",".join(header)}); give a new --out')
    values = dict(credit_split.ABLATION)
    task, model = build(values, a.seed)
    H = None if a.trace_reset_every is None else max(1, int(round(a.trace_reset_every / values['dt'])))
    if a.window is not None and a.method != 'bptt':
        raise SystemExit(f'error: --window is for --method bptt (TBPTT on trials), not {a.method}')
    window = None if a.window is None else max(1, int(round(a.window / values['dt'])))
    trainer = Trainer(model, a.method, task.n_in, a.batch, lr=a.lr, etrace_decay=0.99, trace_chunk=None,
                      rule_options=dict(trace_reset_every_steps=H, trial_window_steps=window))
    ws = task.loss_weights()
    xv, yv, sv = labelled_trials(task, a.n_val, a.seed, datasets.VALIDATION_KEY)
    xt, yt, st = labelled_trials(task, a.n_test, a.seed, datasets.TEST_KEY)
    n_mem, T_end = values['memory']['n_memory'], task.decision_start
    fv, ft = (layer_states(trainer, model, x, a.batch, T_end) for x in (xv, xt))
    probe_init = probes(fv, sv, ft, st, n_mem)
    t0 = time.time()
    for b in range(a.batches):
        trainer.reset()
        x, y = task.trials(a.batch, datasets.dms_batch_rng(a.seed, 0, b))
        trainer.train_step(x, y, ws)
    seconds = time.time() - t0
    fv, ft = (layer_states(trainer, model, x, a.batch, T_end) for x in (xv, xt))
    probe_final = probes(fv, sv, ft, st, n_mem)
    row = dict(method=a.method, trace_reset_every_ms=a.trace_reset_every or 'never', seed=a.seed, lr=a.lr,
               batches=a.batches, val_acc=round(accuracy(trainer, xv, yv, ws, a.batch), 4),
               test_acc=round(accuracy(trainer, xt, yt, ws, a.batch), 4), probe_init=round(probe_init[0], 4),
               probe_final=round(probe_final[0], 4), probe_fast_init=round(probe_init[1], 4),
               probe_fast_final=round(probe_final[1], 4), w_sample_memory=w_sample_memory(model, task, n_mem),
               seconds=round(seconds, 1), window_ms=a.window or 'whole')
    new = not os.path.exists(a.out)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, 'a', newline='') as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerow(row)
    print(row)
    return row


if __name__ == '__main__':
    main()
