"""The flags of a run: parsed with the precedence command line > the saved config of --resume RUN_DIR >
--preset > defaults; what a resume may change; the saved configuration checked against the parser's flags
and against the configuration its newest checkpoint was written under. No jax."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

from rsnn import argparse_adapter
from rsnn.checkpoints import check_no_stray_steps
from rsnn.datasets import DATASETS
from rsnn.errors import UserError
from rsnn.files import json_value
from rsnn.run_marker import RUN_MARKER, has_checkpoint, is_run_folder, listdir


def parse_args(parser: argparse.ArgumentParser, argv, presets: Optional[dict] = None) -> argparse.Namespace:
    """Parse argv with this precedence: flags on the command line > the saved config of --resume RUN_DIR
    > the values of --preset NAME (presets[NAME]) > the parser's defaults.

    A first parse (which also answers --help and rejects bad flags) finds --preset and --resume; the
    preset and the saved config then become the parser's defaults (`set_defaults`) and argv is parsed
    once more, so the flags given on the command line win. A resume may change only RESUME_MAY_CHANGE.
    """
    argv = list(argv)
    args = parser.parse_args(argv)
    defaults = {}
    if getattr(args, 'preset', None):
        defaults.update(presets[args.preset])
    run_dir = getattr(args, 'resume', None)
    saved = {}
    if run_dir:
        saved = args_from_checkpoint(run_dir, parser)
        defaults.update({k: v for k, v in saved.items() if k in vars(args) and k not in NOT_FROM_SAVED})
    if defaults:
        parser.set_defaults(**defaults)
        args = parser.parse_args(argv)
    if run_dir:
        check_resume_overrides(args, saved, run_dir)
        if has_checkpoint(run_dir):
            args.resume = args.out_dir = run_dir
        else:  # interrupted before its first checkpoint: nothing to continue from; prepare_run_dir starts it
            args.resume, args.out_dir = None, run_dir  # over in place with its saved configuration
    return args


# Flags a resume never takes from the saved config.json: how this start is launched, not what the run is
# (a run trained with --distributed resumes on one process unless --distributed is given again).
NOT_FROM_SAVED = {'resume', 'distributed'}

# What a --resume may change: how long and where it trains (--stream_trials: a stream run goes on), how it shows progress, the learning-rate
# schedule and the batching. Everything else (method, network, task, data, seed, optimizer) is part of
# what the checkpoint means, and changing it is refused.
RESUME_MAY_CHANGE = {'epochs', 'lr', 'lr_schedule', 'lr_milestones', 'grad_clip', 'batch_size', 'batches_per_epoch',
                     'eval_batches', 'n_test_trials', 'acc_th', 'acc_th_window', 'devices', 'distributed',
                     'n_data_worker', 'no_progress', 'check_grad', 'check_grad_every', 'data_dir', 'cache_dir',
                     'exp_name', 'preset', 'stream_trials', 'eval_every_trials'}


def check_resume_overrides(args, saved: dict, run_dir: str):
    """One error line when a flag given with --resume changes what the checkpoint means, or names another
    run folder (--out_dir)."""
    out_dir = getattr(args, 'out_dir', None)
    if out_dir and out_dir != saved.get('out_dir') and os.path.realpath(out_dir) != os.path.realpath(run_dir):
        raise UserError(f'--resume {run_dir} --out_dir {out_dir}: a resumed run stays in its own folder; '
                        f'drop --out_dir (or copy {run_dir} to {out_dir} and resume the copy)')
    changed = [k for k, v in saved.items() if k in vars(args) and k not in RESUME_MAY_CHANGE | {'resume', 'out_dir'}
               and json_value(getattr(args, k)) != json_value(v)]
    if changed:
        k = changed[0]
        raise UserError(f'--resume {run_dir}: --{k} {getattr(args, k)} differs from the run\'s {saved[k]}; '
                        f'{", ".join("--" + c for c in changed)} cannot change in a resumed run (the checkpoint '
                        f'was trained with them); start a new run with another --out_dir instead')


def args_from_checkpoint(run_dir: str, parser: Optional[argparse.ArgumentParser] = None) -> dict:
    """The saved configuration of the run in RUN_DIR (config.json), after checking that the folder is a run
    of this repository, of this script (parser), and that every saved value passes its flag's check."""
    path = os.path.join(run_dir, 'config.json')
    if not os.path.isdir(run_dir):
        raise UserError(f'--resume {run_dir}: no checkpoint there (no such folder); give the folder of an earlier run')
    if not is_run_folder(run_dir):
        raise UserError(f'--resume {run_dir}: not a run folder of this repository (no {RUN_MARKER} and no '
                        f'checkpoint of ours); nothing there was changed')
    check_no_stray_steps(os.path.join(run_dir, 'checkpoints'), run_dir)
    if not os.path.exists(path) and checkpoint_config(run_dir) is not None:
        step, saved = checkpoint_config(run_dir)
        if parser is not None:
            check_saved_values(saved, parser, f'{run_dir}/checkpoints/last/{step}')
        print(f'note: {path} is missing; the configuration is taken from checkpoint last/{step} (it is written '
              f'back there when the run goes on)', file=sys.stderr, flush=True)
        return saved
    if not os.path.exists(path) and has_checkpoint(run_dir):
        raise UserError(f'--resume {run_dir}: config.json is missing and no checkpoint there holds a readable '
                        f'configuration; the run cannot be resumed: start a new run with another --out_dir')
    if not os.path.exists(path):
        if os.path.isdir(os.path.join(run_dir, 'checkpoints')):
            raise UserError(f'--resume {run_dir}: no checkpoint and no config.json there (stopped while '
                            f'starting); start it again with its flags and --out_dir {run_dir}')
        raise UserError(f'--resume {run_dir}: no checkpoint there (expected {run_dir}/config.json and '
                        f'{run_dir}/checkpoints/last); give the folder of an earlier run')
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f'--resume {run_dir}: {path} is not readable JSON ({str(e).splitlines()[0]}); '
                        f'repair it or start a new run')
    if not isinstance(saved, dict):
        raise UserError(f'--resume {run_dir}: {path} holds no configuration (a JSON object); repair it')
    if parser is not None:
        check_saved_values(saved, parser, path)
        check_config_matches_checkpoint(saved, run_dir, parser)
    return saved


