"""Learning on a stream: the DMS task (1000 ms delay) as 32 endless streams, ES-D-RTRL and D-RTRL updating
online against truncated BPTT, and the memory each needs.

    python scripts/reproduce_stream.py                   # everything (see docs/stream.md for how long)
    python scripts/reproduce_stream.py --budget_min 25   # start no run after 25 minutes; run again to go on
    python scripts/reproduce_stream.py --tiny            # the same code path at toy sizes (CI)

Every run is `task-rsnn-long-term-dependency.py --preset cpu-demo --protocol stream` (the paper's task
and network, batch 32 = 32 streams) with one method and one update interval, for the same stream length
(--stream_trials trials per stream), one process each (its peak RSS is the process's), in OUT/runs/; a
finished run folder is reused, an interrupted one resumed. Then the memory of one update, each in a fresh
process: XLA's memory analysis of the compiled update for TBPTT windows up to the whole stream (full BPTT,
which stops fitting: an OOM row, not run) and ES-D-RTRL, plus the peak RSS of ES-D-RTRL runs on a stream 4x
shorter. Written to OUT (default results/dms/stream/):

  table.md, table.csv        method, window / update interval, update memory (XLA), peak RSS, seconds per
                             1000 stream steps, held-out accuracy at the end, trials per stream to 0.9
  memory.md, memory.csv      memory of one update against the window (up to the whole stream) and the
                             peak RSS against the stream length
  accuracy_vs_stream.png     held-out accuracy against stream time
  accuracy_vs_memory.png     final held-out accuracy against the memory of one update
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from rsnn.files import write_json
from rsnn import run_folder  # (no jax at import time either)
from rsnn.child_runs import run_folder_state, run_task
from rsnn import methods
SCRIPT = os.path.join(ROOT, 'task-rsnn-long-term-dependency.py')

FULL = dict(
    base=['--preset', 'cpu-demo', '--protocol', 'stream', '--t_iti', '100-500', '--n_test_trials', '256',
          '--eval_every_trials', '25', '--no_progress'],
    stream_trials=400, short_trials=50,     # the memory check: ES-D-RTRL on a stream 8x shorter
    es_seeds=[0, 1, 2], update_every=500,
    tbptt_windows=[250, 500, 1000, 2000, 4000], tbptt_seeds=[0],
    drtrl_trials=4,                         # D-RTRL: ~45x slower per step, a capped budget
    best_tbptt_seeds=[],                    # more seeds for the best TBPTT window: none (time; docs/stream.md)
    control_trials=200,                     # the controls, against the first 200 trials of the main runs
    controls=[('bptt', 250, ['--A2', '0']),                   # no adaptation current: where the memory is
              ('expsm_diag', 2000, ['--stream_reset', '0']),   # a longer update interval
              ('expsm_diag', 500, ['--stream_reset', '1'])],   # a reset at every trial start (interference?)
    full_bptt_trials=[1, 4, 16, 64, 400],   # full BPTT over the stream, up to the whole of it (mean periods)
    run_limit_mb=4096,                      # memory rows: run one update when XLA says it needs less
)
TINY = dict(
    base=['--protocol', 'stream', '--t_fixation', '5', '--t_sample', '20', '--t_delay', '20', '--t_test', '20',
          '--n_rec', '12', '--batch_size', '4', '--t_iti', '5-15', '--n_test_trials', '8', '--eval_every_trials', '2',
          '--devices', 'cpu', '--no_progress'],
    stream_trials=4, short_trials=1, es_seeds=[0], update_every=30, tbptt_windows=[20, 80], tbptt_seeds=[0],
    drtrl_trials=2, full_bptt_trials=[1, 4], run_limit_mb=4096, best_tbptt_seeds=[1], control_trials=3,
    controls=[('expsm_diag', 30, ['--stream_reset', '1'])],
)


def launch(run_dir: str, flags: list, log_path: str, trials: int) -> dict:
    """Run the task script once (or resume it; or extend a finished run on a shorter stream to `trials`
    trials per stream: the same stream goes on); returns its summary with the process's peak RSS."""
    state = run_folder_state(run_dir)
    if state == 'finished':
        with open(os.path.join(run_dir, 'summary.json')) as f:
            summary = json.load(f)
        if summary.get('stream_trials', trials) >= trials:
            return summary
        os.remove(os.path.join(run_dir, 'summary.json'))
        state = 'interrupted'
    if state == 'interrupted':
        argv = ['--resume', run_dir, '--no_progress', '--stream_trials', str(trials)]
    else:
        argv = flags + ['--out_dir', run_dir]
    summary = run_task(SCRIPT, argv, run_dir, log_path, ROOT)
    flags = flags[:flags.index('--stream_trials')] + ['--stream_trials', str(trials)] + \
        flags[flags.index('--stream_trials') + 2:]
    summary['command'] = 'python task-rsnn-long-term-dependency.py ' + ' '.join(shlex.quote(c) for c in flags)
    write_json(os.path.join(run_dir, 'summary.json'), summary)
    return summary


