"""BPTT: the exact gradient of the update's summed loss, by differentiating through the whole sequence.

On trials the sequence is the trial (the states start from zero). On a stream it is truncated BPTT: the
update's stretch of stream is the window, the states carried in from the previous window are constants
(stop_gradient), so the gradient flows back to the window's first step and no further; its memory grows with
the window. Layer after layer (`model.run_sequence`: the input products of all steps out of the time loop,
rsnn/recurrence.py's backward pass) where the network has it and no step hook is given; else a per-step loop.
"""
from __future__ import annotations

import brainstate
import jax
import jax.numpy as jnp

from rsnn.rules.base import Result, Rule


class BPTT(Rule):
    trace_chunk = 1

    def gradients(self, xs, targets, objective, step_hook=None, keep_outputs=False, hook_inputs=None) -> Result:
        model = self.model
        # the states carried in (a stream's previous window; zeros on trials) are constants: the cut
        for s in model.states().values():
            if not isinstance(s, brainstate.ParamState):
                s.value = jax.tree.map(jax.lax.stop_gradient, s.value)

        def sequence_loss():
            if hasattr(model, 'run_sequence') and step_hook is None:
                outs = model.run_sequence(xs.astype(jnp.float32))
                losses = jax.vmap(objective.loss)(outs, targets)
                wouts = jax.vmap(objective.weighted)(outs, targets)
            else:
                def step(x, target, hook_in):
                    if step_hook is not None:
                        step_hook(hook_in)
                    out = model(x.astype(jnp.float32))
                    return objective.loss(out, target), objective.weighted(out, target), out
                losses, wouts, outs = brainstate.transform.for_loop(step, xs, targets, hook_inputs)
            return losses.sum(), (losses, wouts, outs)

        grads, _, (losses, wouts, outs) = brainstate.transform.grad(
            sequence_loss, self.params, return_value=True, has_aux=True)()
        return Result(grads, losses.sum(), wouts.sum(0), outs if keep_outputs else None)
