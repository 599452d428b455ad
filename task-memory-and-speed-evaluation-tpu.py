"""Memory and speed of one training step against sequence length, for BPTT, D-RTRL and ES-D-RTRL.

    python task-memory-and-speed-evaluation-tpu.py                      # the whole sweep, best device
    python task-memory-and-speed-evaluation-tpu.py --methods bptt,diag --lengths 50,100
    python task-memory-and-speed-evaluation-tpu.py --analysis_only --preset paper   # XLA's analysis, no step run
    python task-memory-and-speed-evaluation-tpu.py --preset smoke   # seconds: BPTT's memory grows with T, ES-D-RTRL's not

The online methods are measured in two configurations, each a row with its trace_chunk: K = 1
(brainscale step by step, the paper's algorithm: the least memory) and the default, `auto` (K steps at a
time for speed, K chosen so that its K-step buffers fit a budget: utils.auto_trace_chunk).

On a GPU or TPU the default is the paper's network (3 x 512 LIF-delta, 32768 binary inputs with
p = 0.1, 11 classes, batch 128, T = 50 ... 1000); on a CPU a scaled preset (docs/memory-and-speed.md).
Every (method, T) is measured in a fresh process (this script with a hidden worker flag),
so that one measurement cannot leak into the next: the step that `Trainer` trains with is
compiled, its compile time and its compiled memory analysis are recorded, then it runs --repeats times
(median, block until ready). Running out of memory is a result (status OOM), not the end of the sweep.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import time

import utils

from rsnn import run_folder
from rsnn import methods
from rsnn.child_runs import classify_failure, killed_row, one_line, oom_kills  # noqa: F401 (tests use them here)
from rsnn.memory_measure import (RESULT_TAG, load_average, measure, pick_device, probe,  # noqa: F401 (used
                                 probe_main, worker_main)                               # here by tests, scripts)
from rsnn.memory_report import (complete_row, fmt, markdown_table, memory_growth, n_params, plot, speed_targets,
                                write_outputs)

SCRIPT = os.path.abspath(__file__)

PRESETS = {
    # The paper's configuration (DVS-Gesture-shaped input); needs an accelerator.
    'paper': dict(methods='bptt,expsm_diag,diag', lengths='50,100,200,300,400,600,800,1000', batch_size=128,
                  n_in=32768, n_rec=512, n_layer=3, n_out=11, repeats=5),
    # The same network on N-MNIST-sized input (34 x 34 x 2 = 2312), batch 32: the whole sweep in under
    # 10 minutes on 2 CPU cores, with the same shape (BPTT linear in T, the online methods flat).
    'cpu': dict(methods='bptt,expsm_diag,diag', lengths='25,50,100,200', batch_size=32,
                n_in=2312, n_rec=512, n_layer=3, n_out=11, repeats=3),
    # Seconds on any machine: BPTT and ES-D-RTRL (K = 1) on a toy network at T = 20 and 80, to see that BPTT's
    # step memory grows with T and ES-D-RTRL's does not.
    'smoke': dict(methods='bptt,expsm_diag', lengths='20,80', batch_size=4, n_in=64, n_rec=32, n_layer=1, n_out=3,
                  repeats=1, trace_chunk='1'),
}

# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------


def method_list(text: str):
    names = [m.strip() for m in text.split(',') if m.strip()]
    bad = [m for m in names if m not in methods.names()]
    if bad or not names:
        raise argparse.ArgumentTypeError(f'unknown method(s) {bad or text!r}; choose from {", ".join(methods.names())}')
    return names


def devices_flag(text: str) -> str:
    """--devices: 'auto' or what utils.parse_devices accepts (checked here, before anything is written)."""
    text = str(text).strip().lower()
    if text != 'auto':
        try:
            utils.parse_devices(text)
        except utils.UserError as e:
            raise utils.UserError(str(e).replace("'all' or 'cpu'", "'all', 'cpu' or 'auto'"))
    return text


def chunk_list(text: str):
    """--trace_chunk for the sweep: a comma list of K values ('auto' or positive integers)."""
    try:
        values = [utils.trace_chunk_arg(v) for v in str(text).split(',') if v.strip()]
    except (ValueError, argparse.ArgumentTypeError, utils.UserError):
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"expected a comma list of 'auto' and positive integers, got {text!r}")
    return list(dict.fromkeys(values))


def length_list(text: str):
    try:
        values = [int(v) for v in text.split(',') if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a comma list of positive integers, got {text!r}')
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f'expected a comma list of positive integers, got {text!r}')
    return values


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one."""

    def _get_help_string(self, action):
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def build_parser():
    """The defaults of the size flags are the paper's; --preset cpu (or auto on a CPU) replaces them."""
    paper = PRESETS['paper']
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], formatter_class=HelpFormatter)
    p.add_argument('--preset', choices=('auto', 'paper', 'cpu', 'smoke'), default='auto',
                   help='sizes to use: paper (accelerator), cpu (scaled down), auto = paper on a GPU/TPU, cpu on a '
                        'CPU, smoke = BPTT and ES-D-RTRL on a toy network at T = 20, 80 (seconds); explicit flags '
                        'override the preset')
    p.add_argument('--methods', type=method_list, default=paper['methods'],
                   help='comma list of ' + ', '.join(methods.names()))
    p.add_argument('--lengths', type=length_list, default=paper['lengths'],
                   help='comma list of sequence lengths T (cpu preset: 25,50,100,200)')
    p.add_argument('--batch_size', type=utils.positive_int, default=paper['batch_size'],
                   help='batch size (cpu preset: 32)')
    p.add_argument('--n_in', type=utils.positive_int, default=paper['n_in'],
                   help='binary input channels (128x128x2; cpu preset: 2312 = 34x34x2)')
    p.add_argument('--n_rec', type=utils.positive_int, default=paper['n_rec'], help='neurons per recurrent layer')
    p.add_argument('--n_layer', type=utils.positive_int, default=paper['n_layer'], help='recurrent layers')
    p.add_argument('--n_out', type=utils.positive_int, default=paper['n_out'], help='classes of the readout')
    p.add_argument('--repeats', type=utils.positive_int, default=paper['repeats'],
                   help='timed training steps after the warm-up step; the median is reported (cpu preset: 3)')
    p.add_argument('--density', type=float, default=0.1, help='probability that an input channel spikes in a step')
    p.add_argument('--etrace_decay', type=utils.decay_or_rank, default=0.9,
                   help='ES-D-RTRL decay in (0,1) or integer rank')
    p.add_argument('--model', choices=utils.MODEL_NAMES, default='lif-delta',
                   help='neuron/synapse model of the recurrent layers')
    p.add_argument('--trace_chunk', type=chunk_list, default='1,auto',
                   help="online methods: comma list of the K to measure each at (time steps per chunk of the "
                        "eligibility traces): 1 = brainscale step by step, the paper's algorithm (least memory); "
                        "auto = the training default (the largest K <= 64 whose K-step buffers fit the budget of "
                        "utils.auto_trace_chunk; docs/memory-and-speed.md); one row per method, T and distinct K. "
                        "Default: 1,auto")
    p.add_argument('--analysis_only', action='store_true',
                   help="compile each (method, T, K) against abstract shapes and record XLA's memory analysis "
                        "without running a step and without allocating the input or the chunked traces (any "
                        "size on a CPU; brainscale's K = 1 path still allocates its traces when it is built)")
    p.add_argument('--devices', type=devices_flag, default='auto',
                   help="auto = the first GPU/TPU if there is one, else the CPU; 'cpu'; an accelerator index; or "
                        "a comma list of indices / 'all': the batch split across several devices (memory per device)")
    p.add_argument('--out_dir', default=None,
                   help='run folder (default results/memory_speed/<timestamp>)')
    p.add_argument('--timeout', type=utils.positive_float, default=1800.,
                   help='seconds allowed to one (method, T) measurement; beyond it the row says timeout')
    p.add_argument('--memory_limit_mb', type=utils.positive_float, default=None,
                   help='treat a step whose compiled footprint (arguments incl. input, outputs, temporaries) '
                        'exceeds this as OOM without running it (emulates a smaller device)')
    p.add_argument('--seed', type=int, default=0, help='seed of the weights and of the input spikes')
    p.add_argument('--input_on_device', action='store_true',
                   help='draw the input spikes on the device (jax.random) instead of the host (numpy): an input '
                        'of the paper size at T = 1000 is 16.8 GB of float32')
    p.add_argument('--no_plot', action='store_true', help='skip memory_and_time.png')
    p.add_argument('--_worker', default=None, help=argparse.SUPPRESS)
    p.add_argument('--_probe', default=None, help=argparse.SUPPRESS)
    return p


