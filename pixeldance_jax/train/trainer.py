"""The training loop: `train_and_evaluate(config, workdir)`.

Set up (config checks, data, mesh, checkpoint manager), restore or initialise (state and data
iterators), loop (next batch, step, log, checkpoint, preview, evaluation, preemption), finish
(wait for the saves). The parts live beside it: `iterators` (data), `metrics_logger` (console
and TensorBoard), `preview` (samples), `evaluation` (metrics), `preemption` (SIGTERM).
"""

import json
import os
import time
from collections.abc import Sequence

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from pixeldance_jax.io import checkpoints
from pixeldance_jax.parallel import mesh as mesh_lib
from pixeldance_jax.train import config_checks, iterators, latent_cache, metrics_logger
from pixeldance_jax.train import evaluation as evaluation_lib
from pixeldance_jax.train import preemption as preemption_lib
from pixeldance_jax.train import preview as preview_lib
from pixeldance_jax.train import state as state_lib
from pixeldance_jax.train import step as step_lib

# Steps queued on the device before the loop waits for the oldest: enough to keep the device
# busy while the host prepares the next batch; few enough that a preemption's save (of the
# step the host is at) comes about two steps after the signal, whatever log_every_steps is.
MAX_STEPS_IN_FLIGHT = 2


def _write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """config.json, replaced whole (a run stopped mid-write never leaves half a file)."""
  if jax.process_index() == 0:
    path = os.path.join(workdir, "config.json")
    with open(path + ".tmp", "w") as f:
      json.dump(config.to_dict(), f, indent=2)
    os.replace(path + ".tmp", path)


def _initial_state(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                   abstract: state_lib.TrainState, rng: jax.Array) -> state_lib.TrainState:
  """Step 0: the weights of `config.init_from` (a converted checkpoint, which holds every part),
  or the model's initialiser when none is given."""
  if not config.init_from:
    if config.autoencoder.kind == "kl":  # config_checks.check says so before any work.
      raise ValueError("config.autoencoder.kind='kl' needs pretrained VAE weights: convert a "
                       "diffusers checkpoint with `python -m pixeldance_jax.convert` and pass "
                       "--config.init_from=<its output directory>.")
    logging.info("initialising the model (its initialiser compiles first)")
    return state_lib.create_train_state(config, mesh, rng)
  params, frozen = checkpoints.restore_pretrained(config.init_from, abstract.params,
                                                  abstract.frozen)
  logging.info("initialised parameters from %s", config.init_from)
  # AdamW's moments start at zero whatever the weights.
  return state_lib.state_from_weights(config, mesh, params, frozen)


def _check_resume(config: ml_collections.ConfigDict, manager: ocp.CheckpointManager,
                  allow_resume_changes: Sequence[str]) -> None:
  """Refuses to resume the newest checkpoint with another model, data, conditioning or seed
  (`checkpoints.check_resume_config`), before any data is built; logs what else changed."""
  step = manager.latest_step()
  if step is None:
    return
  for key, old, new in checkpoints.check_resume_config(manager, step, config,
                                                       allow_resume_changes):
    logging.info("resuming with %s changed: %r -> %r", key, old, new)


def _restore_or_initialise(config: ml_collections.ConfigDict, manager: ocp.CheckpointManager,
                           mesh: jax.sharding.Mesh, abstract: state_lib.TrainState,
                           directory: str, rng: jax.Array
                           ) -> tuple[state_lib.TrainState, iterators.Iterators]:
  """(state, data iterators): resumed from the newest checkpoint, or fresh."""
  step = manager.latest_step()
  if step is None:
    state = _initial_state(config, mesh, abstract, rng)
    return state, iterators.make(config, directory, state)
  logging.info("resuming from checkpoint step %d", step)
  state = checkpoints.restore(manager, step, abstract)
  return state, iterators.restore(config, manager, step, directory, state)


def _compile_steps(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                   shardings: state_lib.TrainState) -> dict[str, step_lib.CompiledStep]:
  """The jitted steps by kind (compiled on first use): "train_step", and "image_step" for
  joint image training (single frames, temporal layers off; always decoded images, as the
  latent cache holds video clips)."""
  loss = latent_cache.cached_loss_fn if config.data.cache_latents else step_lib.loss_fn
  steps = {"train_step": step_lib.jit_train_step(config, mesh, shardings, loss=loss)}
  if config.data.image_every_k_steps:
    steps["image_step"] = step_lib.jit_train_step(config, mesh, shardings, use_temporal=False)
  return steps


