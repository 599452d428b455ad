"""The trace-chunk policy: the K of `--trace_chunk auto` for an online rule (docs/chunked-traces.md).
No jax: the memory command's parent process calls it too."""
from __future__ import annotations

# --trace_chunk: the largest K (the K measured fastest here, docs/chunked-traces.md) and the default, `auto`:
# the largest power of two K <= DEFAULT_TRACE_CHUNK whose K-step buffers (estimated by auto_trace_chunk)
# fit a memory budget, so that the chunks' speed never costs more memory than the rule's own state
# (docs/memory-and-speed.md#trace_chunk-auto).
DEFAULT_TRACE_CHUNK = 64
AUTO_CHUNK_BUDGET_MB = 192.      # ES-D-RTRL: the K-step buffers of auto at most this;
AUTO_CHUNK_TRACE_FRACTION = 0.3  # D-RTRL: at most this fraction of its traces (its step <= 1.3 x step by step's)
AUTO_CHUNK_FLOOR_MB = 32.        # ... but never less than this (small networks keep K = 64)
AUTO_CHUNK_CACHE_MB = 12.8       # ES-D-RTRL: the chunk's per-neuron Jacobians (K x B x S x S floats per neuron)
#                                  within this too, about 0.4 x the 32 MB L3 of the machine it was measured on
#                                  (docs/chunked-traces.md, "Choosing K"): larger chunks fall out of the cache
BUFFER_FLOATS_PER_STEP = 3       # floats per input and per hidden state and sample that a chunk keeps per step


def auto_trace_chunk(method: str, relations, batch: int) -> int:
    """The K of `--trace_chunk auto` for an online method on a network whose weight relations are
    `relations` [(n_in, n_out, S), ...] (layers..., readout), per device batch `batch`. The chunk keeps per
    step, per sample, about BUFFER_FLOATS_PER_STEP floats per input and per hidden state of every relation
    (the inputs, previous states, weight outputs, D, df, L, ...; measured against XLA's analysis in
    docs/memory-and-speed.md); K is the largest power of two <= DEFAULT_TRACE_CHUNK whose buffers fit
    AUTO_CHUNK_BUDGET_MB (ES-D-RTRL) or AUTO_CHUNK_TRACE_FRACTION of the traces (D-RTRL, at least
    AUTO_CHUNK_FLOOR_MB: its traces dominate its step anyway, and fewer, longer chunks stream them less).
    ES-D-RTRL's K also keeps the chunk's per-neuron Jacobians D (batch x S x S floats per neuron and step, the
    buffer its f^ recursion reads step by step) within AUTO_CHUNK_CACHE_MB, a cache-sized budget: at large
    batches a chunk that outgrows the cache is slower (DMS network, batch 128: K 8 1.18 s, K 64 1.65 s).
    No jax: the memory command's parent calls it too."""
    per_step = 4. * BUFFER_FLOATS_PER_STEP * batch * sum(n_in + n_out * S for n_in, n_out, S in relations)
    budget = AUTO_CHUNK_BUDGET_MB * 2 ** 20
    jacobians = 4. * batch * sum(n_out * S * S for _, n_out, S in relations)
    cache = AUTO_CHUNK_CACHE_MB * 2 ** 20 if method == 'expsm_diag' else float('inf')
    if method == 'diag':
        traces = 4. * batch * sum((n_in + 1) * n_out * S for n_in, n_out, S in relations)
        budget = max(AUTO_CHUNK_FLOOR_MB * 2 ** 20, AUTO_CHUNK_TRACE_FRACTION * traces)
    K = 1
    while 2 * K <= DEFAULT_TRACE_CHUNK and 2 * K * per_step <= budget and 2 * K * jacobians <= cache:
        K *= 2
    return K