def auto_preset(platform: str) -> str:
    """What --preset auto means on this platform."""
    return 'cpu' if platform == 'cpu' else 'paper'


def parse_args(argv=None, platform: str = None):
    """run_folder.parse_args: explicit flags > --preset > defaults. --preset auto needs the platform, which
    only the probe process knows: until then (platform None) auto reads as paper, and run_sweep parses
    `args.argv` again with the platform."""
    argv = sys.argv[1:] if argv is None else list(argv)
    presets = dict(PRESETS, auto=PRESETS[auto_preset(platform)] if platform else {})
    args = run_folder.parse_args(build_parser(), argv, presets)
    args.argv = argv
    return args


# --------------------------------------------------------------------------------------------
# Parent side: the sweep
# --------------------------------------------------------------------------------------------


def child_env(devices: str) -> dict:
    env = dict(os.environ)
    env.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')  # measure what the step needs, not a reservation
    if devices == 'cpu':
        env['JAX_PLATFORMS'] = 'cpu'
    env.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    return env


_WARNED = set()


def forward_warnings(stderr: str):
    """Repeat a child's own warning lines (such as a missing --devices) on our stderr, each once."""
    for line in (stderr or '').splitlines():
        if line.startswith('warning:') and line not in _WARNED:
            _WARNED.add(line)
            print(line, file=sys.stderr, flush=True)


