"""The speed table of docs/chunked-traces.md: seconds per batch of BPTT, ES-D-RTRL and D-RTRL, step by step
through brainscale (--trace_chunk 1) and K steps at a time (the default K), at the DMS size and at the image
README size, each at batch 32 and 128, with the machine's limits measured in the same run and a PyTorch BPTT
of the same image network.

    flock /tmp/cpu.lock python benchmarks/speed_table.py         # the table (about 25 minutes on 2 cores)
    python benchmarks/speed_table.py --tiny --out_dir /tmp/t      # the same code path at toy sizes (tests)

A row is the gradient of one batch (forward and backward: what a training step spends, without the Adam
update), compiled, then timed --repeats times after two warm-up calls (median; block until ready), each
(size, method, K) in a fresh process; the chunked rows at the training default K (`auto`, the K used in the
row) unless --trace_chunk names one. Limits: float32 matmul GFLOP/s (2048^3, jit), the rate of a loop's
per-step product (32 x 512 by 512 x 512, 100 steps of a scan: what the recurrences run at) and memory-copy
GB/s (an in-place pass over 256 MB, read + write). The floor of a row is its matmul FLOPs at the matmul rate plus,
for D-RTRL, one read and one write of its traces per chunk at the copy rate; share = floor / measured time.
D-RTRL step by step at the image size is timed on a shorter sequence and scaled to T (its time is linear in T;
the row says so). Writes speed_table.md / .csv / .json into --out_dir (default results/speed_table/<timestamp>).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from rsnn.cli import positive_float, positive_int, trace_chunk_arg
from rsnn.files import write_json

TAG = '@@SPEED@@ '
SIZES = {  # name -> network and batch; 'scaled_T': the sequence D-RTRL step by step is timed on
    'dms': dict(kind='dms', n_in=100, n_rec=200, n_out=2, n_layer=1, T=2010, loss_steps=500, decay=0.99,
                scaled_T=402),
    'image': dict(kind='image', n_in=2312, n_rec=512, n_out=10, n_layer=3, T=400, loss_steps=400, decay=0.9,
                  scaled_T=25),
}
TINY = {'dms': dict(SIZES['dms'], n_in=10, n_rec=12, T=60, loss_steps=20, scaled_T=30),
        'image': dict(SIZES['image'], n_in=20, n_rec=16, n_layer=2, T=40, loss_steps=40, scaled_T=20)}


def positive_ints(text: str) -> list:
    """argparse type of a comma list of positive integers ('32,128')."""
    return [positive_int(k) for k in text.split(',')]


def size_list(text: str) -> list:
    """argparse type of a comma list of the table's sizes ('dms,image')."""
    sizes = text.split(',')
    if not set(sizes) <= set(SIZES):
        raise argparse.ArgumentTypeError(f'expected sizes among {", ".join(SIZES)}, got {text!r}')
    return sizes


def plan(tiny: bool, K, sweep: list = None) -> list:
    """(size, batch, T, method, trace_chunk) of every row, in the order of the table; with `sweep` (a list of
    K) only the chunked rows at batch 32, once per K (to choose --trace_chunk)."""
    if sweep:
        sizes = TINY if tiny else SIZES
        return [(size, 32, sizes[size]['T'], m, k) for size in ('dms', 'image') for m in ('expsm_diag', 'diag')
                for k in sweep]
    rows = []
    for size, batches in (('dms', (32, 128)), ('image', (32, 128))):
        for B in batches:
            T = (TINY if tiny else SIZES)[size]['T']
            rows += [(size, B, T, 'bptt', 1)] + ([(size, B, T, 'torch', 1)] if size == 'image' else [])
            rows += [(size, B, T, m, k) for m in ('expsm_diag', 'diag') for k in (1, K)]
    T100 = 30 if tiny else 100
    return rows + [('image', 32, T100, 'bptt', 1), ('image', 32, T100, 'torch', 1)]


# --------------------------------------------------------------------------------------------
# Shapes: FLOPs and trace bytes per time step
# --------------------------------------------------------------------------------------------


def weights(cfg) -> list:
    """(rows, columns, states per neuron, rows whose input needs a gradient) of each weight matrix: a
    recurrent layer's [W_in; W_rec] (the data input needs none), then the readout."""
    n_rec, S = cfg['n_rec'], 3 if cfg['kind'] == 'dms' else 1
    out = [(cfg['n_in'] + n_rec, n_rec, S, n_rec)] + [(2 * n_rec, n_rec, S, 2 * n_rec)] * (cfg['n_layer'] - 1)
    return out + [(n_rec, cfg['n_out'], 1, n_rec)]


