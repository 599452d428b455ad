"""Where the time of one training step goes: XLA's own per-op timing of the compiled gradient of one batch
(docs/chunked-traces.md, "Where the time goes"), at the speed table's sizes.

    python benchmarks/profile_step.py --size image --batch 32 --T 100 --method bptt --out_dir DIR
    python benchmarks/profile_step.py --size dms --batch 32 --method diag --trace_chunk 64 --out_dir DIR
    python benchmarks/profile_step.py --tiny --size dms --method expsm_diag --out_dir /tmp/p   # toy size (tests)

The step is compiled, warmed up, timed --calls times without the profiler (median: the step's own time),
then run --calls times under jax.profiler with XLA CPU's per-op trace events (--xla_cpu_enable_xprof_traceme,
set by this script before jax starts). Every event of the XLA threads is summed per HLO op over the traced
calls; each op's shape and kind come from XLA's dump of the optimized HLO (--xla_dump_to, a temporary
folder). Also: the wall time of a traced call split into no op running (dispatch, loop control, waiting),
one op and two or more at once. The tracing itself costs time (a traced call is slower than an untraced
one), and a product that XLA hands to its thread pool is timed only while its caller waits: read the
shares, not the absolute sums. Writes profile.md and profile.csv into --out_dir (default
results/profile/<size>-<method>-B<batch>-<timestamp>).
"""
from __future__ import annotations

import argparse
import collections
import datetime
import glob
import os
import re
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SKIP = ('ThunkExecutor', 'Transpose', 'ThreadpoolListener')  # the runtime's own events, not ops


def parse_args(argv):
    from rsnn.cli import positive_int, trace_chunk_arg
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--size', choices=('dms', 'image'), default='image', help='the speed table network')
    p.add_argument('--batch', type=positive_int, default=32, help='batch size')
    p.add_argument('--T', type=positive_int, default=None, help='sequence length (default: the size\'s)')
    p.add_argument('--method', choices=('bptt', 'expsm_diag', 'diag'), default='bptt', help='the rule')
    p.add_argument('--trace_chunk', type=trace_chunk_arg, default='auto',
                   help='K of the online rules: an integer or auto')
    p.add_argument('--calls', type=positive_int, default=3, help='calls timed, and calls traced')
    p.add_argument('--top', type=positive_int, default=25, help='ops listed in profile.md')
    p.add_argument('--tiny', action='store_true', help='toy sizes, the same code path (for the tests)')
    p.add_argument('--out_dir', default=None, help='default results/profile/<size>-<method>-B<batch>-<time>')
    return p.parse_args(argv)


def hlo_ops(dump_dir: str) -> dict:
    """op name -> 'shape kind' from XLA's dump of the optimized modules."""
    out = {}
    for path in glob.glob(os.path.join(dump_dir, '*after_optimizations.txt')):
        with open(path) as f:
            for line in f:
                m = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ([\w-]+)\(', line)
                if m and m.group(1) not in out:
                    out[m.group(1)] = f'{m.group(2)} {m.group(3)}'
    return out


def read_trace(trace_dir: str):
    """(events of the XLA threads [(start, end, name)], the python-side calls [(start, end)])."""
    from jax._src.lib import _profile_data
    path = glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'), recursive=True)[0]
    events, calls = [], []
    for plane in _profile_data.ProfileData.from_file(path).planes:
        for line in plane.lines:
            for ev in line.events:
                if 'python' in line.name:
                    if 'block_until_ready' in ev.name:
                        calls.append((ev.start_ns, ev.start_ns + ev.duration_ns))
                elif not ev.name.startswith(SKIP):
                    events.append((ev.start_ns, ev.start_ns + ev.duration_ns, ev.name))
    return events, sorted(calls)


def concurrency(events, call) -> dict:
    """ms of the call with no op, one op and two or more ops running."""
    c0, c1 = call
    edges = sorted([(a, 1) for a, b, _ in events if a >= c0 and b <= c1] +
                   [(b, -1) for a, b, _ in events if a >= c0 and b <= c1])
    busy, running, last = [0., 0., 0.], 0, c0
    for t, d in edges:
        busy[min(running, 2)] += t - last
        last, running = t, running + d
    busy[0] += c1 - last
    return dict(call_ms=(c1 - c0) / 1e6, idle_ms=busy[0] / 1e6, one_op_ms=busy[1] / 1e6, two_ops_ms=busy[2] / 1e6)


def main(argv) -> int:
    args = parse_args(argv)
    dump = tempfile.mkdtemp(prefix='xla-dump-')
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_cpu_enable_xprof_traceme=true'
                               f' --xla_dump_to={dump} --xla_dump_hlo_as_text').strip()
    import jax
    import numpy as np
    import speed_table as st

    cfg = (st.TINY if args.tiny else st.SIZES)[args.size]
    T = args.T or cfg['T']
    fn, inputs, K = st.compiled_step(cfg, args.batch, T, args.method, 1 if args.method == 'bptt' else args.trace_chunk)
    untraced = st.timed(lambda: jax.block_until_ready(fn(*inputs)), args.calls)
    trace_dir = tempfile.mkdtemp(prefix='xla-trace-')
    with jax.profiler.trace(trace_dir):
        for _ in range(args.calls):
            jax.block_until_ready(fn(*inputs))
    events, calls = read_trace(trace_dir)
    shapes = hlo_ops(dump)
    total, count = collections.Counter(), collections.Counter()
    for a, b, name in events:
        total[name] += (b - a) / 1e6 / args.calls
        count[name] += 1
    spans = [concurrency(events, c) for c in calls[-args.calls:]]
    span = {k: float(np.median([s[k] for s in spans])) for k in spans[0]}
    op_ms = sum(total.values())

    label = f'{args.size}-{args.method}-B{args.batch}'
    out_dir = args.out_dir or os.path.join('results', 'profile',
                                           f"{label}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(out_dir, exist_ok=True)
    command = 'python benchmarks/profile_step.py ' + ' '.join(argv)
    lines = [f'`{command.strip()}`: {args.size} network, batch {args.batch}, T {T}, {args.method}, '
             f'K {K}; untraced {untraced * 1e3:.1f} ms per call (median of {args.calls}); '
             f"traced call {span['call_ms']:.1f} ms: no op running {span['idle_ms']:.1f} ms, one op "
             f"{span['one_op_ms']:.1f} ms, two or more {span['two_ops_ms']:.1f} ms; ops summed {op_ms:.1f} ms",
             '', '| op | shape and kind | ms per call | share of the ops | events per call |', '|---|---|---|---|---|']
    for name, ms in total.most_common(args.top):
        lines.append(f"| {name} | {shapes.get(name, '')} | {ms:.2f} | {100 * ms / op_ms:.1f} % | "
                     f"{count[name] / args.calls:g} |")
    with open(os.path.join(out_dir, 'profile.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    with open(os.path.join(out_dir, 'profile.csv'), 'w') as f:
        f.write('op,shape,ms_per_call,events_per_call\n')
        for name, ms in total.most_common():
            f.write(f"{name},\"{shapes.get(name, '')}\",{ms:.4f},{count[name] / args.calls:g}\n")
    print('\n'.join(lines[:2 + min(args.top, 12) + 2]))
    print(f'written: {out_dir}/profile.md, profile.csv')
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