def run_child(flag: str, payload: dict, timeout: float, devices: str):
    """Run this script with a hidden flag in a fresh process; returns (result dict or None, failure row)."""
    cmd = [sys.executable, SCRIPT, flag, json.dumps(payload)]
    oom_before = oom_kills()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=child_env(devices),
                              cwd=os.path.dirname(SCRIPT))
    except subprocess.TimeoutExpired:
        return None, dict(status='timeout', reason=f'no result within --timeout {timeout:g} s')
    forward_warnings(proc.stderr)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):]), None
    if proc.returncode < 0:
        return None, killed_row(-proc.returncode, oom_before, oom_kills())
    text = proc.stderr or proc.stdout or f'exit code {proc.returncode}'
    return None, dict(status=classify_failure(text), reason=one_line(text))


def resolve_devices(spec: str, platform: str) -> str:
    """--devices auto as the device the probe found: 'cpu' on a CPU, else accelerator 0 (the first GPU/TPU,
    as pick_device chooses); any other value as given."""
    if spec != 'auto':
        return spec
    return 'cpu' if platform == 'cpu' else '0'


def resolve_config(args, platform: str) -> dict:
    preset = args.preset if args.preset != 'auto' else auto_preset(platform)
    if args.preset == 'auto':  # the preset's values now that the platform is known (flags still win)
        args = parse_args(args.argv, platform)
    cfg = dict(preset=preset)
    for key in ('batch_size', 'n_in', 'n_rec', 'n_layer', 'n_out', 'repeats', 'methods', 'lengths'):
        cfg[key] = getattr(args, key)
    cfg.update(density=args.density, etrace_decay=args.etrace_decay, model=args.model, seed=args.seed,
               trace_chunks=args.trace_chunk, analysis_only=bool(args.analysis_only),
               input_on_device=bool(args.input_on_device),
               devices=resolve_devices(args.devices, platform), timeout=args.timeout,
               memory_limit_mb=args.memory_limit_mb)
    return cfg


