"""The neuron models' and surrogate gradients' names, without jax (the --model and --surrogate choices)."""
from __future__ import annotations

# The surrogate gradients of rsnn.models.SURROGATES, named here so that building a parser imports no jax.
SURROGATE_NAMES = ('arctan', 'gaussian', 'multi_gaussian', 'piecewise_quadratic', 'relu', 'sigmoid', 'slayer')
# The recurrent layers of the image networks (rsnn.models.SpikingStack); the --model choices.
MODEL_NAMES = ('lif-delta', 'alif-delta', 'lif-exp-cu')
