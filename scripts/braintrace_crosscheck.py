"""Cross-check of this repository's online rules against braintrace 0.2.6 (issue #25, item 3; not in CI).

Two environments that cannot import each other, so two halves joined by one .npz file:

  .venv/bin/python scripts/braintrace_crosscheck.py --export X.npz
      (our environment: brainstate 0.2.3, brainscale 0.1.0) builds the tiny one-layer LIF network of
      models.py (lif-delta, soft reset with the reset spike detached, relu surrogate, leaky readout), draws
      the inputs and targets and saves every array of the network plus OUR gradients of one window (T steps
      from zero states) for bptt, diag (D-RTRL; and with --drtrl_readout_filter 1, the pseudo-derivative
      outside the kappa filter as braintrace's EProp), eprop (kappa = the readout's decay, and kappa = 0;
      symmetric feedback), snap1, uoro (the mean over --uoro_seeds seeds: one seed is noise), expsm_diag,
      and ES-D-RTRL's recursion with braintrace's warm-up correction (see below).

  .venv-braintrace/bin/python scripts/braintrace_crosscheck.py --braintrace X.npz --out DIR
      (requirements-braintrace.txt: Python 3.11, braintrace 0.2.6, brainstate 0.5.4, jax 0.10.2) rebuilds the
      same network from the saved arrays with braintrace's ETP matmul, first checks that its own BPTT gradient
      (brainstate.transform.grad through the whole window) equals our saved BPTT gradient (the two networks
      are one model), then runs braintrace's D_RTRL, EProp, SnAp(n=1), UORO and pp_prop step by step
      (vjp_method 'single-step', etrace_grad with chunk_size None: the online rule; a whole-window VJP would
      give BPTT for every rule, braintrace's F-23) and writes DIR/crosscheck.csv and DIR/crosscheck.md:
      per rule and weight the cosine between our rule and braintrace's, the norm ratio, and each one's cosine
      to BPTT.

`make braintrace-crosscheck` runs both (results/braintrace-crosscheck/); docs/online-rules.md,
"Cross-check against braintrace 0.2.6", has the table and why the rules that differ differ.
Each half imports its own libraries inside its function; the braintrace half uses numpy, jax, brainstate,
braintools and braintrace only (nothing of this repository).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

N_IN, N_REC, N_OUT, B, T = 6, 8, 3, 4, 30
SEED, DATA_SEED = 5, 0
ES_DECAY = 0.9
WEIGHTS = ('W_in', 'W_rec', 'b_rec', 'W_out', 'b_out')


def cosine(a, b):
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else float('nan')


def ratio(ref, g):
    n = np.linalg.norm(np.ravel(ref))
    return float(np.linalg.norm(np.ravel(g)) / n) if n > 0 else float('nan')


def split(layer_w, layer_b, out_w, out_b, n_in=N_IN):
    """The five weight blocks of the network: [W_in; W_rec] of the layer's one Linear split by rows."""
    layer_w = np.asarray(layer_w)
    return {'W_in': layer_w[:n_in], 'W_rec': layer_w[n_in:], 'b_rec': np.asarray(layer_b),
            'W_out': np.asarray(out_w), 'b_out': np.asarray(out_b)}


# ------------------------------------------------------------------------------------------------
# our half (.venv)
# ------------------------------------------------------------------------------------------------

ALL_OURS = ('bptt', 'diag', 'diag_filter', 'eprop', 'eprop_k0', 'snap1', 'expsm_diag', 'expsm_diag_btcorr', 'uoro')