def sweep_plan(cfg: dict) -> list:
    """(method, K) in the order of the sweep: BPTT once, each online method at each K of --trace_chunk."""
    plan = []
    for method in cfg['methods']:
        ks = cfg['trace_chunks'] if methods.get(method).chunked else [None]
        plan += [(method, K) for K in ks]
    return plan


def run_sweep(args, out_dir: str) -> dict:
    """The whole sweep; writes results.csv, results.json, results.md, memory_and_time.png into out_dir.
    Returns {'config', 'machine', 'rows', 'targets', 'memory_growth', 'out_dir'}."""
    open_out_dir(out_dir)
    probe_info, failure = run_child('--_probe', dict(devices=args.devices), args.timeout, args.devices)
    if probe_info is None:
        raise utils.UserError(f"could not start jax on --devices {args.devices}: {failure['reason']}")
    cfg = resolve_config(args, probe_info['platform'])
    utils.check_batch_for_devices(cfg['batch_size'], cfg['devices'])  # auto is resolved by now
    print_setup(cfg, probe_info, out_dir)
    rows = measure_all(cfg, probe_info, out_dir)
    probe_info['load_avg_end'] = load_average()
    targets = speed_targets(rows)
    growth = memory_growth(rows)
    write_outputs(out_dir, cfg, probe_info, rows, dict(speed=targets, memory_growth=growth))
    table = markdown_table(rows, cfg.get('analysis_only'))
    with open(os.path.join(out_dir, 'results.md'), 'w') as f:
        f.write(table + '\n')
    if not args.no_plot:
        plot(rows, cfg, probe_info, os.path.join(out_dir, 'memory_and_time.png'))
    print_summary(table, growth, {} if cfg['preset'] == 'smoke' else targets, probe_info)
    print(f'results in {out_dir}: results.csv, results.json, results.md'
          + ('' if args.no_plot else ', memory_and_time.png'))
    return dict(config=cfg, machine=probe_info, rows=rows, targets=targets, memory_growth=growth, out_dir=out_dir)


def open_out_dir(out_dir: str):
    """A new (or sweep-free) out_dir, created; an interruption from here on says where the rows are."""
    earlier = [n for n in ('results.csv', 'results.json') if os.path.exists(os.path.join(out_dir, n))]
    if earlier:
        raise utils.UserError(f'--out_dir {out_dir} already holds a sweep ({earlier[0]}); give another --out_dir '
                              f'(its rows are kept as they are)')
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise utils.UserError(f'cannot create --out_dir {out_dir}: {e.strerror or e}; give a writable folder')
    from rsnn import interrupts
    interrupts.set_describe(lambda signum: f'interrupted ({signal.Signals(signum).name}): the rows measured so far are in '
                                           f'{out_dir}/results.csv; a sweep has no --resume: run it again with another '
                                           f'--out_dir (or fewer --lengths / --methods)')


def print_setup(cfg: dict, probe_info: dict, out_dir: str):
    print(f"device: {probe_info['device']} ({probe_info['platform']}, {probe_info['n_cpu']} CPU cores, load average "
          f"{probe_info['load_avg']}), float32 matmul {probe_info['matmul_gflops']:.1f} GFLOP/s "
          f"({probe_info['matmul_n']}^3)")
    preset_note = ' (scaled down for a CPU; the paper size needs a GPU/TPU: --preset paper)' \
        if cfg['preset'] == 'cpu' else ''
    print(f"preset {cfg['preset']}{preset_note}: {cfg['n_layer']} x {cfg['n_rec']} {cfg['model']}, "
          f"{cfg['n_in']} inputs (p = {cfg['density']}), {cfg['n_out']} classes, batch {cfg['batch_size']}, "
          f"{n_params(cfg)} weights; T in {cfg['lengths']}; methods {cfg['methods']}; "
          f"median of {cfg['repeats']} steps; run folder {out_dir}", flush=True)