def checkpoint_config(run_dir: str):
    """(step, config) of the newest step of checkpoints/last whose JSON meta is readable and holds the
    configuration the step was written under; None when there is none. Reads the meta file orbax writes
    (<step>/meta/metadata) directly: no jax."""
    last = os.path.join(run_dir, 'checkpoints', 'last')
    for step in sorted((int(n) for n in listdir(last) if n.isdigit()), reverse=True):
        try:
            with open(os.path.join(last, str(step), 'meta', 'metadata')) as f:
                meta = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict) and isinstance(meta.get('config'), dict):
            return step, meta['config']
    return None


def check_config_matches_checkpoint(saved: dict, run_dir: str, parser: argparse.ArgumentParser):
    """config.json against the configuration its newest checkpoint was written under: a flag that shapes
    the state (method, sizes, model, data, seed, optimizer: everything a resume may not change) that differs
    means config.json was edited, and is refused in one line naming the field and both values; the run is
    never continued as another run."""
    found = checkpoint_config(run_dir)
    if found is None:
        return
    step, written = found
    names = {f.dest: f.flags[0] for f in argparse_adapter.flags(parser)}
    for key, flag in names.items():
        if key in RESUME_MAY_CHANGE or key in ('resume', 'out_dir', 'help') or key not in written:
            continue
        if json_value(saved.get(key)) != json_value(written[key]):
            raise UserError(f'--resume {run_dir}: config.json has {key} = {json.dumps(saved.get(key))} but checkpoint '
                            f'last/{step} was trained with {json.dumps(written[key])}; config.json was changed after '
                            f'the run: set "{key}": {json.dumps(written[key])} there again (or delete config.json: '
                            f'it is then recovered from the checkpoint), or start a new run for another {flag}')


def check_saved_values(saved: dict, parser: argparse.ArgumentParser, path: str):
    """Each saved value as its flag would take it: a config.json edited by hand (or another script's)
    is refused in one line instead of training with a value the parser refuses."""
    options = argparse_adapter.flags(parser)
    datasets = [f.choices for f in options if f.dest == 'dataset']
    if datasets and 'dataset' in saved and saved['dataset'] not in datasets[0]:
        script = (DATASETS[saved['dataset']].script if saved.get('dataset') in DATASETS else 'the script that started it')
        raise UserError(f'{os.path.dirname(path) or "."} is a run of --dataset {saved.get("dataset")}, which this '
                        f'script does not train; resume it with {script}')
    for option in options:
        if option.dest not in saved or option.dest in ('help', 'resume'):
            continue
        flag, value = option.flags[0], saved[option.dest]
        problem = value_problem(option, value)
        if problem:
            raise UserError(f'{path}: {flag} {value!r} {problem}; correct it there or start a new run')


def value_problem(option, value) -> Optional[str]:
    """What is wrong with a saved `value` for `option` (an argparse_adapter.Flag), as its flag would take it;
    None when nothing is."""
    if value is None:
        return None if option.default is None else 'has no value'
    if option.choices is not None and value not in option.choices:
        return f'is not one of {", ".join(map(str, option.choices))}'
    if option.switch:
        return None if isinstance(value, bool) else 'is not true or false'
    if option.type is not None:
        text = ','.join(map(str, value)) if isinstance(value, list) else str(value)
        try:
            option.type(text)
        except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
            return f'is refused ({e})'
    return None