def flop_per_step(cfg, B: int, method: str) -> float:
    """Matmul FLOPs per time step: forward, weight gradient and the input gradients that are needed (the memory
    script's count, the same for every method), and for D-RTRL the trace update x_t df_t (2 B x #weights x S)."""
    total = 0.
    for n_i, n_j, S, grad_rows in weights(cfg):
        total += 4. * B * n_i * n_j + 2. * B * grad_rows * n_j
        if method == 'diag':
            total += 2. * B * n_i * n_j * S
    return total


def trace_bytes(cfg, B: int) -> float:
    return 4. * B * sum(n_i * n_j * S for n_i, n_j, S, _ in weights(cfg))


# --------------------------------------------------------------------------------------------
# Worker: one measurement
# --------------------------------------------------------------------------------------------


def build(cfg, seed=0):
    import brainstate
    from rsnn import models
    brainstate.environ.set(dt=1.)
    if cfg['kind'] == 'dms':
        return models.DMSNet(cfg['n_in'], cfg['n_rec'], cfg['n_out'], dt=1., tau_neu=100., tau_syn=100., tau_I2=1500.,
                             A2=1., ff_scale=6., rec_scale=2., seed=seed)
    return models.SpikingStack(cfg['n_in'], cfg['n_rec'], cfg['n_out'], cfg['n_layer'], ff_scale=10., rec_scale=0.5,
                               detach_reset=False, seed=seed)


def batch(cfg, B, T, seed=1):
    import numpy as np
    rng = np.random.default_rng(seed)
    rate = 0.02 if cfg['kind'] == 'dms' else 0.1
    xs = (rng.random((T, B, cfg['n_in']), dtype=np.float32) < rate).astype(np.float32)
    ws = np.zeros(T, np.float32)
    n = min(cfg['loss_steps'], T)
    ws[T - n:] = 1. / n
    return xs, rng.integers(0, cfg['n_out'], B).astype(np.int32), ws


def timed(fn, repeats: int) -> float:
    import numpy as np
    fn(), fn()  # compile, and a second warm-up (a training run's second batch can still compile)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def compiled_step(cfg, B, T, method, K):
    """(the compiled gradient of one batch, its inputs, the K used) of `method` on the network `cfg` (K an
    integer or 'auto'); what a row times (profile_step.py and paired_steps.py use it too)."""
    import jax.numpy as jnp
    from rsnn.trainer import Trainer
    trainer = Trainer(build(cfg), method, cfg['n_in'], B, etrace_decay=cfg['decay'], trace_chunk=K)
    xs, labels, ws = batch(cfg, B, T)
    return trainer.compiled_gradients(), [jnp.asarray(a) for a in (xs, labels, jnp.ones(B), ws)], trainer.trace_chunk


def measure_jax(cfg, B, T, method, K, repeats) -> tuple:
    import jax
    grads_fn, args, K = compiled_step(cfg, B, T, method, K)
    return timed(lambda: jax.block_until_ready(grads_fn(*args)), repeats), K


def measure_torch(cfg, B, T, repeats) -> float:
    """BPTT of the image network as a careful PyTorch user writes it: float32, every layer's input product
    of all T steps as one matmul, only the recurrence step by step, the readout's cross-entropy of all steps
    at once, as many threads as XLA uses (all cores)."""
    import torch
    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)

    class Spike(torch.autograd.Function):  # Heaviside with the relu surrogate (models.SURROGATES['relu'])
        @staticmethod
        def forward(ctx, v):
            ctx.save_for_backward(v)
            return (v >= 0).float()

        @staticmethod
        def backward(ctx, g):
            v, = ctx.saved_tensors
            return g * torch.clamp(0.3 - 0.3 * v.abs(), min=0.)

    n_rec, layers = cfg['n_rec'], []
    for l in range(cfg['n_layer']):
        n_x = cfg['n_in'] if l == 0 else n_rec
        layers.append([(torch.randn(n_x, n_rec) * (10. / n_x) ** .5).requires_grad_(),
                       (torch.randn(n_rec, n_rec) * (0.5 / n_rec) ** .5).requires_grad_(),
                       torch.zeros(n_rec, requires_grad=True), torch.exp(-1. / (10. + torch.randn(n_rec)))])
    w_o = (torch.randn(n_rec, cfg['n_out']) / n_rec ** .5).requires_grad_()
    b_o = torch.zeros(cfg['n_out'], requires_grad=True)
    xs, labels, ws = (torch.from_numpy(a) for a in batch(cfg, B, T))
    labels = labels.long()

    def step():
        x = xs
        for w_in, w_rec, b, decay in layers:
            z = (x.reshape(T * B, -1) @ w_in + b).reshape(T, B, n_rec)
            V, s, outs = torch.zeros(B, n_rec), torch.zeros(B, n_rec), []
            for t in range(T):  # V_th = 1, soft reset (gradient through it), recurrent input s_{t-1} W_rec
                V = decay * (V - s) + z[t] + s @ w_rec
                s = Spike.apply(V - 1.)
                outs.append(s)
            x = torch.stack(outs)
        z = (x.reshape(T * B, -1) @ w_o + b_o).reshape(T, B, -1)
        r, rs = torch.zeros(B, cfg['n_out']), []
        for t in range(T):
            r = 0.904837 * r + z[t]  # exp(-1 / tau_o), tau_o = 10
            rs.append(r)
        ce = torch.nn.functional.cross_entropy(torch.stack(rs).reshape(T * B, -1), labels.repeat(T), reduction='none')
        loss = (ce.reshape(T, B).mean(1) * ws).sum()
        params = [p for layer in layers for p in layer[:3]] + [w_o, b_o]
        torch.autograd.grad(loss, params)

    return timed(step, repeats)


