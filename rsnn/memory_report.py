"""The analytic side and the outputs of the memory and speed sweep (task-memory-and-speed-evaluation-tpu.py):
FLOPs and the predicted state size of each method, the result rows completed with them, results.csv /
results.json, the markdown table, the speed targets, the memory growth and the figure.
"""
from __future__ import annotations

import csv
import json
import os


from rsnn import methods, neurons


CSV_COLUMNS = [
    'method', 'method_name', 'T', 'trace_chunk', 'trace_chunk_requested', 'configuration', 'status', 'reason',
    'batch_size', 'n_in', 'n_rec', 'n_layer', 'n_out', 'n_params',
    'setup_s', 'compile_s', 'first_step_s', 'step_s', 'step_s_min', 'step_s_max', 'ms_per_time_step',
    'gflop_per_step', 'gflops', 'matmul_gflops', 'frac_of_matmul',
    'input_mb', 'xla_args_mb', 'xla_out_mb', 'xla_alias_mb', 'xla_temp_mb', 'total_mb', 'step_mb',
    'weights_opt_mb', 'method_mb',
    'predicted_state_mb', 'params_mb', 'device_peak_mb', 'device_peak_minus_input_mb',
    'rss_base_mb', 'peak_rss_mb', 'platform', 'device', 'n_devices', 'device_peak_mb_per_device',
]

MB = 2.0 ** 20

# The speed targets of docs/memory-and-speed.md, set for the CPU preset: BPTT reaches at least this fraction
# of the machine's float32 matmul throughput; an online method's step time is at most this multiple of BPTT's (same T).
BPTT_MIN_FRAC_OF_MATMUL = 0.5
MAX_STEP_TIME_OVER_BPTT = {'expsm_diag': 0.6, 'diag': 10.}


# --------------------------------------------------------------------------------------------
# Theory: FLOPs and predicted state size
# --------------------------------------------------------------------------------------------


def layer_inputs(cfg):
    return [cfg['n_in'] if l == 0 else cfg['n_rec'] for l in range(cfg['n_layer'])]


def n_params(cfg) -> int:
    n_rec, n_out = cfg['n_rec'], cfg['n_out']
    return sum((n_x + n_rec) * n_rec + n_rec for n_x in layer_inputs(cfg)) + n_rec * n_out + n_out


def flop_per_time_step(cfg) -> float:
    """Matmul FLOPs of one time step of training: forward, weight gradients, and the input gradients
    that are needed (all but the data input's). The same yardstick for the three methods."""
    B, n_rec, n_out = cfg['batch_size'], cfg['n_rec'], cfg['n_out']
    total = 0.
    for l, n_x in enumerate(layer_inputs(cfg)):
        total += 2 * 2 * B * (n_x + n_rec) * n_rec                    # forward + weight gradient
        total += 2 * B * n_rec * (n_rec + (n_x if l > 0 else 0))     # gradient of s_{t-1} (and x_t)
    total += 3 * 2 * B * n_rec * n_out                               # readout
    return total




def network_sizes(cfg, T: int) -> 'methods.Sizes':
    """The sweep's network as the table of methods' memory formulas see it."""
    S = len(neurons.get(cfg.get('model', 'lif-delta')).states)  # the table of neuron models
    n_rec = cfg['n_rec']
    return methods.Sizes(layers=tuple((n_x + n_rec, n_rec, S) for n_x in layer_inputs(cfg)),
                         readout=(n_rec, cfg['n_out']), batch=cfg['batch_size'], T=T)


def predicted_state_bytes(cfg, method: str, T: int) -> float:
    """The memory that the method's formula in the table of methods says it keeps (float32; rsnn/methods.py):
    bptt its tape over T steps, the online rules their traces; S = hidden states per neuron (lif-delta 1;
    alif-delta, lif-exp-cu, adlif 2; the readout 1). An unknown method is an error, never another's formula."""
    return 4. * methods.memory_floats(method, network_sizes(cfg, T))


# --------------------------------------------------------------------------------------------
# Result rows and outputs
# --------------------------------------------------------------------------------------------


