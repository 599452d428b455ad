"""The accelerator check's memory and speed sweep, sized to fit one device run: one worker process per
(method, K) that loops over T, the methods interleaved at each T (every method has its T = 100 row before
any has T = 250, so a cap cuts the longest T of every method, not the last method), a wall-clock cap per
row, and the table (results.csv, results.md) written after every row.

    python scripts/accelerator_sweep.py --out DIR                         # the paper's size
    python scripts/accelerator_sweep.py --out DIR --tiny                  # toy size, on any machine

A worker measures each T with task-memory-and-speed-evaluation-tpu.py's `measure` (the step Trainer trains
with: compiled, XLA's memory analysis, --repeats timed steps), the input drawn on the device
(--input_on_device). A row past its cap is a `timeout` row, its worker is stopped, and that method's
longer T are `skipped` rows (they would take longer still). The device's peak memory (`device_peak_mb`)
is the peak of the worker so far: over increasing T, the peak of the longest T measured.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import queue
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from rsnn import methods
from rsnn.memory_report import complete_row, markdown_table, write_outputs

TAG = '@@SWEEP_ROW@@ '
TASK = os.path.join(ROOT, 'task-memory-and-speed-evaluation-tpu.py')
PAPER = dict(batch_size=128, n_in=32768, n_rec=512, n_layer=3, n_out=11, lengths=[100, 250, 500, 1000], repeats=1)
TINY = dict(batch_size=4, n_in=20, n_rec=16, n_layer=1, n_out=3, lengths=[4, 8], repeats=1)
# (method, K): BPTT, ES-D-RTRL and D-RTRL at the training default (--trace_chunk auto); --with_k1 adds the
# online methods step by step (K = 1, brainscale's algorithm as the paper ran it)
PLAN = [('bptt', None), ('expsm_diag', 'auto'), ('diag', 'auto')]
K1_PLAN = [('expsm_diag', 1), ('diag', 1)]


def load_task():
    spec = importlib.util.spec_from_file_location('memory_task', TASK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def worker(cfg_json: str) -> int:
    """Measure one (method, K) at each T read from stdin (one per line); a result row per T on stdout."""
    import jax
    cfg = json.loads(cfg_json)
    task = load_task()
    for line in sys.stdin:
        T = int(line)
        try:
            row = task.measure(dict(cfg, T=T))
        except BaseException as e:  # a failed measurement (an out-of-memory) is a result row
            text = f'{type(e).__name__}: {e}'
            row = dict(method=cfg['method'], T=T, trace_chunk_requested=cfg.get('trace_chunk'),
                       status=task.classify_failure(text), reason=task.one_line(text))
        print(TAG + json.dumps(row), flush=True)
        gc.collect()
        jax.clear_caches()
    return 0


class Worker:
    """A worker process and a thread that reads its result rows."""

    def __init__(self, cfg: dict, log_path: str):
        self.log = open(log_path, 'w')
        env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE='false', TF_CPP_MIN_LOG_LEVEL='2')
        if cfg['devices'] == 'cpu':
            env['JAX_PLATFORMS'] = 'cpu'
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), '--_worker', json.dumps(cfg)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     cwd=ROOT, env=env)
        self.rows = queue.Queue()
        self.stopped_at = None  # (T, why) once the worker is stopped
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            if line.startswith(TAG):
                self.rows.put(json.loads(line[len(TAG):]))
            else:
                self.log.write(line)
        self.rows.put(None)  # the process ended

    def measure(self, T: int, cap: float):
        """(row, None) or (None, failure dict)."""
        try:
            self.proc.stdin.write(f'{T}\n')
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return None, dict(status='error', reason='the worker process had ended')
        try:
            row = self.rows.get(timeout=cap)
        except queue.Empty:
            self.stop()
            return None, dict(status='timeout', reason=f'no result within the cap of {cap:g} s per row')
        if row is None:
            code = self.proc.wait()
            return None, dict(status='OOM' if code == -9 else 'error',
                              reason=f'the worker ended (exit {code}; see its log)')
        return row, None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.stop()
        self.log.close()


def sweep(args) -> list:
    sizes = dict(TINY if args.tiny else PAPER)
    if args.lengths:
        sizes['lengths'] = [int(v) for v in args.lengths.split(',')]
    cfg = dict(sizes, methods=[m for m, _ in PLAN], density=0.1, etrace_decay=0.9, model='lif-delta', seed=0,
               devices=args.devices, input_on_device=True, memory_limit_mb=None, preset='tiny' if args.tiny else 'paper')
    os.makedirs(args.out, exist_ok=True)
    plan = [(m, K) for m, K in PLAN + (K1_PLAN if args.with_k1 else []) if m in args.methods.split(',')]
    workers = {key: Worker(dict(cfg, method=key[0], trace_chunk=key[1]),
                           os.path.join(args.out, f'worker-{key[0]}-{key[1] or "bptt"}.log')) for key in plan}
    machine = dict(platform=None, device=None)
    rows = []
    try:
        for T in cfg['lengths']:
            for key, w in workers.items():
                method, K = key
                t0 = time.time()
                if w.stopped_at:
                    result, failure = None, dict(status='skipped', reason=f'{w.stopped_at[1]} at T={w.stopped_at[0]}')
                else:
                    result, failure = w.measure(T, args.cap + (args.startup if T == cfg['lengths'][0] else 0))
                    if failure and failure['status'] in ('timeout', 'OOM', 'error'):
                        w.stopped_at = (T, failure['status'])
                if result and not machine['platform']:
                    machine.update(platform=result.get('platform'), device=result.get('device'))
                row = complete_row(result or dict(method=method, T=T, trace_chunk_requested=K, **failure), cfg,
                                   machine)
                rows.append(row)
                write_outputs(args.out, cfg, machine, rows)  # after every row: a cut run keeps its rows
                with open(os.path.join(args.out, 'results.md'), 'w') as f:
                    f.write(markdown_table(rows) + '\n')
                what = (f"step {row['step_s']:.4g} s, step memory {row.get('step_mb') or 0:.5g} MB, device peak "
                        f"{row.get('device_peak_mb') or '-'} MB" if row['status'] == 'ok'
                        else f"{row['status']}: {row.get('reason')}")
                print(f"{methods.title(method):>9} K={K or '-'} T={T:<5} {what}  [{time.time() - t0:.0f} s]",
                      flush=True)
    finally:
        for w in workers.values():
            w.close()
    print()
    print(markdown_table(rows))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--out', default=None, help='folder of results.csv, results.json, results.md, worker logs')
    p.add_argument('--tiny', action='store_true', help='toy sizes (1 x 16 LIF, 20 inputs, batch 4, T = 4, 8; any machine)')
    p.add_argument('--lengths', default=None, help='comma list of T (default: 100,250,500,1000; tiny: 4,8)')
    p.add_argument('--methods', default='bptt,expsm_diag,diag', help='comma list of bptt, expsm_diag, diag')
    p.add_argument('--devices', default='0', help="the device: an accelerator index, or 'cpu'")
    p.add_argument('--cap', type=float, default=25., help='seconds allowed to one row')
    p.add_argument('--startup', type=float, default=30.,
                   help='seconds added to the cap of the first T: the workers start (import jax, find the device)')
    p.add_argument('--with_k1', action='store_true', help='also the online methods at K = 1 (two rows more per T)')
    p.add_argument('--_worker', default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker is not None:
        return worker(args._worker)
    if not args.out:
        p.error('give --out DIR')
    rows = sweep(args)
    return 0 if all(r['status'] in ('ok', 'timeout', 'skipped', 'OOM') for r in rows) else 1


if __name__ == '__main__':
    sys.exit(main())
