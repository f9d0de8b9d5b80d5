"""Meshes, logical-axis rules and multi-host plumbing.

Sharding is declared: parameters carry logical axis names, `LOGICAL_RULES` maps them onto the
mesh axes (`data`, `fsdp`, `tensor`), and the train step is a `jax.jit` with in/out shardings.
The same code runs on 1 CPU, 8 fake CPU devices, a GPU node and a multi-host TPU pod.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")   # the batch is split over these
TENSOR_AXIS = "tensor"          # heads, MLP hidden units and the vocabulary are split over this


class MeshError(ValueError):
  """config.mesh does not fit the available devices (a ValueError, like config errors)."""

# logical axis -> mesh axis (or tuple, or None = replicated).
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("qkv", None),
    ("vocab", "tensor"),
    ("cond", None),
    ("cond2", None),
    ("time", None),
    ("aux", None),
)


def maybe_initialize_distributed(coordinator_address: str | None = None,
                                 num_processes: int | None = None,
                                 process_id: int | None = None) -> None:
  """Starts `jax.distributed` from explicit flags or a detected cluster environment.

  Explicit flags win. Otherwise a TPU pod (several TPU workers) or a SLURM job with more than
  one task is initialised with auto-detection; a single process does nothing.
  """
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise ValueError("--coordinator_address needs --num_processes and --process_id too.")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id={process_id} must be in [0, --num_processes={num_processes}).")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    return
  multi_slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
  multi_tpu = "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if multi_slurm or multi_tpu:
    logging.info("Detected a multi-process %s environment; initialising jax.distributed.",
                 "SLURM" if multi_slurm else "TPU pod")
    jax.distributed.initialize()


def mesh_shape(mesh_cfg: Any, num_devices: int) -> tuple[int, int, int]:
  """Resolves `config.mesh` (one axis may be -1 = the remaining devices) to a shape."""
  dims = [int(mesh_cfg.data), int(mesh_cfg.fsdp), int(mesh_cfg.tensor)]
  if sum(d == -1 for d in dims) > 1:
    raise MeshError("config.mesh: at most one of data/fsdp/tensor may be -1.")
  if any(d == 0 or d < -1 for d in dims):
    raise MeshError(f"config.mesh: axis sizes must be positive or -1, got {dims}.")
  known = int(np.prod([d for d in dims if d != -1]))
  if num_devices % known:
    raise MeshError(f"config.mesh {dict(zip(MESH_AXES, dims))} does not divide the "
                     f"{num_devices} available devices.")
  dims = [num_devices // known if d == -1 else d for d in dims]
  if int(np.prod(dims)) != num_devices:
    raise MeshError(f"config.mesh {dict(zip(MESH_AXES, dims))} uses {int(np.prod(dims))} devices "
                     f"but {num_devices} are available; set one axis to -1.")
  return tuple(dims)  # type: ignore[return-value]


def make_mesh(mesh_cfg: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a (data, fsdp, tensor) mesh with Auto axis types over all (or given) devices."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  try:
    from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
    arr = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
  except Exception:  # pylint: disable=broad-except
    arr = np.asarray(devices).reshape(shape)
  return Mesh(arr, MESH_AXES)


def split_axes(mesh: Any, batch: int, dim: int | None = None) -> tuple[tuple[str, ...], str | None]:
  """Mesh axes a per-device computation (`shard_map`) can split over: (batch axes, tensor axis).

  The batch axes are those of BATCH_AXES that exist, are not manual already, have size > 1 and
  keep dividing `batch`; the tensor axis is TENSOR_AXIS when usable and it divides `dim` (heads,
  vocabulary), else None. Axes left out replicate the work, which stays correct.
  """
  shape = dict(mesh.shape)
  manual = set(getattr(mesh, "manual_axes", ()) or ())
  usable = lambda a: a in shape and a not in manual and shape[a] > 1  # noqa: E731
  axes, size = [], 1
  for a in BATCH_AXES:
    if usable(a) and batch % (size * shape[a]) == 0:
      axes.append(a)
      size *= shape[a]
  tensor = TENSOR_AXIS if (dim is not None and usable(TENSOR_AXIS)
                           and dim % shape[TENSOR_AXIS] == 0) else None
  return tuple(axes), tensor


def active_mesh(mesh: Any = None) -> Any:
  """`mesh`, else the (abstract) mesh set with `jax.set_mesh` while tracing, else None."""
  if mesh is not None:
    return mesh
  abstract = jax.sharding.get_abstract_mesh()
  if abstract is None or abstract.empty:
    return None
  return abstract


def data_parallel_size(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def logical_to_sharding(logical_tree: Any, mesh: Mesh) -> Any:
  """Logical PartitionSpecs (from `nn.get_partition_spec`) -> NamedShardings on `mesh`."""
  specs = nn.logical_to_mesh(logical_tree, LOGICAL_RULES)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Shards the leading (batch) axis over (data, fsdp); other axes replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch_from_local(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles the global batch from each process's local rows (sharded on the batch axis)."""
  out = {}
  for k, v in local_batch.items():
    sharding = batch_sharding(mesh, v.ndim)
    out[k] = jax.make_array_from_process_local_data(sharding, v)
  return out


def local_batch_size(global_batch: int) -> int:
  return global_batch // jax.process_count()


def is_main_process() -> bool:
  return jax.process_index() == 0


class sharding_context:  # pylint: disable=invalid-name
  """`with sharding_context(mesh):` activates the mesh and the logical-axis rules.

  Wraps calls of jitted functions (it cannot be entered inside jit), so that Flax's logical
  constraints on activations resolve to mesh axes while the function is traced.
  """

  def __init__(self, mesh: Mesh):
    self.mesh = mesh
    self._stack = []

  def __enter__(self):
    import contextlib  # pylint: disable=g-import-not-at-top
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(self.mesh))
    stack.enter_context(nn.logical_axis_rules(LOGICAL_RULES))
    self._stack.append(stack)
    return self.mesh

  def __exit__(self, *exc):
    return self._stack.pop().__exit__(*exc)


def in_sharding_context(fn, mesh: Mesh):
  """Returns fn wrapped so that every call runs inside `sharding_context(mesh)`."""

  def wrapped(*args, **kwargs):
    with sharding_context(mesh):
      return fn(*args, **kwargs)

  wrapped.__wrapped__ = fn
  return wrapped