def _run_step(step_fn: step_lib.CompiledStep, name: str, step: int,
              state: state_lib.TrainState, batch: dict[str, jax.Array], rng: jax.Array,
              logger: metrics_logger.MetricsLogger) -> tuple[state_lib.TrainState, dict]:
  """(new state, metrics on the device) of one step; the first step of each kind compiles it,
  which the logger reports (and leaves out of the rates)."""
  if step_fn.is_compiled:
    return step_fn(state, batch, rng)
  logger.compiling(name)
  result = step_fn(state, batch, rng)
  logger.log_compile(step_fn, name, step)
  return result


def _save(manager: ocp.CheckpointManager, step: int, state: state_lib.TrainState,
          config: ml_collections.ConfigDict, data: iterators.Iterators) -> None:
  """Starts an asynchronous save of the state, config and data iterators."""
  checkpoints.save(manager, step, state, config, data)
  logging.info("step %d: checkpoint -> %s", step,
               os.path.join(str(manager.directory), str(step)))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       allow_resume_changes: Sequence[str] = ()) -> state_lib.TrainState:
  """Trains (or resumes) in `workdir`: checkpoints, TensorBoard logs and config.json go there.

  Stops early, after saving, when preempted (SIGTERM); rerunning the same command resumes.
  Raises `errors.ConfigError` (a ValueError) before any work for a config that cannot train,
  ValueError before any work for a config that cannot resume the workdir's checkpoint (another
  model; other data, conditioning or seed unless those keys or sections are in
  `allow_resume_changes`), and FloatingPointError at the first non-finite step (nothing saved
  after it).
  """
  # --- Set up ---
  started = time.time()
  workdir = os.path.abspath(workdir)
  config_checks.check(config, fresh_start=not os.path.isdir(checkpoints.checkpoint_dir(workdir)))
  os.makedirs(workdir, exist_ok=True)
  manager = checkpoints.make_manager(workdir, config)
  _check_resume(config, manager, allow_resume_changes)
  directory = iterators.prepare_data(config, workdir)
  mesh = mesh_lib.make_mesh(config.mesh)
  logging.info("mesh %s over %d devices in %d processes", dict(mesh.shape), mesh.size,
               jax.process_count())
  abstract, shardings = state_lib.abstract_state(config, mesh)

  # --- Restore or initialise ---
  init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
  state, data = _restore_or_initialise(config, manager, mesh, abstract, directory, init_rng)
  logging.info("parameters: U-Net %.2fM, text encoder %.2fM",
               state_lib.count_params(state.params["unet"]) / 1e6,
               state_lib.count_params(state.params["text_encoder"]) / 1e6)
  _write_config(config, workdir)
  steps = _compile_steps(config, mesh, shardings)
  logger = metrics_logger.MetricsLogger(workdir, config)
  pending = metrics_logger.PendingMetrics(config.diffusion.num_train_timesteps,
                                         MAX_STEPS_IN_FLIGHT)
  preview = preview_lib.Preview(config, mesh, directory, workdir)
  evaluation = evaluation_lib.PeriodicEvaluation(config, mesh, directory, workdir)
  preemption = preemption_lib.Preemption(manager)
  first_step, last_saved = int(state.step) + 1, manager.latest_step()

  # --- Loop ---
  try:
    for step in range(first_step, config.num_train_steps + 1):
      name, batch = iterators.next_batch(config, data, step, mesh)
      if step == first_step:  # The rates leave out the restore and the loader's start-up.
        logger.start(step, state)
      state, metrics = _run_step(steps[name], name, step, state, batch, train_rng, logger)
      pending.add(step, name, metrics)
      is_last, preempted = step == config.num_train_steps, preemption.reached(step)
      if step % config.log_every_steps == 0 or is_last or preempted:
        logger.log(step, pending.flush(last_saved), steps["train_step"].flops_per_device)
      if step % config.checkpoint_every_steps == 0 or is_last or preempted:
        pending.flush(last_saved)  # Never save past a non-finite step.
        _save(manager, step, state, config, data)
        last_saved = step
      preview(state, step, logger)
      evaluation(state, step, logger)
      if preempted:
        manager.wait_until_finished()
        logging.warning("preempted: saved step %d in %s; rerun the same command to resume.",
                        step, checkpoints.checkpoint_dir(workdir))
        break
  finally:
    # Also on failure: the checkpoints already begun (asynchronously) must land.
    manager.wait_until_finished()
    preemption.close()
    logger.close()

  # --- Finish ---
  if first_step > config.num_train_steps:
    logging.info("nothing to train: the checkpoint is at step %d, config.num_train_steps=%d",
                 first_step - 1, config.num_train_steps)
  elif int(state.step) == config.num_train_steps:
    logging.info("done: step %d in %.1f min; checkpoints in %s, TensorBoard logs in %s%s",
                 int(state.step), (time.time() - started) / 60,
                 checkpoints.checkpoint_dir(workdir), logger.tensorboard_dir,
                 f", previews in {preview.folder}" if config.sample_every_steps else "")
  return state
