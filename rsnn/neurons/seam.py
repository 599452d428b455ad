"""The neuron-model seam: what a recurrent layer and a network must give the learning rules (no jax here).

Every rule of rsnn/methods.py reaches a network only through these two protocols: BPTT through the layers'
`run_sequence`, brainscale's step-by-step algorithms (D-RTRL, ES-D-RTRL at --trace_chunk 1) through their
stateful `update`, and the chunk engine (rsnn/rules/chunk_engine.py: D-RTRL and ES-D-RTRL K steps at a time,
e-prop, OTTT, SnAp-1; UORO's pure network) through the pure `step`. A layer whose stateful `update` and
pure `step` are one arithmetic (rsnn.neurons.base.RecurrentLayer derives the first from the second) gets the
same gradient on every path; tests/test_neuron_seam.py checks it for a model defined in the test.
"""
from __future__ import annotations

from typing import Optional, Protocol, runtime_checkable


@runtime_checkable
class RecurrentLayer(Protocol):
    """A recurrent spiking layer as the rules see it.

    The layer's weight is ONE trace-carrying `brainscale.nn.Linear` named `linear`, over the concatenation
    [x_t, s_{t-1}] of its input and its own previous spikes (rows: the n_in input weights, then the n_rec
    recurrent ones; a bias): y_t = [x_t, s_{t-1}] W + b is the weight output that every rule differentiates
    through. Its hidden states are `brainstate.HiddenState` attributes, one array (batch, n_rec) per name of
    `state_names()`; the states of a neuron are element-wise in the neuron (state k of neuron j depends on
    neuron j's states and y_t[j] only), which is what makes the per-neuron S x S Jacobians of the chunk
    engine and brainscale's hidden groups exact.

    - n_rec: int, the neurons.
    - state_names() -> list of str: the hidden states per neuron, S of them (the eligibility traces carry S
      entries per weight and sample).
    - step(h, y, perturb=None) -> (new states dict, output): the pure dynamics of one step from the previous
      states h (dict name -> array) and the weight output y. `perturb` (dict name -> array, or None) is added
      to each new state where it is formed, before any later use within the step (brainscale adds its hidden
      perturbation there, so the single-step learning signal L_t counts a new state's path into another new
      state of the same step: the chunk engine's signals equal brainscale's).
    - output(h) -> array: the output given to the layer above (or the readout), a function of the NEW states
      h_t only (spikes; the DMS layer: V). e-prop's pseudo-derivative is its derivative by each state.
    - prev_spike(h) -> array: s_{t-1}, the spike that enters the next step's recurrent input, from the states
      h_{t-1} (element-wise per neuron; SnAp-1 and the engine differentiate it by each state).
    - update(x) -> output: the stateful step (reads and writes the HiddenStates; brainscale runs it); it must
      be the same arithmetic as `step` (rsnn.neurons.base.stateful_update derives it).
    - run_sequence(xs) -> outputs: `update` over xs (T, B, n_in) for BPTT (rsnn.neurons.base.run_layer).
    """
    n_rec: int
    linear: object

    def state_names(self) -> list: ...

    def step(self, h: dict, y, perturb: Optional[dict] = None) -> tuple: ...

    def output(self, h: dict): ...

    def prev_spike(self, h: dict): ...

    def update(self, x): ...

    def run_sequence(self, xs): ...


@runtime_checkable
class RecurrentNetwork(Protocol):
    """A network as the online rules' pure paths see it: recurrent layers in a chain, then a leaky readout.

    - recurrent_layers() -> list of RecurrentLayer: in order, each fed the output of the one below (the first
      the network's input);
    - readout_input(o) -> array: what the readout reads from the last layer's output o (the identity, or the
      DMS network's standardisation); a pure, differentiable function;
    - out: the leaky readout rsnn.models.LeakyReadout (r_t = a r_{t-1} + z_t W + b; `decay`, `linear`, `r`).
    """
    out: object

    def recurrent_layers(self) -> list: ...

    def readout_input(self, o): ...


LAYER_METHODS = ('state_names', 'step', 'output', 'prev_spike', 'update', 'run_sequence')


def layer_gaps(layer) -> list:
    """What a layer lacks of the seam (names of missing attributes); [] for a layer that implements it."""
    missing = [m for m in LAYER_METHODS if not callable(getattr(layer, m, None))]
    return missing + [a for a in ('n_rec', 'linear') if not hasattr(layer, a)]


def why_not_network(model) -> Optional[str]:
    """Why `model` cannot run on the pure paths (one line naming what it lacks), or None."""
    name = type(model).__name__
    if not (callable(getattr(model, 'recurrent_layers', None)) and callable(getattr(model, 'readout_input', None))):
        return f'{name} does not declare recurrent_layers() and readout_input() (rsnn/neurons/seam.py)'
    layers = model.recurrent_layers()
    if not layers:
        return f'{name} has no recurrent layer'
    for layer in layers:
        gaps = layer_gaps(layer)
        if gaps:
            return f'its layer {type(layer).__name__} lacks {", ".join(gaps)} of the neuron seam (rsnn/neurons/seam.py)'
    return None