def es_braintrace_correction():
    """ES-D-RTRL's recursion with braintrace's warm-up correction c_t = 1 - a^(t+1) in place of brainscale's
    1 - (1 - a)^(t+1), as a rule class (OTTT's chunk driver with ES-D-RTRL's two decays; the same recursion as
    tests/test_online_rules.py's ESReference, which equals brainscale's ES-D-RTRL with brainscale's correction).
    Built here, not at import: this file's other half runs where rsnn cannot be imported."""
    import jax.numpy as jnp
    from rsnn.rules import chunk_engine, ottt

    class ESBraintraceCorrection(ottt.OTTT):
        a = b = ES_DECAY

        def zero_traces(self):
            return [(jnp.zeros((B, n_in)), jnp.zeros((B, n_out, S)))
                    for n_in, n_out, S in chunk_engine.relation_shapes(self.model)]

        def chunk_update(self, key, rel, trace, t0):
            xhat, fhat = trace
            dW, db = 0., 0.
            for t in range(rel['x'].shape[0]):
                xhat = self.a * xhat + rel['x'][t]
                fhat = self.b * jnp.sum(rel['D'][t] * fhat[..., None, :], -1) + (1 - self.b) * rel['df'][t]
                n = jnp.asarray(t0 + t, jnp.float32)
                c = jnp.where(n < 1000, jnp.maximum(1. - self.b ** (n + 1.), 1e-8), 1.)
                G = jnp.sum(fhat / c * rel['L'][t], -1)
                dW, db = dW + xhat.T @ G, db + G.sum(0)
            return {'weight': dW, 'bias': db}, (xhat, fhat)

    return ESBraintraceCorrection


def export(path: str, uoro_seeds: int = 256, T_: int = T, rules=ALL_OURS):
    import brainstate
    from rsnn import models
    from rsnn.trainer import Trainer

    def network():
        brainstate.environ.set(dt=1.)
        return models.SpikingStack(N_IN, N_REC, N_OUT, 1, model='lif-delta', ff_scale=4., seed=SEED)

    rng = np.random.default_rng(DATA_SEED)
    xs = (rng.random((T_, B, N_IN)) < 0.3).astype(np.float32)
    labels = rng.integers(0, N_OUT, B).astype(np.int32)
    ws = np.linspace(0.2, 1., T_).astype(np.float32)

    def blocks(grads):
        layer = [v for k, v in grads.items() if k.startswith('layers')]
        out = [v for k, v in grads.items() if k.startswith('out')]
        assert len(layer) == 1 and len(out) == 1, list(grads)
        return split(layer[0]['weight'], layer[0]['bias'], out[0]['weight'], out[0]['bias'])

    def run(method, K=None, decay=ES_DECAY, **extra):
        tr = Trainer(network(), method, N_IN, B, etrace_decay=decay, trace_chunk=K, rule_options=extra)
        return tr, blocks(tr.gradients(xs, labels, ws))

    m = network()
    layer, out = m.layers[0], m.out
    assert type(layer.spk_fun).__name__ == 'ReluGrad' and layer.spk_reset == 'soft' and layer.detach_reset
    saved = dict(
        xs=xs, labels=labels, ws=ws,
        layer_weight=np.asarray(layer.linear.weight_op.value['weight']),
        layer_bias=np.asarray(layer.linear.weight_op.value['bias']),
        out_weight=np.asarray(out.linear.weight_op.value['weight']),
        out_bias=np.asarray(out.linear.weight_op.value['bias']),
        mem_decay=np.asarray(layer.mem_decay), out_decay=np.float32(out.decay), V_th=np.float32(layer.V_th),
        surrogate_alpha=np.float32(layer.spk_fun.alpha), surrogate_width=np.float32(layer.spk_fun.width),
        es_decay=np.float64(ES_DECAY), eprop_kappa=np.float64(out.decay), uoro_seeds=np.int32(uoro_seeds))
    grads, meta = {}, {}
    t0 = time.time()
    grads['bptt'] = run('bptt')[1]
    want = lambda r: r in rules
    if want('diag'):
        grads['diag'] = run('diag', 1)[1]                      # brainscale's ParamDimVjpAlgorithm step by step
    if want('diag_filter'):   # the trace filtered with the readout decay, psi outside: braintrace's EProp's form
        grads['diag_filter'] = run('diag', None, drtrl_readout_filter=1)[1]
    if want('eprop'):
        grads['eprop'] = run('eprop', None, eprop_kappa=float(out.decay), eprop_feedback='symmetric')[1]
    if want('eprop_k0'):
        grads['eprop_k0'] = run('eprop', None, eprop_kappa=0., eprop_feedback='symmetric')[1]
    if want('snap1'):
        grads['snap1'] = run('snap1')[1]
    if want('expsm_diag'):
        grads['expsm_diag'] = run('expsm_diag', 1)[1]          # brainscale's IODimVjpAlgorithm step by step

    if want('expsm_diag_btcorr'):
        tr = Trainer(network(), 'ottt', N_IN, B, etrace_decay=ES_DECAY, trace_chunk=1)
        rule = es_braintrace_correction()(tr.model, tr.params, tr.rule_options)
        rule.trace_chunk = T_
        tr.use_rule(rule)
        grads['expsm_diag_btcorr'] = blocks(tr.gradients(xs, labels, ws))

    # UORO: one seed, and the mean over uoro_seeds seeds (the rule's key advances at every call)
    if want('uoro'):
        tr = Trainer(network(), 'uoro', N_IN, B, trace_chunk=1, rule_options={'uoro_seed': 0})
        runs = [blocks(tr.gradients(xs, labels, ws)) for _ in range(uoro_seeds)]
        grads['uoro_1'] = runs[0]
        grads['uoro'] = {k: np.mean([r[k] for r in runs], 0) for k in WEIGHTS}
    meta['export_s'] = round(time.time() - t0, 1)
    for rule_name, g in grads.items():
        for k in WEIGHTS:
            saved[f'g/{rule_name}/{k}'] = np.asarray(g[k], np.float32)
    saved['meta'] = json.dumps(dict(meta, N_IN=N_IN, N_REC=N_REC, N_OUT=N_OUT, B=B, T=T_, seed=SEED,
                                    data_seed=DATA_SEED, model='lif-delta', spk_fun='relu', ff_scale=4.))
    np.savez(path, **saved)
    print(f'wrote {path}: {len(grads)} rules of ours; '
          + ', '.join(f'{r} cos to BPTT (W_rec) {cosine(grads[r]["W_rec"], grads["bptt"]["W_rec"]):.4f}'
                      for r in grads if r != 'bptt'))
    return path


