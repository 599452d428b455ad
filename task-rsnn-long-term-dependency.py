"""Trial tasks with long-term dependencies (delayed match-to-sample, cue accumulation, store-recall): a
recurrent spiking network trained by BPTT or an online rule, on independent trials or on an endless stream.

A trial: fixation, a sample direction (500 ms), a delay (--t_delay), a test direction (500 ms); the
network says whether the test matches the sample. The memory of the sample has to survive the delay in
the neurons' slow adaptation currents (tau_I2 up to 1.5 x --tau_I2). --dataset cue-accumulation and
--dataset store-recall are the tasks of Bellec et al. (docs/tasks.md); the table of tasks is rsnn/tasks/.

    python task-rsnn-long-term-dependency.py --preset cpu-demo          # the paper's task on the CPU
    python task-rsnn-long-term-dependency.py --preset smoke             # seconds: the training path runs
    python task-rsnn-long-term-dependency.py --preset cue-accumulation  # Bellec's task on the CPU
    python task-rsnn-long-term-dependency.py --method expsm_diag ...     # the README commands
"""
from __future__ import annotations

import utils

from rsnn import run_folder
from rsnn import methods
from rsnn import tasks

# Every task's presets (each task's config module holds its own: rsnn/tasks/dms.py, cue_accumulation.py,
# store_recall.py); a preset names its --dataset.
PRESETS = tasks.all_presets()
NETWORKS = ('gif',) + tuple(m for m in utils.MODEL_NAMES if m.endswith('-delta'))


def build_parser():
    p = utils.base_parser(' '.join(__doc__.split('\n\n')[0].split()), experiment='dms')
    p.set_defaults(epochs=2000, batch_size=128, etrace_decay=0.99)
    p.add_argument('--preset', choices=sorted(PRESETS), default=None,
                   help="a named set of defaults; flags given explicitly win. cpu-demo: the paper's 1000 ms "
                        'task with ES-D-RTRL at batch 32 on the CPU (make demo); short-delay: a 100 ms delay, '
                        '100 neurons with 20 ms time constants; credit: the credit task of issue #24 (docs/stream.md); '
                        'smoke: a tiny DMS in seconds; cue-accumulation, store-recall: those tasks on the CPU '
                        '(docs/tasks.md)')
    p.add_argument('--lr_schedule', choices=('constant', 'cosine'), default='constant',
                   help='constant lr, or a cosine decay to lr/100 over --epochs x --batches_per_epoch updates')
    g = p.add_argument_group('task')
    g.add_argument('--dataset', choices=list(tasks.TASKS), default='dms',
                   help='the trial task (rsnn/tasks/): ' + '; '.join(f'{r.name} = {r.title}' for r in tasks.TASKS.values()))
    g.add_argument('--dt', type=utils.positive_float, default=1., help='time step (ms)')
    g.add_argument('--batches_per_epoch', type=utils.positive_int, default=100,
                   help='freshly generated training batches per epoch')
    g.add_argument('--n_test_trials', type=utils.positive_int, default=512,
                   help='size of the fixed held-out set of trials for test accuracy')
    g.add_argument('--validation', type=utils.nonneg_int, default=0, metavar='N',
                   help='also evaluate on N validation trials (on a stream: N / --batch_size trials per stream) '
                        'drawn from a generator key that neither the training trials nor the held-out ones use, '
                        'at every evaluation: val_loss, val_acc in metrics.csv (what scripts/benchmark.py tunes '
                        'on); 0 = none')
    g.add_argument('--acc_th', type=utils.finite_float, default=0.95,
                   help='stop when the training accuracy averaged over the last --acc_th_window batches '
                        'reaches this')
    g.add_argument('--acc_th_window', type=utils.positive_int, default=20,
                   help='training batches whose accuracies are averaged for --acc_th')
    tasks.add_task_flags(p)
    add_stream_flags(p)
    add_network_flags(p)
    return p


