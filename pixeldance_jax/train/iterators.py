"""The training data: datasets built once, then this process's iterators, made or restored.

Iterators are checkpoint items by name: "data" (video clips, or the latent cache with
`data.cache_latents`) and, with joint image training (`data.image_every_k_steps`),
"image_data". A resumed run takes up its data order exactly when it has as many processes as
the run that saved (grain keeps one state per process); with another count the iterators
restart, reshuffled by the step.
"""

import time
from typing import Any

import jax
import ml_collections
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh
import orbax.checkpoint as ocp

from pixeldance_jax.io import checkpoints
from pixeldance_jax.runtime import quiet
from pixeldance_jax.data import loaders
from pixeldance_jax.parallel import mesh as mesh_lib
from pixeldance_jax.train import latent_cache
from pixeldance_jax.train import state as state_lib

Iterators = dict[str, Any]


def _build(data_config: ml_collections.ConfigDict, directory: str) -> None:
  """Builds one dataset if missing, saying so: generating thousands of clips takes a while."""
  builder = loaders.get_builder(data_config, directory)
  # TFDS renames the folder into place once complete, and checks the same (`is_prepared` also
  # warns about the folder it does not find).
  if builder.data_path.exists():
    return
  logging.info("data: building %s (%s) in %s, once", data_config.name,
               builder.builder_config.name, builder.data_dir)
  start = time.perf_counter()
  with quiet.library_prints():
    builder = loaders.build_dataset(data_config, directory)
  splits = ", ".join(f"{split.num_examples} {name}" for name, split in builder.info.splits.items())
  skipped = {k: v for k, v in loaders.report_metrics(loaders.build_report(builder)).items()
             if k.startswith("data/skipped")}
  logging.info("data: %s ready, %s records (%.1f s)%s", data_config.name, splits,
               time.perf_counter() - start, f"; skipped {skipped}" if skipped else "")


def prepare_data(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Builds the run's datasets once (process 0) before any process reads them; their folder."""
  directory = loaders.data_dir(config, workdir)
  if jax.process_index() == 0:
    _build(config.data, directory)
    if config.data.image_every_k_steps:
      _build(loaders.image_data_config(config), directory)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("dataset prepared")
  return directory


def names(config: ml_collections.ConfigDict) -> list[str]:
  """The checkpoint items of the data iterators a run with `config` has."""
  return ["data"] + (["image_data"] if config.data.image_every_k_steps else [])


def make(config: ml_collections.ConfigDict, directory: str,
         state: state_lib.TrainState) -> Iterators:
  """This process's fresh data iterators, by checkpoint item (`names`). The latent cache is
  encoded with `state`'s weights (built here when missing, by a single process)."""
  index, count = jax.process_index(), jax.process_count()
  if config.data.cache_latents:
    if count == 1:
      with quiet.library_prints():
        latent_cache.build_cache(config, directory, state.params, state.frozen)
    videos = latent_cache.make_cached_loader(config, directory, state.params, state.frozen,
                                             index, count)
  else:
    videos = loaders.make_train_loader(config, directory, index, count)
  iterators = {"data": iter(videos)}
  if "image_data" in names(config):
    iterators["image_data"] = iter(loaders.make_image_loader(config, directory, index, count))
  return iterators


def restore(config: ml_collections.ConfigDict, manager: ocp.CheckpointManager, step: int,
            directory: str, state: state_lib.TrainState) -> Iterators:
  """The iterators as checkpoint `step` left them, or, when it holds no state for this
  process count, fresh ones reshuffled by `step` (and a warning)."""
  index, count = jax.process_index(), jax.process_count()
  if all(checkpoints.has_data_state(manager, step, name, index, count)
         for name in names(config)):
    iterators = make(config, directory, state)
    checkpoints.restore_iterators(manager, step, iterators)
    return iterators
  logging.warning("checkpoint %d has no data iterator state for %d processes (it was saved by "
                  "another number of processes, or without joint image training): the data "
                  "order restarts, reshuffled.", step, count)
  reshuffled = config.copy_and_resolve_references()
  with reshuffled.unlocked():
    reshuffled.data.shuffle_seed = config.data.shuffle_seed + step
  return make(reshuffled, directory, state)


def next_batch(config: ml_collections.ConfigDict, iterators: Iterators, step: int,
               mesh: Mesh) -> tuple[str, dict[str, jax.Array]]:
  """(step kind, global batch) for training step `step`: "image_step" on the image steps of
  joint training (single frames), else "train_step" (video clips)."""
  if loaders.is_image_step(config, step):
    return "image_step", mesh_lib.global_batch(next(iterators["image_data"]), mesh)
  return "train_step", mesh_lib.global_batch(next(iterators["data"]), mesh)
