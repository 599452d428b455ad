"""The table of neuron models: one row per `--model`, read by the task scripts' choices, the image networks
(rsnn.models.SpikingStack builds its layers from it), the memory formulas (states per neuron) and the tests.

Importable without jax (a parser's `--help` stays fast): a row names its layer builder as 'module:function'
(or gives a callable, for a row registered at runtime) and `build_layer` imports it only when a network is
built. Adding a neuron model is one file in rsnn/neurons/ (a layer that implements the seam of
rsnn/neurons/seam.py, usually by deriving from rsnn.neurons.base.NeuronLayer and writing its pure `step`)
and one `register(NeuronModel(...))`; every learning rule of rsnn/methods.py then trains it, chunked where the
rule has a chunked path (docs/code-organisation.md, "Adding a neuron model"; tests/test_neuron_seam.py does
exactly this with a toy model registered from the test).
"""
from __future__ import annotations

import collections.abc
import dataclasses
import importlib
from typing import Callable, Union

# The surrogate gradients of rsnn.neurons.base.SURROGATES, named here so that building a parser imports no jax.
SURROGATE_NAMES = ('arctan', 'gaussian', 'multi_gaussian', 'piecewise_quadratic', 'relu', 'sigmoid', 'slayer')


@dataclasses.dataclass(frozen=True)
class LayerParams:
    """The image networks' neuron flags (the task script's network group), handed to every layer builder;
    a model reads the ones it needs."""
    dt: float = 1.
    tau_mem: float = 10.
    tau_mem_sigma: float = 1.
    V_th: float = 1.
    ff_scale: float = 1.
    rec_scale: float = 0.5
    spk_fun: str = 'relu'
    spk_reset: str = 'soft'
    detach_reset: bool = True
    tau_syn: float = 5.
    tau_adapt: float = 200.
    beta: float = 1.8


@dataclasses.dataclass(frozen=True)
class NeuronModel:
    name: str                      # the --model flag
    build: Union[str, Callable]    # 'module:function' (imported lazily) or a callable:
                                   # build(n_in, n_rec, params: LayerParams, rng, **options) -> a layer (seam.py)
    states: tuple                  # its hidden states per neuron, in the layer's state_names() order
    doc: str                       # one line for --help
    adaptive: bool = False         # has an adaptation variable (a second, slow state that the spikes drive)
    options: tuple = ()            # (name, value) pairs passed to `build` (one builder, several rows)


TABLE: dict = {}


def register(model: NeuronModel, replace: bool = False) -> NeuronModel:
    """Add a row (a new neuron model: its file and this call). A name already taken needs replace=True."""
    if model.name in TABLE and not replace:
        raise ValueError(f'a neuron model named {model.name!r} is already registered')
    TABLE[model.name] = model
    return model


def unregister(name: str):
    """Remove a row (a test's runtime row, when the test ends)."""
    TABLE.pop(name, None)


def get(name: str) -> NeuronModel:
    try:
        return TABLE[name]
    except KeyError:
        raise ValueError(f'unknown --model {name!r}; choose one of {", ".join(TABLE)}') from None


def build_layer(name: str, n_in: int, n_rec: int, params: LayerParams, rng):
    """A layer of the model `name` (imports its module: jax from here on)."""
    row = get(name)
    build = row.build
    if isinstance(build, str):
        module, fn = build.split(':')
        build = getattr(importlib.import_module(module), fn)
    return build(n_in, n_rec, params, rng, **dict(row.options))


def model_help() -> str:
    """The --model flag's help: every row's one line."""
    return '; '.join(f'{m.name} = {m.doc}' for m in TABLE.values())


class _LiveNames(collections.abc.Sequence):
    """The table's names as a tuple-like view that follows `register` (a row added at runtime is a valid
    --model choice at once)."""

    def __getitem__(self, i):
        return tuple(TABLE)[i]

    def __len__(self):
        return len(TABLE)

    def __repr__(self):
        return repr(tuple(TABLE))


# The --model choices (rsnn.models.SpikingStack's layers).
MODEL_NAMES = _LiveNames()

register(NeuronModel('lif-delta', 'rsnn.neurons.lif:build', ('V',), 'LIF with delta synapses',
                     options=(('neuron', 'lif'), ('synapse', 'delta'))))
register(NeuronModel('alif-delta', 'rsnn.neurons.lif:build', ('V', 'b'), 'adaptive-threshold LIF',
                     adaptive=True, options=(('neuron', 'alif'), ('synapse', 'delta'))))
register(NeuronModel('lif-exp-cu', 'rsnn.neurons.lif:build', ('V', 'I'), 'LIF with exponential current synapses',
                     options=(('neuron', 'lif'), ('synapse', 'exp'))))
register(NeuronModel('adlif', 'rsnn.neurons.adlif:build', ('u', 'w'),
                     'adaptive LIF of Bittar & Garner 2022 (sparch RadLIF: current-coupled adaptation w, recurrent)',
                     adaptive=True))
