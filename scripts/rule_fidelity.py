"""Each rule's gradient against BPTT's on one small network, one window of T steps from zero states (the
numbers of docs/online-rules.md, "Fidelity"): per rule the cosine and norm ratio (rule / BPTT) of the
layer's weight and of the readout's weight.

    python scripts/rule_fidelity.py                       # one LIF layer, W_rec = 0, detached reset
    python scripts/rule_fidelity.py --rec_scale 0.5       # the same with recurrent weights
    python scripts/rule_fidelity.py --model alif-delta --T 100

The network: models.SpikingStack(6, 8, 3, 1) (tests/test_chunked_traces.py's sizes), ff_scale 4, seed 5, leaky
readout (decay exp(-1/10) = 0.905), batch 4, Bernoulli(0.3) inputs, the loss weighted from 0.2 to 1 over T.
UORO: one seed (its key 0), and the mean over --uoro_seeds successive calls.
"""
import argparse


import brainstate
import jax
import numpy as np

from rsnn import models
from rsnn.trainer import Trainer

RULES = [('diag', {}, 'D-RTRL'), ('diag', {'drtrl_readout_filter': 1}, 'D-RTRL, --drtrl_readout_filter 1'),
         ('expsm_diag', {}, 'ES-D-RTRL (decay 0.9)'), ('eprop', {}, 'e-prop (kappa = readout decay)'),
         ('eprop', {'eprop_kappa': 0.}, 'e-prop (kappa 0)'), ('ottt', {}, 'OTTT (lambda 0.9)'),
         ('snap1', {}, 'SnAp-1'), ('uoro', {}, 'UORO, one seed'),
         ('uoro', {'uoro_per_sample': 1}, 'UORO --uoro_per_sample 1, one seed')]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--model', default='lif-delta', choices=('lif-delta', 'alif-delta', 'lif-exp-cu'))
    p.add_argument('--rec_scale', type=float, default=0.)
    p.add_argument('--T', type=int, default=23)
    p.add_argument('--uoro_seeds', type=int, default=64)
    args = p.parse_args(argv)
    brainstate.environ.set(dt=1.)
    n_in, n_rec, n_out, B = 6, 8, 3, 4
    rng = np.random.default_rng(0)
    xs = (rng.random((args.T, B, n_in)) < 0.3).astype(np.float32)
    labels, ws = rng.integers(0, n_out, B).astype(np.int32), np.linspace(0.2, 1., args.T).astype(np.float32)

    def trainer(method, **extra):
        model = models.SpikingStack(n_in, n_rec, n_out, 1, model=args.model, ff_scale=4., rec_scale=args.rec_scale,
                                    detach_reset=True, seed=5)
        return Trainer(model, method, n_in, B, etrace_decay=0.9, trace_chunk=1 if method == 'uoro' else None,
                       rule_options=extra)

    def flat(g):
        return {jax.tree_util.keystr(k): np.asarray(v, np.float64).ravel()
                for k, v in jax.tree_util.tree_flatten_with_path(g)[0]}

    ref = flat(trainer('bptt').gradients(xs, labels, ws))
    keys = [k for k in ref if k.endswith("['weight']")]
    print(f'{args.model}, rec_scale {args.rec_scale}, T {args.T}: cosine (norm ratio) to BPTT')
    print('| rule | ' + ' | '.join(k.split("'")[1].split('/')[0] + ' weight' for k in keys) + ' |')
    print('|---|' + '---|' * len(keys))
    rows = [(label, flat(trainer(m, **extra).gradients(xs, labels, ws))) for m, extra, label in RULES]
    tr = trainer('uoro')
    mean = None
    for _ in range(args.uoro_seeds):
        g = flat(tr.gradients(xs, labels, ws))
        mean = g if mean is None else {k: mean[k] + g[k] for k in g}
    rows.append((f'UORO, the mean of {args.uoro_seeds} seeds', mean))
    for label, g in rows:
        cells = []
        for k in keys:
            a, b = ref[k], g[k]
            cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
            scale = args.uoro_seeds if label.endswith('seeds') else 1
            cells.append(f'{cos:.4f} ({np.linalg.norm(b) / scale / np.linalg.norm(a):.3f})')
        print(f'| {label} | ' + ' | '.join(cells) + ' |', flush=True)


if __name__ == '__main__':
    main()
