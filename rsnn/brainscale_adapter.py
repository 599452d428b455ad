"""Every change this repository makes to brainscale 0.1.0, behind one call: `adapt_brainscale()`.

The rules that use brainscale (rsnn/rules/d_rtrl.py, es_d_rtrl.py) call it once, when they are imported, before any algorithm is built. brainscale looks the patched
functions up when a step is traced, so a call changes the steps traced after it (steps compiled earlier
keep what they were traced with). Each call sets the state it asks for (idempotent; cheap to repeat).
Nothing in jax itself is changed, only names inside brainscale's own modules; the originals are kept
here (never as markers on brainscale's modules), so a change can be switched back off.

The changes, why, and the test that proves each:

1. jax >= 0.10 bridge (always; does nothing on jax 0.8). brainscale 0.1.0 calls four jax APIs that jax
   0.10 removed or changed:
     a. `jax.core.get_aval` (its successor is `typeof` in jax's core);
     b. `jax.core.new_jaxpr_eqn` in the public module (it is still in `jax._src.core`);
     c. a separate `ClosedJaxpr(jaxpr=..., consts=...)` class: `ClosedJaxpr` is now an alias of `Jaxpr`,
        which takes the legacy form only positionally, `Jaxpr(jaxpr, consts)`;
     d. `Jaxpr(constvars=cv, invars=iv, ...)` without consts used to keep `cv` apart from `iv`; now the
        constvars without attached values become leading invars (`.constvars == []`,
        `.invars == cv + iv`). brainscale builds such jaxprs (the weight-output -> hidden-group and
        hidden -> hidden transitions) and reads `.constvars` / `.invars` separately ("The weight y
        should be unique" otherwise).
   Bridged inside brainscale's modules (their module globals): `jax` there becomes a proxy whose `core`
   also has `get_aval` and `new_jaxpr_eqn`; `Jaxpr`, in the modules that build jaxprs from constvars,
   becomes a subclass that keeps the constvars apart (evaluation is unchanged: `eval_jaxpr` binds
   `all_invars` to `[*consts, *args]`); `ClosedJaxpr` becomes a function accepting the old keywords.
   It cannot be switched off (brainscale would not run without it). Proof: the whole test suite run
   with `requirements-jax011.txt` (jax 0.11.2), and the gradients of the DMS network equal to the jax 0.8
   stack's to 1.1e-7 (docs/dependencies.md).

2. D-RTRL trace fix (`drtrl_fix=True`). `ParamDimVjpAlgorithm`'s `_update_param_dim_etrace_scan_fn`
   divides each new eligibility trace (and each trace increment) by its largest absolute element
   whenever that exceeds 1 (`_normalize_vector`). That silently shrinks the gradient: a leaky
   readout's trace grows towards 1/(1 - decay), so after a few steps its D-RTRL gradient is several
   times too small. `_normalize_vector` becomes the identity; the traces stay bounded whenever the
   diagonal Jacobians are below 1, and D-RTRL is exact where theory says so. Proof:
   tests/test_gradients.py (D-RTRL equals BPTT to cosine >= 0.9999 where it must;
   `test_unpatched_brainscale_gets_the_leaky_readout_wrong` shows the unfixed library off by > 30 %).

3. Fast dense-layer paths (`speedups=True`; `speedups=None` reads BRAINSCALE_SPEEDUPS from the
   environment, on unless it is `0`). Same formulas as brainscale, written so that XLA's CPU backend
   compiles them well (3 x 512 LIF-delta, 2312 inputs, batch 32, 2-core CPU, found by switching parts
   off and reading the optimized HLO of the training step):

   D-RTRL (`ParamDimVjpAlgorithm`), about 420 ms per time step before, 43 times a BPTT step. Step by
   step, its work is streaming the traces (batch x #params floats, 320 MB here) through memory every step
   (`--trace_chunk K` > 1 avoids that for this repository's networks: chunked_traces.py reads and writes
   them once per K steps).
   brainscale writes the trace update and the gradient as nested `vmap`s of `jax.vjp(x @ W)` and of
   `yw_to_w`; after XLA's fusion this became, per trace and per step,
     * a full copy of the old trace (the gradient fusion re-read the *old* trace and recomputed the
       update from it, so the update could not happen in place), and
     * the gradient `sum_b e[b] * dL/dh[b]` as a reduction over the batch fused with the surrogate
       derivative and the running gradient sum: XLA's CPU backend emits that as scalar code (a micro
       benchmark of the same fusion: 540 ms against 90 ms for the version below).
   Without the gradient read the step took ~100 ms, without the trace update ~170 ms.

   ES-D-RTRL (`IODimVjpAlgorithm`): the weight gradient `x^T (df * dL/dh)` came out of `jax.vjp` as a
   (n_out, n_in) product that was transposed while being added to the gradient sum, every step (-22 %).

   For every `brainscale.nn.Linear` (a `MatMulOp` without mask or weight function) in batching mode:

    D-RTRL     e_t[b,i,j,k] = sum_s D_t[b,j,k,s] e_{t-1}[b,i,j,s] + x_t[b,i] df_t[b,j,k]
               dL/dW[i,j]  += sum_b sum_k e_t[b,i,j,k] dL/dh_t[b,j,k]   (written as a chain of B*S slice
                                                                        products: one vectorized loop)
    ES-D-RTRL  dL/dW       += x_hat^T (sum_k df_hat[..., k] / c_t * dL/dh[..., k])    (one dot, no transpose)

   Every other relation (convolutions, element-wise parameters, masks, weight functions, physical
   units) goes to brainscale's own code, and so does the D-RTRL trace update while change 2 is off
   (the fast update has no rescaling). `STATS` counts the relations traced through each. Proof:
   tests/test_memory_speed.py::test_brainscale_speedups_give_brainscale_gradients (gradients equal to
   brainscale's own code to float32 rounding, several networks incl. multi-state neurons and the DMS
   network) and ::test_fast_path_counts_the_drtrl_gradient_read.
"""
from __future__ import annotations

