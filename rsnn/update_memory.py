"""XLA's memory analysis of a Trainer's compiled update (nothing is run or allocated: the arguments may be
jax.ShapeDtypeStructs): what `make compare-rules`, the stream's summary and `make reproduce-stream` report as
the memory of one update. The Trainer holds the update; measuring it is here."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rsnn import brainstate_adapter


def update_memory(trainer, *args) -> dict:
    """XLA's memory analysis of `trainer`'s compiled update for these arguments (after the optimizer state),
    in bytes: temp_bytes, argument_bytes, output_bytes, alias_bytes."""
    return brainstate_adapter.memory_analysis(trainer.update_fn, trainer.opt_state, *args)


def stream_update_memory(trainer, chunk_steps: int, n_in: int) -> dict:
    """update_memory of a stream update of `chunk_steps` steps (abstract shapes: nothing allocated)."""
    B = trainer.batch_size
    return update_memory(trainer, jax.ShapeDtypeStruct((chunk_steps, B, n_in), jnp.uint8),
                         jax.ShapeDtypeStruct((chunk_steps, B), jnp.int32),
                         jax.ShapeDtypeStruct((chunk_steps, B), jnp.float32),
                         jax.ShapeDtypeStruct((chunk_steps, B), jnp.bool_))
