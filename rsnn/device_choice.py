"""Which devices a run uses (--devices): one, a list, or all; the batch's divisibility by their number.
jax is imported inside the functions only (so that `--help` answers at once)."""
from __future__ import annotations

import sys

from rsnn.distributed import init_distributed
from rsnn.errors import UserError


def device_name(device) -> str:
    return f'{device.platform}:{device.id}'


def select_device(spec: str):
    """Make the requested device jax's default and return it; one warning line when it is absent."""
    import jax
    spec = str(spec).strip().lower()
    if spec == 'cpu':
        device = jax.devices('cpu')[0]
    else:
        try:
            index = int(spec)
        except ValueError:
            raise UserError(f"--devices must be an accelerator index (0, 1, ...) or 'cpu', got {spec!r}")
        accelerators = [d for d in jax.devices() if d.platform != 'cpu']
        if 0 <= index < len(accelerators):
            device = accelerators[index]
        else:
            device = accelerators[0] if accelerators else jax.devices('cpu')[0]
            have = ', '.join(device_name(d) for d in accelerators) or 'no accelerator'
            print(f'warning: --devices {index} not found ({have}); running on {device_name(device)}',
                  file=sys.stderr, flush=True)
    jax.config.update('jax_default_device', device)
    return device


def parse_devices(spec):
    """--devices without jax: 'cpu', an index N (one device), 'all', or a list of distinct indices."""
    text = str(spec).strip().lower()
    if text in ('cpu', 'all'):
        return text
    try:
        indices = [int(p) for p in text.split(',') if p.strip()]
    except ValueError:
        indices = []
    if not indices or len(set(indices)) != len(indices) or min(indices) < 0:
        raise UserError(f"--devices must be an index (0, 1, ...), a comma list of distinct indices (0,1,2,3), "
                        f"'all' or 'cpu', got {spec!r}")
    return indices[0] if len(indices) == 1 else indices


def check_batch_for_devices(batch_size: int, spec):
    """One error line when --batch_size does not divide by the number of devices a --devices list names
    (checked before anything is written; 'all' is checked by the Trainer once the devices are known)."""
    devices = parse_devices(spec)
    if isinstance(devices, list) and batch_size % len(devices):
        raise UserError(batch_error(batch_size, len(devices), spec))


def batch_error(batch_size: int, n: int, spec) -> str:
    lower, upper = batch_size // n * n, (batch_size // n + 1) * n
    options = ' or '.join(str(b) for b in (lower, upper) if b > 0)
    return (f'--batch_size {batch_size} does not divide by the {n} devices of --devices {spec}: every device '
            f'takes an equal part of the batch; use a multiple of {n} ({options})')


def select_devices(spec, distributed: bool = False) -> list:
    """The devices a run trains on. 'cpu' and a single index behave as select_device (one device, with
    a warning and a fall-back when the index is absent). A comma list of indices, or 'all', names several
    devices: the accelerators, or the CPU devices where there is none (XLA_FLAGS=
    --xla_force_host_platform_device_count=N gives N); an absent index is an error. The first local one
    becomes jax's default device."""
    parsed = parse_devices(spec)
    if distributed:
        init_distributed()
    if parsed == 'cpu' or isinstance(parsed, int):
        return [select_device(spec)]
    import jax
    accelerators = [d for d in jax.devices() if d.platform != 'cpu']
    pool = accelerators or jax.devices('cpu')
    if parsed == 'all':
        devices = pool
    else:
        missing = [i for i in parsed if i >= len(pool)]
        if missing:
            have = ', '.join(device_name(d) for d in pool)
            hint = (f'give indices below {len(pool)} or --devices all' if accelerators else
                    f'for {max(parsed) + 1} CPU devices set XLA_FLAGS=--xla_force_host_platform_device_count='
                    f'{max(parsed) + 1} before starting')
            raise UserError(f'--devices {spec}: there is no device {missing[0]} here ({have}); {hint}')
        devices = [pool[i] for i in parsed]
    local = [d for d in devices if d.process_index == jax.process_index()]
    jax.config.update('jax_default_device', local[0])
    return devices


def devices_name(devices) -> str:
    return ','.join(device_name(d) for d in devices)
