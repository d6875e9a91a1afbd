"""`Pipeline`: a model's weights, config and sampling program; restored from a checkpoint by
`load_pipeline` (weights only, never the optimiser state) or made from weights in memory by
`make_pipeline` (training's previews, tests)."""

import dataclasses
import os
from typing import Any

import jax
import ml_collections
from absl import logging

from pixeldance_jax.io import checkpoints
from pixeldance_jax.models import pixeldance
from pixeldance_jax.parallel import mesh as mesh_lib
from pixeldance_jax.sampling import program


@dataclasses.dataclass(frozen=True)
class Pipeline:
  """A model ready to sample."""
  config: ml_collections.ConfigDict
  params: Any
  frozen: Any  # Frozen pretrained weights, e.g. {"autoencoder": ...}; {} for space_to_depth.
  step: int
  generate_fn: Any  # The jitted program, see `program.make_generate_fn`.
  mesh: jax.sharding.Mesh
  weights: str = "ema"  # "ema", "raw", "converted" (or e.g. "random" in tests).
  workdir: str = ""


def make_pipeline(config: ml_collections.ConfigDict, params: Any, frozen: Any,
                  mesh: jax.sharding.Mesh, *, step: int = 0, weights: str = "ema",
                  workdir: str = "", generate_fn: Any = None) -> Pipeline:
  """A pipeline of weights already on `mesh`. `generate_fn`: a program from
  `program.make_generate_fn(config, mesh)` (by default the process's program for this config)."""
  if generate_fn is None:
    generate_fn = program.make_generate_fn(config, mesh)
  return Pipeline(config=config, params=params, frozen=frozen, step=step,
                  generate_fn=generate_fn, mesh=mesh, weights=weights, workdir=workdir)


def _abstract_weights(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, step: int,
                      workdir: str) -> tuple[Any, Any]:
  try:
    return pixeldance.abstract_weights(config, mesh)
  except (AttributeError, KeyError, TypeError, ValueError) as error:
    raise ValueError(f"The config saved with checkpoint {step} in "
                     f"{checkpoints.checkpoint_dir(workdir)} does not build a model with this "
                     f"code ({type(error).__name__}: {error}).") from error


def load_pipeline(workdir: str, step: int | None = None, use_ema: bool = True) -> Pipeline:
  """Restores the weights of the latest (or the given) checkpoint of `workdir` with its own
  config: the EMA (what training evaluates) or raw params, and the frozen weights.

  `workdir` is a training workdir or a converted checkpoint (python -m pixeldance_jax.convert).
  """
  step, config = checkpoints.find_config(workdir, step)
  mesh = mesh_lib.make_mesh(config.mesh)
  abstract_params, abstract_frozen = _abstract_weights(config, mesh, step, workdir)
  params, frozen, weights = checkpoints.restore_weights(workdir, step, abstract_params,
                                                        abstract_frozen, use_ema)
  logging.info("Restored the %s weights of step %d from %s.", weights, step,
               checkpoints.checkpoint_dir(workdir))
  return make_pipeline(config, params, frozen, mesh, step=step, weights=weights,
                       workdir=os.path.abspath(workdir))
