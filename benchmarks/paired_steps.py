"""Several training steps timed in one process, their calls alternating: the fairer ratio on a machine whose
timings move between processes (docs/chunked-traces.md).

    python benchmarks/paired_steps.py dms 32 2010 bptt:1,diag:64 7     # size, batch, T, method:K,..., rounds
    python benchmarks/paired_steps.py dms 128 2010 expsm_diag:8,expsm_diag:64 5

Each variant is the speed table's network (benchmarks/speed_table.py) and its compiled gradient of one batch;
all are compiled and warmed up twice, then called in turn, `rounds` times; prints each one's median, minimum
and every time (seconds).
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv) -> int:
    if len(argv) < 4 or argv[0] in ('-h', '--help'):
        print(__doc__)
        return 0 if argv[:1] in (['-h'], ['--help']) else 2
    import jax
    import jax.numpy as jnp
    import numpy as np
    import speed_table as st
    from rsnn.trainer import Trainer
    size, B, T = argv[0], int(argv[1]), int(argv[2])
    variants = [v.split(':') for v in argv[3].split(',')]
    rounds = int(argv[4]) if len(argv) > 4 else 5
    cfg = st.SIZES[size]
    xs, labels, ws = st.batch(cfg, B, T)
    inputs = [jnp.asarray(a) for a in (xs, labels, jnp.ones(B), ws)]
    fns = []
    for method, K in variants:
        trainer = Trainer(st.build(cfg), method, cfg['n_in'], B, etrace_decay=cfg['decay'],
                          trace_chunk=None if K == 'auto' else int(K))
        fn = trainer.compiled_gradients()
        jax.block_until_ready(fn(*inputs)), jax.block_until_ready(fn(*inputs))
        fns.append(fn)
    times = [[] for _ in fns]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*inputs))
            times[i].append(time.perf_counter() - t0)
    for (method, K), ts in zip(variants, times):
        print(f"{size} B {B} T {T} {method} K {K}: median {np.median(ts):.3f} s, min {np.min(ts):.3f} s, "
              f"all {' '.join(f'{t:.3f}' for t in ts)}")
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