import os
import types


def adapt_brainscale(drtrl_fix: bool = True, speedups: bool = None) -> dict:
    """Apply the changes listed in the module docstring; returns which are active.

    drtrl_fix: switch brainscale's D-RTRL trace rescaling off (True) or leave brainscale's own (False).
    speedups: the fast dense-layer paths; None = on unless BRAINSCALE_SPEEDUPS=0 in the environment.
    """
    global _CONFIGURED
    _CONFIGURED = True
    if speedups is None:
        speedups = os.environ.get('BRAINSCALE_SPEEDUPS', '1') != '0'
    bridged = _apply_jax_bridge()
    _set_drtrl_fix(drtrl_fix)
    _set_speedups(speedups)
    return dict(jax_bridge=bridged, drtrl_fix=drtrl_fix_active(), speedups=speedups_active())


_CONFIGURED = False  # adapt_brainscale has been called in this process


def ensure_adapted():
    """The defaults of adapt_brainscale(), unless it was called already: importing a rule that uses
    brainscale must not undo a configuration chosen before (a test that switches the D-RTRL fix off)."""
    if not _CONFIGURED:
        adapt_brainscale()


# ------------------------------------------------------------------------------------------------
# 1. The jax >= 0.10 bridge
# ------------------------------------------------------------------------------------------------

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


def _bridge_needed() -> bool:
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


def _apply_jax_bridge() -> bool:
    """Patch brainscale's modules for the newest jax; returns True when the bridge is (now) active."""
    global _APPLIED
    if _APPLIED:
        return True
    if not _bridge_needed():
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
            raise RuntimeError(f'brainscale internals changed ({name}.Jaxpr missing): re-check brainscale_adapter.py')
        mod.Jaxpr = split_jaxpr
    _APPLIED = True
    return True


# ------------------------------------------------------------------------------------------------
# 2. The D-RTRL trace fix
# ------------------------------------------------------------------------------------------------

_DRTRL = {}  # 'original': brainscale's _normalize_vector


def _no_rescaling(v):
    """Stands in for brainscale's `_normalize_vector`: the trace unchanged."""
    return v


def _set_drtrl_fix(on: bool):
    import brainscale._etrace_vjp_algorithms as alg
    if not hasattr(alg, '_normalize_vector'):
        raise RuntimeError('brainscale internals changed (_normalize_vector missing): re-check brainscale_adapter.py')
    if alg._normalize_vector is not _no_rescaling:
        _DRTRL['original'] = alg._normalize_vector
    alg._normalize_vector = _no_rescaling if on else _DRTRL['original']


