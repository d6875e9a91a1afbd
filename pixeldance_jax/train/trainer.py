"""The training loop: `train_and_evaluate(config, workdir)`."""

import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from tensorboardX import SummaryWriter

from pixeldance_jax.data import pipeline
from pixeldance_jax.parallel import mesh as mesh_lib
from pixeldance_jax.train import checkpointing
from pixeldance_jax.train import state as state_lib
from pixeldance_jax.train import step as step_lib


def data_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  return config.data.data_dir or os.path.join(os.path.abspath(workdir), "data")


def _prepare_data(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Builds the dataset once (process 0) before any process reads it."""
  directory = data_dir(config, workdir)
  if jax.process_index() == 0:
    pipeline.build_dataset(config.data, directory)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("dataset prepared")
  return directory


def _write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(config.to_dict(), f, indent=2)


class _Logger:
  """Console progress line and TensorBoard scalars (process 0 only)."""

  def __init__(self, workdir: str, total_steps: int):
    self.total_steps = total_steps
    self.writer = SummaryWriter(os.path.join(workdir, "tensorboard")) if (
        jax.process_index() == 0) else None
    self.last_time, self.last_step = time.time(), None

  def log(self, step: int, metrics: dict[str, float]) -> None:
    now = time.time()
    if self.last_step is not None:
      metrics["steps_per_sec"] = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_time, self.last_step = now, step
    if self.writer is None:
      return
    for name, value in metrics.items():
      self.writer.add_scalar(f"train/{name}", value, step)
    self.writer.flush()
    rate = metrics.get("steps_per_sec")
    eta = f"{(self.total_steps - step) / rate / 60:.1f} min" if rate else "?"
    logging.info("step %d/%d  loss %.4f  grad_norm %.3f  lr %.2e  %s steps/s  eta %s", step,
                 self.total_steps, metrics["loss"], metrics["grad_norm"],
                 metrics["learning_rate"], f"{rate:.2f}" if rate else "?", eta)


def _check_finite(pending: list[tuple[int, dict]], last_saved: int | None) -> dict[str, float]:
  """Fetches the pending metrics; stops the run at the first non-finite step."""
  if not pending:
    return {}
  fetched = [(step, jax.device_get(metrics)) for step, metrics in pending]
  for step, metrics in fetched:
    if not metrics["finite"]:
      raise FloatingPointError(
          f"Loss or gradient is NaN/Inf at step {step} (loss={metrics['loss']}, "
          f"grad_norm={metrics['grad_norm']}). That update was not applied and nothing was "
          f"saved after it; the last good checkpoint is step {last_saved}.")
  return {name: float(np.mean([m[name] for _, m in fetched]))
          for name in ("loss", "grad_norm", "learning_rate")}


def _initialise_from(state: state_lib.TrainState, abstract: state_lib.TrainState,
                     config: ml_collections.ConfigDict) -> state_lib.TrainState:
  """Pretrained weights from `config.init_from` (a converted checkpoint), if given."""
  if not config.init_from:
    if config.autoencoder.kind == "kl":
      raise ValueError("config.autoencoder.kind='kl' needs pretrained VAE weights: convert a "
                       "diffusers checkpoint with `python -m pixeldance_jax.convert` and pass "
                       "--config.init_from=<its output directory>.")
    return state
  params, frozen = checkpointing.restore_pretrained(config.init_from, abstract.params,
                                                    abstract.frozen)
  logging.info("initialised parameters from %s", config.init_from)
  # AdamW's moments start at zero whatever the weights, so the fresh optimiser state stands.
  # The EMA gets its own buffers: the train step donates both trees.
  return state.replace(params=params, ema_params=jax.tree.map(jnp.copy, params), frozen=frozen)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> state_lib.TrainState:
  """Trains (or resumes) in `workdir`: checkpoints, TensorBoard logs and config.json go there."""
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  directory = _prepare_data(config, workdir)
  mesh = mesh_lib.make_mesh(config.mesh)
  logging.info("mesh %s over %d devices", dict(mesh.shape), mesh.size)
  abstract, shardings = state_lib.abstract_state(config, mesh)
  iterator = iter(pipeline.make_train_loader(config, directory, jax.process_index(),
                                             jax.process_count()))
  manager = checkpointing.make_manager(workdir, config)
  init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
  if manager.latest_step() is not None:
    logging.info("resuming from checkpoint step %d", manager.latest_step())
    state = checkpointing.restore(manager, manager.latest_step(), abstract, iterator)
  else:
    state = state_lib.create_train_state(config, mesh, init_rng)
    state = _initialise_from(state, abstract, config)
  logging.info("parameters: U-Net %.2fM, text encoder %.2fM",
               state_lib.count_params(state.params["unet"]) / 1e6,
               state_lib.count_params(state.params["text_encoder"]) / 1e6)
  _write_config(config, workdir)

  train_step = step_lib.jit_train_step(config, mesh, shardings)
  logger = _Logger(workdir, config.num_train_steps)
  last_saved, pending = manager.latest_step(), []
  try:
    for step in range(int(state.step) + 1, config.num_train_steps + 1):
      batch = mesh_lib.global_batch(next(iterator), mesh)
      state, metrics = train_step(state, batch, train_rng)
      pending.append((step, metrics))
      is_last = step == config.num_train_steps
      if step % config.log_every_steps == 0 or is_last:
        logger.log(step, _check_finite(pending, last_saved))
        pending = []
      if step % config.checkpoint_every_steps == 0 or is_last:
        _check_finite(pending, last_saved)
        pending = []
        checkpointing.save(manager, step, state, config, iterator)
        last_saved = step
  finally:
    # Also on failure: the checkpoints already begun (asynchronously) must land.
    manager.wait_until_finished()
  return state