def worker(job: dict) -> dict:
    cfg = (TINY if job['tiny'] else SIZES)[job['size']]
    B, T, method, K = job['B'], job['T'], job['method'], job['K']
    t_timed = cfg['scaled_T'] if method == 'diag' and K == 1 else T
    if method == 'torch':
        seconds = measure_torch(cfg, B, T, job['repeats'])
    else:
        seconds, K = measure_jax(cfg, B, t_timed, method, K, job['repeats'])
    return dict(job, K=K, timed_T=t_timed, s_per_batch=seconds * T / t_timed)


# --------------------------------------------------------------------------------------------
# Parent: limits, rows, table
# --------------------------------------------------------------------------------------------


def machine_limits() -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    n = 2048
    a = jnp.ones((n, n), jnp.float32) / n
    f = jax.jit(lambda x: x @ x)
    t_mm = timed(lambda: f(a).block_until_ready(), 5)
    m = jnp.ones((64 * 2 ** 20,), jnp.float32)  # 256 MB, 20 in-place passes
    g = jax.jit(lambda v: jax.lax.fori_loop(0, 20, lambda i, v: v * 0.999 + 1e-3, v))
    t_bw = timed(lambda: g(m).block_until_ready(), 3)
    w, c = jnp.ones((512, 512), jnp.float32) / 512, jnp.ones((100, 32, 512), jnp.float32)
    loop = jax.jit(lambda w, c: jax.lax.scan(lambda s, c_t: (jnp.tanh(c_t + s @ w),) * 2, c[0], c)[1])
    t_step = timed(lambda: loop(w, c).block_until_ready(), 7)
    return dict(matmul_gflops=2. * n ** 3 / t_mm / 1e9, copy_gbps=2. * 20 * m.nbytes / t_bw / 1e9,
                step_product_gflops=2. * 100 * 32 * 512 * 512 / t_step / 1e9,
                n_cpu=os.cpu_count(), jax=jax.__version__, numpy=np.__version__)


def run_job(job: dict, timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), '--_worker', json.dumps(job)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return dict(job, error=f'timeout after {timeout:.0f} s')
    lines = [l for l in p.stdout.splitlines() if l.startswith(TAG)]
    if p.returncode or not lines:
        return dict(job, error=(p.stderr.strip().splitlines() or ['no output'])[-1][:200])
    return json.loads(lines[-1][len(TAG):])