def drtrl_fix_active() -> bool:
    """brainscale's D-RTRL trace rescaling is switched off (looked up on brainscale's module each time)."""
    import brainscale._etrace_vjp_algorithms as alg
    return alg._normalize_vector is _no_rescaling


# ------------------------------------------------------------------------------------------------
# 3. Fast dense-layer paths
# ------------------------------------------------------------------------------------------------
_STATE = {}
STATS = {'fast': 0, 'fallback': 0}  # relations traced through the fast path / brainscale's code (every
                                    # trace update and every gradient read counts)


def _plain_dense(relation, mode) -> bool:
    """A `MatMulOp` without mask or weight function, in batching mode."""
    import brainscale
    import brainstate
    import brainscale._etrace_vjp_algorithms as alg
    op = relation.weight.op
    return (type(op) is brainscale.MatMulOp and op.weight_mask is None
            and getattr(op.weight_fn, '__code__', None) is _STATE['weight_fn_code']
            and not isinstance(relation.weight, alg.ElemWiseParam)
            and mode.has(brainstate.mixin.Batching))


def _unitless(*trees) -> bool:
    import brainunit as u
    import jax
    return not any(isinstance(v, u.Quantity) for t in trees for v in jax.tree.leaves(t, is_leaf=u.math.is_quantity))


def _weight_dict(tree) -> bool:
    return isinstance(tree, dict) and 'weight' in tree and not set(tree) - {'weight', 'bias'}


def _count(fast: int, slow: int):
    STATS['fast'] += fast
    STATS['fallback'] += slow


# ------------------------------------------------------------------------------------------------
# D-RTRL
# ------------------------------------------------------------------------------------------------


def _param_dim_shapes_ok(x, old, df, diag) -> bool:
    if x is None or x.ndim != 2 or df.ndim != 3 or not _weight_dict(old):
        return False
    B, I = x.shape
    J, S = df.shape[1:]
    if df.shape[0] != B or diag.shape != (B, J, S, S) or old['weight'].shape != (B, I, J, S):
        return False
    return 'bias' not in old or old['bias'].shape == (B, J, S)


def new_trace(old, diag, phg):
    """sum_s diag[b, j, k, s] old[b, ..., j, s] + phg[b, ..., j, k]; old/phg (B, ..., J, S), diag (B, J, S, S)."""
    import jax.numpy as jnp
    n_state = old.shape[-1]
    d = diag.reshape(diag.shape[:1] + (1,) * (old.ndim - 3) + diag.shape[1:])
    if n_state == 1:
        return d[..., 0] * old + phg
    return jnp.stack([phg[..., k] + sum(d[..., k, s] * old[..., s] for s in range(n_state))
                      for k in range(n_state)], axis=-1)


def _param_dim_update(hist_etrace_vals, jacobians, weight_path_to_vals, hidden_param_op_relations, mode,
                      normalize_matrix_spectrum: bool = False):
    import brainscale._etrace_vjp_algorithms as alg
    original = _STATE['param_dim_update']
    if normalize_matrix_spectrum or not drtrl_fix_active():
        _count(0, len(hidden_param_op_relations))
        return original(hist_etrace_vals, jacobians, weight_path_to_vals, hidden_param_op_relations, mode,
                        normalize_matrix_spectrum)
    xs_at_t, dfs_at_t, hid_jacs = jacobians
    new, slow = {}, []
    for relation in hidden_param_op_relations:
        fast = _plain_dense(relation, mode) and _unitless(weight_path_to_vals[relation.path])
        x = xs_at_t[id(relation.x)] if fast else None
        groups = []
        for group in relation.hidden_groups:
            key = alg.etrace_param_key(relation.path, relation.y, group.index)
            groups.append((key, hist_etrace_vals[key], dfs_at_t[alg.etrace_df_key(relation.y, group.index)],
                           hid_jacs[group.index]))
        if not (fast and all(_unitless(*g[1:]) and _param_dim_shapes_ok(x, *g[1:]) for g in groups)):
            slow.append(relation)
            continue
        for key, old, df, diag in groups:          # old: (B, I, J, S); df: (B, J, S); diag: (B, J, S, S)
            out = {'weight': new_trace(old['weight'], diag, x[:, :, None, None] * df[:, None, :, :])}
            if 'bias' in old:
                out['bias'] = new_trace(old['bias'], diag, df)
            new[key] = out
    _count(len(hidden_param_op_relations) - len(slow), len(slow))
    if slow:
        new.update(original(hist_etrace_vals, jacobians, weight_path_to_vals, slow, mode,
                            normalize_matrix_spectrum)[0])
    return new, None