def measure_all(cfg: dict, probe_info: dict, out_dir: str) -> list:
    """Each (method, K, T) of the plan in its own process, the outputs rewritten after each row."""
    rows = []
    for method, K in sweep_plan(cfg):
        for T in cfg['lengths']:
            payload = dict(cfg, method=method, T=T, trace_chunk=K)
            t0 = time.perf_counter()
            result, failure = run_child('--_worker', payload, cfg['timeout'], cfg['devices'])
            row = complete_row(result or dict(method=method, T=T, trace_chunk_requested=K, **failure), cfg,
                               probe_info)
            if any(r['method'] == method and r['T'] == T and r.get('trace_chunk') == row.get('trace_chunk')
                   and r['status'] == row['status'] for r in rows):
                continue  # two K of --trace_chunk that came to the same K (auto = 1 where no chunked path)
            rows.append(row)
            write_outputs(out_dir, cfg, probe_info, rows)
            K_txt = f" K={row.get('trace_chunk') or K}" if methods.get(method).chunked else ''
            print(f"{methods.title(method):>9}{K_txt} T={T:<5} {row_line(row, cfg)}  "
                  f"[{time.perf_counter() - t0:.0f} s]", flush=True)
    return rows


def row_line(row: dict, cfg: dict) -> str:
    """One measurement as the sweep prints it."""
    if cfg.get('analysis_only') and row['status'] == 'ok':
        return (f"compiled only: step memory {fmt(row['step_mb'], '.4g')} MB (method's own "
                f"{fmt(row['method_mb'], '.4g')} MB, weights and Adam {fmt(row['weights_opt_mb'], '.4g')} MB, "
                f"input {fmt(row['input_mb'], '.4g')} MB), compile {row['compile_s']:.2g} s, peak RSS "
                f"{fmt(row.get('peak_rss_mb'), '.4g')} MB")
    if row['status'] == 'ok':
        return (f"step {row['step_s']:.4g} s ({row['ms_per_time_step']:.3g} ms per time step, "
                f"{row['gflops']:.1f} GFLOP/s), compile {row['compile_s']:.2g} s, step memory "
                f"{fmt(row['step_mb'], '.4g')} MB (predicted state {row['predicted_state_mb']:.4g} MB)")
    return f"{row['status']}: {row['reason']}"


def print_summary(table: str, growth: dict, targets: dict, probe_info: dict):
    print()
    print(table)
    print()
    for g in growth.values():
        method, K = g['method'], g['K']
        print(f"memory {methods.title(method)}{'' if K is None else f' K={K}'}: {g['mb_T_min']:.4g} MB at T={g['T_min']} -> {g['mb_T_max']:.4g} MB "
              f"at T={g['T_max']} (x{g['ratio']:.2f}; {g['mb_per_step']:.3g} MB per time step, predicted state "
              f"{g['predicted_mb_per_step']:.3g})")
    for key, t in targets.items():
        print(f"speed target {key} (docs/memory-and-speed.md, set for the CPU preset): {t['value']:.3g} "
              f"at T={t['T']} (target {t['target']}): {'met' if t['met'] else 'NOT met'}")
    if probe_info['platform'] == 'cpu':
        print(f"load average {probe_info['load_avg']} at the start, {probe_info['load_avg_end']} at the end "
              f"({probe_info['n_cpu']} cores): timings are only as good as the machine was quiet")


def main(argv) -> int:
    args = parse_args(argv)
    if args._worker is not None:
        return worker_main(args._worker)
    if args._probe is not None:
        return probe_main(args._probe)
    if not 0 < args.density < 1:
        raise utils.UserError(f'--density must be in (0, 1), got {args.density}')
    out_dir = args.out_dir or os.path.join('results', 'memory_speed',
                                           datetime.datetime.now().strftime('%Y%m%d-%H%M%S'))
    run_sweep(args, out_dir)
    return 0


if __name__ == '__main__':
    utils.cli_main(main)
