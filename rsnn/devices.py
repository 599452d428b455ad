"""Data-parallel placement for the Trainer: a mesh with one axis 'batch'. The inputs, labels and mask, and
every per-sample state (neuron states, eligibility traces: leading axis = batch) are split along the batch
axis (NamedSharding, with_sharding_constraint after each reset), weights and optimizer state replicated;
XLA (GSPMD) inserts the reductions of the loss and gradients. One device: every function here does nothing.
"""
from __future__ import annotations

import jax
import numpy as np

from rsnn.device_choice import batch_error, devices_name
from rsnn.errors import UserError


class Placement:
    def __init__(self, devices, batch_size: int):
        self.batch_size, self.mesh = batch_size, None
        if devices is not None and len(devices) > 1:
            if batch_size % len(devices):
                raise UserError(batch_error(batch_size, len(devices), devices_name(devices)))
            self.mesh = jax.sharding.Mesh(np.array(devices), ('batch',))

    def local_rows(self):
        """The rows of the batch that this process's devices hold, as a slice, where that is a part of the
        batch (several processes); None where this process holds it all."""
        if self.mesh is None or jax.process_count() == 1:
            return None
        devices = list(self.mesh.devices.flat)
        mine = [i for i, d in enumerate(devices) if d.process_index == jax.process_index()]
        if mine != list(range(mine[0], mine[-1] + 1)):
            return None  # not one run of rows: generate the whole batch
        per = self.batch_size // len(devices)
        return slice(mine[0] * per, (mine[-1] + 1) * per)

    def sharding(self, *spec):
        return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(*spec))

    def weights_sharding(self):
        """Where the weights live: replicated over the mesh, or the one device of the run."""
        if self.mesh is not None:
            return self.sharding()
        return jax.sharding.SingleDeviceSharding(jax.config.jax_default_device or jax.devices()[0])

    def state_sharding(self, value):
        """A per-sample state (leading axis = batch) is split across the devices; anything else replicated."""
        batched = getattr(value, 'ndim', 0) >= 1 and value.shape[0] == self.batch_size
        return self.sharding('batch') if batched else self.sharding()

    def put(self, value, sharding):
        """A host value as a global array (each process gives the slices of its own devices)."""
        value = np.asarray(value)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    def place(self, params: dict, opt_state, states: list):
        """Weights and optimizer state on every device, per-sample states split along the batch axis (at
        the start and after a checkpoint restore); returns the placed optimizer state."""
        if self.mesh is None:
            return opt_state
        for s in params.values():
            s.value = jax.tree.map(lambda v: self.put(v, self.sharding()), s.value)
        for s in states:
            s.value = jax.tree.map(lambda v: self.put(v, self.state_sharding(v)) if hasattr(v, 'shape') else v,
                                   s.value)
        return jax.tree.map(lambda v: self.put(v, self.sharding()), opt_state)

    def constrain(self, states: list):
        """Inside a step, after a reset: keep the per-sample states split along the batch axis."""
        if self.mesh is None:
            return
        for s in states:
            s.value = jax.tree.map(lambda v: jax.lax.with_sharding_constraint(v, self.state_sharding(v))
                                   if hasattr(v, 'shape') else v, s.value)

    def replicated(self, tree):
        if self.mesh is None:
            return tree
        return jax.lax.with_sharding_constraint(tree, self.sharding())

    def batch(self, xs, labels, mask, ws):
        """The batch as the step's arguments: on several devices xs (T, B, ...) split along B."""
        if self.mesh is None:
            return xs, labels, mask, ws
        return (self.put(xs, self.sharding(None, 'batch')), self.put(labels, self.sharding('batch')),
                self.put(mask, self.sharding('batch')), self.put(ws, self.sharding()))
