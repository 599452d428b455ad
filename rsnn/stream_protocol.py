"""--protocol stream: the plan of a stream run (the training and held-out streams, the chunks), its
evaluation on the held-out stream and its checkpoint contents, for a Trainer built with protocol='stream'
(rsnn/trainer.py: one update per chunk of stream, the neuron states and the rule's traces carried from one
chunk to the next; online rules step by step or chunked, BPTT truncated to the chunk).
"""
from __future__ import annotations

import collections
import json
import os
import sys
import time

import numpy as np

from rsnn import dms_stream, methods, run_folder
import utils


BURN_IN_TRIALS = 1  # the held-out stream's first trial of every stream is run but not scored


def evaluate_stream(st, stream, n_trials_per_stream: int, burn_in: int = BURN_IN_TRIALS):
    """Held-out accuracy and loss of the current weights, frozen, on n_trials_per_stream trials of every
    stream of `stream` (a DMSStream) after `burn_in` trials per stream that are run but not scored (the
    first trial starts from zero states, which the training stream never has), run from zero states without
    any reset (unless the trainer's reset_per_trial control). The training states and traces are put back
    afterwards. Returns (loss, accuracy, trials scored)."""
    saved = st.get_states()
    st.reset(with_rule=False)
    scorer = dms_stream.TrialScorer(stream.n_streams)
    correct, losses = [], []
    for k in range(stream.chunks_for_trials(n_trials_per_stream + burn_in)):
        chunk = stream.chunk(k)
        outs, per_stream = st.eval_chunk(chunk)
        for t, ok, loss in scorer.add(chunk, outs, per_stream):
            if burn_in <= t.index < n_trials_per_stream + burn_in:
                correct.append(ok)
                losses.append(loss)
    st.set_states(saved)
    return float(np.mean(losses)), float(np.mean(correct)), len(correct)


# --------------------------------------------------------------------------------------------
# The stream loop: run folder, checkpoints (with the stream's state), evaluation
# --------------------------------------------------------------------------------------------

TRIALS_TO = 0.9  # summary: the training trials after which the held-out accuracy first reached this


def stream_extra(trainer, chunks_done: int, scorer) -> dict:
    """What a stream's checkpoint holds besides the weights and the optimizer: the states and traces the
    stream carries (by their names), the chunk index and the partial test-period sums of the scorer."""
    # 32-bit, as jax restores them (x64 off): the checksum compares dtypes too
    return {'stream_state': trainer.get_states(), 'chunks_done': np.asarray(chunks_done, np.int32),
            'partial': np.asarray(scorer.partial, np.float32), 'loss_partial': np.asarray(scorer.loss_partial, np.float32)}


def restore_stream(ckpt, trainer, scorer):
    """-> (evaluation step, chunks done, meta): the newest checkpoint that restores and verifies (a damaged
    one is set aside with one warning line, as for trials), loaded into trainer and scorer."""
    extra = stream_extra(trainer, 0, scorer)
    step, meta = ckpt.restore(trainer, extra=extra)
    trainer.set_states(dict(extra['stream_state']))
    scorer.partial[:] = np.asarray(extra['partial'])
    scorer.loss_partial[:] = np.asarray(extra['loss_partial'])
    return int(step), int(extra['chunks_done']), meta


def chunk_ms(args) -> float:
    """The stretch of stream per update: the TBPTT window for bptt, --update_every for the online methods."""
    return args.tbptt_window if args.method == 'bptt' else args.update_every


def stream_plan(args, cfg):
    """The training stream, the held-out stream and the number of chunks of the run."""
    try:
        iti = dms_stream.parse_iti(args.t_iti)
    except ValueError as e:
        raise utils.UserError(str(e))
    steps = cfg.steps(chunk_ms(args))
    if steps < 1:
        raise utils.UserError(f'--{"tbptt_window" if args.method == "bptt" else "update_every"} must be at '
                              f'least one step of dt={cfg.dt} ms')
    train = dms_stream.DMSStream(cfg, args.batch_size, steps, args.seed, iti)
    held_out = dms_stream.DMSStream(cfg, args.batch_size, cfg.steps(EVAL_CHUNK_MS), args.seed, iti,
                                    salt=dms_stream.HELD_OUT_SALT)
    n_chunks = int(np.ceil(args.stream_trials * train.mean_period_steps() / steps))
    return train, held_out, n_chunks


EVAL_CHUNK_MS = 2000.  # the held-out stream is cut into chunks of this length (the same for every method)


