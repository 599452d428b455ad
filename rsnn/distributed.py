"""Several processes (hosts): starting jax.distributed, which process writes, the barrier between them.
jax is imported inside the functions only, so that a task script can call these before anything imports
brainscale."""
from __future__ import annotations

import os
import sys

from rsnn.errors import UserError

DISTRIBUTED_ENV = ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES')  # set by hand for several processes


def wants_distributed(argv) -> bool:
    """--distributed on the command line, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES (> 1) set. Read
    from argv itself (no parsing), so that a task script can initialize before anything imports brainscale:
    braintools' initializers evaluate jnp at import, which starts a backend (jax 0.8)."""
    if any(a == '--distributed' for a in argv):
        return True
    n = os.environ.get('JAX_NUM_PROCESSES', '')
    return bool(os.environ.get('JAX_COORDINATOR_ADDRESS')) and (not n or n.strip() != '1')


def start_distributed(argv):
    """The task scripts' first line: jax.distributed.initialize() when wants_distributed(argv)."""
    if wants_distributed(argv):
        init_distributed()


def slurm_local_device_ids(env=None):
    """(local_device_ids for jax.distributed.initialize, a note or None) under SLURM. jax gives a process
    under SLURM only GPU number SLURM_LOCALID: right for one task per GPU, but one task per node would see
    1 of the node's GPUs. With one task on this node, every GPU of the node (SLURM_GPUS_ON_NODE, else
    CUDA_VISIBLE_DEVICES); JAX_LOCAL_DEVICE_IDS (a comma list) overrides both. (None, None): jax's choice."""
    env = os.environ if env is None else env
    given = env.get('JAX_LOCAL_DEVICE_IDS', '').strip()
    if given:
        try:
            return [int(v) for v in given.split(',') if v.strip()], None
        except ValueError:
            raise UserError(f'JAX_LOCAL_DEVICE_IDS={given!r}: give a comma list of device numbers (0,1,2,3)')
    if 'SLURM_JOB_ID' not in env or 'SLURM_LOCALID' not in env:
        return None, None
    per_node = (env.get('SLURM_NTASKS_PER_NODE') or env.get('SLURM_STEP_TASKS_PER_NODE')
                or env.get('SLURM_TASKS_PER_NODE') or '').split('(')[0].split(',')[0].strip()
    if per_node != '1':
        return None, (f'note: SLURM with {per_node or "several"} tasks per node: this process uses GPU '
                      f'{env["SLURM_LOCALID"]} of its node (SLURM_LOCALID; one task per GPU)')
    count = env.get('SLURM_GPUS_ON_NODE', '').strip()
    visible = [v for v in env.get('CUDA_VISIBLE_DEVICES', '').split(',') if v.strip()]
    n = int(count) if count.isdigit() else len(visible)
    if n < 1:
        return None, ('note: SLURM with one task per node, but neither SLURM_GPUS_ON_NODE nor '
                      'CUDA_VISIBLE_DEVICES says how many GPUs it has: jax gives this process one; set '
                      'JAX_LOCAL_DEVICE_IDS=0,1,... to use more')
    return list(range(n)), None


def init_distributed():
    """jax.distributed.initialize() for a multi-host run (once). TPU pods, SLURM and Open MPI are detected
    by jax; elsewhere JAX_COORDINATOR_ADDRESS (read by jax), JAX_NUM_PROCESSES and JAX_PROCESS_ID say
    who is who. Under SLURM with one task per node, the node's GPUs (slurm_local_device_ids)."""
    import jax
    if getattr(init_distributed, 'done', False):
        return
    kw = {}
    if os.environ.get('JAX_NUM_PROCESSES'):
        kw['num_processes'] = int(os.environ['JAX_NUM_PROCESSES'])
    if os.environ.get('JAX_PROCESS_ID'):
        kw['process_id'] = int(os.environ['JAX_PROCESS_ID'])
    ids, note = slurm_local_device_ids()
    if ids is not None:
        kw['local_device_ids'] = ids
    if note:
        print(note, file=sys.stderr, flush=True)
    try:
        jax.distributed.initialize(**kw)
    except (ValueError, RuntimeError) as e:
        raise UserError(f'--distributed: jax.distributed.initialize() failed ({str(e).splitlines()[0]}); '
                        f'set JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID')
    init_distributed.done = True


def distributed_started() -> bool:
    """jax.distributed was initialized by this process (init_distributed)."""
    return bool(getattr(init_distributed, 'done', False))


def is_main_process() -> bool:
    """False on the processes of a --distributed run other than process 0 (which alone writes the run
    folder). Imports no jax unless jax.distributed was initialized here."""
    if not distributed_started():
        return True
    import jax
    return jax.process_index() == 0


def sync_processes(name: str):
    """Every process of a --distributed run waits here for the others (nothing without one)."""
    if distributed_started():
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
