"""Measurements that need 8 devices, run by tests/test_parallel.py in a subprocess.

XLA fixes the device count when jax is first imported and the rest of the suite runs on one
device, so this script sets the fake-device flag itself and prints one JSON line of findings
for the test to assert on (the assertions live in the test, with readable failure messages).
"""

import os
import pathlib
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import json  # pylint: disable=g-import-not-at-top,wrong-import-position

import jax
import ml_collections
import numpy as np

from configs import pixeldance, unit_test
from pixeldance_jax.parallel import mesh as mesh_lib
from pixeldance_jax.train import state as state_lib
from pixeldance_jax.train import step as step_lib

REPLICATION_LIMIT_BYTES = 2**20
# Parameters whose placement the test pins down: [*window, conv_in, conv_out] convolutions,
# [embed, heads] attention projections and the [vocab, embed] token table.
PINNED_PARAMS = {
    "conv": ("unet", "down_blocks_1", "resnets_0", "conv1", "kernel"),
    "attention": ("unet", "down_blocks_1", "attentions_0", "transformer_blocks_0", "attn1",
                  "to_q", "kernel"),
    "token_embedding": ("text_encoder", "token_embedding", "embedding"),
}


def _with_mesh(config: ml_collections.ConfigDict, shape: tuple[int, int, int]
               ) -> ml_collections.ConfigDict:
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = shape
  return config


def replicated_leaves(config: ml_collections.ConfigDict) -> list[str]:
  """Every state leaf (params, EMA, optimiser moments) over the limit that no mesh axis splits."""
  abstract, _ = state_lib.abstract_state(config, mesh_lib.make_mesh(config.mesh))
  nbytes = lambda leaf: leaf.size * leaf.dtype.itemsize
  return [f"{jax.tree_util.keystr(path)} {leaf.shape} {nbytes(leaf) / 2**20:.1f} MiB"
          for path, leaf in jax.tree_util.tree_leaves_with_path(abstract)
          if nbytes(leaf) > REPLICATION_LIMIT_BYTES and leaf.sharding.is_fully_replicated]


def paper_replication() -> dict[str, list[str]]:
  """Offenders of the paper config per mesh, plus a control whose rules replicate conv kernels.

  The control shows the check sees replication: a check that finds nothing anywhere proves
  nothing.
  """
  found = {}
  for shape in ((1, 8, 1), (2, 2, 2)):
    found["x".join(map(str, shape))] = replicated_leaves(_with_mesh(pixeldance.get_config(), shape))
  control = _with_mesh(pixeldance.get_config(), (1, 8, 1))
  control.logical_axis_rules = tuple((name, None if name == "conv_in" else axes)
                                     for name, axes in control.logical_axis_rules)
  found["control"] = replicated_leaves(control)
  return found


def synthetic_batch(config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """A fixed batch in the loader's format (no dataset generation needed)."""
  rng = np.random.default_rng(0)
  size, frames = config.data.image_size, config.data.frames
  video = rng.integers(0, 256, (config.batch_size, frames, size, size, 3), dtype=np.uint8)
  tokens = rng.integers(0, config.text_encoder.vocab_size,
                        (config.batch_size, config.text_encoder.max_length), dtype=np.int32)
  return {"video": video, "tokens": tokens}


def _placement(leaf: jax.Array) -> dict[str, list]:
  return {"spec": [list(a) if isinstance(a, tuple) else a for a in leaf.sharding.spec],
          "shard_shape": list(leaf.addressable_shards[0].data.shape),
          "shape": list(leaf.shape)}


def _unit_test_config(shape: tuple[int, int, int]) -> ml_collections.ConfigDict:
  config = _with_mesh(unit_test.get_config(), shape)
  config.batch_size = 8  # Divisible by data x fsdp on every mesh tried.
  return config


def placements(state: state_lib.TrainState) -> dict[str, dict[str, list]]:
  """Where the pinned parameters, and the Adam moment of the conv kernel, live."""
  found = {}
  for name, path in PINNED_PARAMS.items():
    param = state.params
    for key in path:
      param = param[key]
    found[name] = _placement(param)
  conv_key = "".join(f"['{key}']" for key in PINNED_PARAMS["conv"])
  found["adam_mu_conv"] = next(
      _placement(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(state.opt_state)
      if ".mu" in jax.tree_util.keystr(path) and jax.tree_util.keystr(path).endswith(conv_key))
  return found


def step_metrics(state: state_lib.TrainState, shape: tuple[int, int, int]) -> dict[str, float]:
  """One train step of the unit-test config with `state` moved onto a mesh of `shape`."""
  config = _unit_test_config(shape)
  mesh = mesh_lib.make_mesh(config.mesh)
  _, shardings = state_lib.abstract_state(config, mesh)
  train_step = step_lib.jit_train_step(config, mesh, shardings)
  batch = mesh_lib.global_batch(synthetic_batch(config), mesh)
  # A copy: the step donates its state, and `state` is stepped again on the next mesh.
  state = jax.device_put(state, shardings, may_alias=False)
  _, metrics = train_step(state, batch, jax.random.key(1))
  return {"loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"])}


def sharded_steps() -> dict:
  """Initialises on a 2x2x2 mesh, then steps there and, resharded, on 8x1x1.

  One initialisation for both (compiling it is as slow as compiling a step).
  """
  config = _unit_test_config((2, 2, 2))
  state = state_lib.create_train_state(config, mesh_lib.make_mesh(config.mesh),
                                       jax.random.key(0))
  found = {"placements": placements(state)}
  for shape in ((8, 1, 1), (2, 2, 2)):
    found["x".join(map(str, shape))] = step_metrics(state, shape)
  return found


def main() -> None:
  assert jax.device_count() == 8, jax.devices()
  results = {"replicated": paper_replication(),
             "step": sharded_steps()}
  print(json.dumps(results))


if __name__ == "__main__":
  main()
