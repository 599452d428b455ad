"""The table of learning rules: one row per `--method`, read by every part of the repository that needs to
know a rule (the task scripts' choices, the trainer, the memory report, the figures, the reproduction
scripts, the results table).

Importable without jax: a row names its gradient path as 'module:Class' and `rule_class` imports it only when
a run needs it. Adding a rule is one file in rsnn/rules/ and one `register(Method(...))` (see README and
docs/code-organisation.md, "Adding a learning rule").

The memory formula of a row is the method's own state, in float32 numbers, as a function of the network's
`Sizes`: what the rule keeps (BPTT: its tape over T steps; the online rules: their traces), not the weights,
the optimizer or the input, which every rule holds alike.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional


class UnknownMethod(ValueError):
    """A --method name that the table does not hold (the task scripts report it as one line)."""


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The shape of a network as the memory formulas see it.

    layers: (n_x, n, S) per recurrent layer: inputs to the layer (feed-forward + recurrent), neurons,
    hidden states per neuron; readout: (n_x, n_out); batch B; sequence length T (steps of one update)."""
    layers: tuple
    readout: tuple
    batch: int
    T: int

    @property
    def weights(self) -> int:
        return sum(n_x * n + n for n_x, n, _ in self.layers) + self.readout[0] * self.readout[1] + self.readout[1]


@dataclasses.dataclass(frozen=True)
class Method:
    name: str                  # the --method flag
    title: str                 # the display name (figures, tables, logs)
    color: str                 # its colour in every figure
    rule: str                  # 'module:Class' of its gradient path (imported lazily by rule_class)
    carries: str               # what it carries from one update to the next besides the neuron states
    memory_order: str          # its memory in big-O, for tables
    memory: Callable[[Sizes], float]  # the floats of its own state (module docstring)
    chunked: bool = False      # has a chunked path (--trace_chunk K > 1)
    stream: bool = True        # runs on --protocol stream
    online: bool = True        # a forward-in-time rule (False: BPTT, which differentiates through the sequence)
    several_devices: bool = True  # runs with the batch split over several devices (--devices 0,1)
    estimator: bool = True     # its update is a gradient that --check_grad compares with BPTT's (False: FPTT)
    note: str = ''             # one line for the comparison tables


def _bptt_memory(s: Sizes) -> float:
    # the tape: every layer's states and spikes and the readout, for each of T steps
    return float(s.T * s.batch * (sum((S + 1) * n for _, n, S in s.layers) + s.readout[1]))


def _drtrl_memory(s: Sizes) -> float:
    # one eligibility trace per weight, sample and hidden state of the neuron it drives
    return float(s.batch * (sum(S * (n_x * n + n) for n_x, n, S in s.layers) + s.readout[0] * s.readout[1]
                            + s.readout[1]))


def _es_drtrl_memory(s: Sizes) -> float:
    # an input-side trace per weight matrix input and an output-side trace per neuron and state
    return float(s.batch * (sum(n_x + S * n for n_x, n, S in s.layers) + s.readout[0] + s.readout[1]))


TABLE: dict = {}


def register(method: Method, replace: bool = False) -> Method:
    """Add a row (a new rule: its file and this call). A name already taken needs replace=True."""
    if method.name in TABLE and not replace:
        raise ValueError(f'a method named {method.name!r} is already registered')
    TABLE[method.name] = method
    return method


register(Method('bptt', 'BPTT', 'tab:red', 'rsnn.rules.bptt:BPTT',
                carries='nothing (truncated on a stream: the states, as constants)',
                memory_order='O(T B n S)', memory=_bptt_memory, online=False,
                note='the exact gradient; on a stream truncated BPTT over --tbptt_window'))
register(Method('diag', 'D-RTRL', 'tab:green', 'rsnn.rules.d_rtrl:DRTRL',
                carries='the eligibility trace of each weight, per sample and state',
                memory_order='O(B P S)', memory=_drtrl_memory, chunked=True,
                note="brainscale's ParamDimVjpAlgorithm; exact for a diagonal hidden Jacobian and a memoryless "
                     "readout: drops the path through a leaky readout (0.14 of BPTT's norm on one LIF layer; "
                     "--drtrl_readout_filter 1 adds it, 2x the layer traces)"))
register(Method('expsm_diag', 'ES-D-RTRL', 'tab:blue', 'rsnn.rules.es_d_rtrl:ESDRTRL',
                carries='an input trace per weight matrix input and an output trace per neuron and state',
                memory_order='O(B (I + n S))', memory=_es_drtrl_memory, chunked=True,
                note="brainscale's IODimVjpAlgorithm; rank-1, exponentially smoothed (--etrace_decay); drops the "
                     "path through a leaky readout as D-RTRL does"))


def _eprop_memory(s: Sizes) -> float:
    # per layer weight and sample the eligibility vector (S floats) and the filtered trace e~ (1 float);
    # the readout's D-RTRL trace
    return float(s.batch * (sum((S + 1) * (n_x * n + n) for n_x, n, S in s.layers) + s.readout[0] * s.readout[1]
                            + s.readout[1]))


