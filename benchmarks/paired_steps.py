"""Several training steps timed in one process, their calls alternating: the fairer ratio on a machine whose
timings move between processes (docs/chunked-traces.md).

    python benchmarks/paired_steps.py dms 32 2010 bptt:1,diag:64 7     # size, batch, T, method:K,..., rounds
    python benchmarks/paired_steps.py dms 128 2010 expsm_diag:8,expsm_diag:64 5

Each variant is the speed table's network (benchmarks/speed_table.py) and its compiled gradient of one batch;
all are compiled and warmed up twice, then called in turn, `rounds` times; prints each one's median, minimum
and every time (seconds).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv) -> int:
    if len(argv) < 4 or argv[0] in ('-h', '--help'):
        print(__doc__)
        return 0 if argv[:1] in (['-h'], ['--help']) else 2
    import jax
    import numpy as np
    import speed_table as st
    from rsnn.cli import trace_chunk_arg
    try:
        size, B, T = argv[0], int(argv[1]), int(argv[2])
        variants = [(m, trace_chunk_arg(K)) for m, K in (v.split(':') for v in argv[3].split(','))]
        rounds = int(argv[4]) if len(argv) > 4 else 5
        if size not in st.SIZES:
            raise ValueError(f'size {size!r}: choose one of {sorted(st.SIZES)}')
    except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
        print(f'error: {e}; usage: python benchmarks/paired_steps.py dms 32 2010 bptt:1,diag:64 7', file=sys.stderr)
        return 2
    steps = []
    for method, K in variants:
        fn, inputs, _ = st.compiled_step(st.SIZES[size], B, T, method, K)
        jax.block_until_ready(fn(*inputs)), jax.block_until_ready(fn(*inputs))
        steps.append((fn, inputs))
    times = [[] for _ in steps]
    for _ in range(rounds):
        for i, (fn, inputs) in enumerate(steps):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*inputs))
            times[i].append(time.perf_counter() - t0)
    for (method, K), ts in zip(variants, times):
        print(f"{size} B {B} T {T} {method} K {K}: median {np.median(ts):.3f} s, min {np.min(ts):.3f} s, "
              f"all {' '.join(f'{t:.3f}' for t in ts)}")
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