# ------------------------------------------------------------------------------------------------
# braintrace's half (.venv-braintrace)
# ------------------------------------------------------------------------------------------------

# our rule -> (braintrace's rule, its constructor's options, how to drive it); 'mean over seeds' for UORO
PAIRS = [
    ('diag', 'D_RTRL', {}),
    ('eprop', 'EProp', {'kappa_filter_decay': 'eprop_kappa', 'feedback': 'symmetric'}),
    ('eprop_k0', 'EProp', {'kappa_filter_decay': 0., 'feedback': 'symmetric'}),
    ('diag_filter', 'EProp', {'kappa_filter_decay': 'eprop_kappa', 'feedback': 'symmetric'}),
    ('snap1', 'SnAp', {'n': 1}),
    ('snap1', 'OSTLRecurrent', {}),
    ('bptt', 'SnAp', {'n': 2}),       # saturated SnAp: full RTRL within each hidden group (UORO's target)
    ('uoro', 'UORO', {}),
    ('expsm_diag', 'pp_prop', {'decay_or_rank': 'es_decay'}),
    ('expsm_diag_btcorr', 'pp_prop', {'decay_or_rank': 'es_decay'}),
]
LABELS = {
    'diag': 'D-RTRL', 'eprop': 'e-prop (kappa = readout decay)', 'eprop_k0': 'e-prop (kappa 0)',
    'diag_filter': 'D-RTRL, --drtrl_readout_filter 1',
    'snap1': 'SnAp-1', 'bptt': 'BPTT', 'uoro': 'UORO (mean over seeds)', 'expsm_diag': 'ES-D-RTRL (decay 0.9)',
    'expsm_diag_btcorr': "ES-D-RTRL, braintrace's warm-up correction",
}


