"""The one place that reaches behind `brainstate.transform.jit`: its state trace (`stateful_fun`) and the
jax-level jit (`jitted_fun`) are not documented API, and the memory analysis and the compiled text of a step
need them. If brainstate changes them, this module is the only one to fix (and its error says so)."""
from __future__ import annotations


def jitted_parts(jitted):
    """(state trace, jax jit) behind a `brainstate.transform.jit` function."""
    if not (hasattr(jitted, 'stateful_fun') and hasattr(jitted, 'jitted_fun')):
        raise RuntimeError('brainstate.transform.jit internals changed (no stateful_fun / jitted_fun): '
                           'update rsnn/brainstate_adapter.py for the installed brainstate')
    return jitted.stateful_fun, jitted.jitted_fun


def compiled(jitted, *args):
    """The XLA executable of `jitted` for these arguments (arrays or jax.ShapeDtypeStructs; nothing is run)."""
    stateful, jit = jitted_parts(jitted)
    trace = stateful.get_state_trace(*args, compile_if_miss=True)
    return jit.lower(trace.get_state_values(), *args).compile()


def memory_analysis(jitted, *args) -> dict:
    """XLA's memory analysis of `jitted` compiled for these arguments, in bytes: temporaries, arguments,
    outputs, aliased."""
    ma = compiled(jitted, *args).memory_analysis()
    return dict(temp_bytes=int(ma.temp_size_in_bytes), argument_bytes=int(ma.argument_size_in_bytes),
                output_bytes=int(ma.output_size_in_bytes), alias_bytes=int(ma.alias_size_in_bytes))
