"""Device mesh and batch sharding from config."""

import math

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
# The global batch is split over both data-parallel axes.
BATCH_AXES = ("data", "fsdp")
# XLA:CPU's default hands matmuls, reductions and convolutions to YNNPACK, which runs each one
# on a single thread. Its Eigen convolutions are as fast on one core and use every core of the
# pool, so the train step's convolutions go to Eigen; matmuls and reductions stay with YNNPACK,
# whose are faster (docs/benchmarks.md).
_CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
                         "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


def mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
  """Resolves `config.mesh` (one axis may be -1: 'the rest') against the device count."""
  shape = [int(mesh_config[axis]) for axis in MESH_AXES]
  if shape.count(-1) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, shape))}")
  if -1 in shape:
    known = math.prod(s for s in shape if s != -1)
    if num_devices % known:
      raise ValueError(f"config.mesh {dict(zip(MESH_AXES, shape))}: {num_devices} devices are "
                       f"not divisible by {known}.")
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ValueError(f"config.mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} "
                     f"devices but {num_devices} are available.")
  return tuple(shape)


def make_mesh(mesh_config: ml_collections.ConfigDict, devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh with Auto axis types (jit shardings, not explicit types)."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def target_platform() -> str:
  """The platform of the program being traced: that of the mesh set by `jax.set_mesh` (a TPU
  topology's when compiling ahead of time on a CPU host), else JAX's default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else mesh.abstract_device
  return device.platform if device is not None else jax.default_backend()


def train_compiler_options(mesh: Mesh) -> dict[str, str] | None:
  """XLA options for the train step on `mesh` (`jax.jit(..., compiler_options=...)`); None: the
  defaults (GPU, TPU).

  Only for training: Eigen's convolution splits its sums by batch size and thread count, so a
  video sampled with it would depend on the other videos of its batch (sampling keeps XLA's
  defaults), and a CPU training run's bits depend on the cores (a resume on the same machine
  stays exact).
  """
  return dict(_CPU_COMPILER_OPTIONS) if mesh.devices.flat[0].platform == "cpu" else None


def batch_devices(mesh: Mesh) -> int:
  """Devices the batch is split over (data x fsdp)."""
  return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis over data x fsdp; every other axis replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles global arrays from each process's slice of the batch."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)
