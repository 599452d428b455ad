"""The credit horizon of each learning rule: how much gradient reaches an input L ms before the loss.

A recurrent network (the paper's GIF network, and the same layer with A2 = 0: a plain LIF neuron with an
exponential synapse and no adaptation current) gets Poisson background input on the channels
`n_pulse..n_in` for the whole sequence, and on the channels `0..n_pulse` nothing but one pulse of
--pulse_ms ms (rate --pulse_rate). The loss is the cross entropy of one step, the last, L ms after the
pulse's last step. The gradient on the input weights of the pulsed channels (their rows of the layer's
weight [x, s] W) is then the credit the rule assigns to the pulse: BPTT's is exact; for every rule we write
its cosine with BPTT's and its norm, relative to BPTT's norm at the same lag and to its own norm at the
shortest lag.

The GIF network is the task's (tau 100/100 ms, rec_scale 2, syn_gain 0.3, A2 = 1, tau_I2 ~ U(100, 2250)).
The plain LIF network: the same layer with A2 = 0, tau_mem 20 ms, tau_syn 10 ms, rec_scale 0.5, syn_gain 1.
The GIF network with only A2 = 0 is no plain LIF to compare: its BPTT gradient explodes (norm 0.32 at
L = 10, 1.5e5 at 1000, 4.3e20 at 4000 ms); docs/stream.md, "Credit horizons".

Methods: BPTT (the whole sequence), TBPTT(k2) (forward over all but the last k2 steps without gradient,
then BPTT over the last k2 with the states carried in as constants: rsnn/rules/bptt.py, as on the stream),
D-RTRL, ES-D-RTRL at decay 0.99 and 0.999 (the trainer's rules, their default chunked paths).

One sequence length T = burn_in + pulse + max lag for every lag (one compiled shape per method): for lag L
the pulse starts at T - pulse - L.

    python scripts/credit_horizon.py --out results/dms/credit/horizon            # horizon.csv, horizon.png
    python scripts/credit_horizon.py --out /tmp/h --tiny                          # seconds, for the tests
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time

import numpy as np


LAGS_MS = (10, 30, 100, 300, 1000, 2000, 4000)
FIELDS = ['network', 'method', 'lag_ms', 'cosine_to_bptt', 'norm', 'ratio_to_bptt', 'ratio_to_first_lag',
          'rate_hz']


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--out', required=True, help='folder for horizon.csv and horizon.png')
    p.add_argument('--lags', default=','.join(map(str, LAGS_MS)), help='lags in ms, comma separated')
    p.add_argument('--networks', default='gif,lif', help='gif (the paper\'s GIF, A2 = 1), lif (A2 = 0) and/or '
                   'credit-split (the credit ablation\'s network, scripts/credit_ablation.py)')
    p.add_argument('--methods', default='bptt,tbptt:1000,diag,expsm_diag:0.99,expsm_diag:0.999',
                   help='bptt, tbptt:K2_MS, diag (D-RTRL), expsm_diag:DECAY (ES-D-RTRL)')
    p.add_argument('--n_rec', type=int, default=200, help='recurrent neurons of each network')
    p.add_argument('--n_in', type=int, default=40, help='input channels (the pulse rows among them)')
    p.add_argument('--n_pulse', type=int, default=10, help='input channels that carry only the pulse')
    p.add_argument('--batch', type=int, default=8, help='sequences averaged per gradient')
    p.add_argument('--pulse_ms', type=float, default=100., help='length of the input pulse (ms)')
    p.add_argument('--pulse_rate', type=float, default=0.2, help='spike probability per step in the pulse')
    p.add_argument('--bg_rate', type=float, default=0.05, help='background spike probability per step')
    p.add_argument('--burn_in_ms', type=float, default=50., help='background input before the pulse (ms)')
    p.add_argument('--tau_I2', type=float, default=1500., help="the GIF network's adaptation time constant (ms)")
    p.add_argument('--syn_gain', type=float, default=0.3, help="the task's default (--syn_gain)")
    p.add_argument('--lif_tau_neu', type=float, default=20., help='the LIF network: membrane time constant (ms)')
    p.add_argument('--lif_tau_syn', type=float, default=10., help='the LIF network: synaptic time constant (ms)')
    p.add_argument('--lif_rec_scale', type=float, default=0.5, help='the LIF network: recurrent weight scale')
    p.add_argument('--lif_syn_gain', type=float, default=1., help='the LIF network: synaptic gain')
    p.add_argument('--seed', type=int, default=0, help='seed of the weights and the inputs')
    p.add_argument('--plot_only', action='store_true', help='redraw horizon.png from OUT/horizon.csv')
    p.add_argument('--tiny', action='store_true', help='n_rec 16, batch 2, lags 10,100,300, tbptt:100')
    return p


def make_model(network: str, a, seed: int):
    from rsnn import models
    if network == 'credit-split':  # the ablation's credit network (rsnn/tasks/credit_split.py ABLATION): the
        # pulsed channels play the sample channels (silent outside the pulse; the memory neurons' weights from
        # them start at 0); --n_rec, --tau_I2 and --syn_gain are the ablation's, not the flags'
        from rsnn.tasks.credit_split import ABLATION as v
        return models.DMSNet(a.n_in, v['n_rec'], 2, dt=1., tau_neu=v['tau_neu'], tau_syn=v['tau_syn'],
                             tau_I2=v['tau_I2'], A2=v['A2'], ff_scale=v['ff_scale'], rec_scale=v['rec_scale'],
                             syn_gain=v['syn_gain'], spk_fun=v['spk_fun'], seed=seed,
                             memory=dict(v['memory'], zero_in_rows=a.n_pulse))
    if network == 'gif':  # the paper's network (task-rsnn-long-term-dependency.py PAPER_TASK)
        kw = dict(tau_neu=100., tau_syn=100., A2=1., rec_scale=2., syn_gain=a.syn_gain)
    else:  # no adaptation current; faster membrane and synapse, weaker recurrence (module docstring)
        kw = dict(tau_neu=a.lif_tau_neu, tau_syn=a.lif_tau_syn, A2=0., rec_scale=a.lif_rec_scale,
                  syn_gain=a.lif_syn_gain)
    return models.DMSNet(a.n_in, a.n_rec, 2, dt=1., tau_I2=a.tau_I2, ff_scale=6., spk_fun='relu', seed=seed, **kw)


def inputs(a, T: int, lag: int, rng):
    """xs (T, B, n_in) float32: background on the channels n_pulse.., the pulse on 0..n_pulse ending `lag`
    steps before the last step; labels (B,); ws (T,) one-hot at the last step."""
    P = int(a.pulse_ms)
    xs = np.zeros((T, a.batch, a.n_in), np.float32)
    xs[:, :, a.n_pulse:] = rng.random((T, a.batch, a.n_in - a.n_pulse)) < a.bg_rate
    start = T - 1 - lag - P + 1
    xs[start:start + P, :, :a.n_pulse] = rng.random((P, a.batch, a.n_pulse)) < a.pulse_rate
    labels = rng.integers(0, 2, a.batch).astype(np.int32)
    ws = np.zeros(T, np.float32)
    ws[-1] = 1.
    return xs, labels, ws


def input_weight_grad(grads: dict, n_pulse: int) -> np.ndarray:
    """The gradient on the pulsed channels' rows of the recurrent layer's weight [x, s] W."""
    g = grads['rec/linear/weight_op']
    return np.asarray(g['weight'] if isinstance(g, dict) else g)[:n_pulse].ravel().astype(np.float64)


class Gradients:
    """The compiled gradient of one method on one network (one sequence length)."""

    def __init__(self, network: str, method: str, a, T: int):
        import brainstate
        from rsnn.trainer import Trainer, trial_objective
        brainstate.environ.set(dt=1.)
        name, _, arg = method.partition(':')
        self.name = name
        kw = dict(etrace_decay=float(arg)) if name == 'expsm_diag' and arg else {}
        rule = 'bptt' if name == 'tbptt' else name
        self.trainer = Trainer(make_model(network, a, a.seed), rule, a.n_in, a.batch,
                                        trace_chunk=None, **kw)
        self.k2 = int(float(arg)) if name == 'tbptt' else None
        self.T = T
        if self.k2 is not None:
            self._fn = brainstate.transform.jit(self._tbptt)

    def _tbptt(self, xs, labels, mask, ws):
        """TBPTT(k2) at the last step: the states of the first T - k2 steps without gradient, then the BPTT
        rule over the last k2 (it takes the states carried in as constants, as on the stream)."""
        import brainstate
        from rsnn.trainer import Trainer, trial_objective
        tr, cut = self.trainer, self.T - self.k2
        tr.reset(xs.shape[1])
        brainstate.transform.for_loop(lambda x: tr.model(x), xs[:cut])
        return tr.rule_gradients(xs[cut:], ws[cut:], trial_objective(labels, mask, 'cel')).grads

    def __call__(self, xs, labels, ws) -> dict:
        if self.k2 is None:
            return self.trainer.gradients(xs, labels, ws)
        xs, labels, mask = self.trainer.pad(xs, labels)
        return self._fn(xs, labels, mask, ws)

    def rate_hz(self, xs) -> float:
        """Mean firing rate of the recurrent layer over the sequence (Hz at dt = 1 ms)."""
        tr = self.trainer
        _, labels, _ = inputs_placeholder(xs)
        tr.evaluate(xs, labels, np.ones(xs.shape[0], np.float32))
        return 1000. * tr.pop_eval_rates()[0]


def inputs_placeholder(xs):
    return xs, np.zeros(xs.shape[1], np.int32), None


def measure(a, log=print) -> list:
    lags = [int(x) for x in a.lags.split(',')]
    T = int(a.burn_in_ms + a.pulse_ms + max(lags))
    rows = []
    for network in a.networks.split(','):
        data = {lag: inputs(a, T, lag, np.random.default_rng([a.seed, lag])) for lag in lags}
        ref, first = {}, {}
        for method in a.methods.split(','):
            t0 = time.time()
            g = Gradients(network, method, a, T)
            rate = g.rate_hz(data[lags[0]][0]) if method == 'bptt' else float('nan')
            for lag in lags:
                grad = input_weight_grad({k: v for k, v in g(*data[lag]).items()}, a.n_pulse)
                norm = float(np.linalg.norm(grad))
                if method == 'bptt':
                    ref[lag] = grad
                first.setdefault(method, norm)
                r = ref[lag]
                cos = float(grad @ r / (np.linalg.norm(r) * norm)) if norm > 0 and np.linalg.norm(r) > 0 else 0.
                rows.append(dict(network=network, method=method, lag_ms=lag, cosine_to_bptt=cos, norm=norm,
                                 ratio_to_bptt=norm / max(np.linalg.norm(r), 1e-30),
                                 ratio_to_first_lag=norm / first[method] if first[method] > 0 else float('nan'),
                                 rate_hz=rate))
            log(f'{network} {method}: {time.time() - t0:.1f} s; ' + ', '.join(
                f'L={r["lag_ms"]} cos {r["cosine_to_bptt"]:.3f} ratio {r["ratio_to_first_lag"]:.3g}'
                for r in rows if r['network'] == network and r['method'] == method))
    return rows


def plot(rows, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    networks = sorted({r['network'] for r in rows})
    fig, axes = plt.subplots(2, len(networks), figsize=(5.5 * len(networks), 7), squeeze=False)
    for j, net in enumerate(networks):
        for method in dict.fromkeys(r['method'] for r in rows):
            rs = [r for r in rows if r['network'] == net and r['method'] == method]
            lags = [r['lag_ms'] for r in rs]
            axes[0, j].plot(lags, [r['cosine_to_bptt'] for r in rs], 'o-', label=method)
            axes[1, j].plot(lags, [max(r['ratio_to_first_lag'], 1e-12) for r in rs], 'o-', label=method)
        axes[0, j].set(xscale='log', ylim=(-0.5, 1.05), title=f'{net}: cosine with BPTT', xlabel='lag (ms)')
        axes[1, j].set(xscale='log', yscale='log', ylim=(1e-8, 10),
                       title=f'{net}: |grad(L)| / |grad(first lag)| (0 shown at 1e-12)', xlabel='lag (ms)')
        axes[0, j].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    a = build_parser().parse_args(argv)
    if a.tiny:
        a.n_rec, a.batch, a.n_in, a.n_pulse = 16, 2, 12, 4
        if a.lags == ','.join(map(str, LAGS_MS)):
            a.lags = '10,100,300'
        a.methods = a.methods.replace('tbptt:1000', 'tbptt:100')
    os.makedirs(a.out, exist_ok=True)
    if a.plot_only:
        with open(os.path.join(a.out, 'horizon.csv')) as f:
            rows = [dict(r, lag_ms=int(r['lag_ms']), **{k: float(r[k]) for k in FIELDS[3:]}) for r in csv.DictReader(f)]
        plot(rows, os.path.join(a.out, 'horizon.png'))
        return rows
    rows = measure(a)
    with open(os.path.join(a.out, 'horizon.csv'), 'w', newline='') as f:
        w = csv.DictWriter(f, FIELDS)
        w.writeheader()
        w.writerows(rows)
    plot(rows, os.path.join(a.out, 'horizon.png'))
    print(f'wrote {a.out}/horizon.csv and horizon.png')
    return rows


if __name__ == '__main__':
    main()