def fit_stream(args, trainer, run_dir: str, cfg, extra_config: dict = None) -> dict:
    """Train on the stream for --stream_trials trials per stream; evaluate on the held-out stream every
    --eval_every_trials trials per stream. Writes config.json, batches.csv (one row per update),
    metrics.csv (one row per evaluation), learning_curves.png, checkpoints and summary.json."""
    st = trainer
    train, held_out, n_chunks = stream_plan(args, cfg)
    if getattr(args, 'check_grad', False) or getattr(args, 'check_grad_every', None):
        print('note: --check_grad compares gradients on independent trials; the stream protocol has none '
              '(no grad_fidelity.csv)', file=sys.stderr, flush=True)
    n_test = int(np.ceil(args.n_test_trials / args.batch_size))
    period = train.mean_period_steps()
    eval_steps = args.eval_every_trials * period
    log = run_folder.RunLog(run_dir)
    config = dict(vars(args), run_dir=run_dir, chunk_steps=train.chunk_steps, n_chunks=n_chunks,
                  mean_period_steps=period, n_test_trials_used=n_test * args.batch_size,
                  held_out_burn_in_trials=BURN_IN_TRIALS,
                  trace_chunk_used=trainer.trace_chunk, **(extra_config or {}))
    scorer = dms_stream.TrialScorer(args.batch_size)
    ckpt = run_folder.Checkpoints(run_dir)
    try:
        step, chunks_done, meta = 0, 0, {}
        if args.resume:
            with open(os.path.join(run_dir, 'config.json')) as f:
                saved = json.load(f)
            if saved.get('batch_size', args.batch_size) != args.batch_size:
                raise utils.UserError(f'--resume {run_dir}: --batch_size is the number of streams; it cannot change '
                                      f'in a resumed stream run (the run has {saved["batch_size"]})')
            step, chunks_done, meta = restore_stream(ckpt, st, scorer)
            log.truncate_after(step)
            print(f'resumed {run_dir} after evaluation {step} (chunk {chunks_done} of {n_chunks})', flush=True)
        log.write_config(config)
        summary = stream_loop(args, st, log, ckpt, train, held_out, n_chunks, n_test, eval_steps,
                              scorer, step, chunks_done, meta)
        log.write_summary(summary)
        return summary
    finally:
        ckpt.close()