def configuration(method: str, requested, K) -> str:
    """Which claim a row supports: BPTT the baseline; an online method at K = 1 (brainscale step by step,
    the paper's algorithm) the memory claim; at K > 1 (the chunked traces, the default) the speed."""
    if not methods.get(method).chunked:
        return 'baseline'
    if requested in (1, '1'):
        return "K = 1: the paper's algorithm (memory)"
    how = 'auto, the default' if requested in ('auto', None) else 'explicit'
    if K == 1:
        return f'K = 1 ({how}): step by step'
    return f'K = {fmt(K)} ({how}): speed'


def row_key(r: dict):
    """(method, configuration K) of a row: the lines of the figure and the memory growth."""
    if not methods.get(r['method']).chunked:
        return r['method'], None
    return r['method'], str(r.get('trace_chunk_requested') or 'auto')


def complete_row(row: dict, cfg: dict, probe_info: dict) -> dict:
    """Add the configuration, the theory and the derived speed figures to a measured row."""
    method, T = row['method'], int(row['T'])
    row['configuration'] = configuration(method, row.get('trace_chunk_requested'), row.get('trace_chunk'))
    row.update(method_name=methods.title(method), batch_size=cfg['batch_size'], n_in=cfg['n_in'],
               n_rec=cfg['n_rec'], n_layer=cfg['n_layer'], n_out=cfg['n_out'], n_params=n_params(cfg))
    n_dev = int(row.get('n_devices') or 1)  # per device: each holds batch / n_devices samples
    row['predicted_state_mb'] = predicted_state_bytes(dict(cfg, batch_size=cfg['batch_size'] // n_dev), method, T) / MB
    row['params_mb'] = 4. * n_params(cfg) / MB
    row['gflop_per_step'] = flop_per_time_step(cfg) * T / 1e9
    row['matmul_gflops'] = probe_info.get('matmul_gflops')
    row.setdefault('platform', probe_info.get('platform'))
    row.setdefault('device', probe_info.get('device'))
    if row.get('step_s'):
        row['ms_per_time_step'] = 1e3 * row['step_s'] / T
        row['gflops'] = row['gflop_per_step'] / row['step_s']
        if row['matmul_gflops']:
            row['frac_of_matmul'] = row['gflops'] / row['matmul_gflops']
    return {k: row.get(k) for k in CSV_COLUMNS}


def write_outputs(out_dir: str, cfg: dict, probe_info: dict, rows: list, summary=None):
    with open(os.path.join(out_dir, 'results.csv'), 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: ('' if r.get(k) is None else r[k]) for k in CSV_COLUMNS})
    with open(os.path.join(out_dir, 'results.json'), 'w') as f:
        json.dump(dict(config=cfg, machine=probe_info, rows=rows, **(summary or {})), f, indent=1, default=str)


def fmt(v, spec='.3g'):
    if v is None or v == '':
        return '-'
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def markdown_table(rows: list, analysis_only: bool = False) -> str:
    if analysis_only:
        return analysis_table(rows)
    head = ('| method | K | T | status | step (s) | ms / time step | compile (s) | GFLOP/s | % of matmul | '
            'step memory (MB) | predicted state (MB) | device peak (MB) | peak RSS (MB) |')
    lines = [head, '|' + '---|' * 13]
    for r in rows:
        status = r['status'] if r['status'] == 'ok' else f"{r['status']}: {r.get('reason') or ''}"[:80]
        frac = fmt(100 * r['frac_of_matmul'], '.0f') if r.get('frac_of_matmul') else '-'
        lines.append(f"| {r['method_name']} | {k_text(r)} | {r['T']} | {status} | {fmt(r.get('step_s'))} | "
                     f"{fmt(r.get('ms_per_time_step'))} | {fmt(r.get('compile_s'), '.2g')} | "
                     f"{fmt(r.get('gflops'), '.1f')} | {frac} | {fmt(r.get('step_mb'), '.4g')} | "
                     f"{fmt(r.get('predicted_state_mb'), '.4g')} | {fmt(r.get('device_peak_minus_input_mb'), '.4g')} | "
                     f"{fmt(r.get('peak_rss_mb'), '.4g')} |")
    return '\n'.join(lines)


def k_text(r: dict) -> str:
    """The K column: '-' for BPTT, K (and 'auto' where the default chose it)."""
    if not methods.get(r['method']).chunked:
        return '-'
    K = r.get('trace_chunk')
    return f"{fmt(K)} (auto)" if r.get('trace_chunk_requested') in ('auto', None) else fmt(K)


def analysis_table(rows: list) -> str:
    """--analysis_only: XLA's compiled memory analysis per (method, K, T), nothing run."""
    head = ('| method | K | T | status | arguments (MB) | outputs (MB) | temporaries (MB) | aliased (MB) | input (MB) | '
            'weights + Adam, in and out (MB) | step memory without input (MB) | method\'s own (MB) | '
            'predicted state (MB) | compile (s) | peak RSS (MB) |')
    lines = [head, '|' + '---|' * 15]
    for r in rows:
        status = r['status'] if r['status'] == 'ok' else f"{r['status']}: {r.get('reason') or ''}"[:70]
        lines.append(f"| {r['method_name']} | {k_text(r)} | {r['T']} | {status} | {fmt(r.get('xla_args_mb'), '.5g')} | "
                     f"{fmt(r.get('xla_out_mb'), '.5g')} | {fmt(r.get('xla_temp_mb'), '.5g')} | "
                     f"{fmt(r.get('xla_alias_mb'), '.4g')} | {fmt(r.get('input_mb'), '.5g')} | "
                     f"{fmt(r.get('weights_opt_mb'), '.4g')} | {fmt(r.get('step_mb'), '.5g')} | "
                     f"{fmt(r.get('method_mb'), '.5g')} | {fmt(r.get('predicted_state_mb'), '.4g')} | "
                     f"{fmt(r.get('compile_s'), '.2g')} | {fmt(r.get('peak_rss_mb'), '.4g')} |")
    return '\n'.join(lines)


def default_rows(rows: list) -> list:
    """The rows of each method's default configuration (BPTT; the online methods at auto or, where the
    sweep has no auto row, their largest K): what the speed targets compare."""
    best = {}
    for r in rows:
        key = (r['method'], r['T'])
        rank = (r.get('trace_chunk_requested') in ('auto', None), r.get('trace_chunk') or 0)
        if key not in best or rank > best[key][0]:
            best[key] = (rank, r)
    return [v[1] for v in best.values()]


def speed_targets(rows: list) -> dict:
    """The speed targets (docs/memory-and-speed.md), evaluated at the longest T that BPTT and the other
    method completed."""
    ok = {(r['method'], r['T']): r for r in default_rows([r for r in rows if r['status'] == 'ok'])
          if r.get('step_s') is not None}
    out = {}
    bptt_T = sorted(T for (m, T) in ok if m == 'bptt')
    if bptt_T:
        b = ok[('bptt', bptt_T[-1])]
        if b.get('frac_of_matmul') is not None:
            out['bptt_frac_of_matmul'] = dict(T=b['T'], value=b['frac_of_matmul'],
                                              target=f'>= {BPTT_MIN_FRAC_OF_MATMUL:g}',
                                              met=b['frac_of_matmul'] >= BPTT_MIN_FRAC_OF_MATMUL)
    for method, key in (('expsm_diag', 'esdrtrl_over_bptt'), ('diag', 'drtrl_over_bptt')):
        limit = MAX_STEP_TIME_OVER_BPTT[method]
        common = sorted(T for (m, T) in ok if m == method and ('bptt', T) in ok)
        if common:
            T = common[-1]
            ratio = ok[(method, T)]['step_s'] / ok[('bptt', T)]['step_s']
            out[key] = dict(T=T, value=ratio, target=f'<= {limit:g}', met=ratio <= limit)
    return out


def memory_growth(rows: list) -> dict:
    """Per (method, K of --trace_chunk; None for BPTT): step memory at the shortest and longest T measured,
    their ratio, and the growth per time step next to the predicted state's."""
    out = {}
    keys = list(dict.fromkeys(row_key(r) for r in rows))
    for key in sorted(keys, key=lambda k: (methods.ordered(methods.names()).index(k[0]), str(k[1]))):
        rs = sorted([r for r in rows if row_key(r) == key and r.get('step_mb') is not None], key=lambda r: r['T'])
        if len(rs) < 2:
            continue
        a, b = rs[0], rs[-1]
        out[key[0] if key[1] is None else f'{key[0]} K={key[1]}'] = dict(method=key[0], K=key[1], T_min=a['T'], T_max=b['T'], mb_T_min=a['step_mb'], mb_T_max=b['step_mb'],
                           ratio=b['step_mb'] / a['step_mb'],
                           mb_per_step=(b['step_mb'] - a['step_mb']) / (b['T'] - a['T']),
                           predicted_mb_per_step=(b['predicted_state_mb'] - a['predicted_state_mb']) / (b['T'] - a['T']))
    return out


def plot(rows: list, cfg: dict, probe_info: dict, path: str):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    on_device = any(r.get('device_peak_minus_input_mb') for r in rows)
    mem_key = 'device_peak_minus_input_mb' if on_device else 'step_mb'
    mem_label = ('device peak memory - input (MB)' if on_device
                 else 'compiled step memory - input (MB)')
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    keys = list(dict.fromkeys(row_key(r) for r in rows))
    for method, K in sorted(keys, key=lambda k: (methods.ordered(methods.names()).index(k[0]), str(k[1]))):
        rs = sorted([r for r in rows if row_key(r) == (method, K)], key=lambda r: r['T'])
        c = methods.color(method)
        name = methods.title(method) + ('' if K is None else f' K={K}')
        ok = [r for r in rs if r['status'] == 'ok' or (r.get(mem_key) is not None and r['status'] == 'OOM')]
        pts = [(r['T'], r[mem_key]) for r in ok if r.get(mem_key) is not None]
        style = 's-' if K in ('1', 1) else 'o-'  # K = 1 squares, the chunked default circles
        if pts:
            axes[0].plot(*zip(*pts), style, color=c, label=f'{name} ({"memory" if K in ("1", 1) else "speed" if K else "baseline"})',
                         alpha=1. if K not in ('1', 1) else 0.7)
        if K in (None, '1', 1):
            axes[0].plot([r['T'] for r in rs], [r['predicted_state_mb'] for r in rs], '--', color=c, alpha=0.6,
                         label=f'{methods.title(method)} predicted state')
        fails = [r for r in rs if r['status'] != 'ok']
        for r in fails:
            axes[0].annotate(r['status'], (r['T'], r.get(mem_key) or r['predicted_state_mb']), color=c,
                             fontsize=8, ha='center')
        t_pts = [(r['T'], r['step_s']) for r in rs if r['status'] == 'ok']
        if t_pts:
            axes[1].plot(*zip(*t_pts), style, color=c, label=name)
        f_pts = [(r['T'], 100 * r['frac_of_matmul']) for r in rs if r.get('frac_of_matmul')]
        if f_pts:
            axes[2].plot(*zip(*f_pts), style, color=c, label=name)
    fixed = 2 * 3 * 4. * n_params(cfg) / MB
    axes[0].axhline(fixed, color='gray', ls=':', lw=1,
                    label='weights + Adam moments, in and out (every method)')
    axes[0].set(xlabel='sequence length T', ylabel=mem_label, yscale='log', title='peak memory of one training step')
    axes[1].set(xlabel='sequence length T', ylabel='seconds per training step (median)', yscale='log',
                title='time of one training step after compilation')
    axes[2].set(xlabel='sequence length T', ylabel='% of float32 matmul GFLOP/s',
                title=f"model matmul FLOP/s vs machine ({fmt(probe_info.get('matmul_gflops'), '.0f')} GFLOP/s)")
    for ax in axes:
        ax.grid(alpha=0.3, which='both')
        ax.legend(fontsize=8)
    fig.suptitle(f"{cfg['n_layer']} x {cfg['n_rec']} {cfg['model']}, {cfg['n_in']} inputs, batch {cfg['batch_size']}, "
                 f"{probe_info.get('device')} ({cfg['preset']} preset)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