def add_stream_flags(p):
    g = p.add_argument_group('stream protocol (--protocol stream; docs/stream.md)')
    g.add_argument('--protocol', choices=('trials', 'stream'), default='trials',
                   help='trials: independent trials, states reset per batch; stream: --batch_size endless '
                        'streams of trials, states and traces never reset, one update per stretch of stream '
                        '(--epochs, --batches_per_epoch, --acc_th do not apply; docs/stream.md)')
    g.add_argument('--t_iti', default='100-500',
                   help='stream: inter-trial interval in ms (background input only), MIN-MAX drawn uniformly or '
                        'one value; with 0 the streams also start in step (no random phase)')
    g.add_argument('--update_every', type=utils.positive_float, default=500.,
                   help='stream, online methods: ms of stream per weight update')
    g.add_argument('--tbptt_window', type=utils.positive_float, default=1000.,
                   help='stream, bptt: truncated BPTT window in ms (states carried in, gradient cut at its '
                        'start, one update per window); with --tbptt_k2 it is k1, the update interval')
    g.add_argument('--tbptt_k2', type=utils.positive_float, default=None,
                   help='stream, bptt: TBPTT(k1, k2): one update every --tbptt_window (k1) ms, each '
                        'backpropagating the loss of its k1 ms over the last k2 ms of stream (overlapping '
                        'windows, re-run forward from the states k2 ms back with the current weights); '
                        'default k2 = k1, the plain TBPTT; k2 >= k1 (docs/stream.md)')
    g.add_argument('--stream_trials', type=utils.positive_int, default=500,
                   help='stream: training length in trials per stream (times the mean trial + ITI period)')
    g.add_argument('--eval_every_trials', type=utils.positive_int, default=25,
                   help='stream: trials per stream between evaluations on the held-out stream (and checkpoints)')
    g.add_argument('--stream_reset', type=int, choices=(0, 1), default=0,
                   help='stream, a control: 1 = zero the states and traces of a stream at every trial start')


def add_network_flags(p):
    g = p.add_argument_group('network')
    g.add_argument('--model', choices=NETWORKS, default='gif',
                   help="gif: the paper's GIF network with adaptation currents (the flags below); alif-delta: one "
                        'layer of adaptive LIF neurons (--tau_adapt, --beta), lif-delta: the same without '
                        'adaptation (models.SpikingStack; --tau_neu is the membrane time constant)')
    g.add_argument('--n_rec', type=utils.positive_int, default=200, help='recurrent neurons')
    g.add_argument('--tau_neu', type=utils.positive_float, default=100., help='membrane time constant (ms)')
    g.add_argument('--tau_syn', type=utils.positive_float, default=100., help='synaptic time constant (ms)')
    g.add_argument('--tau_I2', type=utils.positive_float, default=1500.,
                   help='adaptation current time constants are drawn from U(100, 1.5 tau_I2) ms')
    g.add_argument('--n_memory', type=utils.nonneg_int, default=0,
                   help='the credit task: the last N neurons are memory neurons with slow adaptation '
                        '(--tau_memory) and weak input / recurrent weights into them (--memory_in_scale, '
                        '--memory_rec_scale); the others draw tau_I2 from U(--tau_fast_min, 1.5 tau_I2) (gif; '
                        'alif-delta: the same for its threshold adaptation, --memory_others). 0: the paper\'s network')
    g.add_argument('--tau_memory', type=utils.positive_float, default=3000.,
                   help='memory neurons: tau_I2 (ms; alif-delta: their threshold adaptation tau_a)')
    g.add_argument('--memory_others', choices=('fast', 'lif'), default='fast',
                   help='alif-delta with --n_memory: the other neurons adapt fast (tau_a from U(--tau_fast_min, '
                        "1.5 tau_I2)) or are LIF (beta 0: Bellec's mix)")
    g.add_argument('--tau_fast_min', type=utils.positive_float, default=20.,
                   help='with --n_memory: the other neurons\' smallest tau_I2 (ms)')
    g.add_argument('--memory_in_scale', type=utils.nonneg_float, default=0.1,
                   help='memory neurons: factor on their initial input weights')
    g.add_argument('--memory_rec_scale', type=utils.nonneg_float, default=0.1,
                   help='memory neurons: factor on their initial recurrent weights (from the other neurons)')
    g.add_argument('--freeze_rec', type=int, choices=(0, 1), default=0,
                   help='a control: 1 = no gradient reaches the recurrent layer (only the readout learns)')
    g.add_argument('--A2', type=utils.finite_float, default=1., help='adaptation current jump per spike (I2 -= A2 s)')
    g.add_argument('--ff_scale', type=utils.positive_float, default=6.,
                   help='input weights: Kaiming normal with variance ff_scale / n_in')
    g.add_argument('--rec_scale', type=utils.nonneg_float, default=2.,
                   help='recurrent weights: Kaiming normal with variance rec_scale / n_rec')
    g.add_argument('--syn_gain', type=utils.positive_float, default=0.3,
                   help='scale of the synaptic input c in g_t = g_{t-1} exp(-dt/tau_syn) + syn_gain c; with 1 '
                        'and tau_syn 100 BPTT stays at chance (docs/dms.md, "BPTT and the synapse")')
    g.add_argument('--spk_fun', choices=utils.SURROGATE_NAMES, default='relu',
                   help='surrogate gradient of the spike (relu: max(0, 0.3 (1 - |u|)))')
    g.add_argument('--diff_spike', type=int, choices=(0, 1), default=0,
                   help='1 = let the gradient flow through the reset spike too (gif: the spike into the '
                        'adaptation current always carries gradient; lif-delta, alif-delta: the reset)')
    g.add_argument('--tau_o', type=utils.positive_float, default=10., help='readout time constant (ms)')
    g.add_argument('--readout_scale', type=utils.positive_float, default=0.1,
                   help='readout weights ~ N(0, readout_scale^2 / n_rec): first outputs O(1)')
    g.add_argument('--tau_adapt', type=utils.positive_float, default=2000.,
                   help='alif-delta: threshold adaptation time constant (ms)')
    g.add_argument('--beta', type=utils.nonneg_float, default=1.8,
                   help='alif-delta: threshold increase per unit of adaptation (V_th + beta b)')


