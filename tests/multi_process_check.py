"""The evaluation's feature statistics over several processes, run by
tests/test_train_at_scale.py.

  python tests/multi_process_check.py OUTPUT.npz [COORDINATOR_ADDRESS NUM_PROCESSES PROCESS_ID]

One of several processes joined by `jax.distributed.initialize` (the launcher sets the CPU
device count of each, XLA_FLAGS), or, through `run`, the test's own process on its one device.
The mesh (`MESH`) spans the devices of all processes; each process reads its share of the
clips and the sums are reduced across the processes. Process 0 writes the statistics and the
topology to OUTPUT. (Training across processes is tested through train.py itself.)
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # pylint: disable=wrong-import-position
import numpy as np

import helpers
from configs import unit_test
from pixeldance_jax.evaluate import features, suite
from pixeldance_jax.parallel import mesh as mesh_lib

# data x fsdp x tensor over 2 devices. With 2 processes of 1 device, the batch axes cross
# processes.
MESH = (1, 2, 1)


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
  """The feature statistics on a mesh of `mesh_shape` over every process's devices, with the
  topology."""
  config = unit_test.get_config()
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh_shape
  mesh = mesh_lib.make_mesh(config.mesh)
  mean, covariance, skipped = feature_statistics(mesh)
  return {"processes": np.asarray(jax.process_count()), "devices": np.asarray(jax.device_count()),
          "feature_mean": mean, "feature_covariance": covariance, "skipped": skipped}


def main(output: str, *distributed: str) -> None:
  if distributed:
    address, count, index = distributed
    jax.distributed.initialize(address, int(count), int(index))
  found = run()
  if jax.process_index() == 0:
    np.savez(output, **found)


if __name__ == "__main__":
  main(*sys.argv[1:])
