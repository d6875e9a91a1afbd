"""Three train steps of the one-level unit-test model on a mesh, from numpy-drawn weights: the
sharding checks run them on 2x2x2 fake devices (tests/multi_device_checks.py, a subprocess) and
on one device (the test process, where conftest has compiled that program already)."""

import math

import jax
import ml_collections
import numpy as np

import helpers
from configs import unit_test
from pixeldance_jax.parallel import mesh as mesh_lib
from pixeldance_jax.train import state as state_lib
from pixeldance_jax.train import step as step_lib

STEPS = 3


def config_on(shape: tuple[int, int, int]) -> ml_collections.ConfigDict:
  """The unit-test config with a one-level U-Net (its step compiles fastest) on a mesh of
  `shape`; batch_size 4 divides data x fsdp on every mesh tried."""
  config = unit_test.get_config()
  config.update_from_flattened_dict(helpers.ONE_LEVEL_UNET)
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = shape
  return config


def initial_state(shape: tuple[int, int, int]) -> state_lib.TrainState:
  """A fresh state on the mesh around `helpers.random_params` (the same numbers in every
  process; no initialiser to compile)."""
  config = config_on(shape)
  mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:math.prod(shape)])
  _, shardings = state_lib.abstract_state(config, mesh)
  params = jax.device_put(helpers.random_params(config), shardings.params)
  return state_lib.state_from_weights(config, mesh, params, {})


def train(shape: tuple[int, int, int], state: state_lib.TrainState | None = None
          ) -> tuple[list[float], float, state_lib.TrainState]:
  """(losses, the first step's gradient norm, the trained state on the host) of `STEPS` steps
  from `state` (default `initial_state(shape)`; donated)."""
  config = config_on(shape)
  mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:math.prod(shape)])
  _, shardings = state_lib.abstract_state(config, mesh)
  train_step = step_lib.jit_train_step(config, mesh, shardings)
  batch = mesh_lib.global_batch(helpers.synthetic_batch(config), mesh)
  state = initial_state(shape) if state is None else state
  losses = []
  for _ in range(STEPS):
    state, metrics = train_step(state, batch, jax.random.key(1))
    if not losses:
      first_grad_norm = float(metrics["grad_norm"])
    losses.append(float(metrics["loss"]))
  return losses, first_grad_norm, jax.device_get(state)


def flat(state: state_lib.TrainState) -> dict[str, np.ndarray]:
  """The trained trees as `{"part|keystr": array}` (an .npz's keys)."""
  return {f"{part}|{jax.tree_util.keystr(path)}": np.asarray(leaf)
          for part in ("params", "ema_params", "opt_state")
          for path, leaf in jax.tree_util.tree_leaves_with_path(getattr(state, part))}


def max_differences(trained: dict[str, np.ndarray], reference: dict[str, np.ndarray]
                    ) -> dict[str, tuple[float, str]]:
  """Per part, the largest absolute difference between two `flat` dicts and where it is."""
  found = {}
  for part in ("params", "ema_params", "opt_state"):
    keys = [key for key in reference if key.startswith(part + "|")]
    assert keys and set(keys) == {k for k in trained if k.startswith(part + "|")}, part
    found[part] = max((float(np.max(np.abs(trained[key].astype(np.float64) -
                                           reference[key].astype(np.float64)))), key)
                      for key in keys)
  return found
