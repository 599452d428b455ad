"""The run folder's files (CSV rows, strict JSON), the memory check before a run allocates and the peak
resident memory. No jax."""
from __future__ import annotations

import csv
import json
import math
import os
import sys
from typing import Optional

from rsnn.errors import UserError


def json_value(value):
    return json.loads(json.dumps(value, default=str))


def available_memory_bytes() -> Optional[int]:
    """Memory available to a new allocation (Linux MemAvailable; else the physical memory; None if unknown)."""
    try:
        with open('/proc/meminfo') as f:
            for line in f:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(parts: list):
    """parts: (flag, value, estimated bytes, what needs them); one error line for the first part that needs
    more memory than is available, before anything is allocated."""
    available = available_memory_bytes()
    if available is None:
        return
    for flag, value, need, what in parts:
        if need > available:
            raise UserError(f'{flag} {value}: {what} needs about {need / 2 ** 30:,.1f} GiB, more than the '
                            f'{available / 2 ** 30:,.1f} GiB of memory available here; lower {flag}')


def append_csv_row(path: str, row: dict, sync: bool):
    """Append one row (a header first when the file is new); sync=True also forces it to disk."""
    new = not os.path.exists(path)
    with open(path, 'a', newline='') as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)
        if sync:
            f.flush()
            os.fsync(f.fileno())


def read_csv(path: str) -> list:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def write_json(path: str, obj):
    """Strict JSON (NaN and infinities become null), written whole and then renamed over `path`."""
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(finite_or_null(obj), f, indent=2, default=str, allow_nan=False)
    os.replace(tmp, path)


def finite_or_null(obj):
    if isinstance(obj, dict):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_null(v) for v in obj]
    if isinstance(obj, float) or type(obj).__name__.startswith('float'):  # numpy floats too
        value = float(obj)
        return value if math.isfinite(value) else None
    return obj


def peak_rss_mb() -> Optional[float]:
    """The process's peak resident memory in MB (resource.getrusage; None where unavailable)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == 'darwin' else peak / 1024.  # bytes on macOS, KiB on Linux