def braintrace_network(d: dict):
    """The export's network (models.SpikingStack, one LIF layer and the leaky readout) rebuilt in brainstate 0.5 /
    braintrace from the exported arrays `d`; returns its class."""
    import brainstate
    import braintools
    import braintrace
    import jax
    import jax.numpy as jnp

    brainstate.environ.set(dt=1.)
    spk = braintools.surrogate.ReluGrad(alpha=float(d['surrogate_alpha']), width=float(d['surrogate_width']))
    V_th = float(d['V_th'])

    class Layer(brainstate.nn.Module):
        """models.RecurrentLIFLayer (lif, delta synapse, soft reset, reset spike detached): one ETP matmul over
        [x_t, s_{t-1}], V_t = a (V_{t-1} - V_th s_{t-1}) + y_t, s_t = H((V_t - V_th) / V_th)."""

        def __init__(self):
            super().__init__()
            self.weight = brainstate.ParamState({'weight': jnp.asarray(d['layer_weight']),
                                                 'bias': jnp.asarray(d['layer_bias'])})
            self.decay = jnp.asarray(d['mem_decay'])
            self.n = self.decay.shape[0]

        def init_state(self, batch_size=None, **kw):
            self.V = brainstate.HiddenState(jnp.zeros((batch_size, self.n)))

        def reset_state(self, batch_size=None, **kw):
            self.V.value = jnp.zeros((batch_size, self.n))

        def update(self, x):
            V = self.V.value
            s_prev = spk((V - V_th) / V_th)
            y = braintrace.matmul(jnp.concatenate([x, s_prev], -1), self.weight.value['weight'],
                                  self.weight.value['bias'])
            V = self.decay * (V - V_th * jax.lax.stop_gradient(s_prev)) + y
            self.V.value = V
            return spk((V - V_th) / V_th)

    class Readout(brainstate.nn.Module):
        """models.LeakyReadout: r_t = decay r_{t-1} + s_t W + b."""

        def __init__(self):
            super().__init__()
            self.weight = brainstate.ParamState({'weight': jnp.asarray(d['out_weight']),
                                                 'bias': jnp.asarray(d['out_bias'])})
            self.decay = float(d['out_decay'])
            self.n = d['out_bias'].shape[0]

        def init_state(self, batch_size=None, **kw):
            self.r = brainstate.HiddenState(jnp.zeros((batch_size, self.n)))

        def reset_state(self, batch_size=None, **kw):
            self.r.value = jnp.zeros((batch_size, self.n))

        def update(self, s):
            r = self.decay * self.r.value + braintrace.matmul(s, self.weight.value['weight'],
                                                              self.weight.value['bias'])
            self.r.value = r
            return r

    class Net(brainstate.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer, self.out = Layer(), Readout()

        def update(self, x):
            return self.out(self.layer(x))

    return Net


def compare_pairs(d, ours, rule_grads, rows: list):
    """Each (ours, braintrace) pair of PAIRS: braintrace's gradient by `rule_grads`, a row per weight appended to
    `rows` (cosines to ours and to BPTT, norm ratio). Returns (errors: label -> the exact error of a rule that
    cannot run, extra: UORO's single-seed and SnAp(n=2) comparisons)."""
    errors, extra, snap2 = {}, {}, None
    for ours_name, bt_name, options in PAIRS:
        if ours_name not in ours:  # not exported (--rules)
            continue
        shown = {k: (f'{float(d[v]):.4g}' if isinstance(v, str) and v in d else v) for k, v in options.items()}
        label = bt_name + (f'({", ".join(f"{k}={v}" for k, v in shown.items())})' if options else '')
        t0 = time.time()
        try:
            g_bt, g_bt_1 = rule_grads(bt_name, options)
        except Exception as e:  # a rule that cannot run: the exact error goes into the table
            errors[label] = f'{type(e).__name__}: {str(e).splitlines()[0][:300]}'
            print(f'{label}: FAILED {errors[label]}')
            continue
        for k in WEIGHTS:
            rows.append(dict(rule=LABELS[ours_name], ours=ours_name, braintrace=label, weight=k,
                             cos_ours_bt=cosine(ours[ours_name][k], g_bt[k]),
                             norm_ratio=ratio(ours[ours_name][k], g_bt[k]),
                             cos_ours_bptt=cosine(ours[ours_name][k], ours['bptt'][k]),
                             cos_bt_bptt=cosine(g_bt[k], ours['bptt'][k])))
        if bt_name == 'SnAp' and options.get('n') == 2:
            snap2 = g_bt
        if g_bt_1 is not None:
            extra[label] = {k: (cosine(ours['uoro_1'][k], ours['bptt'][k]), cosine(g_bt_1[k], ours['bptt'][k]))
                            for k in WEIGHTS}
            if snap2 is not None:
                extra[label + ', mean over seeds, cosine to braintrace SnAp(n=2)'] = {
                    k: (cosine(ours['uoro'][k], snap2[k]), cosine(g_bt[k], snap2[k])) for k in WEIGHTS}
        print(f'{label}: {time.time() - t0:.1f} s; W_rec cos ours~bt '
              f'{[r["cos_ours_bt"] for r in rows if r["braintrace"] == label and r["weight"] == "W_rec"][-1]:.4f}')
    return errors, extra


def braintrace_half(path: str, out_dir: str):
    import brainstate
    import braintrace
    import jax
    import jax.numpy as jnp

    d = dict(np.load(path))
    meta = json.loads(str(d['meta']))
    xs, labels, ws = jnp.asarray(d['xs']), jnp.asarray(d['labels']), jnp.asarray(d['ws'])
    T_, B_ = xs.shape[:2]
    n_in = xs.shape[2]
    ours = {}
    for k in d:
        if k.startswith('g/'):
            _, rule, w = k.split('/')
            ours.setdefault(rule, {})[w] = d[k]
    Net = braintrace_network(d)

    def step_loss(out, w):  # rsnn/trainer.py's trial objective with all samples real: w_t mean_b CE
        ce = -jnp.take_along_axis(jax.nn.log_softmax(out, -1), labels[:, None], -1)[:, 0]
        return w * jnp.mean(ce)

    def blocks(net, grads_by_state):
        g_layer = grads_by_state[id(net.layer.weight)]
        g_out = grads_by_state[id(net.out.weight)]
        return split(g_layer['weight'], g_layer['bias'], g_out['weight'], g_out['bias'], n_in)

    def by_state(params, grads):
        return {id(params[k]): grads[k] for k in grads}

    # 1. BPTT through the whole window: the two networks are one model
    net = Net()
    brainstate.nn.init_all_states(net, B_)
    params = net.states(brainstate.ParamState)

    def window_loss():
        brainstate.nn.reset_all_states(net, B_)
        losses = brainstate.transform.for_loop(lambda x, w: step_loss(net(x), w), xs, ws)
        return jnp.sum(losses)

    g_bptt = blocks(net, by_state(params, brainstate.transform.jit(
        brainstate.transform.grad(window_loss, params))()))
    rows = []
    match = {k: (cosine(ours['bptt'][k], g_bptt[k]), ratio(ours['bptt'][k], g_bptt[k])) for k in WEIGHTS}
    rows += [dict(rule='BPTT (model match)', ours='bptt', braintrace='brainstate grad (BPTT)', weight=k,
                  cos_ours_bt=match[k][0], norm_ratio=match[k][1], cos_ours_bptt=1.,
                  cos_bt_bptt=match[k][0]) for k in WEIGHTS]
    print('BPTT model match (cosine, norm ratio):', {k: (round(c, 6), round(r, 6)) for k, (c, r) in match.items()})

    # 2. braintrace's rules, step by step
    def rule_grads(name, options, key=None):
        net = Net()
        cls = getattr(braintrace, name)
        opts = {k: (float(d[v]) if isinstance(v, str) and v in d else v) for k, v in options.items()}
        if name == 'UORO':
            opts['projection_key'] = 0
        learner = braintrace.compile(net, cls, xs[0], batch_size=B_, vjp_method='single-step', **opts)

        def one(key_value):
            brainstate.nn.reset_all_states(learner, B_)
            if key_value is not None:
                learner.projection_rng.value = key_value
            return learner.etrace_grad(xs, ws, step_fn=lambda x, w: step_loss(learner(x), w),
                                       reduction='sum')

        run = brainstate.transform.jit(one)
        ps = learner.param_states
        if name != 'UORO':
            return blocks(net, by_state(ps, run(None))), None
        n = int(d['uoro_seeds'])
        keys = jax.random.split(jax.random.key(1), n)  # typed keys: the carry's type
        runs = [blocks(net, by_state(ps, run(keys[i]))) for i in range(n)]
        return {k: np.mean([r[k] for r in runs], 0) for k in WEIGHTS}, runs[0]

    errors, extra = compare_pairs(d, ours, rule_grads, rows)
    write_tables(out_dir, rows, errors, extra, meta, match)
    return rows, errors


def write_tables(out_dir, rows, errors, extra, meta, match):
    import csv
    os.makedirs(out_dir, exist_ok=True)
    fields = ['rule', 'ours', 'braintrace', 'weight', 'cos_ours_bt', 'norm_ratio', 'cos_ours_bptt', 'cos_bt_bptt']
    with open(os.path.join(out_dir, 'crosscheck.csv'), 'w', newline='') as f:
        w = csv.DictWriter(f, fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f'{v:.6f}' if isinstance(v, float) else v) for k, v in r.items()})
    pairs = []
    for r in rows:
        if (r['rule'], r['braintrace']) not in pairs:
            pairs.append((r['rule'], r['braintrace']))
    get = {(r['rule'], r['braintrace'], r['weight']): r for r in rows}
    f3 = lambda v: 'nan' if v != v else f'{v:.4f}'
    lines = [f"Tiny LIF network ({meta['model']}, {meta['N_IN']} -> {meta['N_REC']} -> {meta['N_OUT']}, leaky readout, "
             f"relu surrogate), B {meta['B']}, T {meta['T']}, one window from zero states, seed {meta['seed']}. "
             f"UORO: the mean over the seeds of each side.", '',
             '**Cosine between our rule and braintrace 0.2.6\'s** (norm ratio braintrace / ours in brackets)', '',
             '| our rule | braintrace | ' + ' | '.join(WEIGHTS) + ' |', '|---|---|' + '---|' * len(WEIGHTS)]
    for rule, bt in pairs:
        lines.append(f'| {rule} | {bt} | ' + ' | '.join(
            f"{f3(get[(rule, bt, k)]['cos_ours_bt'])} ({get[(rule, bt, k)]['norm_ratio']:.3f})" for k in WEIGHTS) + ' |')
    lines += ['', '**Cosine to BPTT** (ours / braintrace)', '',
              '| our rule | braintrace | ' + ' | '.join(WEIGHTS) + ' |', '|---|---|' + '---|' * len(WEIGHTS)]
    for rule, bt in pairs:
        lines.append(f'| {rule} | {bt} | ' + ' | '.join(
            f"{f3(get[(rule, bt, k)]['cos_ours_bptt'])} / {f3(get[(rule, bt, k)]['cos_bt_bptt'])}" for k in WEIGHTS) + ' |')
    if extra:
        lines += ['', '**UORO, one seed: cosine to BPTT; the mean: cosine to braintrace\'s SnAp(n=2)** (ours / braintrace)', '']
        for label, v in extra.items():
            lines.append(f'- {label}: ' + ', '.join(f'{k} {f3(a)} / {f3(b)}' for k, (a, b) in v.items()))
    if errors:
        lines += ['', '**Could not run**', '']
        lines += [f'- {label}: `{e}`' for label, e in errors.items()]
    open(os.path.join(out_dir, 'crosscheck.md'), 'w').write('\n'.join(lines) + '\n')
    json.dump({'model_match': match, 'errors': errors, 'meta': meta},
              open(os.path.join(out_dir, 'crosscheck.json'), 'w'), indent=1)
    print('\n'.join(lines))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument('--export', metavar='FILE.npz', help='our half (.venv): the network and our gradients')
    g.add_argument('--braintrace', metavar='FILE.npz', help="braintrace's half (.venv-braintrace)")
    p.add_argument('--out', default='results/braintrace-crosscheck', help='where the tables go (braintrace half)')
    p.add_argument('--uoro_seeds', type=int, default=256, help='UORO gradients averaged (export half; the '
                                                               'braintrace half uses the same number)')
    p.add_argument('--T', type=int, default=T, help='window length (export half)')
    p.add_argument('--rules', default=','.join(ALL_OURS), help='our rules to export (comma list; bptt always)')
    a = p.parse_args(argv)
    if a.export:
        export(a.export, a.uoro_seeds, a.T, tuple(a.rules.split(',')))
    else:
        braintrace_half(a.braintrace, a.out)


if __name__ == '__main__':
    main()
