"""python scripts/credit_speed.py: Seconds per 1000 stream steps of ES-D-RTRL and D-RTRL (chunked traces carried across updates) on the
credit task's network, interleaved in one process so that both see the same load."""
import sys, time, os
sys.path.insert(0, os.getcwd())
import importlib.util
spec = importlib.util.spec_from_file_location('task', 'task-rsnn-long-term-dependency.py')
task = importlib.util.module_from_spec(spec); spec.loader.exec_module(task)
import utils, brainstate, datasets, models
from rsnn.trainer import Trainer
from rsnn import dms_stream, run_folder
trainers = {}
for m, dec in (('expsm_diag', '0.99'), ('diag', '0.99'), ('bptt', '0.99')):
    flags = ['--preset', 'credit', '--protocol', 'stream', '--method', m, '--etrace_decay', dec]
    if m == 'bptt':
        flags += ['--tbptt_window', '500', '--tbptt_k2', '1000']
    args = run_folder.parse_args(task.build_parser(), flags, task.PRESETS)
    brainstate.environ.set(dt=1.)
    cfg = datasets.DMSConfig(t_delay=args.t_delay)
    model = models.DMSNet(cfg.n_input, args.n_rec, 2, dt=1., tau_neu=args.tau_neu, tau_syn=args.tau_syn, tau_I2=args.tau_I2,
                          A2=args.A2, ff_scale=args.ff_scale, rec_scale=args.rec_scale, syn_gain=args.syn_gain,
                          seed=0, memory=task.memory_layout(args))
    tr = Trainer(model, m, cfg.n_input, 32, etrace_decay=args.etrace_decay, protocol='stream', trace_chunk=args.trace_chunk,
                          rule_options=task.tbptt_options(args, cfg))
    trainers[m] = (tr, dms_stream.DMSStream(cfg, 32, 500, 0, (100., 500.)))
    tr.train_chunk(trainers[m][1].chunk(0))
    print(m, 'trace_chunk', tr.trace_chunk, flush=True)
times = {m: [] for m in trainers}
for k in range(1, 6):
    for m, (tr, st) in trainers.items():
        t0 = time.perf_counter(); tr.train_chunk(st.chunk(k)); times[m].append(time.perf_counter() - t0)
import numpy as np
med = {m: float(np.median(t)) * 2 for m, t in times.items()}  # 500-step chunks -> per 1000 steps
print({m: round(v, 3) for m, v in med.items()}, 'D-RTRL / ES-D-RTRL:', round(med['diag'] / med['expsm_diag'], 2), flush=True)
