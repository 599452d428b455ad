"""N-MNIST and SHD classification: a stack of recurrent LIF layers trained by BPTT, D-RTRL or ES-D-RTRL.

Events are read by tonic (N-MNIST: first saccade only; SHD), binned into --data_length frames by
tonic.transforms.ToFrame (counts per bin, float32), cached on disk once, and fed time-major
(T, batch, n_in) to the network: N-MNIST 2 x 34 x 34 = 2312 inputs, 10 classes; SHD 700 inputs, 20 classes.

    python task-image-classification.py --devices 0 --dataset nmnist --data_length 400 --epoch 100 \\
        --n_layer 3 --n_rec 512 --method bptt --model lif-delta --exp_name test-nmnist --warmup_ratio 0.
    python task-image-classification.py --preset smoke --method bptt   # seconds, on a tiny synthetic stand-in
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import utils

from rsnn import argparse_adapter, run_folder
from rsnn import datasets as dataset_table
from rsnn import methods


SMOKE_DATA = os.path.join('data', 'synthetic-smoke')
# the tiny stand-in that --preset smoke reads, made by this command where it is absent
SMOKE_DATA_COMMAND = ('python scripts/synthetic_events.py --dataset {dataset} --out {data_dir} --n_train 128 --n_test 64 '
                      '--seed 0 --no_baselines')

PRESETS = {
    # Seconds on a CPU: one layer of 64 LIF neurons, 50 bins, 2 epochs of 8 batches of 16 on a tiny synthetic
    # stand-in (128 train / 64 test recordings in data/synthetic-smoke, made on first use); run it with two
    # --method values to see two rules train the same network on the same batches.
    'smoke': dict(data_dir=SMOKE_DATA, data_length=50, n_layer=1, n_rec=64, batch_size=16, batches_per_epoch=8,
                  eval_batches=4, epochs=2, exp_name='smoke', devices='cpu'),
}


def milestone_list(text: str) -> list:
    """--lr_milestones '30,60' -> [30, 60] (epochs)."""
    text = str(text).strip()
    if not text:
        return []
    try:
        values = [int(v) for v in text.replace(' ', '').split(',') if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a comma list of epochs such as 30,60, got {text!r}')
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f'milestone epochs must be > 0, got {text!r}')
    return sorted(values)


def build_parser():
    p = utils.base_parser(__doc__.split('\n')[0], experiment='image')
    p.set_defaults(epochs=100, batch_size=128, etrace_decay=0.9)
    argparse_adapter.set_help(p, 'out_dir', 'run folder (None = results/<dataset>/<exp_name>/<method>-<timestamp>): '
                              'a new or empty folder, or a run of this repository stopped before its first '
                              'checkpoint')  # the run folder is named after --dataset (see main)
    p.add_argument('--preset', choices=sorted(PRESETS), default=None,
                   help='a named set of defaults; flags given explicitly win. smoke: seconds on a CPU, 1 x 64 LIF on '
                        'a tiny synthetic stand-in in data/synthetic-smoke (made on first use: ' +
                        SMOKE_DATA_COMMAND.format(dataset='nmnist', data_dir=SMOKE_DATA) + ')')
    g = p.add_argument_group('data')
    g.add_argument('--dataset', choices=dataset_table.names(dataset_table.IMAGE_SCRIPT), default='nmnist',
                   help='; '.join(f'{d.name} = {d.title} ({d.n_in} inputs, {d.n_classes} classes)' for d in
                                  dataset_table.DATASETS.values() if d.script == dataset_table.IMAGE_SCRIPT))
    g.add_argument('--data_dir', default='./data',
                   help='folder holding NMNIST/ or SHD/ as tonic lays them out (downloaded there if absent)')
    g.add_argument('--cache_dir', default=None,
                   help='where the framed data are cached (None = <data_dir>/cache)')
    g.add_argument('--data_length', type=utils.positive_int, default=400,
                   help='time bins per sample (tonic ToFrame n_time_bins) = time steps T')
    g.add_argument('--warmup_ratio', type=utils.nonneg_float, default=0.,
                   help='steps without loss at the start: a fraction of T if < 1, a number of steps if >= 1')
    g.add_argument('--drop_last', type=int, choices=(0, 1), nargs='?', const=1, default=0,
                   help='drop the last short training batch (otherwise it is padded and masked)')
    g.add_argument('--batches_per_epoch', type=utils.positive_int, default=None,
                   help='cap on training batches per epoch (None = the whole training split)')
    g.add_argument('--validation', type=utils.nonneg_int, default=0, metavar='N',
                   help='hold N training samples apart (the same N for every seed and rule: rsnn/validation.py) '
                        'and evaluate on them at every evaluation: val_loss, val_acc in metrics.csv (what '
                        'scripts/benchmark.py tunes on); the training set is the rest; 0 = none')
    g.add_argument('--eval_batches', type=utils.positive_int, default=None,
                   help='cap on test batches per evaluation (None = the whole test split)')
    g = p.add_argument_group('network')
    g.add_argument('--model', choices=utils.MODEL_NAMES, default='lif-delta', help=utils.model_help())
    g.add_argument('--n_layer', type=utils.positive_int, default=3, help='recurrent spiking layers')
    g.add_argument('--n_rec', type=utils.positive_int, default=512, help='neurons per recurrent layer')
    g.add_argument('--dt', type=utils.positive_float, default=1., help='time step (ms) of one bin')
    g.add_argument('--tau_mem', type=utils.positive_float, default=10.,
                   help='mean membrane time constant (ms); drawn per neuron')
    g.add_argument('--tau_mem_sigma', type=utils.nonneg_float, default=1.,
                   help='standard deviation (ms) of the per-neuron membrane time constants')
    g.add_argument('--tau_o', type=utils.positive_float, default=10., help='readout time constant (ms)')
    g.add_argument('--tau_syn', type=utils.positive_float, default=5.,
                   help='lif-exp-cu: time constant (ms) of the exponential current synapse')
    g.add_argument('--tau_adapt', type=utils.positive_float, default=200.,
                   help='alif-delta: time constant (ms) of the threshold adaptation b')
    g.add_argument('--beta', type=utils.nonneg_float, default=1.8,
                   help='alif-delta: threshold V_th + beta b, b jumps by 1 at each spike')
    g.add_argument('--V_th', type=utils.positive_float, default=1., help='firing threshold')
    g.add_argument('--ff_scale', type=utils.positive_float, default=10.,
                   help='feed-forward weights: Kaiming normal with variance ff_scale / fan_in')
    g.add_argument('--rec_scale', type=utils.nonneg_float, default=0.5,
                   help="recurrent weights: Kaiming normal with variance rec_scale / n_rec (the authors' SHD "
                        'value; their default 2 learned less here, docs/image-classification.md, '
                        '"Why the README size learns")')
    g.add_argument('--detach_reset', type=int, choices=(0, 1), default=0,
                   help="1 = no gradient through the reset (V -= V_th s); 0 (the authors' LIF) keeps it: at T 400 "
                        "BPTT's gradient explodes when it is detached")
    g.add_argument('--init_rate', type=utils.nonneg_float, default=0.05,
                   help='data-dependent init: scale each layer\'s feed-forward weights (bottom up) so that it '
                        'fires this many spikes per neuron per step on 16 training samples; 0 = plain Kaiming '
                        'with --ff_scale')
    g.add_argument('--spk_fun', choices=utils.SURROGATE_NAMES, default='relu',
                   help='surrogate gradient of the spike')
    g.add_argument('--spk_reset', choices=('soft', 'hard'), default='soft',
                   help='soft: V -= V_th after a spike; hard: V = 0')
    g.add_argument('--readout_scale', type=utils.positive_float, default=1.,
                   help='readout weights ~ N(0, readout_scale^2 / n_rec)')
    g = p.add_argument_group('loss and schedule')
    g.add_argument('--loss', choices=('cel', 'mse'), default='cel',
                   help='cel = softmax cross-entropy; mse = squared error to the one-hot label')
    g.add_argument('--lr_milestones', type=milestone_list, default=[],
                   help="comma list of epochs at which the learning rate is multiplied by 0.1, e.g. '30,60'")
    g.add_argument('--weight_L2', type=utils.nonneg_float, default=0.,
                   help='L2 penalty coefficient: weight_L2 * w is added to every gradient')
    return p


def warmup_steps(warmup_ratio: float, T: int) -> int:
    """Steps without loss: int(T r) for r < 1, int(r) for r >= 1."""
    return int(T * warmup_ratio) if warmup_ratio < 1 else int(warmup_ratio)


def step_weights(T: int, warmup_ratio: float):
    import numpy as np
    warm = warmup_steps(warmup_ratio, T)
    if warm >= T:
        raise utils.UserError(f'--warmup_ratio {warmup_ratio} leaves no step with a loss out of '
                              f'--data_length {T} (warm-up {warm} steps)')
    w = np.zeros(T, np.float32)
    w[warm:] = 1. / (T - warm)
    return w


def open_data(args):
    """(the dataset's description, tonic's train and test datasets); raises a UserError, leaving nothing
    behind, when the files are absent."""
    from rsnn import event_data
    info = event_data.event_dataset(args.dataset)
    return (info, event_data.open_tonic_dataset(info, args.data_dir, True),
            event_data.open_tonic_dataset(info, args.data_dir, False))


def frame_data(args, data=None):
    """(info, [train split, test split]) framed from the cache (framing it on first use); a damaged data file
    is a UserError naming it."""
    from rsnn import event_data
    info, train_ds, test_ds = data if data is not None else open_data(args)
    splits = [event_data.load_framed_split(info, args.data_dir, train, args.data_length,
                                           cache_dir=args.cache_dir, n_workers=args.n_data_worker, ds=ds,
                                           progress=not args.no_progress)
              for train, ds in ((True, train_ds), (False, test_ds))]
    if len(splits[1]) == 0:
        raise utils.UserError(f'the {info.title} test split in {args.data_dir} has no samples: there is nothing to '
                              f'measure test accuracy on; check the dataset files')
    return info, splits


def train_and_evaluate(args, run_dir: str, data=None, ws=None, framed=None) -> dict:
    """data: open_data(args), ws: step_weights(...), framed: frame_data(args, data) when main has them."""
    import brainstate
    import numpy as np
    from rsnn import event_data
    import models
    from rsnn import train_loop
    from rsnn.trainer import Trainer, step_schedule

    ws = step_weights(args.data_length, args.warmup_ratio) if ws is None else ws
    warm = len(ws) - int(np.count_nonzero(ws))  # the steps without loss
    info, splits = framed if framed is not None else frame_data(args, data)
    val_batches = None
    if args.validation:
        from rsnn import validation
        try:
            splits[0], val_split = validation.hold_apart(splits[0], args.validation)
        except ValueError as e:
            raise utils.UserError(str(e))
        _, val_batches = event_data.event_loaders(splits[0], val_split, batch_size=args.batch_size, seed=args.seed,
                                                  n_workers=args.n_data_worker)
    train_batches, test_batches = event_data.event_loaders(
        *splits, batch_size=args.batch_size, seed=args.seed, n_workers=args.n_data_worker,
        drop_last=bool(args.drop_last), batches_per_epoch=args.batches_per_epoch, eval_batches=args.eval_batches)
    n_batches = len(train_batches(1))

    devices = utils.select_devices(args.devices, args.distributed)
    brainstate.environ.set(dt=args.dt)  # before the network is built: the readout reads dt
    model = models.SpikingStack(info.n_in, args.n_rec, info.n_classes, args.n_layer, model=args.model,
                                dt=args.dt, tau_mem=args.tau_mem, tau_mem_sigma=args.tau_mem_sigma,
                                tau_o=args.tau_o, V_th=args.V_th, ff_scale=args.ff_scale,
                                rec_scale=args.rec_scale, spk_fun=args.spk_fun, spk_reset=args.spk_reset,
                                readout_scale=args.readout_scale, seed=args.seed, tau_syn=args.tau_syn,
                                tau_adapt=args.tau_adapt, beta=args.beta,
                                detach_reset=bool(args.detach_reset))
    ff_factors = init_rates = None
    if args.init_rate > 0:  # event frames are far sparser than Kaiming assumes (models.calibrate_feedforward)
        idx = np.random.default_rng([args.seed, 7]).permutation(len(splits[0]))[:16]
        ff_factors, init_rates = models.calibrate_feedforward(model, splits[0].batch(idx)[0], args.init_rate)
        print('init: feed-forward weights of layer ' + ', '.join(f'{i} x{f:.3g}' for i, f in enumerate(ff_factors))
              + f' for {args.init_rate} spikes per neuron per step (--init_rate); rates '
              + ', '.join(f'{r:.4f}' for r in init_rates), flush=True)
    lr = step_schedule(args.lr, args.lr_milestones, n_batches)
    trainer = Trainer(model, args.method, info.n_in, args.batch_size, optimizer=args.optimizer, lr=lr,
                               grad_clip=args.grad_clip, etrace_decay=args.etrace_decay, vjp_time=args.vjp_time,
                               loss=args.loss, weight_L2=args.weight_L2, devices=devices,
                               trace_chunk=args.trace_chunk, rule_options=utils.rule_options(args))
    print(f'{info.title}: {len(splits[0])} train / {len(splits[1])} test samples, {args.data_length} bins, '
          f'{info.n_in} inputs, {info.n_classes} classes; {args.n_layer} x {args.n_rec} {args.model}, '
          f'{models.count_params(model)} weights, {methods.title(args.method)} on {utils.devices_name(devices)}; '
          f'{n_batches} batches per epoch; loss on steps {warm}..{args.data_length - 1}; run folder {run_dir}',
          flush=True)
    config = dict(vars(args), run_dir=run_dir, n_in=info.n_in, n_classes=info.n_classes, warmup_steps=warm,
                  batches_per_epoch_used=n_batches, n_train=len(splits[0]), n_test=len(splits[1]),
                  train_cache=splits[0].folder, test_cache=splits[1].folder, n_params=models.count_params(model),
                  device=utils.devices_name(devices), n_devices=len(devices), ff_factors=ff_factors,
                  init_rates=init_rates, trace_chunk_used=trainer.trace_chunk)
    summary = train_loop.fit(train_loop.LoopSettings.from_args(args), trainer, run_dir, train_batches, test_batches,
                             ws, config, validation_batches=val_batches)
    print('summary:', {k: (round(v, 4) if isinstance(v, float) else v) for k, v in summary.items()})
    return summary


def make_smoke_data(args):
    """--preset smoke on its own stand-in: the tiny synthetic recordings, written by scripts/synthetic_events.py
    where --data_dir holds none for --dataset (a few seconds)."""
    folder = os.path.join(args.data_dir, {'nmnist': 'NMNIST', 'shd': 'SHD'}[args.dataset])
    if args.preset != 'smoke' or args.data_dir != SMOKE_DATA or os.path.isdir(folder):
        return
    command = SMOKE_DATA_COMMAND.format(dataset=args.dataset, data_dir=args.data_dir)
    print(f'note: --preset smoke: making its tiny synthetic stand-in: {command}', file=sys.stderr, flush=True)
    argv = command.split()
    argv[:2] = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), argv[1])]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ['no output'])[-1]
        raise utils.UserError(f'--preset smoke could not make its stand-in in {args.data_dir} ({last}); run {command}')


def main(argv) -> int:
    utils.start_distributed(argv)  # first: before anything imports brainscale (which starts a backend)
    args = run_folder.parse_args(build_parser(), argv, PRESETS)
    make_smoke_data(args)
    args.experiment = args.dataset  # results/<dataset>/<exp_name>/<method>-<timestamp>
    ws = step_weights(args.data_length, args.warmup_ratio)  # bad sizes fail before anything is written
    n_in = dataset_table.input_size(args.dataset)
    utils.check_memory([('--batch_size', args.batch_size, args.batch_size * args.data_length * n_in * 4 * 2,
                         'one batch of float32 event frames (and its copy on the device)')])
    utils.check_batch_for_devices(args.batch_size, args.devices)
    framed = frame_data(args)  # a missing or damaged dataset fails before the run folder exists
    if args.validation and args.validation >= len(framed[1][0]):
        raise utils.UserError(f'--validation {args.validation}: the training split has {len(framed[1][0])} samples; '
                              f'hold apart fewer')
    run_dir = run_folder.prepare_run_dir(args)  # locked: another process cannot write it until this one ends
    try:
        summary = train_and_evaluate(args, run_dir, ws=ws, framed=framed)
    finally:
        run_folder.release_run_dir()
    return 1 if summary['stopped_because'] == 'nan' else 0


if __name__ == '__main__':
    utils.cli_main(main)