_BATCH_SHARDS = [None]


class batch_shards:
    """`with batch_shards(mesh):` while a step is traced whose batch axis is split over the mesh axis
    'batch' (rsnn.trainer.Trainer on several devices): batch_sum then runs on each device's own samples
    (shard_map) and adds the devices' sums (psum). Slicing single samples out of the split axis, as on
    one device, made XLA gather the whole trace onto every device (3.5 copies of a device's traces in
    temporaries; one einsum still left 1.4 copies; this: none, as on one device; D-RTRL on 2 CPU devices)."""

    def __init__(self, mesh):
        self.mesh = mesh

    def __enter__(self):
        _BATCH_SHARDS.append(self.mesh)

    def __exit__(self, *exc):
        _BATCH_SHARDS.pop()


def batch_sum(trace, dl):
    """sum_b sum_s trace[b, :, :, s] * dl[b, None, :, s], as one element-wise sum of B x S slices.

    Written out term by term on purpose: as `jnp.sum(..., axis=0)` XLA's CPU backend fuses the surrogate
    derivative and the running gradient sum into the reduction loop and runs it as scalar code; a chain
    of slice products is one vectorized loop over the weight's elements. With the batch split over
    several devices (batch_shards) the same chain runs on each device's samples and the sums are added.
    """
    mesh = _BATCH_SHARDS[-1]
    if mesh is not None:
        import jax
        from jax.sharding import PartitionSpec as P

        def local(t, d):
            return jax.lax.psum(_batch_sum_local(t, d), 'batch')
        return jax.shard_map(local, mesh=mesh, in_specs=(P('batch'), P('batch')), out_specs=P())(trace, dl)
    return _batch_sum_local(trace, dl)


def _batch_sum_local(trace, dl):
    total = None
    for b in range(trace.shape[0]):
        for s in range(trace.shape[-1]):
            term = trace[b, :, :, s] * dl[b, None, :, s]
            total = term if total is None else total + term
    return total


def _param_dim_solve(hist_etrace_data, dG_weights, dG_hidden_groups, weight_hidden_relations, mode):
    import jax
    import jax.numpy as jnp
    import brainscale._etrace_vjp_algorithms as alg
    slow = []
    for relation in weight_hidden_relations:
        traces = [(hist_etrace_data[alg.etrace_param_key(relation.path, relation.y, g.index)],
                   dG_hidden_groups[g.index]) for g in relation.hidden_groups]
        if not (_plain_dense(relation, mode) and all(
                _weight_dict(t) and _unitless(t, dl) and t['weight'].ndim == 4 and dl.ndim == 3
                and t['weight'].shape[:1] + t['weight'].shape[2:] == dl.shape for t, dl in traces)):
            slow.append(relation)
            continue
        total = None
        for trace, dl in traces:
            g = {'weight': batch_sum(trace['weight'], dl)}
            if 'bias' in trace:
                g['bias'] = jnp.sum(trace['bias'] * dl, axis=(0, 2))
            total = g if total is None else jax.tree.map(jnp.add, total, g)
        alg._update_dict(dG_weights, relation.path, total)
    _count(len(weight_hidden_relations) - len(slow), len(slow))
    if slow:
        _STATE['param_dim_solve'](hist_etrace_data, dG_weights, dG_hidden_groups, slow, mode)


# ------------------------------------------------------------------------------------------------
# ES-D-RTRL
# ------------------------------------------------------------------------------------------------