def build_network(args, task):
    """The network of --model for the task's sizes: the GIF DMSNet, or one SpikingStack layer (alif-delta,
    lif-delta); --freeze_rec 1 keeps the recurrent layer fixed (on a SpikingStack: BPTT only)."""
    import models
    if args.model == 'gif':
        return models.DMSNet(task.n_in, args.n_rec, task.n_out, dt=args.dt, tau_neu=args.tau_neu, tau_syn=args.tau_syn,
                             tau_I2=args.tau_I2, A2=args.A2, ff_scale=args.ff_scale, rec_scale=args.rec_scale,
                             spk_fun=args.spk_fun, diff_spike=bool(args.diff_spike), syn_gain=args.syn_gain,
                             tau_o=args.tau_o, readout_scale=args.readout_scale, seed=args.seed,
                             memory=memory_layout(args), freeze_rec=bool(args.freeze_rec))
    if args.n_memory and args.model != 'alif-delta':
        raise utils.UserError(f'--n_memory {args.n_memory} (the memory neurons) needs --model gif or alif-delta; '
                              f'with --model {args.model} add --n_memory 0')
    if args.n_memory > args.n_rec:
        raise utils.UserError(f'--n_memory {args.n_memory} > --n_rec {args.n_rec}')
    if args.freeze_rec and args.method != 'bptt':
        raise utils.UserError(f'--freeze_rec 1 with --model {args.model} needs --method bptt (the online rules '
                              f'freeze only the gif network); use --model gif or --method bptt')
    model = models.SpikingStack(task.n_in, args.n_rec, task.n_out, 1, model=args.model, dt=args.dt,
                                tau_mem=args.tau_neu, tau_o=args.tau_o, ff_scale=args.ff_scale,
                                rec_scale=args.rec_scale, spk_fun=args.spk_fun, readout_scale=args.readout_scale,
                                seed=args.seed, tau_adapt=args.tau_adapt, beta=args.beta,
                                detach_reset=not args.diff_spike)
    if args.n_memory:  # the credit layout: slow memory neurons with weak initial weights, the others fast (or LIF)
        import numpy as np
        from rsnn.neurons import lif
        fast = None if args.memory_others == 'lif' else (args.tau_fast_min, 1.5 * args.tau_I2)
        lif.memory_layout(model.layers[0], task.n_in, np.random.default_rng([args.seed, 1]), n_memory=args.n_memory,
                          tau_memory=args.tau_memory, tau_fast=fast, in_scale=args.memory_in_scale,
                          rec_scale=args.memory_rec_scale, dt=args.dt)
    for layer in model.layers:
        layer.freeze = bool(args.freeze_rec)  # models.run_layer and stateful_update stop its gradient
    return model


def train_and_evaluate(args, run_dir: str) -> dict:
    import brainstate
    import models
    from rsnn.trainer import Trainer, cosine_schedule

    devices = utils.select_devices(args.devices, args.distributed)
    brainstate.environ.set(dt=args.dt)  # before the network is built: the readout reads dt
    task = make_task(args)
    model = build_network(args, task)
    lr = args.lr if args.lr_schedule == 'constant' else \
        cosine_schedule(args.lr, args.epochs * args.batches_per_epoch)
    trainer = Trainer(model, args.method, task.n_in, args.batch_size, optimizer=args.optimizer,
                      lr=lr, grad_clip=args.grad_clip, etrace_decay=args.etrace_decay,
                      vjp_time=args.vjp_time, devices=devices, trace_chunk=args.trace_chunk,
                      protocol=args.protocol, reset_per_trial=bool(args.stream_reset),
                      rule_options=dict(utils.rule_options(args), **tbptt_options(args, task)))
    sizes = dict(n_steps=task.n_steps, test_start=task.decision_start, n_params=models.count_params(model),
                 device=utils.devices_name(devices), n_devices=len(devices))
    name = 'DMS' if task.name == 'dms' else task.name
    if args.protocol == 'stream':
        summary = train_on_stream(args, trainer, run_dir, task, sizes, name)
    else:
        summary = train_on_trials(args, trainer, run_dir, task, sizes, name)
    print('summary:', {k: (round(v, 4) if isinstance(v, float) else v) for k, v in summary.items()})
    return summary


