"""A few train steps of the unit-test model, run by tests/test_train_at_scale.py.

  python tests/multi_process_check.py OUTPUT.npz [COORDINATOR_ADDRESS NUM_PROCESSES PROCESS_ID]

One of several processes joined by `jax.distributed.initialize` (the launcher sets the CPU
device count of each, XLA_FLAGS), or, through `run`, the test's own process on its one device.
The mesh (`MESH`) spans the devices of all processes.
Every process builds the same initial state on the host (`helpers.random_params`: no
initialisation program to compile) and the same global batch, and passes the trainer's
`mesh_lib.global_batch` the rows its own devices hold, as each process's data loader does.
Process 0 writes the per-step losses and the trained params, gathered from every process, to
OUTPUT.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # pylint: disable=wrong-import-position
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

import helpers
from configs import unit_test
from pixeldance_jax.evaluate import features, suite
from pixeldance_jax.parallel import mesh as mesh_lib
from pixeldance_jax.train import state as state_lib
from pixeldance_jax.train import step as step_lib

# data x fsdp x tensor over 2 devices. With 2 processes of 1 device, fsdp crosses processes: the
# batch, the parameter shards and their all-gathers, the gradients' reductions.
MESH = (1, 2, 1)

STEPS = 3


def global_batch_rows(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
                      ) -> dict[str, np.ndarray]:
  """This process's rows `[b / processes, ...]` of one fixed global batch."""
  batch = helpers.synthetic_batch(config)
  indices = mesh_lib.batch_sharding(mesh).addressable_devices_indices_map((config.batch_size,))
  rows = sorted({index[0].indices(config.batch_size)[:2] for index in indices.values()})
  return {name: np.concatenate([value[start:stop] for start, stop in rows])
          for name, value in batch.items()}


def initial_state(config: ml_collections.ConfigDict, shardings: state_lib.TrainState
                  ) -> state_lib.TrainState:
  """Random params, their copy as EMA and a fresh optimiser, placed shard by shard."""
  params = helpers.random_params(config, seed=0)
  state = state_lib.TrainState(step=np.int32(0), params=params, ema_params=params,
                               opt_state=state_lib.make_optimizer(config).init(params), frozen={})
  place = lambda x, sharding: jax.make_array_from_callback(
      np.shape(x), sharding, lambda index: np.asarray(x)[index])
  return jax.tree.map(place, state, shardings)


def feature_statistics(mesh: jax.sharding.Mesh) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The evaluation's statistics of 13 clips (one unreadable), each process reading its share
  and the sums reduced across processes: (mean, covariance, unreadable count)."""
  clips = np.random.default_rng(1).integers(0, 256, (13, 4, 8, 8, 3), np.uint8)
  networks = suite.Networks(
      extractors={"fvd": features.ShardedExtractor(helpers.toy_extractor(), mesh, 4)},
      encode_captions=None, conditioning=False, notes=[])
  statistics = suite.measure_loaded_set(helpers.ClipsInMemory(clips, unreadable=(6,)),
                                        networks, ["fvd"], 4, "clips")
  mean, covariance = statistics.stats["fvd"].mean_and_covariance()
  return mean, covariance, np.asarray(statistics.skipped["unreadable"])


def run(mesh_shape: tuple[int, int, int] = MESH) -> dict[str, np.ndarray]:
  """`STEPS` steps on a mesh of `mesh_shape` over every process's devices: the per-step losses
  and the trained params (gathered from every process), flat, with the topology."""
  config = unit_test.get_config()
  config.update_from_flattened_dict(helpers.ONE_LEVEL_UNET)  # The processes are tested here.
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh_shape
  mesh = mesh_lib.make_mesh(config.mesh)
  _, shardings = state_lib.abstract_state(config, mesh)
  state = initial_state(config, shardings)
  train_step = step_lib.jit_train_step(config, mesh, shardings)
  batch = mesh_lib.global_batch(global_batch_rows(config, mesh), mesh)
  losses = []
  for _ in range(STEPS):
    state, metrics = train_step(state, batch, jax.random.key(1))
    losses.append(float(metrics["loss"]))  # Replicated: readable in every process.
  params = multihost_utils.process_allgather(state.params, tiled=True)
  mean, covariance, skipped = feature_statistics(mesh)
  return {"losses": np.asarray(losses), "processes": np.asarray(jax.process_count()),
          "feature_mean": mean, "feature_covariance": covariance, "skipped": skipped,
          "devices": np.asarray(jax.device_count()),
          **{f"params{jax.tree_util.keystr(path)}": np.asarray(leaf)
             for path, leaf in jax.tree_util.tree_leaves_with_path(params)}}


def main(output: str, *distributed: str) -> None:
  if distributed:
    address, count, index = distributed
    jax.distributed.initialize(address, int(count), int(index))
  found = run()
  if jax.process_index() == 0:
    np.savez(output, **found)


if __name__ == "__main__":
  main(*sys.argv[1:])
