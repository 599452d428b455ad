"""Faster D-RTRL and ES-D-RTRL steps of brainscale 0.1.0 for dense layers, with the same gradients.

Why (3 x 512 LIF-delta, 2312 inputs, batch 32, 2-core CPU, found by switching parts off and reading
the optimized HLO of the training step):

D-RTRL (`ParamDimVjpAlgorithm`), about 420 ms per time step before, 43 times a BPTT step. Its
unavoidable work is streaming the traces (batch x #params floats, 320 MB here) through memory. brainscale
writes the trace update and the gradient as nested `vmap`s of `jax.vjp(x @ W)` and of `yw_to_w`; after
XLA's fusion this became, per trace and per step,
  * a full copy of the old trace (the gradient fusion re-read the *old* trace and recomputed the update
    from it, so the update could not happen in place), and
  * the gradient `sum_b e[b] * dL/dh[b]` as a reduction over the batch fused with the surrogate
    derivative and the running gradient sum: XLA's CPU backend emits that as scalar code (a micro
    benchmark of the same fusion: 540 ms against 90 ms for the version below).
Without the gradient read the step took ~100 ms, without the trace update ~170 ms.

ES-D-RTRL (`IODimVjpAlgorithm`): the weight gradient `x^T (df * dL/dh)` came out of `jax.vjp` as a
(n_out, n_in) product that was transposed while being added to the gradient sum, every step (-22% here).

The replacement computes, for every `brainscale.nn.Linear` (a `MatMulOp` without mask or weight
function) in batching mode, exactly brainscale's formulas:

    D-RTRL     e_t[b,i,j,k] = sum_s D_t[b,j,k,s] e_{t-1}[b,i,j,s] + x_t[b,i] df_t[b,j,k]
               dL/dW[i,j]  += sum_b sum_k e_t[b,i,j,k] dL/dh_t[b,j,k]   (written as a chain of B*S slice
                                                                        products: one vectorized loop)
    ES-D-RTRL  dL/dW       += x_hat^T (sum_k df_hat[..., k] / c_t * dL/dh[..., k])    (one dot, no transpose)

Every other relation (convolutions, element-wise parameters, masks, weight functions, physical units)
goes to brainscale's own code, and so does D-RTRL while brainscale's trace rescaling is active
(utils.patch_brainscale_drtrl switches it off). tests/test_memory_speed.py compares the gradients of
several networks with the unpatched brainscale (equal to float32 rounding).

`install()` is called by `utils.Trainer` for the online methods; `uninstall()` restores brainscale's code
(for steps traced afterwards). BRAINSCALE_SPEEDUPS=0 in the environment keeps brainscale's code.
"""
from __future__ import annotations

import os

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


def _normalization_off(alg) -> bool:
    """utils.patch_brainscale_drtrl replaced brainscale's trace rescaling by the identity."""
    original = getattr(alg, '_original_normalize_vector', None)
    return getattr(alg, '_our_patch', False) and original is not None and alg._normalize_vector is not original


def _param_dim_shapes_ok(x, old, df, diag) -> bool:
    if x is None or x.ndim != 2 or df.ndim != 3 or not _weight_dict(old):
        return False
    B, I = x.shape
    J, S = df.shape[1:]
    if df.shape[0] != B or diag.shape != (B, J, S, S) or old['weight'].shape != (B, I, J, S):
        return False
    return 'bias' not in old or old['bias'].shape == (B, J, S)


def _new_trace(old, diag, phg):
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
    if normalize_matrix_spectrum or not _normalization_off(alg):
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
            out = {'weight': _new_trace(old['weight'], diag, x[:, :, None, None] * df[:, None, :, :])}
            if 'bias' in old:
                out['bias'] = _new_trace(old['bias'], diag, df)
            new[key] = out
    _count(len(hidden_param_op_relations) - len(slow), len(slow))
    if slow:
        new.update(original(hist_etrace_vals, jacobians, weight_path_to_vals, slow, mode,
                            normalize_matrix_spectrum)[0])
    return new, None


_BATCH_SHARDS = [None]


class batch_shards:
    """`with batch_shards(mesh):` while a step is traced whose batch axis is split over the mesh axis
    'batch' (utils.Trainer on several devices): _batch_sum then runs on each device's own samples
    (shard_map) and adds the devices' sums (psum). Slicing single samples out of the split axis, as on
    one device, made XLA gather the whole trace onto every device (3.5 copies of a device's traces in
    temporaries; one einsum still left 1.4 copies; this: none, as on one device; D-RTRL on 2 CPU devices)."""

    def __init__(self, mesh):
        self.mesh = mesh

    def __enter__(self):
        _BATCH_SHARDS.append(self.mesh)

    def __exit__(self, *exc):
        _BATCH_SHARDS.pop()


def _batch_sum(trace, dl):
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
            g = {'weight': _batch_sum(trace['weight'], dl)}
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


def install() -> bool:
    """Route brainscale's D-RTRL and ES-D-RTRL dense-layer computations through the code above.

    Idempotent. brainscale looks these functions up when a step is traced, so this must run before the
    first compile. Returns False (and changes nothing) when BRAINSCALE_SPEEDUPS=0.
    """
    import brainscale
    import brainscale._etrace_vjp_algorithms as alg
    if os.environ.get('BRAINSCALE_SPEEDUPS', '1') == '0':
        return False
    if _STATE.get('installed'):
        return True
    for name in list(_NAMES.values()) + ['_normalize_vector', '_update_dict', 'etrace_param_key',
                                         'etrace_df_key', 'ElemWiseParam']:
        if not hasattr(alg, name):
            raise RuntimeError(f'brainscale internals changed ({name} missing): re-check brainscale_speedups')
    _STATE['weight_fn_code'] = brainscale.MatMulOp().weight_fn.__code__
    for key, name in _NAMES.items():
        _STATE[key] = getattr(alg, name)
        setattr(alg, name, _FAST[key])
    _STATE['installed'] = True
    return True


def uninstall():
    """Put brainscale's own functions back (steps compiled earlier keep what they were traced with)."""
    import brainscale._etrace_vjp_algorithms as alg
    if _STATE.get('installed'):
        for key, name in _NAMES.items():
            setattr(alg, name, _STATE[key])
        _STATE['installed'] = False


def installed() -> bool:
    return bool(_STATE.get('installed'))