def _ottt_memory(s: Sizes) -> float:
    # the presynaptic trace of each weight matrix input (layers and readout)
    return float(s.batch * (sum(n_x for n_x, _, _ in s.layers) + s.readout[0]))


def _uoro_memory(s: Sizes) -> float:
    # the default estimate (--uoro_per_sample 0): theta~ (one copy of the layers' weights), s~ (one copy of every
    # state of the batch), the readout's exact trace (its input and bias, per sample), plus a 2-word key
    layer_weights = sum(n_x * n + n for n_x, n, _ in s.layers)
    return float(layer_weights + s.batch * (sum(S * n for _, n, S in s.layers) + s.readout[1])
                 + s.batch * (s.readout[0] + 1) + 2)


register(Method('eprop', 'e-prop', 'tab:orange', 'rsnn.rules.eprop:EProp',
                carries='the eligibility vector of each weight (per sample and state) and its filtered '
                        'eligibility trace (per sample)',
                memory_order='O(B P (S + 1))', several_devices=False, memory=_eprop_memory, chunked=True,
                note='Bellec et al. 2020: psi inside the kappa filter, same-step readout error, symmetric or '
                     'random feedback (--eprop_kappa, --eprop_feedback); = BPTT for one layer without '
                     'recurrent weights'))
register(Method('ottt', 'OTTT', 'tab:purple', 'rsnn.rules.ottt:OTTT',
                carries='the presynaptic trace of each weight matrix input',
                memory_order='O(B I)', several_devices=False, memory=_ottt_memory, chunked=True,
                note='Xiao et al. 2022; ES-D-RTRL with no output-side trace (decay --etrace_decay)'))
register(Method('snap1', 'SnAp-1', 'tab:brown', 'rsnn.rules.snap1:SnAp1',
                carries='the eligibility trace of each weight, per sample and state',
                memory_order='O(B P S)', several_devices=False, memory=_drtrl_memory, chunked=True,
                note="Menick et al. 2021; D-RTRL plus each neuron's own recurrent weight in D"))
register(Method('uoro', 'UORO', 'tab:gray', 'rsnn.rules.uoro:UORO',
                carries="a rank-1 estimate of the layers' RTRL influence (one copy of their weights and of the "
                        "states; --uoro_per_sample 1: one per sample) and the readout's exact trace",
                memory_order='O(P + B n S); --uoro_per_sample 1: O(B P + B n S)', several_devices=False,
                memory=_uoro_memory, chunked=False,
                note='Tallec & Ollivier 2018; unbiased, high variance; the readout exact; step by step (JVP + VJP '
                     'per step); default one estimate for the batch (O(P), UORO\'s point; per sample: O(B P), '
                     'as D-RTRL with S = 1)'))


# --vjp_time: the VJP of the online rules' hidden-state Jacobians, as brainscale names it.
VJP_METHODS = {'t': 'single-step', 't_minus_1': 'multi-step'}

FPTT_WINDOW = 100  # FPTT's default window on trials (--fptt_window, steps): the steps of one of its updates


def _fptt_memory(s: Sizes) -> float:
    # BPTT's tape over one window (the default --fptt_window, or T where shorter: the memory sweep and the
    # comparison run with the default) plus lambda and theta_bar, a copy of the weights each
    return _bptt_memory(dataclasses.replace(s, T=min(s.T, FPTT_WINDOW))) + 2. * s.weights


register(Method('fptt', 'FPTT', 'tab:olive', 'rsnn.rules.fptt:FPTT',
                carries='nothing between windows but the states (detached); lambda and theta_bar with the optimizer',
                memory_order='O(K B n S) + 2 |theta|', several_devices=False, memory=_fptt_memory, estimator=False,
                note='Yin et al. 2023; TBPTT windows of K steps (--fptt_window; a stream: --update_every), each an '
                     'update with the dynamic regulariser (--fptt_alpha); not a gradient estimator'))


# the rules of the paper: what the memory command and the reproductions run by default
PAPER = ('bptt', 'diag', 'expsm_diag')


def names() -> tuple:
    return tuple(TABLE)


def get(name: str) -> Method:
    """The row of `name`; an unknown name raises UnknownMethod with the choices (never another row)."""
    try:
        return TABLE[name]
    except KeyError:
        raise UnknownMethod(f'unknown --method {name!r}; choose one of {", ".join(TABLE)}') from None


def title(name: str) -> str:
    return get(name).title


def color(name: str) -> str:
    return get(name).color


def rule_class(name: str):
    """The gradient path of `name` (imports its module: jax from here on)."""
    import importlib
    module, cls = get(name).rule.split(':')
    return getattr(importlib.import_module(module), cls)


def memory_floats(name: str, sizes: Sizes) -> float:
    return get(name).memory(sizes)


def ordered(names_given) -> list:
    """`names_given` in the table's order (figures and tables list the rules the same way everywhere)."""
    given = list(names_given)
    for n in given:
        get(n)
    return [n for n in TABLE if n in given]