def complete(row: dict, limits: dict, tiny: bool) -> dict:
    if row.get('error'):
        return row
    cfg = (TINY if tiny else SIZES)[row['size']]
    B, T, K = row['B'], row['T'], row['K']
    method = 'bptt' if row['method'] == 'torch' else row['method']
    floor = flop_per_step(cfg, B, method) * T / (limits['matmul_gflops'] * 1e9)
    if method == 'diag':  # the traces read and written once per chunk
        floor += 2. * trace_bytes(cfg, B) * -(-T // K) / (limits['copy_gbps'] * 1e9)
    row.update(floor_s=floor, share=floor / row['s_per_batch'] if row.get('s_per_batch') else None)
    return row


NAMES = {'bptt': 'BPTT', 'torch': 'BPTT, PyTorch reference', 'expsm_diag': 'ES-D-RTRL', 'diag': 'D-RTRL'}


def markdown(rows: list) -> str:
    bptt = {(r['size'], r['B'], r['T']): r.get('s_per_batch') for r in rows if r['method'] == 'bptt'}
    lines = ['| size | batch | T | method | K | s / batch | x our BPTT | floor (s) | share of floor |',
             '|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        scaled = r.get('timed_T', r['T']) != r['T']
        name = NAMES[r['method']] + (f" (timed on T {r['timed_T']}, scaled)" if scaled else '')
        if r.get('error'):
            lines.append(f"| {r['size']} | {r['B']} | {r['T']} | {name} | {r['K']} | {r['error']} | | | |")
            continue
        ref = bptt.get((r['size'], r['B'], r['T']))
        k = r['K'] if r['method'] in ('expsm_diag', 'diag') else '-'
        ratio = f"{r['s_per_batch'] / ref:.2f}" if ref else '-'
        lines.append(f"| {r['size']} | {r['B']} | {r['T']} | {name} | {k} | {r['s_per_batch']:.3g} | "
                     f"{ratio} | {r['floor_s']:.3g} | {100 * r['share']:.0f} % |")
    return '\n'.join(lines)


def main(argv) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--trace_chunk', type=trace_chunk_arg, default='auto',
                   help='the K of the chunked rows: auto (the training default, per row) or an integer')
    p.add_argument('--repeats', type=positive_int, default=3, help='timed calls per row (median)')
    p.add_argument('--only', type=size_list, default=None, help='comma list of sizes to run (dms, image)')
    p.add_argument('--batches', type=positive_ints, default=None, metavar='B,B,...',
                   help='comma list of batch sizes to run (32, 128)')
    p.add_argument('--sweep', type=positive_ints, default=None, metavar='K,K,...',
                   help='instead of the table: the chunked rows at batch 32 for each K listed (choosing the default)')
    p.add_argument('--tiny', action='store_true', help='toy sizes, the same code path (for the tests)')
    p.add_argument('--timeout', type=positive_float, default=900., help='seconds allowed to one row')
    p.add_argument('--out_dir', default=None, help='default results/speed_table/<timestamp>')
    p.add_argument('--_worker', default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker:
        print(TAG + json.dumps(worker(json.loads(args._worker))), flush=True)
        return 0
    selected = [(size, B, T, method, K) for size, B, T, method, K in plan(args.tiny, args.trace_chunk, args.sweep)
                if (not args.only or size in args.only) and (not args.batches or B in args.batches)]
    if not selected:
        p.error('no row of the table has these --only and --batches (the sizes are dms and image, the batches 32 '
                'and 128, --sweep rows batch 32)')
    out_dir = args.out_dir or os.path.join('results', 'speed_table', datetime.datetime.now().strftime('%Y%m%d-%H%M%S'))
    os.makedirs(out_dir, exist_ok=True)
    t_start = time.time()
    limits = machine_limits()
    print(f"limits: float32 matmul {limits['matmul_gflops']:.1f} GFLOP/s, a loop's per-step product "
          f"{limits['step_product_gflops']:.1f} GFLOP/s, copy {limits['copy_gbps']:.1f} GB/s", flush=True)
    rows = []
    for size, B, T, method, K in selected:
        job = dict(size=size, B=B, T=T, method=method, K=K, repeats=args.repeats, tiny=args.tiny)
        rows.append(complete(run_job(job, args.timeout), limits, args.tiny))
        r = rows[-1]
        print(f"{size} B {B} T {T} {NAMES[method]} K {r['K']}: " + (r['error'] if r.get('error') else
              f"{r['s_per_batch']:.3g} s/batch, {100 * r['share']:.0f} % of the floor"), flush=True)
    limits['seconds'] = time.time() - t_start
    table = markdown(rows)
    command = 'python benchmarks/speed_table.py ' + ' '.join(argv)
    with open(os.path.join(out_dir, 'speed_table.md'), 'w') as f:
        f.write(f"`{command.strip()}`: float32 matmul {limits['matmul_gflops']:.1f} GFLOP/s, a loop's "
                f"per-step product {limits['step_product_gflops']:.1f} GFLOP/s, memory copy "
                f"{limits['copy_gbps']:.1f} GB/s (read + write), {limits['n_cpu']} CPUs, "
                f"{limits['seconds'] / 60:.1f} min in all\n\n{table}\n")
    write_json(os.path.join(out_dir, 'speed_table.json'), dict(limits=limits, rows=rows, command=command))
    keys = ['size', 'B', 'T', 'method', 'K', 'timed_T', 's_per_batch', 'floor_s', 'share', 'error']
    with open(os.path.join(out_dir, 'speed_table.csv'), 'w') as f:
        f.write(','.join(keys) + '\n')
        for r in rows:
            f.write(','.join('' if r.get(k) is None else str(r[k]) for k in keys) + '\n')
    print(table)
    print(f'written: {out_dir}/speed_table.md, .csv, .json')
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
