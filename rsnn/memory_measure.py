"""The worker side of the memory and speed sweep (task-memory-and-speed-evaluation-tpu.py): one measurement in
a fresh process. The step that `Trainer` trains with is compiled, its compile time and XLA's memory analysis
are recorded, then it runs `repeats` times (median, block until ready); or, for --analysis_only, it is
compiled against abstract shapes and nothing runs. The probe: the device and its matmul speed.

A worker prints one line, RESULT_TAG + the row as JSON, which the sweep reads from its output.
"""
from __future__ import annotations

import json
import os
import time

from rsnn import brainstate_adapter
from rsnn.child_runs import classify_failure, one_line
from rsnn.device_choice import devices_name, parse_devices, select_device, select_devices
from rsnn.files import peak_rss_mb
from rsnn.memory_report import MB

RESULT_TAG = '@@MEMSPEED_RESULT@@ '


def pick_device(spec: str):
    import jax
    if spec == 'auto':
        accelerators = [d for d in jax.devices() if d.platform != 'cpu']
        device = accelerators[0] if accelerators else jax.devices('cpu')[0]
        jax.config.update('jax_default_device', device)
        return device
    return select_device(spec)


def pick_devices(spec: str) -> list:
    """The devices of a measurement: one (auto, cpu, an index) or several (a comma list, all)."""
    if spec != 'auto' and (parse_devices(spec) == 'all' or isinstance(parse_devices(spec), list)):
        return select_devices(spec)
    return [pick_device(spec)]


def probe(spec: str, size: int = 0) -> dict:
    """The (first) device, and its float32 matmul GFLOP/s measured like the steps (jit, median, block)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    devices = pick_devices(spec)
    device = devices[0]
    n = size or (2048 if device.platform == 'cpu' else 8192)
    a = jax.device_put(jnp.ones((n, n), jnp.float32) / n, device)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        f(a, a).block_until_ready()
        times.append(time.perf_counter() - t0)
    return dict(platform=device.platform, device=devices_name(devices), n_devices=len(devices),
                device_kind=getattr(device, 'device_kind', ''),
                matmul_n=n, matmul_gflops=2. * n ** 3 / float(np.median(times)) / 1e9, jax_version=jax.__version__,
                n_cpu=os.cpu_count(), load_avg=load_average())


def load_average():
    """The 1-minute load average (other processes sharing the CPU slow every CPU measurement)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def time_repeats(run, repeats: int) -> list:
    """Seconds of each of `repeats` calls of run(), each waited for (block until ready)."""
    import jax
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = run()
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
        del out
    return times


def device_peaks_mb(devices) -> list:
    """Each device's peak memory in use (MB), where the device reports it (GPU/TPU; not the CPU)."""
    peaks = []
    for d in devices:
        try:
            stats = d.memory_stats()
        except Exception:
            stats = None
        if stats and 'peak_bytes_in_use' in stats:
            peaks.append(stats['peak_bytes_in_use'] / MB)
    return peaks


def tree_mb(tree) -> float:
    import jax
    return sum(getattr(l, 'nbytes', 0) for l in jax.tree.leaves(tree)) / MB


def memory_parts(row: dict, ma, fixed_mb: float, limit):
    """XLA's memory analysis into the row: arguments, outputs, temporaries, aliased; the step without the input
    (step_mb); the weights and optimizer state in and out (fixed_mb, every method the same) and what is
    left, the method's own memory (method_mb); OOM against `limit` (MB) as the row's status."""
    row.update(xla_args_mb=ma.argument_size_in_bytes / MB, xla_out_mb=ma.output_size_in_bytes / MB,
               xla_alias_mb=ma.alias_size_in_bytes / MB, xla_temp_mb=ma.temp_size_in_bytes / MB)
    total = row['xla_args_mb'] + row['xla_out_mb'] + row['xla_temp_mb'] - row['xla_alias_mb']
    row['total_mb'] = total
    row['step_mb'] = total - row['input_mb']
    row['weights_opt_mb'] = fixed_mb
    row['method_mb'] = row['step_mb'] - fixed_mb
    if limit and total > limit:
        row.update(status='OOM', reason=f'compiled step needs {total:.1f} MB > --memory_limit_mb {limit:g}')
        return True
    return False


