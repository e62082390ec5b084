"""Data parallelism over every device with `jax.sharding`.

One code path for 1..N devices and 1..M hosts: a 1-D `Mesh` with a ``data``
axis over all devices, batches split along their leading axis, the training
state replicated. Each host feeds its own slice of the global batch
(`global_batch`), so a multi-host job reads disjoint data shards.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def _env_int(name: str) -> int | None:
  value = os.environ.get(name, "")
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"{name}={value!r} must be an integer") from None


def maybe_initialize_distributed(enabled: bool, coordinator_address: str | None = None,
                                 num_processes: int | None = None,
                                 process_id: int | None = None) -> None:
  """Joins a multi-process job with `jax.distributed.initialize` when `enabled`.

  Arguments left None come from ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of
  process 0), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``, and what those leave
  unset from JAX's cluster detection (SLURM, Open MPI, Cloud TPU, Kubernetes).
  Must run before any other JAX call; a no-op when `enabled` is False or this
  process has already joined.
  """
  if not enabled or jax.distributed.is_initialized():
    return
  if num_processes is None:
    num_processes = _env_int("JAX_NUM_PROCESSES")
  if process_id is None:
    process_id = _env_int("JAX_PROCESS_ID")
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"the number of processes must be >= 1, got {num_processes}")
  if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"the process id must be in [0, {num_processes}), got {process_id}")
  jax.distributed.initialize(coordinator_address, num_processes, process_id)


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh named ``data`` over `devices` (default: all devices of all hosts)."""
  devices = list(jax.devices() if devices is None else devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding of the training state: a full copy on every device."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Sharding of a batch: leading axis split over the ``data`` axis."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def per_host_batch_size(global_batch_size: int, mesh: Mesh) -> int:
  """How many examples this host loads per step; checks divisibility first."""
  devices = mesh.devices.size
  if global_batch_size % devices:
    raise ValueError(f"data.batch_size={global_batch_size} must be divisible by the number "
                     f"of devices ({devices}); use a multiple of {devices}")
  return global_batch_size // jax.process_count()


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each host's numpy slice into one global array sharded over ``data``."""
  sharding = batch_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Puts every array of `tree` on all devices of `mesh`."""
  return jax.device_put(tree, replicated(mesh))


def pad_to_multiple(x: np.ndarray, multiple: int) -> tuple[np.ndarray, int]:
  """Pads the leading axis (repeating the last row) to a multiple; returns (padded, n)."""
  n = x.shape[0]
  extra = (-n) % multiple
  if extra:
    x = np.concatenate([x, np.repeat(x[-1:], extra, axis=0)], axis=0)
  return x, n
