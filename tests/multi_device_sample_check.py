"""Sampling with the batch sharded over 8 devices, run by tests/test_sample.py in a subprocess.

XLA fixes the device count when jax is first imported and the rest of the suite runs on one
device, so this script sets the fake-device flag itself and prints one JSON line of findings.
"""

import os
import pathlib
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import dataclasses  # pylint: disable=g-import-not-at-top,wrong-import-position
import json  # pylint: disable=wrong-import-position

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

import helpers  # pylint: disable=wrong-import-position  (tests/: the script's own folder)
from configs import unit_test  # pylint: disable=wrong-import-position
from pixeldance_jax.parallel import mesh as mesh_lib  # pylint: disable=wrong-import-position
from pixeldance_jax.sampling import generate  # pylint: disable=wrong-import-position
from pixeldance_jax.sampling import program  # pylint: disable=wrong-import-position


def main():
  config = unit_test.get_config()
  config.update_from_flattened_dict(helpers.ONE_LEVEL_UNET)  # Compiles faster, twice here.
  config.mesh.data, config.mesh.fsdp = 4, 2  # The batch goes over data x fsdp = 8 devices.
  sharded = helpers.random_pipeline(config, seed=1)
  single_config = config.copy_and_resolve_references()
  single_config.mesh.data, single_config.mesh.fsdp = 1, 1
  single_mesh = mesh_lib.make_mesh(single_config.mesh, jax.devices()[:1])
  single = dataclasses.replace(
      sharded, config=single_config, mesh=single_mesh,
      params=jax.device_put(sharded.params, jax.devices()[0]),
      generate_fn=program.make_generate_fn(single_config, single_mesh))
  rng = np.random.default_rng(0)
  frames = rng.integers(0, 256, (3, 2, 16, 16, 3), dtype=np.uint8)
  prompts = ["a red square moves up", "a blue circle moves left", "a star"]
  sample = lambda pipeline: generate.generate(pipeline, prompts, frames[:, 0], frames[:, 1],
                                              tau=[0, 2, 4], seed=[1, 2, 3])
  on_eight, on_one = sample(sharded), sample(single)
  print(json.dumps({"devices": jax.device_count(), "shape": list(on_eight.shape),
                    "max_abs_difference": int(np.abs(on_eight.astype(int) -
                                                     on_one.astype(int)).max()),
                    "fraction_differing": float(np.mean(on_eight != on_one))}))


if __name__ == "__main__":
  main()