def analyse(cfg: dict) -> dict:
    """--analysis_only: build the network and the Trainer, lower and compile the training step against
    abstract shapes (jax.ShapeDtypeStruct: no input and no chunked trace is allocated) and record XLA's
    memory analysis. Nothing runs."""
    row = dict(method=cfg['method'], T=cfg['T'], trace_chunk_requested=cfg.get('trace_chunk'))
    import brainstate
    import jax
    import jax.numpy as jnp
    from rsnn import models
    from rsnn.trainer import Trainer
    row['rss_base_mb'] = peak_rss_mb()
    devices = pick_devices(cfg['devices'])
    row.update(platform=devices[0].platform, device=devices_name(devices), n_devices=len(devices))
    brainstate.environ.set(dt=1.)
    T, B = cfg['T'], cfg['batch_size']
    t0 = time.perf_counter()
    model = models.SpikingStack(cfg['n_in'], cfg['n_rec'], cfg['n_out'], cfg['n_layer'], model=cfg['model'],
                                seed=cfg['seed'])
    trainer = Trainer(model, cfg['method'], cfg['n_in'], B, etrace_decay=cfg['etrace_decay'],
                               devices=devices, trace_chunk=cfg.get('trace_chunk'),
                               rule_options=dict(abstract_traces=True))
    row['trace_chunk'] = min(trainer.trace_chunk, T)
    row['setup_s'] = time.perf_counter() - t0
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype)
    args = (spec((T, B, cfg['n_in']), jnp.float32), spec((B,), jnp.int32), spec((B,), jnp.float32),
            spec((T,), jnp.float32))
    n_dev = len(devices)
    row['input_mb'] = (4. * T * B * cfg['n_in'] / n_dev + 4. * T) / MB
    stateful, jit_fun = brainstate_adapter.jitted_parts(trainer.update_fn)
    t0 = time.perf_counter()
    state_trace = stateful.get_state_trace(trainer.opt_state, *args, compile_if_miss=True)
    abstract = lambda tree: jax.tree.map(lambda v: spec(v.shape, v.dtype) if hasattr(v, 'shape') else v, tree)
    compiled = jit_fun.lower(abstract(state_trace.get_state_values()), trainer.opt_state, *args).compile()
    row['compile_s'] = time.perf_counter() - t0
    fixed = 2. * (tree_mb(trainer.opt_state) + tree_mb(trainer.param_values()))  # in and out of the step
    ma = compiled.memory_analysis()
    if ma is None:
        row.update(status='error', reason='this backend gives no memory analysis')
    elif not memory_parts(row, ma, fixed, cfg.get('memory_limit_mb')):
        row.update(status='ok', reason='compiled only (--analysis_only)')
    row['peak_rss_mb'] = peak_rss_mb()
    return row


