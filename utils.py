"""The user's layer of helpers: one import for the task scripts and the tests, re-exporting what the package
`rsnn` defines (nothing here is imported by rsnn). The one-line error is rsnn/errors.py; the flag validators,
the shared parser and cli_main rsnn/cli.py; device choice rsnn/device_choice.py; several hosts
rsnn/distributed.py; the trace-chunk policy rsnn/chunk_policy.py; CSV/JSON writing and the memory check
rsnn/files.py; the table of neuron models and the surrogates' names rsnn/neurons/.
"""
from __future__ import annotations

from rsnn.chunk_policy import (AUTO_CHUNK_BUDGET_MB, AUTO_CHUNK_CACHE_MB, AUTO_CHUNK_FLOOR_MB, AUTO_CHUNK_TRACE_FRACTION,  # noqa: F401
                               BUFFER_FLOATS_PER_STEP, DEFAULT_TRACE_CHUNK, auto_trace_chunk)
from rsnn.cli import (base_parser, cli_main, decay_or_rank, exp_name_arg, finite_float, nonneg_float,  # noqa: F401
                      nonneg_int, positive_float, positive_int, rule_options, trace_chunk_arg)
from rsnn.device_choice import (batch_error, check_batch_for_devices, device_name, devices_name,  # noqa: F401
                                parse_devices, select_device, select_devices)
from rsnn.distributed import (DISTRIBUTED_ENV, distributed_started, init_distributed, is_main_process,  # noqa: F401
                              slurm_local_device_ids, start_distributed, sync_processes, wants_distributed)
from rsnn.errors import UserError  # noqa: F401
from rsnn.files import (append_csv_row, available_memory_bytes, check_memory, finite_or_null, json_value,  # noqa: F401
                        peak_rss_mb, read_csv, write_json)
from rsnn.methods import VJP_METHODS  # noqa: F401
from rsnn.neurons import MODEL_NAMES, SURROGATE_NAMES, model_help  # noqa: F401