def _io_dim_solve(hist_etrace_data, dG_weights, dG_hidden_groups, weight_hidden_relations, weight_vals,
                  running_index, decay, mode):
    import brainunit as u
    import jax
    import jax.numpy as jnp
    import brainscale._etrace_vjp_algorithms as alg
    # brainscale's bias correction, as brainscale computes it
    correction = 1. - u.math.power(1. - decay, running_index + 1)
    correction = jax.lax.stop_gradient(u.math.where(running_index < 1000, correction, 1.))
    xs, dfs = hist_etrace_data
    slow = []
    for relation in weight_hidden_relations:
        fast = _plain_dense(relation, mode) and _weight_dict(weight_vals[relation.path])
        x = xs[id(relation.x)] if fast else None
        dls = [(dfs[alg.etrace_df_key(relation.y, g.index)], dG_hidden_groups[g.index])
               for g in relation.hidden_groups]
        if not (fast and x.ndim == 2 and _unitless(weight_vals[relation.path], x)
                and all(_unitless(df, dl) and df.ndim == 3 and df.shape == dl.shape and df.shape[0] == x.shape[0]
                        for df, dl in dls)):
            slow.append(relation)
            continue
        for df, dl in dls:
            dh = jnp.sum(df / correction * dl, axis=-1)                 # (B, J)
            g = {'weight': jnp.dot(x.T, dh)}
            if 'bias' in weight_vals[relation.path]:
                g['bias'] = jnp.sum(dh, axis=0)
            alg._update_dict(dG_weights, relation.path, g)
    _count(len(weight_hidden_relations) - len(slow), len(slow))
    if slow:
        _STATE['io_dim_solve'](hist_etrace_data, dG_weights, dG_hidden_groups, slow, weight_vals,
                               running_index, decay, mode)


# ------------------------------------------------------------------------------------------------


_NAMES = {'param_dim_update': '_update_param_dim_etrace_scan_fn',
          'param_dim_solve': '_solve_param_dim_weight_gradients',
          'io_dim_solve': '_solve_IO_dim_weight_gradients'}
_FAST = {'param_dim_update': _param_dim_update, 'param_dim_solve': _param_dim_solve,
         'io_dim_solve': _io_dim_solve}


def _set_speedups(on: bool):
    """Route brainscale's D-RTRL and ES-D-RTRL dense-layer computations through the code above (on), or
    put brainscale's own functions back (off)."""
    import brainscale
    import brainscale._etrace_vjp_algorithms as alg
    if on == speedups_active():
        return
    if not on:
        for key, name in _NAMES.items():
            setattr(alg, name, _STATE[key])
        _STATE['installed'] = False
        return
    for name in list(_NAMES.values()) + ['_update_dict', 'etrace_param_key', 'etrace_df_key', 'ElemWiseParam']:
        if not hasattr(alg, name):
            raise RuntimeError(f'brainscale internals changed ({name} missing): re-check brainscale_adapter.py')
    _STATE['weight_fn_code'] = brainscale.MatMulOp().weight_fn.__code__
    for key, name in _NAMES.items():
        _STATE.setdefault(key, getattr(alg, name))  # brainscale's own function, kept once
        setattr(alg, name, _FAST[key])
    _STATE['installed'] = True


def speedups_active() -> bool:
    return bool(_STATE.get('installed'))


# ------------------------------------------------------------------------------------------------
# The eligibility traces of a brainscale algorithm, by names that survive a restart
# ------------------------------------------------------------------------------------------------
# brainscale 0.1.0's trace dicts: IODimVjpAlgorithm (ES-D-RTRL) and ParamDimVjpAlgorithm (D-RTRL)
TRACE_DICTS = ('etrace_xs', 'etrace_dfs', 'etrace_bwg')


def trace_states(algo, model) -> dict:
    """name -> state of every eligibility trace of a brainscale algorithm (and its step counter), by the
    dict it is in and its position there: brainscale's own keys hold Python ids, which differ from one
    process to the next, and the order of algo.states() changes after the first step, so neither can name
    a checkpointed trace. Raises if brainscale holds a state (besides `model`'s own) that this does not name."""
    import brainstate
    states = {}
    for name in TRACE_DICTS:
        for i, st in enumerate(getattr(algo, name, {}).values()):
            states[f'{name}/{i}'] = st
    states['running_index'] = algo.running_index
    known = {id(s) for s in states.values()} | {id(s) for s in model.states().values()}
    missed = [k for k, s in algo.states().items() if not isinstance(s, brainstate.ParamState) and id(s) not in known]
    if missed:
        raise RuntimeError(f'brainscale holds states that trace_states does not name: {missed}')
    return states