def train_on_trials(args, trainer, run_dir: str, task, sizes: dict, name: str) -> dict:
    import datasets
    from rsnn import train_loop
    print(f'{name}: {task.n_steps} steps per trial (decision from step {task.decision_start}), {args.n_rec} '
          f'{args.model.upper()} neurons, {sizes["n_params"]} weights, {methods.title(args.method)} on '
          f'{sizes["device"]}; run folder {run_dir}', flush=True)
    train_batches = tasks.train_loader(task, args.batch_size, args.batches_per_epoch, args.seed,
                                       args.n_data_worker, rows=trainer.placement.local_rows())
    test_set = tasks.test_set(task, args.n_test_trials, args.batch_size, args.seed)
    settings = train_loop.LoopSettings.from_args(args, acc_th=args.acc_th, smooth=args.acc_th_window)
    config = dict(vars(args), run_dir=run_dir, **sizes, trace_chunk_used=trainer.trace_chunk)
    val_set = tasks.test_set(task, args.validation, args.batch_size, args.seed,
                             key=datasets.VALIDATION_KEY) if args.validation else None
    return train_loop.fit(settings, trainer, run_dir, train_batches, lambda: test_set, task.loss_weights(), config,
                          validation_batches=(lambda: val_set) if val_set else None)


def train_on_stream(args, trainer, run_dir: str, task, sizes: dict, name: str) -> dict:
    from rsnn import stream_protocol
    cfg = stream_protocol.StreamConfig.from_flags(vars(args), title=name)
    print(f'{name} stream: {args.batch_size} streams, {task.n_steps} steps per trial + ITI {args.t_iti} ms, '
          f'{cfg.chunk_ms:g} ms per update, {args.n_rec} {args.model.upper()} neurons, '
          f'{methods.title(args.method)}; run folder {run_dir}', flush=True)
    return stream_protocol.fit_stream(cfg, trainer, run_dir, task, vars(args), extra_config=sizes)


def make_task(args):
    """The trial task of --dataset from the flags (rsnn/tasks); bad sizes are a one-line error."""
    try:
        return tasks.make_task(vars(args))
    except ValueError as e:
        raise utils.UserError(str(e))


def memory_layout(args):
    """models.credit_layout's arguments for --n_memory > 0 (the credit task), else None."""
    if not args.n_memory:
        return None
    if args.n_memory > args.n_rec:
        raise utils.UserError(f'--n_memory {args.n_memory} > --n_rec {args.n_rec}')
    return dict(n_memory=args.n_memory, tau_memory=args.tau_memory, tau_fast_min=args.tau_fast_min,
                in_scale=args.memory_in_scale, rec_scale=args.memory_rec_scale)


def tbptt_options(args, task) -> dict:
    """The BPTT rule's TBPTT(k1, k2) window on a stream (rsnn/rules/bptt.py); none otherwise."""
    if args.protocol != 'stream' or args.method != 'bptt' or args.tbptt_k2 is None:
        return {}
    return dict(tbptt_k1_steps=task.steps(args.tbptt_window), tbptt_k2_steps=task.steps(args.tbptt_k2))


def check_sizes(args):
    """Refuse, before anything is allocated, sizes whose trial arrays alone exceed the memory available."""
    task = make_task(args)
    per_trial = task.n_steps * task.n_in  # uint8 spikes; generating them takes two float32 arrays more
    utils.check_memory([
        ('--n_test_trials', args.n_test_trials, args.n_test_trials * per_trial, 'the held-out trials'),
        ('--validation', args.validation, args.validation * per_trial, 'the validation trials'),
        ('--batch_size', args.batch_size, args.batch_size * per_trial * 9 * (1 + 2 * args.n_data_worker),
         'generating one batch of trials'),
    ])


def main(argv) -> int:
    utils.start_distributed(argv)  # first: before anything imports brainscale (which starts a backend)
    args = run_folder.parse_args(build_parser(), argv, PRESETS)
    args.experiment = args.dataset  # results/<dataset>/<exp_name>/<method>-<timestamp> (dms: as always)
    utils.check_batch_for_devices(args.batch_size, args.devices)  # before anything is written
    check_sizes(args)
    run_dir = run_folder.prepare_run_dir(args)  # locked: another process cannot write it until this one ends
    try:
        summary = train_and_evaluate(args, run_dir)
    finally:
        run_folder.release_run_dir()
    return 1 if summary['stopped_because'] == 'nan' else 0


if __name__ == '__main__':
    utils.cli_main(main)
