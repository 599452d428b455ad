"""Seconds per 1000 stream steps of the online rules on the DMS stream (the paper's network: 200 GIF neurons,
32 streams, one update per --update_every ms), chunked traces carried across updates against brainscale's
step-by-step path. The rules are timed in turns within one process (chunk after chunk, round robin), so that
a load on the machine falls on all of them alike; the ratio to ES-D-RTRL is the figure to quote.

    python scripts/stream_speed.py --out_dir results/stream-speed            # writes stream_speed.csv / .md
    python scripts/stream_speed.py --tiny --out_dir /tmp/s                   # toy sizes (seconds)
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import utils  # noqa: E402
from rsnn import methods  # noqa: E402


def build(method: str, trace_chunk: int, n_rec: int, streams: int, cfg):
    import brainstate
    import models
    from rsnn.trainer import Trainer
    brainstate.environ.set(dt=1.)
    model = models.DMSNet(cfg.n_input, n_rec, cfg.n_output, dt=1., tau_neu=100., tau_syn=100., tau_I2=1500.,
                          A2=1., ff_scale=6., rec_scale=2., syn_gain=0.3, seed=0)
    return Trainer(model, method, cfg.n_input, streams, etrace_decay=0.99, trace_chunk=trace_chunk,
                   protocol='stream')


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--out_dir', required=True, help='folder for stream_speed.csv and stream_speed.md')
    p.add_argument('--update_every', type=utils.positive_int, default=500, help='ms of stream per update')
    p.add_argument('--chunks', type=utils.positive_int, default=6, help='timed updates per configuration')
    p.add_argument('--configs', default='expsm_diag:64,diag:64,expsm_diag:1,diag:1',
                   help='method:K pairs to time (K = --trace_chunk; 1 = brainscale step by step)')
    p.add_argument('--tiny', action='store_true', help='toy sizes: 12 neurons, 4 streams, 60 ms updates')
    args = p.parse_args(argv)
    import datasets
    from rsnn import dms_stream
    cfg = datasets.DMSConfig()
    n_rec, streams, U = (12, 4, 60) if args.tiny else (200, 32, args.update_every)
    configs = [(m, int(k)) for m, k in (c.split(':') for c in args.configs.split(','))]
    for m, _ in configs:
        methods.get(m)
    stream = dms_stream.DMSStream(cfg, streams, U, seed=0)
    trainers = {c: build(c[0], c[1], n_rec, streams, cfg) for c in configs}
    for tr in trainers.values():
        tr.train_chunk(stream.chunk(0))  # compiles
    times = {c: [] for c in configs}
    for k in range(1, args.chunks + 1):
        chunk = stream.chunk(k)
        for c, tr in trainers.items():
            t0 = time.perf_counter()
            tr.train_chunk(chunk)
            times[c].append(time.perf_counter() - t0)
    os.makedirs(args.out_dir, exist_ok=True)
    ref = sorted(times[('expsm_diag', 64)] if ('expsm_diag', 64) in times else times[configs[0]])
    ref_s = 1000. / U * ref[len(ref) // 2]
    rows = []
    for (m, K), ts in times.items():
        ts = sorted(ts)
        s = 1000. / U * ts[len(ts) // 2]
        rows.append(dict(method=m, title=methods.title(m), trace_chunk=K, n_rec=n_rec, streams=streams, update_ms=U,
                         s_per_1000_steps=round(s, 4), min_s_per_1000_steps=round(1000. / U * ts[0], 4),
                         over_es_d_rtrl=round(s / ref_s, 3)))
    with open(os.path.join(args.out_dir, 'stream_speed.csv'), 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = ['| rule | K | s per 1000 stream steps (median) | min | / ES-D-RTRL (K 64) |', '|---|---|---|---|---|']
    lines += [f"| {r['title']} | {r['trace_chunk']} | {r['s_per_1000_steps']} | {r['min_s_per_1000_steps']} | "
              f"{r['over_es_d_rtrl']} |" for r in rows]
    open(os.path.join(args.out_dir, 'stream_speed.md'), 'w').write('\n'.join(lines) + '\n')
    print('\n'.join(lines))
    return 0


if __name__ == '__main__':
    sys.exit(main())
