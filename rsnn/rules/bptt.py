"""BPTT: the exact gradient of the update's summed loss, by differentiating through the whole sequence.

On trials the sequence is the trial (the states start from zero). On a stream it is truncated BPTT: the
update's stretch of stream is the window, the states carried in from the previous window are constants
(stop_gradient), so the gradient flows back to the window's first step and no further; its memory grows with
the window. Layer after layer (`model.run_sequence`: the input products of all steps out of the time loop,
rsnn/recurrence.py's backward pass) where the network has it and no step hook is given; else a per-step loop.

TBPTT(k1, k2) on a stream (`RuleOptions.extra['tbptt_k2_steps']` = k2 steps > k1 = the chunk's steps, the
update interval; --tbptt_k2): every update backpropagates the loss of its own k1 steps over the last k2
steps of stream, so the windows overlap. The rule carries, besides the neurons' states, the inputs of the
k2 - k1 steps before the chunk (`tbptt/history`) and the neuron states at the window's start
(`tbptt/start/...`): the window is re-run forward from those states with the current weights (the states
carried in are constants), the loss counted on the chunk's steps only (each step's loss in one update).
Before the stream's first step the history is silence from zero states. k2 = k1 is the plain TBPTT above.

TBPTT(W) on trials (`RuleOptions.extra['trial_window_steps']` = W, scripts/credit_ablation.py --window): the
trial's first T - W steps run forward without gradient, the states after them are constants, and the gradient
is BPTT's over the last W steps, of their loss only (a window that starts after the sample gives the weights
out of the sample channels exactly zero). W >= T is BPTT over the whole trial.
"""
from __future__ import annotations

import brainstate
import jax
import jax.numpy as jnp

from rsnn.rules.base import Result, Rule
from rsnn.errors import UserError


class BPTT(Rule):
    trace_chunk = 1

    def __init__(self, model, params: dict, options):
        super().__init__(model, params, options)
        self.k2 = int(options.extra.get('tbptt_k2_steps') or 0)
        self.history = None
        self.trial_window = int(options.extra.get('trial_window_steps') or 0)
        if self.trial_window and options.stream:
            raise UserError('a TBPTT window on trials (trial_window_steps) is for --protocol trials; on a stream '
                            'give --tbptt_window')
        if self.k2 and options.stream:
            if options.step_hook:
                raise UserError('--tbptt_k2 cannot be combined with --stream_reset 1')
            self.neuron_states = [s for s in model.states().values() if not isinstance(s, brainstate.ParamState)]
            self.start = [brainstate.ShortTermState(jnp.zeros_like(s.value)) for s in self.neuron_states]
            k1 = int(options.extra['tbptt_k1_steps'])
            if self.k2 < k1:
                raise UserError(f'--tbptt_k2 ({self.k2} steps) must be at least --tbptt_window ({k1} steps)')
            if self.k2 > k1:  # k2 = k1: the plain TBPTT
                self.history = brainstate.ShortTermState(
                    jnp.zeros((self.k2 - k1, options.batch_size, options.n_in), jnp.uint8))

    def carried_states(self) -> dict:
        if self.history is None:
            return {}
        out = {'tbptt/history': self.history}
        out.update({f'tbptt/start/{i}': st for i, st in enumerate(self.start)})
        return out

    def reset(self):
        if self.history is not None:
            self.history.value = jnp.zeros_like(self.history.value)
            for st in self.start:
                st.value = jnp.zeros_like(st.value)

    def gradients(self, xs, targets, objective, step_hook=None, keep_outputs=False, hook_inputs=None) -> Result:
        if self.history is not None and xs.shape[0] < self.k2:
            return self._windowed(xs, targets, objective, keep_outputs)
        if self.trial_window and xs.shape[0] > self.trial_window:
            # TBPTT(W) on trials: the first T - W steps forward only (_gradients then cuts the states)
            cut = xs.shape[0] - self.trial_window
            brainstate.transform.for_loop(lambda x: self.model(x.astype(jnp.float32)), xs[:cut])
            xs, targets = xs[cut:], jax.tree.map(lambda a: a[cut:], targets)
            hook_inputs = None if hook_inputs is None else jax.tree.map(lambda a: a[cut:], hook_inputs)
        return self._gradients(xs, targets, objective, step_hook, keep_outputs, hook_inputs)

    def _windowed(self, xs, targets, objective, keep_outputs) -> Result:
        """TBPTT(k1, k2): the window = history + chunk, from the states at its start; the chunk's loss."""
        U, model = xs.shape[0], self.model
        window = jnp.concatenate([self.history.value, xs.astype(self.history.value.dtype)], 0)
        for s, st in zip(self.neuron_states, self.start):
            s.value = st.value
        # the next window starts k1 steps later: its initial states, by a forward pass without gradient
        brainstate.transform.for_loop(lambda x: model(x.astype(jnp.float32)), window[:U])
        next_start = [jax.lax.stop_gradient(s.value) for s in self.neuron_states]
        for s, st in zip(self.neuron_states, self.start):
            s.value = st.value
        result = self._gradients(window, targets, objective, None, keep_outputs, None, loss_from=window.shape[0] - U)
        self.history.value = window[U:]
        for st, v in zip(self.start, next_start):
            st.value = v
        return result

    def _gradients(self, xs, targets, objective, step_hook=None, keep_outputs=False, hook_inputs=None,
                   loss_from: int = 0) -> Result:
        """BPTT over xs from the states carried in; the loss of the steps from `loss_from` on (targets
        hold those steps only)."""
        model = self.model
        # the states carried in (a stream's previous window; zeros on trials) are constants: the cut
        for s in model.states().values():
            if not isinstance(s, brainstate.ParamState):
                s.value = jax.tree.map(jax.lax.stop_gradient, s.value)

        def sequence_loss():
            if hasattr(model, 'run_sequence') and step_hook is None:
                outs = model.run_sequence(xs.astype(jnp.float32))[loss_from:]
                losses = jax.vmap(objective.loss)(outs, targets)
                wouts = jax.vmap(objective.weighted)(outs, targets)
            else:
                def step(x, target, hook_in):
                    if step_hook is not None:
                        step_hook(hook_in)
                    out = model(x.astype(jnp.float32))
                    return objective.loss(out, target), objective.weighted(out, target), out
                if loss_from:
                    brainstate.transform.for_loop(lambda x: model(x.astype(jnp.float32)), xs[:loss_from])
                losses, wouts, outs = brainstate.transform.for_loop(step, xs[loss_from:], targets, hook_inputs)
            return losses.sum(), (losses, wouts, outs)

        grads, _, (losses, wouts, outs) = brainstate.transform.grad(
            sequence_loss, self.params, return_value=True, has_aux=True)()
        return Result(grads, losses.sum(), wouts.sum(0), outs if keep_outputs else None)
