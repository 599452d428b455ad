"""Training on an endless stream: one weight update per chunk of stream, states and traces never reset.

StreamTrainer wraps a Trainer (its model, online algorithm, optimizer and loss) and replaces its
per-batch step: the neuron states (and, for D-RTRL / ES-D-RTRL, the eligibility traces) that one chunk
ends with are the ones the next chunk starts from.

- online methods: brainscale's step, one time step at a time, the per-step gradients summed over the
  chunk (memory independent of the chunk length and of the stream length); the trace is never cleared.
- bptt: truncated BPTT. The chunk is the window: the states carried in are constants (stop_gradient),
  the gradient flows back to the window's first step and no further; memory grows with the window.

`reset_per_trial` (a control) zeroes a stream's states and traces at every trial start, which makes each
trial independent as in the trial protocol.
"""
from __future__ import annotations

import collections
import json
import os
import sys
import time

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from rsnn import run_folder
from rsnn import dms_stream, methods
import utils
from rsnn.trainer import path_key


# brainscale 0.1.0's eligibility-trace dicts: IODimVjpAlgorithm (ES-D-RTRL) and ParamDimVjpAlgorithm (D-RTRL)
TRACE_DICTS = ('etrace_xs', 'etrace_dfs', 'etrace_bwg')


class StreamTrainer:
    def __init__(self, trainer, reset_per_trial: bool = False):
        if trainer.mesh is not None:
            raise utils.UserError('--protocol stream runs on one device; give --devices 0 or cpu')
        self.trainer, self.reset_per_trial = trainer, reset_per_trial
        self._canonicalize()
        self.opt_state = trainer.opt_state
        self._train = brainstate.transform.jit(self._train_chunk)
        self._grads = brainstate.transform.jit(self._chunk_grads)
        self._eval = brainstate.transform.jit(self._eval_chunk)
        self.last_update_finite = True

    def _canonicalize(self):
        """Every state, weight and optimizer leaf as a committed, strongly typed jax array: the form a
        compiled update returns them in, so that the second update does not compile again."""
        strong = lambda v: jnp.array(v, dtype=jnp.asarray(v).dtype) if hasattr(v, 'dtype') or isinstance(v, (int, float)) else v
        node = self.trainer.algo if self.trainer.algo is not None else self.trainer.model
        for s in node.states().values():
            s.value = jax.tree.map(strong, s.value)
        self.trainer.opt_state = jax.tree.map(strong, self.trainer.opt_state)

    # -- the states a stream carries ------------------------------------------------------------
    def stream_states(self, with_algo: bool = True) -> dict:
        """name -> state of every state that is not a weight: the neurons' (by their path in the model)
        and, with_algo, the eligibility traces (by brainscale's dict and the position in it: its own keys
        hold Python ids, which differ from one process to the next, and the order of algo.states() changes
        after the first step, so neither can name a checkpointed trace)."""
        tr = self.trainer
        states = {'model/' + path_key(k): s for k, s in tr.model.states().items()
                  if not isinstance(s, brainstate.ParamState)}
        if with_algo and tr.algo is not None:
            for name in TRACE_DICTS:
                for i, st in enumerate(getattr(tr.algo, name, {}).values()):
                    states[f'{name}/{i}'] = st
            states['running_index'] = tr.algo.running_index
            known = {id(s) for s in states.values()}
            missed = [k for k, s in tr.algo.states().items() if not isinstance(s, brainstate.ParamState)
                      and id(s) not in known]
            if missed:
                raise RuntimeError(f'brainscale holds states the stream does not carry: {missed}')
        return states

    def get_stream_state(self, with_algo: bool = True) -> dict:
        return {k: s.value for k, s in self.stream_states(with_algo).items()}

    def set_stream_state(self, values: dict, with_algo: bool = True):
        for k, s in self.stream_states(with_algo).items():
            s.value = values[k]

    def reset_streams(self, with_algo: bool = True):
        """Zero states (and traces) of every stream: the start of a stream."""
        self.trainer._reset(self.trainer.batch_size, with_algo=with_algo and self.trainer.algo is not None)

    def _mask_reset(self, reset, with_algo: bool):
        """Zero the states (and traces) of the streams where `reset` (B,) is true: a trial starts there."""
        B = self.trainer.batch_size
        for s in self.stream_states(with_algo).values():
            def zero(v):
                if getattr(v, 'ndim', 0) >= 1 and v.shape[0] == B:
                    return jnp.where(reset.reshape((B,) + (1,) * (v.ndim - 1)), jnp.zeros_like(v), v)
                return v
            s.value = jax.tree.map(zero, s.value)

    # -- the loss of one step ------------------------------------------------------------------------
    def _step_loss(self, out, label, w):
        """sum_b w_b CE(out_b, label_b) / B: every stream's test period weighs as one trial."""
        per_stream = -jnp.take_along_axis(jax.nn.log_softmax(out, -1), label[:, None], -1)[:, 0]
        return jnp.sum(w * per_stream) / out.shape[0], w * per_stream

    # -- gradients of one chunk --------------------------------------------------------------------
    def _online_grads(self, xs, labels, ws, resets):
        tr = self.trainer

        def step(grad_sum, inp):
            x, label, w, reset = inp
            x = x.astype('float32')  # per step: the chunk's inputs stay uint8 (memory flat in the chunk)
            if self.reset_per_trial:
                self._mask_reset(reset, with_algo=True)

            def step_loss():
                out = tr.algo(x)
                loss, per_stream = self._step_loss(out, label, w)
                return loss, (out, per_stream)

            g, loss, (out, per_stream) = brainstate.transform.grad(
                step_loss, tr.params, return_value=True, has_aux=True)()
            return jax.tree.map(jnp.add, grad_sum, g), (loss, out, per_stream)

        zeros = jax.tree.map(jnp.zeros_like, {k: s.value for k, s in tr.params.items()})
        grads, (losses, outs, per_stream) = brainstate.transform.scan(step, zeros, (xs, labels, ws, resets))
        return grads, losses, outs, per_stream

    def _tbptt_grads(self, xs, labels, ws, resets):
        tr = self.trainer
        # The states carried in from the previous window are constants: the gradient stops here.
        for s in self.stream_states(with_algo=False).values():
            s.value = jax.tree.map(jax.lax.stop_gradient, s.value)

        def window_loss():
            def step(x, label, w, reset):
                x = x.astype('float32')
                if self.reset_per_trial:
                    self._mask_reset(reset, with_algo=False)
                out = tr.model(x)
                loss, per_stream = self._step_loss(out, label, w)
                return loss, out, per_stream
            losses, outs, per_stream = brainstate.transform.for_loop(step, xs, labels, ws, resets)
            return losses.sum(), (losses, outs, per_stream)

        grads, _, (losses, outs, per_stream) = brainstate.transform.grad(
            window_loss, tr.params, return_value=True, has_aux=True)()
        return grads, losses, outs, per_stream

    def _chunk_grads(self, xs, labels, ws, resets):
        path = self._tbptt_grads if self.trainer.method == 'bptt' else self._online_grads
        grads, losses, outs, per_stream = path(xs, labels, ws, resets)
        return {path_key(k): g for k, g in grads.items()}, losses.sum(), outs, per_stream

    def _train_chunk(self, opt_state, xs, labels, ws, resets):
        tr = self.trainer
        grads, loss, outs, per_stream = self._chunk_grads(xs, labels, ws, resets)
        values = tr.param_values()
        if tr.weight_L2:
            grads = jax.tree.map(lambda g, p: g + tr.weight_L2 * p, grads, values)
        grad_norm = optax.global_norm(grads)
        updates, new_opt_state = tr.tx.update(grads, opt_state, values)
        new_values = optax.apply_updates(values, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        for leaf in jax.tree.leaves(new_values):
            finite = finite & jnp.all(jnp.isfinite(leaf))
        # A chunk without any test step has no loss: no update (Adam's momentum would still move the
        # weights on a zero gradient). A non-finite update is refused, as in the trial protocol.
        apply = finite & (jnp.sum(ws) > 0)
        keep = lambda new, old: jnp.where(apply, new, old)
        tr.set_param_values(jax.tree.map(keep, new_values, values))
        opt_state = jax.tree.map(keep, new_opt_state, opt_state)
        return opt_state, loss, grad_norm, finite, apply, outs, per_stream

    def _eval_chunk(self, xs, labels, ws, resets):
        xs = xs.astype('float32')
        tr = self.trainer

        def step(x, label, w, reset):
            if self.reset_per_trial:
                self._mask_reset(reset, with_algo=False)
            out = tr.model(x)
            return out, self._step_loss(out, label, w)[1]

        return brainstate.transform.for_loop(step, xs, labels, ws, resets)

    # -- public ---------------------------------------------------------------------------------------
    def train_chunk(self, chunk):
        """One update from one chunk; returns (loss, grad norm, updated, outs (U, B, n_out), per-step
        per-stream losses (U, B)) as numpy. The states go on into the next chunk."""
        self.opt_state, loss, gnorm, finite, applied, outs, per_stream = self._train(
            self.opt_state, chunk.xs, chunk.labels, chunk.weights, chunk.resets)
        self.trainer.opt_state = self.opt_state
        self.last_update_finite = bool(finite)
        return float(loss), float(gnorm), bool(applied), np.asarray(outs), np.asarray(per_stream)

    def chunk_gradients(self, chunk) -> dict:
        """The summed gradient of one chunk without an update (the states move on, as in training)."""
        grads, _, _, _ = self._grads(chunk.xs, chunk.labels, chunk.weights, chunk.resets)
        return grads

    def eval_chunk(self, chunk):
        outs, per_stream = self._eval(chunk.xs, chunk.labels, chunk.weights, chunk.resets)
        return np.asarray(outs), np.asarray(per_stream)

    def compiled_memory(self, chunk_steps: int, n_in: int) -> dict:
        """XLA's memory analysis of the compiled update for chunks of `chunk_steps` steps (bytes)."""
        B = self.trainer.batch_size
        args = (self.opt_state, jax.ShapeDtypeStruct((chunk_steps, B, n_in), jnp.uint8),
                jax.ShapeDtypeStruct((chunk_steps, B), jnp.int32), jax.ShapeDtypeStruct((chunk_steps, B), jnp.float32),
                jax.ShapeDtypeStruct((chunk_steps, B), jnp.bool_))
        stateful, jitted = self._train.stateful_fun, self._train.jitted_fun  # as the memory script reaches it
        state_trace = stateful.get_state_trace(*args, compile_if_miss=True)
        compiled = jitted.lower(state_trace.get_state_values(), *args).compile()
        ma = compiled.memory_analysis()
        return dict(temp_bytes=int(ma.temp_size_in_bytes), argument_bytes=int(ma.argument_size_in_bytes),
                    output_bytes=int(ma.output_size_in_bytes), alias_bytes=int(ma.alias_size_in_bytes))


def evaluate_stream(st: StreamTrainer, stream, n_trials_per_stream: int):
    """Held-out accuracy and loss of the current weights, frozen, on the first n_trials_per_stream trials of
    every stream of `stream` (a DMSStream), run from zero states without any reset (unless the trainer's
    reset_per_trial control). The training states and traces are put back afterwards."""
    saved = st.get_stream_state()
    st.reset_streams(with_algo=False)
    scorer = dms_stream.TrialScorer(stream.n_streams)
    correct, losses = [], []
    for k in range(stream.chunks_for_trials(n_trials_per_stream)):
        chunk = stream.chunk(k)
        outs, per_stream = st.eval_chunk(chunk)
        for t, ok, loss in scorer.add(chunk, outs, per_stream):
            if t.index < n_trials_per_stream:
                correct.append(ok)
                losses.append(loss)
    st.set_stream_state(saved)
    return float(np.mean(losses)), float(np.mean(correct)), len(correct)


# --------------------------------------------------------------------------------------------
# The stream loop: run folder, checkpoints (with the stream's state), evaluation
# --------------------------------------------------------------------------------------------

TRIALS_TO = 0.9  # summary: the training trials after which the held-out accuracy first reached this


class StreamCheckpoints:
    """orbax checkpoints of the weights, the optimizer state and the stream's state (neuron states,
    eligibility traces, the partial test-period sums, the chunk index): a killed run resumes where the
    stream was. The layout of run_folder.Checkpoints (last keeps two steps, best one)."""

    def __init__(self, run_dir: str):
        self.inner = run_folder.Checkpoints(run_dir)
        self.ocp = ocp

    def _state(self, st: StreamTrainer, chunks_done: int, scorer) -> dict:
        return {'params': st.trainer.param_values(), 'opt_state': st.opt_state,
                'stream_state': st.get_stream_state(), 'chunks_done': np.asarray(chunks_done, np.int64),
                'partial': np.asarray(scorer.partial), 'loss_partial': np.asarray(scorer.loss_partial),
                'rng_key': np.asarray(run_folder.rng_key_data(brainstate.random.DEFAULT.value))}

    def save(self, st: StreamTrainer, step: int, chunks_done: int, scorer, meta: dict, best: bool):
        if not run_folder.values_finite(st.trainer.param_values()):
            raise RuntimeError(f'refusing to save non-finite weights at evaluation {step}')
        args = self.ocp.args.Composite(state=self.ocp.args.StandardSave(self._state(st, chunks_done, scorer)),
                                       meta=self.ocp.args.JsonSave(meta))
        managers = [self.inner.last] + ([self.inner.best] if best else [])
        for m in managers:
            m.save(step, args=args, force=True)
        for m in managers:
            m.wait_until_finished()

    def restore(self, st: StreamTrainer, scorer):
        """-> (evaluation step, chunks done, meta); loads everything into st and scorer."""
        manager = self.inner.last
        step = manager.latest_step()
        if step is None:
            raise utils.UserError(f'no checkpoint in {manager.directory}')
        target = self._state(st, 0, scorer)
        abstract = jax.tree.map(lambda v: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype), target)
        restored = manager.restore(step, args=self.ocp.args.Composite(
            state=self.ocp.args.StandardRestore(abstract), meta=self.ocp.args.JsonRestore()))
        state = restored['state']
        st.trainer.set_param_values(state['params'])
        st.opt_state = st.trainer.opt_state = state['opt_state']
        st.set_stream_state(dict(state['stream_state']))
        scorer.partial[:] = np.asarray(state['partial'])
        scorer.loss_partial[:] = np.asarray(state['loss_partial'])
        brainstate.random.DEFAULT.value = run_folder.rng_key_like(state['rng_key'], brainstate.random.DEFAULT.value)
        return int(step), int(state['chunks_done']), dict(restored['meta'])

    def close(self):
        self.inner.close()


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
    st = StreamTrainer(trainer, reset_per_trial=bool(args.stream_reset))
    train, held_out, n_chunks = stream_plan(args, cfg)
    if getattr(args, 'check_grad', False) or getattr(args, 'check_grad_every', None):
        print('note: --check_grad compares gradients on independent trials; the stream protocol has none '
              '(no grad_fidelity.csv)', file=sys.stderr, flush=True)
    n_test = int(np.ceil(args.n_test_trials / args.batch_size))
    period = train.mean_period_steps()
    eval_steps = args.eval_every_trials * period
    log = run_folder.RunLog(run_dir)
    config = dict(vars(args), run_dir=run_dir, chunk_steps=train.chunk_steps, n_chunks=n_chunks,
                  mean_period_steps=period, n_test_trials_used=n_test * args.batch_size, **(extra_config or {}))
    scorer = dms_stream.TrialScorer(args.batch_size)
    ckpt = StreamCheckpoints(run_dir)
    try:
        step, chunks_done, meta = 0, 0, {}
        if args.resume:
            with open(os.path.join(run_dir, 'config.json')) as f:
                saved = json.load(f)
            if saved.get('batch_size', args.batch_size) != args.batch_size:
                raise utils.UserError(f'--resume {run_dir}: --batch_size is the number of streams; it cannot change '
                                      f'in a resumed stream run (the run has {saved["batch_size"]})')
            step, chunks_done, meta = ckpt.restore(st, scorer)
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
            test_loss, test_acc, _ = evaluate_stream(st, held_out, n_test)
            best = max(best, test_acc)
            row = dict(epoch=step, batches=k + 1, stream_s=(k + 1) * U * train.cfg.dt / 1000.,
                       trials_per_stream=(k + 1) * U / train.mean_period_steps(), trials=trials_done,
                       train_loss=since['loss'] / max(since['n'], 1), train_acc=since['correct'] / max(since['n'], 1),
                       test_loss=test_loss, test_acc=test_acc,
                       grad_norm=float(np.mean(since['gnorm'])) if since['gnorm'] else float('nan'),
                       seconds=seconds_before + time.time() - t0,
                       step_s_per_batch=since['step_s'] / since['timed'] if since['timed'] else float('nan'))
            row['s_per_1000_steps'] = row['step_s_per_batch'] * 1000. / U
            log.append(row)
            metrics.append(row)
            since = dict(correct=0, n=0, loss=0., step_s=0., timed=0, gnorm=[])
            meta = dict(best_test_acc=best, trials_done=trials_done, recent=list(recent),
                        seconds=seconds_before + time.time() - t0)
            ckpt.save(st, step, k + 1, scorer, meta, best=test_acc >= best)
            print(f'{row["trials_per_stream"]:.0f} trials per stream ({row["stream_s"]:.0f} s of stream): train '
                  f'acc {row["train_acc"]:.3f} | held-out loss {test_loss:.4f} acc {test_acc:.3f} | '
                  f'{row["s_per_1000_steps"]:.3f} s per 1000 steps', flush=True)
    run_folder.plot_learning_curves(metrics, os.path.join(log.run_dir, 'learning_curves.png'),
                               f'DMS stream, {methods.title(args.method)}, {chunk_ms(args):g} ms per update')
    return stream_summary(args, metrics, best, recent, stopped, first_step_s, train, st, log.run_dir)


ROLLING_TRIALS = 256  # the rolling training accuracy: the last trials that ended, over all streams


def stream_summary(args, metrics, best, recent, stopped, first_step_s, train, st, run_dir) -> dict:
    last = metrics[-1] if metrics else {}
    reached = [r for r in metrics if r['test_acc'] >= TRIALS_TO]
    timed = [r['s_per_1000_steps'] for r in metrics if np.isfinite(r.get('s_per_1000_steps', float('nan')))]
    memory = st.compiled_memory(train.chunk_steps, train.cfg.n_input)
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