def stream_loop(args, st, log, ckpt, train, held_out, n_chunks, n_test, eval_steps, scorer, step, chunks_done,
                meta) -> dict:
    U = train.chunk_steps
    best = meta.get('best_test_acc', -1.)
    trials_done = meta.get('trials_done', 0)
    recent = collections.deque(meta.get('recent', []), maxlen=ROLLING_TRIALS)
    seconds_before, first_step_s = meta.get('seconds', 0.), None
    since = dict(correct=0, n=0, loss=0., step_s=0., timed=0, gnorm=[])
    t0, stopped = time.time(), 'stream_trials'
    metrics = log.read_metrics()
    for k in range(chunks_done, n_chunks):
        chunk = train.chunk(k)
        ts = time.time()
        loss, gnorm, applied, outs, per_stream = st.train_chunk(chunk)
        if first_step_s is None:
            first_step_s = time.time() - ts
        else:
            since['step_s'] += time.time() - ts
            since['timed'] += 1
        if not st.last_update_finite:
            stopped = 'nan'
            print(f'chunk {k}: the loss, the gradient norm or the weights became NaN or infinite; stopping '
                  f'(the last good checkpoint is kept)', flush=True)
            break
        for _, ok, trial_loss in scorer.add(chunk, outs, per_stream):
            recent.append(ok)
            since['correct'] += ok
            since['n'] += 1
            since['loss'] += trial_loss
            trials_done += 1
        if applied:
            since['gnorm'].append(gnorm)
        log.append_batch(dict(epoch=step + 1, batch=k + 1, stream_s=(k + 1) * U * train.cfg.dt / 1000.,
                              trials=trials_done, loss=loss, acc=float(np.mean(recent)) if recent else float('nan'),
                              grad_norm=gnorm, updated=int(applied), seconds=round(time.time() - ts, 4)))
        if int((k + 1) * U // eval_steps) > int(k * U // eval_steps) or k == n_chunks - 1:
            step += 1
            st.pop_eval_rates()
            test_loss, test_acc, _ = evaluate_stream(st, held_out, n_test)
            rates = st.pop_eval_rates()
            best = max(best, test_acc)
            row = dict(epoch=step, batches=k + 1, stream_s=(k + 1) * U * train.cfg.dt / 1000.,
                       trials_per_stream=(k + 1) * U / train.mean_period_steps(), trials=trials_done,
                       train_loss=since['loss'] / max(since['n'], 1), train_acc=since['correct'] / max(since['n'], 1),
                       test_loss=test_loss, test_acc=test_acc,
                       grad_norm=float(np.mean(since['gnorm'])) if since['gnorm'] else float('nan'),
                       seconds=seconds_before + time.time() - t0,
                       step_s_per_batch=since['step_s'] / since['timed'] if since['timed'] else float('nan'))
            row['s_per_1000_steps'] = row['step_s_per_batch'] * 1000. / U
            row.update(update_stats(since['gnorm'], args.grad_clip), **weight_norms(st))
            row['test_rate_hz'] = 1000. / train.cfg.dt * float(np.mean(rates)) if rates else float('nan')
            log.append(row)
            metrics.append(row)
            since = dict(correct=0, n=0, loss=0., step_s=0., timed=0, gnorm=[])
            meta = dict(best_test_acc=best, trials_done=trials_done, recent=list(recent),
                        seconds=seconds_before + time.time() - t0)
            ckpt.save(st, step, meta, best=test_acc >= best, extra=stream_extra(st, k + 1, scorer))
            print(f'{row["trials_per_stream"]:.0f} trials per stream ({row["stream_s"]:.0f} s of stream): train '
                  f'acc {row["train_acc"]:.3f} | held-out loss {test_loss:.4f} acc {test_acc:.3f} | '
                  f'{row["s_per_1000_steps"]:.3f} s per 1000 steps', flush=True)
    run_folder.plot_learning_curves(metrics, os.path.join(log.run_dir, 'learning_curves.png'),
                               f'DMS stream, {methods.title(args.method)}, {chunk_ms(args):g} ms per update')
    return stream_summary(args, metrics, best, recent, stopped, first_step_s, train, st, log.run_dir)


def update_stats(gnorms, grad_clip: float) -> dict:
    """The gradient norms (before the clip) of the updates applied since the last evaluation: median,
    maximum and the fraction that the clip to --grad_clip shortened."""
    g = np.asarray(gnorms, np.float64)
    if not g.size:
        return dict(grad_norm_median=float('nan'), grad_norm_max=float('nan'), clipped_frac=float('nan'))
    return dict(grad_norm_median=float(np.median(g)), grad_norm_max=float(g.max()),
                clipped_frac=float(np.mean(g > grad_clip)))


def weight_norms(st) -> dict:
    """Frobenius norms of the recurrent layer's input and recurrent weights (rows [x, s] of W) and of the
    readout, where the network is a DMSNet; {} otherwise."""
    rec = getattr(st.model, 'rec', None)
    if rec is None or not hasattr(rec, 'n_in'):
        return {}
    values = st.param_values()
    w = values.get('rec/linear/weight_op')
    w = np.asarray(w['weight'] if isinstance(w, dict) else w)
    out = dict(w_in_norm=float(np.linalg.norm(w[:rec.n_in])), w_rec_norm=float(np.linalg.norm(w[rec.n_in:])))
    r = values.get('out/linear/weight_op')
    if r is not None:
        out['w_out_norm'] = float(np.linalg.norm(np.asarray(r['weight'] if isinstance(r, dict) else r)))
    return out


ROLLING_TRIALS = 256  # the rolling training accuracy: the last trials that ended, over all streams


def stream_summary(args, metrics, best, recent, stopped, first_step_s, train, st, run_dir) -> dict:
    last = metrics[-1] if metrics else {}
    reached = [r for r in metrics if r['test_acc'] >= TRIALS_TO]
    timed = [r['s_per_1000_steps'] for r in metrics if np.isfinite(r.get('s_per_1000_steps', float('nan')))]
    memory = st.stream_update_memory(train.chunk_steps, train.cfg.n_input)
    return dict(method=args.method, protocol='stream', chunk_ms=chunk_ms(args), chunk_steps=train.chunk_steps,
                stream_reset=int(args.stream_reset), stream_trials=args.stream_trials,
                updates=int(last.get('batches', 0)), stream_s=last.get('stream_s'),
                trials=int(last.get('trials', 0)), test_acc=last.get('test_acc'),
                best_test_acc=best if best >= 0 else None,
                rolling_train_acc=float(np.mean(recent)) if recent else None,
                trials_per_stream_to_0_9=reached[0]['trials_per_stream'] if reached else None,
                stopped_because=stopped, seconds=last.get('seconds'), compile_and_first_step_s=first_step_s,
                s_per_1000_steps=float(np.median(timed)) if timed else None,
                update_temp_mb=memory['temp_bytes'] / 2 ** 20,
                update_memory_mb=(memory['temp_bytes'] + memory['argument_bytes'] + memory['output_bytes']
                                  - memory['alias_bytes']) / 2 ** 20,
                peak_rss_mb=utils.peak_rss_mb(), run_dir=run_dir)
