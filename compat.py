"""Run brainscale 0.1.0 on the newest jax (>= 0.10, e.g. 0.11.2 with brainstate 0.6) as on jax 0.8.

brainscale 0.1.0 was written against a jax that had four things newer jax no longer has:

  1. `jax.core.get_aval` (its successor is `typeof` in jax's core);
  2. `jax.core.new_jaxpr_eqn` in the public module (it is still in `jax._src.core`);
  3. a separate `ClosedJaxpr(jaxpr=..., consts=...)` class: `ClosedJaxpr` is now an alias of `Jaxpr`,
     which takes the legacy form only positionally, `Jaxpr(jaxpr, consts)`;
  4. `Jaxpr(constvars=cv, invars=iv, ...)` without consts used to keep `cv` apart from `iv`; now the
     constvars without attached values become leading invars (`.constvars == []`, `.invars == cv + iv`).
     brainscale builds such jaxprs (the weight-output -> hidden-group and hidden -> hidden transitions)
     and reads `.constvars` / `.invars` separately ("The weight y should be unique" otherwise).

`apply()` bridges these inside brainscale's own modules only (their module globals), never in jax:
  * `jax` in those modules becomes a proxy whose `core` also has `get_aval` and `new_jaxpr_eqn`;
  * `Jaxpr`, in the modules that build jaxprs from constvars, becomes a subclass that keeps the
    constvars apart (`.constvars` / `.invars` as before; evaluation is unchanged: `eval_jaxpr` binds
    `all_invars` to `[*consts, *args]`);
  * `ClosedJaxpr` becomes a function accepting the old keywords.
On the old stack (jax still has `jax.core.get_aval`) it does nothing. Idempotent; call it before the
first brainscale algorithm compiles its graph.
"""
from __future__ import annotations

import types

_APPLIED = False

# Modules that construct `Jaxpr(constvars=..., ...)` without consts and then read them back.
_JAXPR_BUILDERS = (
    'brainscale._etrace_compiler_hid_param_op',
    'brainscale._etrace_compiler_hidden_group',
    'brainscale._etrace_compiler_module_info',
    'brainscale._etrace_compiler_hidden_pertubation',
)
# Modules that call `ClosedJaxpr(...)`, or re-export it.
_CLOSED_JAXPR_USERS = _JAXPR_BUILDERS + ('brainscale._compatible_imports',)


def needed() -> bool:
    """True on a jax without `jax.core.get_aval` (jax >= 0.10): brainscale 0.1.0 needs the bridge."""
    import jax
    import jax.core
    return not hasattr(jax.core, 'get_aval')


def _core_proxy():
    import jax.core
    from jax._src import core as src_core

    class CoreProxy(types.ModuleType):
        def __getattr__(self, name):
            return getattr(jax.core, name)

    proxy = CoreProxy('jax.core')
    proxy.get_aval = src_core.typeof
    proxy.new_jaxpr_eqn = src_core.new_jaxpr_eqn
    return proxy


def _jax_proxy(core_proxy):
    import jax

    class JaxProxy(types.ModuleType):
        def __getattr__(self, name):
            return getattr(jax, name)

    proxy = JaxProxy('jax')
    proxy.core = core_proxy
    return proxy


def _jaxpr_classes():
    from jax._src import core as src_core

    base = src_core.Jaxpr

    class SplitConstvarJaxpr(base):
        """A `Jaxpr` built with constvars but no consts, whose constvars stay apart from its invars
        (jax <= 0.9 behaviour): the constant values are passed to `eval_jaxpr` explicitly."""

        def __init__(self, constvars=(), invars=None, outvars=None, eqns=None, effects=src_core.no_effects,
                     debug_info=None, is_high=False, consts=None):
            super().__init__(constvars, invars, outvars, eqns, effects, debug_info, is_high, consts)
            self._n_split_constvars = len(constvars) if (consts is None and invars is not None) else 0

        @property
        def constvars(self):
            n = len(self._consts) or self._n_split_constvars
            return self._all_invars[:n]

        @property
        def invars(self):
            n = len(self._consts) or self._n_split_constvars
            return self._all_invars[n:]

    def closed_jaxpr(jaxpr=None, consts=None):
        """The old `ClosedJaxpr(jaxpr, consts)` (keywords allowed) as a `Jaxpr` with consts attached."""
        return base(jaxpr, list(consts if consts is not None else []))

    return SplitConstvarJaxpr, closed_jaxpr


def apply() -> bool:
    """Patch brainscale's modules for the newest jax; returns True when the bridge is (now) active."""
    global _APPLIED
    if _APPLIED:
        return True
    if not needed():
        return False
    import importlib
    import sys
    import brainscale  # noqa: F401  (imports the submodules)
    jax_proxy = _jax_proxy(_core_proxy())
    split_jaxpr, closed_jaxpr = _jaxpr_classes()
    import jax
    for name in list(sys.modules):
        mod = sys.modules[name]
        if (name == 'brainscale' or name.startswith('brainscale.')) and getattr(mod, 'jax', None) is jax:
            mod.jax = jax_proxy
    for name in _CLOSED_JAXPR_USERS:
        mod = importlib.import_module(name)
        if hasattr(mod, 'ClosedJaxpr'):
            mod.ClosedJaxpr = closed_jaxpr
    for name in _JAXPR_BUILDERS:
        mod = importlib.import_module(name)
        if not hasattr(mod, 'Jaxpr'):
            raise RuntimeError(f'brainscale internals changed ({name}.Jaxpr missing): re-check compat.py')
        mod.Jaxpr = split_jaxpr
    _APPLIED = True
    return True