def step_arguments(cfg: dict, trainer, device) -> tuple:
    """(optimizer state, xs, labels, mask, ws) of one training step on the run's devices. The input spikes
    (T, B, n_in) are drawn on the host (numpy), or with --input_on_device by jax.random.bernoulli on the
    device itself (an input of the paper's size at T = 1000 is 16.8 GB of float32: never on the host)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    T, B, n_in = cfg['T'], cfg['batch_size'], cfg['n_in']
    rng = np.random.default_rng(cfg['seed'] + 1)
    if cfg.get('input_on_device'):
        where = (trainer.placement.sharding(None, 'batch') if trainer.mesh is not None
                 else jax.sharding.SingleDeviceSharding(device))
        draw = jax.jit(lambda key: jax.random.bernoulli(key, cfg['density'], (T, B, n_in)).astype(jnp.float32),
                       out_shardings=where)
        xs = draw(jax.random.PRNGKey(cfg['seed'] + 1))
    else:
        xs = (rng.random((T, B, n_in), dtype=np.float32) < cfg['density']).astype(np.float32)
    labels = rng.integers(0, cfg['n_out'], B).astype(np.int32)
    mask = np.ones(B, np.float32)
    ws = np.full(T, 1. / T, np.float32)
    if trainer.mesh is None:
        return (jax.device_put(trainer.opt_state, device), jax.device_put(xs, device),
                *jax.device_put((labels, mask, ws), device))
    if cfg.get('input_on_device'):  # several devices: the batch split across them, weights replicated
        placement = trainer.placement
        return (trainer.opt_state, xs, placement.put(labels, placement.sharding('batch')),
                placement.put(mask, placement.sharding('batch')), placement.put(ws, placement.sharding()))
    return (trainer.opt_state, *trainer.device_batch(xs, labels, mask, ws))


def measure(cfg: dict) -> dict:
    """Build, compile and time one training step of `Trainer`; returns a result row."""
    if cfg.get('analysis_only'):
        return analyse(cfg)
    row = dict(method=cfg['method'], T=cfg['T'], trace_chunk_requested=cfg.get('trace_chunk'))
    import brainstate
    import jax
    import numpy as np
    from rsnn import models
    from rsnn.trainer import Trainer
    row['rss_base_mb'] = peak_rss_mb()
    devices = pick_devices(cfg['devices'])
    device = devices[0]
    row.update(platform=device.platform, device=devices_name(devices), n_devices=len(devices))
    brainstate.environ.set(dt=1.)
    T, B = cfg['T'], cfg['batch_size']

    t0 = time.perf_counter()
    model = models.SpikingStack(cfg['n_in'], cfg['n_rec'], cfg['n_out'], cfg['n_layer'], model=cfg['model'],
                                seed=cfg['seed'])
    trainer = Trainer(model, cfg['method'], cfg['n_in'], B, etrace_decay=cfg['etrace_decay'], devices=devices,
                               trace_chunk=cfg.get('trace_chunk'))
    row['trace_chunk'] = min(trainer.trace_chunk, T)
    row['setup_s'] = time.perf_counter() - t0

    args = step_arguments(cfg, trainer, device)
    # the input spikes and per-step loss weights (per device: memory_analysis is per device)
    row['input_mb'] = (args[1].nbytes / len(devices) + args[4].nbytes) / MB

    # compile exactly the step that Trainer.train_step runs
    stateful, jit_fun = brainstate_adapter.jitted_parts(trainer.update_fn)
    t0 = time.perf_counter()
    state_trace = stateful.get_state_trace(*args, compile_if_miss=True)
    state_vals = state_trace.get_state_values()
    if trainer.mesh is None:
        state_vals = jax.device_put(state_vals, device)
    compiled = jit_fun.lower(state_vals, *args).compile()
    row['compile_s'] = time.perf_counter() - t0

    ma = compiled.memory_analysis()
    if ma is not None:
        fixed = 2. * (tree_mb(trainer.opt_state) + tree_mb(trainer.param_values()))  # in and out of the step
        if memory_parts(row, ma, fixed, cfg.get('memory_limit_mb')):
            row['peak_rss_mb'] = peak_rss_mb()
            return row

    t0 = time.perf_counter()
    out = compiled(state_vals, *args)
    jax.block_until_ready(out)
    row['first_step_s'] = time.perf_counter() - t0
    del out
    times = time_repeats(lambda: compiled(state_vals, *args), cfg['repeats'])
    row.update(step_s=float(np.median(times)), step_s_min=float(min(times)), step_s_max=float(max(times)),
               status='ok', reason='')
    peaks = device_peaks_mb(devices)
    if peaks:  # the largest device's peak; each device's in device_peak_mb_per_device
        row['device_peak_mb'] = max(peaks)
        row['device_peak_minus_input_mb'] = row['device_peak_mb'] - row['input_mb']
        row['device_peak_mb_per_device'] = ';'.join(f'{p:.1f}' for p in peaks)
    row['peak_rss_mb'] = peak_rss_mb()
    return row


def worker_main(cfg_json: str) -> int:
    cfg = json.loads(cfg_json)
    try:
        row = measure(cfg)
    except BaseException as e:  # a failed measurement is a result row
        text = f'{type(e).__name__}: {e}'
        row = dict(method=cfg['method'], T=cfg['T'], trace_chunk_requested=cfg.get('trace_chunk'),
                   status=classify_failure(text), reason=one_line(text))
    print(RESULT_TAG + json.dumps(row), flush=True)
    return 0


def probe_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    print(RESULT_TAG + json.dumps(probe(spec['devices'], spec.get('matmul_n', 0))), flush=True)
    return 0