def read_csv(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def fmt(v, digits=3):
    if v is None or v == '':
        return '-'
    if isinstance(v, float):
        return f'{v:.{digits}g}' if abs(v) >= 10 ** digits else f'{v:.{digits}f}'.rstrip('0').rstrip('.') \
            if digits > 3 else f'{v:.3f}'
    return str(v)


def write_table(rows: list, columns: list, stem: str, title: str):
    with open(stem + '.csv', 'w', newline='') as f:
        fields = list(dict.fromkeys([c for r in rows for c in r] or columns))  # every row's fields (a failed row has fewer)
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    with open(stem + '.md', 'w') as f:
        f.write(f'{title}\n\n| ' + ' | '.join(columns) + ' |\n|' + '---|' * len(columns) + '\n')
        for r in rows:
            f.write('| ' + ' | '.join(fmt(r.get(c)) for c in columns) + ' |\n')


# -- the memory of one update, in a fresh process ---------------------------------------------------

def measure_update(spec: dict) -> dict:
    """Worker: build the network of `spec['flags']`, compile the stream update for chunks of spec['steps']
    steps and read XLA's memory analysis; run it once (peak RSS) when it needs less than spec['run_limit_mb']."""
    import resource
    task = load_task()
    args = run_folder.parse_args(task.build_parser(), spec['flags'], task.PRESETS)
    import brainstate
    from rsnn import datasets
    from rsnn import models
    from rsnn.trainer import Trainer
    from rsnn.update_memory import stream_update_memory
    brainstate.environ.set(dt=args.dt)
    cfg = datasets.DMSConfig(dt=args.dt, t_fixation=args.t_fixation, t_sample=args.t_sample, t_delay=args.t_delay,
                             t_test=args.t_test)
    model = models.DMSNet(cfg.n_input, args.n_rec, cfg.n_output, dt=args.dt, tau_neu=args.tau_neu,
                          tau_syn=args.tau_syn, tau_I2=args.tau_I2, A2=args.A2, ff_scale=args.ff_scale,
                          rec_scale=args.rec_scale, spk_fun=args.spk_fun, syn_gain=args.syn_gain, tau_o=args.tau_o,
                          readout_scale=args.readout_scale, seed=args.seed)
    st = Trainer(model, args.method, cfg.n_input, args.batch_size, etrace_decay=args.etrace_decay,
                          trace_chunk=args.trace_chunk, protocol='stream')
    m = stream_update_memory(st, spec['steps'], cfg.n_input)
    need = (m['temp_bytes'] + m['argument_bytes'] + m['output_bytes'] - m['alias_bytes']) / 2 ** 20
    row = dict(update_memory_mb=need, update_temp_mb=m['temp_bytes'] / 2 ** 20, status='ok')
    if need > spec['machine_mb']:
        row['status'] = f'OOM: needs {need / 1024:.1f} GB > the machine\'s {spec["machine_mb"] / 1024:.0f} GB'
    elif need <= spec['run_limit_mb']:
        from rsnn import dms_stream
        stream = dms_stream.DMSStream(cfg, args.batch_size, spec['steps'], args.seed, dms_stream.parse_iti(args.t_iti))
        st.train_chunk(stream.chunk(0))  # compiles
        times = []
        for k in range(1, 4 if spec['steps'] <= 20000 else 2):
            chunk = stream.chunk(k)
            t0 = time.perf_counter()
            st.train_chunk(chunk)
            times.append(time.perf_counter() - t0)
        row['s_per_1000_steps'] = float(sorted(times)[len(times) // 2]) * 1000. / spec['steps']
        row['peak_rss_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.
    else:
        row['status'] = 'not run (above --run_limit_mb)'
    return row


def load_task():
    import importlib.util
    spec = importlib.util.spec_from_file_location('dms_task', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def machine_mb() -> float:
    with open('/proc/meminfo') as f:
        for line in f:
            if line.startswith('MemTotal:'):
                return int(line.split()[1]) / 1024.
    return float('inf')


def memory_row(spec: dict, out: str) -> dict:
    """measure_update in a fresh process; a crash (the kernel's OOM killer) is an OOM row."""
    cmd = [sys.executable, os.path.abspath(__file__), '--worker', json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    with open(os.path.join(out, 'memory.log'), 'a') as log:
        log.write(' '.join(shlex.quote(c) for c in cmd) + '\n' + proc.stdout + proc.stderr[-3000:] + '\n')
    lines = [l for l in proc.stdout.splitlines() if l.startswith('{')]
    if proc.returncode != 0 or not lines:
        return dict(status=f'failed (exit {proc.returncode}; memory.log)')
    return json.loads(lines[-1])


# -- runs, table, figures ------------------------------------------------------------------------------

def plan(P: dict) -> list:
    """(group, method, interval ms, seed, stream trials) of every training run, in the order they run."""
    runs = [('main', 'expsm_diag', P['update_every'], s, P['stream_trials']) for s in P['es_seeds']]
    runs += [('main', 'bptt', w, s, P['stream_trials']) for w in P['tbptt_windows'] for s in P['tbptt_seeds']]
    runs += [('short', 'expsm_diag', P['update_every'], P['es_seeds'][0], P['short_trials'])]
    runs += [('main', 'diag', P['update_every'], 0, P['drtrl_trials'])]
    return runs


def flags_of(P, method, interval, seed, trials, more=()) -> list:
    interval_flag = '--tbptt_window' if method == 'bptt' else '--update_every'
    return P['base'] + ['--method', method, interval_flag, str(interval), '--seed', str(seed),
                        '--stream_trials', str(trials)] + list(more)


def later_runs(P, rows) -> list:
    """After the plan: more seeds for the best TBPTT window, then the controls (group, method, interval,
    seed, trials, extra flags)."""
    tbptt = [r for r in rows if r['group'] == 'main' and r['method'] == 'BPTT' and r['final_test_acc'] is not None]
    runs = []
    if tbptt:
        best = max(tbptt, key=lambda r: r['final_test_acc'])['update_ms']
        runs += [('main', 'bptt', best, s, P['stream_trials'], ()) for s in P['best_tbptt_seeds']]
    runs += [('control', m, interval, P['es_seeds'][0], P['control_trials'], tuple(more))
             for m, interval, more in P['controls']]
    return runs


def write_outputs(P, out, rows):
    main_rows = [r for r in rows if r['group'] == 'main']
    write_table(main_rows, TABLE_COLUMNS, os.path.join(out, 'table'),
                f'DMS on a stream ({P["stream_trials"]} trials per stream unless said), held-out stream accuracy')
    plot_stream(main_rows, os.path.join(out, 'accuracy_vs_stream.png'))
    plot_memory(main_rows, os.path.join(out, 'accuracy_vs_memory.png'))
    controls = [dict(r, test_acc_at_control_trials=acc_at(r, P['control_trials'])) for r in rows
                if r['group'] != 'main' or r['method'] == 'ES-D-RTRL' or (r['method'] == 'BPTT' and r['update_ms'] == 250)]
    write_table(controls, ['group', 'method', 'update_ms', 'flags', 'seed', 'stream_trials', 'peak_rss_mb',
                           'test_acc_at_control_trials', 'final_test_acc', 'best_test_acc',
                           'trials_per_stream_to_0_9', 'seconds'],
                os.path.join(out, 'controls'), 'Controls: no adaptation current (A2 = 0), the update interval, the '
                'stream length')


def acc_at(row, trials):
    """Held-out accuracy at the evaluation nearest to `trials` trials per stream (none past the run's end)."""
    metrics = read_csv(os.path.join(ROOT, row['run_dir'], 'metrics.csv'))
    near = [m for m in metrics if float(m['trials_per_stream']) <= trials + 1]
    return float(min(near, key=lambda m: abs(float(m['trials_per_stream']) - trials))['test_acc']) if near else None


def row_of(group, method, interval, seed, trials, run_dir, summary, more=()) -> dict:
    return dict(group=group, method=methods.title(method), update_ms=interval, flags=' '.join(more), seed=seed,
                stream_trials=trials,
                update_memory_mb=summary.get('update_memory_mb'), peak_rss_mb=summary.get('peak_rss_mb'),
                s_per_1000_steps=summary.get('s_per_1000_steps'), final_test_acc=summary.get('test_acc'),
                best_test_acc=summary.get('best_test_acc'), rolling_train_acc=summary.get('rolling_train_acc'),
                trials_per_stream_to_0_9=summary.get('trials_per_stream_to_0_9'), seconds=summary.get('seconds'),
                run_dir=os.path.relpath(run_dir, ROOT), command=summary.get('command'))


TABLE_COLUMNS = ['method', 'update_ms', 'seed', 'stream_trials', 'update_memory_mb', 'peak_rss_mb',
                 's_per_1000_steps', 'final_test_acc', 'best_test_acc', 'trials_per_stream_to_0_9', 'seconds']


def plot_stream(rows: list, path: str):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = ['-', '--', ':', '-.', (0, (1, 1)), (0, (5, 1))]
    by_method = {}
    for r in rows:
        metrics = read_csv(os.path.join(ROOT, r['run_dir'], 'metrics.csv'))
        key = 'bptt' if r['method'] == 'BPTT' else ('diag' if r['method'] == 'D-RTRL' else 'expsm_diag')
        by_method.setdefault(key, []).append(r)
        label = (f"TBPTT {r['update_ms']:g} ms" if key == 'bptt' else f"{r['method']} (update {r['update_ms']:g} ms)") \
            + f", seed {r['seed']}"
        ax.plot([float(m['stream_s']) for m in metrics], [float(m['test_acc']) for m in metrics],
                color=methods.color(key), ls=styles[(len(by_method[key]) - 1) % len(styles)], marker='.', label=label)
    ax.axhline(0.9, color='gray', lw=0.8)
    ax.set_xlabel('stream time (s) per stream')
    ax.set_ylabel('held-out accuracy (stream, no resets)')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_memory(rows: list, path: str):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r in rows:
        key = 'bptt' if r['method'] == 'BPTT' else ('diag' if r['method'] == 'D-RTRL' else 'expsm_diag')
        if r['update_memory_mb'] is None or r['final_test_acc'] is None:
            continue
        ax.scatter(r['update_memory_mb'], r['final_test_acc'], color=methods.color(key), s=40)
        name = f"TBPTT {r['update_ms']:g}" if key == 'bptt' else r['method']
        ax.annotate(name, (r['update_memory_mb'], r['final_test_acc']), fontsize=7, xytext=(4, 3),
                    textcoords='offset points')
    ax.set_xscale('log')
    ax.set_xlabel('memory of one update (MB, XLA memory analysis)')
    ax.set_ylabel('held-out accuracy at the end of the stream')
    ax.axhline(0.9, color='gray', lw=0.8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def memory_rows(P, out, runs_rows) -> list:
    """One fresh process per row: the update of every (method, interval) of the runs (memory, peak RSS and
    time per 1000 steps, the CPU to itself), full BPTT over ever longer stretches of the stream up to the
    whole of it, and the peak RSS of the ES-D-RTRL runs against the stream length."""
    rows = []
    base = P['base'] + ['--seed', '0']
    period = json.load(open(os.path.join(ROOT, runs_rows[0]['run_dir'], 'config.json')))['mean_period_steps']
    mb = machine_mb()

    def measure(what, method, steps, trials=None):
        spec = dict(flags=base + ['--method', method], steps=int(steps), machine_mb=mb, run_limit_mb=P['run_limit_mb'])
        row = dict(what=what, method=methods.title(method), window_steps=int(steps), stream_trials=trials,
                   **memory_row(spec, out))
        print(row, flush=True)
        rows.append(row)

    for method, interval in dict.fromkeys((KEYS[r['method']], r['update_ms']) for r in runs_rows if r['group'] == 'main'):
        measure('TBPTT window' if method == 'bptt' else 'online update', method, interval)
    for n in P['full_bptt_trials']:
        measure('full BPTT over the stream', 'bptt', round(n * period), n)
    for r in runs_rows:  # peak RSS of whole runs against the stream length (ES-D-RTRL seed 0)
        if r['method'] == 'ES-D-RTRL' and r['seed'] == P['es_seeds'][0] and not r['flags'] and \
                r['update_ms'] == P['update_every']:
            rows.append(dict(what='ES-D-RTRL run (peak RSS of the whole run)', method='ES-D-RTRL',
                             window_steps=r['update_ms'], stream_trials=r['stream_trials'],
                             update_memory_mb=r['update_memory_mb'], peak_rss_mb=r['peak_rss_mb'], status='ok'))
    return rows


KEYS = {m.title: m.name for m in methods.TABLE.values()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description='DMS on a stream: ES-D-RTRL, D-RTRL and truncated BPTT (make reproduce-stream)')
    p.add_argument('--tiny', action='store_true', help='toy sizes, the same code path (CI)')
    p.add_argument('--out', default=os.path.join(ROOT, 'results', 'dms', 'stream'), help='output folder')
    p.add_argument('--parts', default='runs,memory', help='comma list of runs, memory')
    p.add_argument('--budget_min', type=float, default=float('inf'),
                   help='start no new run after this many minutes (the CPU is shared: run the script again '
                        'later, finished runs are reused and an interrupted one resumed)')
    p.add_argument('--worker', default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(measure_update(json.loads(a.worker))), flush=True)
        return 0
    P = TINY if a.tiny else FULL
    t_start, complete = time.time(), True
    out = os.path.abspath(a.out)
    os.makedirs(os.path.join(out, 'runs'), exist_ok=True)
    rows = []
    todo = [run + ((),) for run in plan(P)]
    later_planned = False
    while todo:
        group, method, interval, seed, trials, more = todo.pop(0)
        name = f'{method}-{interval:g}ms-seed{seed}' + ('-short' if group == 'short' else '') + \
            ''.join('-' + m.strip('-') for m in more)
        run_dir = os.path.join(out, 'runs', name)
        if 'runs' in a.parts and (time.time() - t_start) / 60. < a.budget_min:
            summary = launch(run_dir, flags_of(P, method, interval, seed, trials, more),
                             os.path.join(out, 'runs', name + '.log'), trials)
        elif run_folder_state(run_dir) == 'finished':
            summary = json.load(open(os.path.join(run_dir, 'summary.json')))
        else:
            summary = None
            if 'runs' in a.parts:
                complete = False
                print(f'not run: {name} (the --budget_min of this invocation is spent; run the script again)',
                      flush=True)
        if summary is not None and summary.get('stream_trials') == trials:
            rows.append(row_of(group, method, interval, seed, trials, run_dir, summary, more))
            write_outputs(P, out, rows)
        if not todo and not later_planned:  # the plan is done: the best TBPTT window is known
            later_planned = True
            todo = later_runs(P, rows)
    if 'memory' in a.parts and rows and complete:
        mrows = memory_rows(P, out, rows)
        write_table(mrows, ['what', 'method', 'window_steps', 'stream_trials', 'update_memory_mb', 'update_temp_mb',
                            'peak_rss_mb', 's_per_1000_steps', 'status'], os.path.join(out, 'memory'),
                    'One update in a fresh process: XLA memory analysis of the compiled update, peak RSS, time')
        timed = {(r['method'], r['window_steps']): r.get('s_per_1000_steps') for r in mrows
                 if r['what'] in ('online update', 'TBPTT window')}
        for r in rows:  # the time per 1000 steps measured with the CPU to itself, where there is one
            r['s_per_1000_steps'] = timed.get((r['method'], int(r['update_ms'])), r['s_per_1000_steps'])
        write_outputs(P, out, rows)
    print(f'wrote {out}', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
