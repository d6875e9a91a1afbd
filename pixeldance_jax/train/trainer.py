"""The training loop: `train_and_evaluate(config, workdir)`."""

import json
import os
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from tensorboardX import SummaryWriter
from tensorboardX.proto import summary_pb2

from pixeldance_jax import inference, video_io
from pixeldance_jax.data import cache, pipeline
from pixeldance_jax.parallel import mesh as mesh_lib
from pixeldance_jax import checkpoints
from pixeldance_jax.train import state as state_lib
from pixeldance_jax.train import step as step_lib
from pixeldance_jax.train import throughput


def _prepare_data(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Builds the dataset once (process 0) before any process reads it."""
  directory = pipeline.data_dir(config, workdir)
  if jax.process_index() == 0:
    builder = pipeline.build_dataset(config.data, directory)
    logging.info("dataset %s: %s", builder.builder_config.name,
                 pipeline.report_metrics(pipeline.build_report(builder)))
    if config.data.image_every_k_steps:
      pipeline.build_dataset(pipeline.image_data_config(config), directory)
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

  def __init__(self, workdir: str, config: ml_collections.ConfigDict):
    self.total_steps = config.num_train_steps
    self.clips_per_step = config.batch_size
    self.peak_flops = throughput.peak_flops_per_device(jax.devices()[0],
                                                       config.peak_flops_per_device)
    self.writer = SummaryWriter(os.path.join(workdir, "tensorboard")) if (
        jax.process_index() == 0) else None
    self.last_time, self.last_step = time.time(), None

  def log(self, step: int, metrics: dict[str, float], flops_per_device: float = 0.0) -> None:
    now = time.time()
    if self.last_step is not None:
      rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
      metrics["steps_per_sec"] = rate
      metrics.update(throughput.throughput(rate, self.clips_per_step, flops_per_device,
                                           self.peak_flops))
    self.last_time, self.last_step = now, step
    if self.writer is None:
      return
    for name, value in metrics.items():
      self.writer.add_scalar(f"train/{name}", value, step)
    self.writer.flush()
    rate = metrics.get("steps_per_sec")
    eta = f"{(self.total_steps - step) / rate / 60:.1f} min" if rate else "?"
    mfu = f"  mfu {metrics['mfu']:.1%}" if "mfu" in metrics else ""
    logging.info("step %d/%d  loss %.4f  grad_norm %.3f  lr %.2e  %s steps/s  %s clips/s%s  "
                 "eta %s", step, self.total_steps, metrics.get("loss", float("nan")),
                 metrics["grad_norm"],
                 metrics["learning_rate"], f"{rate:.2f}" if rate else "?",
                 f"{metrics['clips_per_sec']:.1f}" if rate else "?", mfu, eta)

  def log_gif(self, tag: str, gif: bytes, height: int, width: int, step: int) -> None:
    """An animated gif in TensorBoard's images tab."""
    if self.writer is None:
      return
    image = summary_pb2.Summary.Image(height=height, width=width, colorspace=3,
                                      encoded_image_string=gif)
    summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, image=image)])
    self.writer.file_writer.add_summary(summary, step)
    self.writer.flush()

  def log_compile(self, step_fn: step_lib.CompiledStep, name: str) -> None:
    logging.info("%s compiled in %.1f s; %.3f TFLOP per device per step", name,
                 step_fn.compile_seconds, step_fn.flops_per_device / 1e12)
    if self.writer is not None:
      self.writer.add_scalar(f"compile/{name}_seconds", step_fn.compile_seconds, 0)


def _check_finite(pending: list[tuple[int, str, dict]], last_saved: int | None,
                  num_train_timesteps: int = 1000) -> dict[str, float]:
  """Fetches the pending (step, step kind, metrics); stops the run at the first non-finite step.

  Returns their means: `loss` over the video steps, `image_loss` over the image steps of joint
  training, and the video loss per quarter of the timestep range (`loss_t0-249`, ...).
  """
  if not pending:
    return {}
  fetched = [(step, name, jax.device_get(metrics)) for step, name, metrics in pending]
  for step, name, metrics in fetched:
    if not metrics["finite"]:
      raise FloatingPointError(
          f"Loss or gradient is NaN/Inf at step {step} ({name}, loss={metrics['loss']}, "
          f"grad_norm={metrics['grad_norm']}). That update was not applied and nothing was "
          f"saved after it; the last good checkpoint is step {last_saved}.")
  means = {key: float(np.mean([m[key] for _, _, m in fetched]))
           for key in ("grad_norm", "learning_rate")}
  videos = [m for _, name, m in fetched if name == "train_step"]
  images = [m["loss"] for _, name, m in fetched if name == "image_step"]
  if images:
    means["image_loss"] = float(np.mean(images))
  if not videos:
    return means
  means["loss"] = float(np.mean([m["loss"] for m in videos]))
  sums = np.sum([m["bucket_loss_sum"] for m in videos], axis=0)
  counts = np.sum([m["bucket_count"] for m in videos], axis=0)
  width = num_train_timesteps // step_lib.TIMESTEP_BUCKETS
  for bucket, (total, count) in enumerate(zip(sums, counts)):
    if count:
      means[f"loss_t{bucket * width}-{(bucket + 1) * width - 1}"] = float(total / count)
  return means


def _initialise_from(state: state_lib.TrainState, abstract: state_lib.TrainState,
                     config: ml_collections.ConfigDict) -> state_lib.TrainState:
  """Pretrained weights from `config.init_from` (a converted checkpoint), if given."""
  if not config.init_from:
    if config.autoencoder.kind == "kl":
      raise ValueError("config.autoencoder.kind='kl' needs pretrained VAE weights: convert a "
                       "diffusers checkpoint with `python -m pixeldance_jax.convert` and pass "
                       "--config.init_from=<its output directory>.")
    return state
  params, frozen = checkpoints.restore_pretrained(config.init_from, abstract.params,
                                                    abstract.frozen)
  logging.info("initialised parameters from %s", config.init_from)
  # AdamW's moments start at zero whatever the weights, so the fresh optimiser state stands.
  # The EMA gets its own buffers: the train step donates both trees.
  return state.replace(params=params, ema_params=jax.tree.map(jnp.copy, params), frozen=frozen)


class _Preview:
  """Every `config.sample_every_steps`, samples the first held-out clip (its caption, first and
  last frame) with the EMA weights into `<workdir>/samples/step_<N>.gif` and TensorBoard."""

  def __init__(self, config: ml_collections.ConfigDict, mesh, directory: str, workdir: str):
    self.config, self.mesh, self.every = config, mesh, config.sample_every_steps
    self.directory, self.folder = directory, os.path.join(workdir, "samples")
    self.clip, self.generate_fn = None, None

  def __call__(self, state: state_lib.TrainState, step: int, logger: _Logger) -> None:
    if not self.every or step % self.every:
      return
    if self.clip is None:
      self.clip = pipeline.load_test_clips(self.config, self.directory, 1)[0]
      self.generate_fn = inference.make_generate_fn(self.config, self.mesh)
    sampler = inference.Pipeline(config=self.config, params=state.ema_params,
                                 frozen=state.frozen, step=step, generate_fn=self.generate_fn,
                                 mesh=self.mesh)
    video = self.clip["video"]
    frames = inference.generate(sampler, [self.clip["caption"]], video[None, 0],
                                video[None, -1], seed=0)[0]
    if jax.process_index() == 0:
      path = os.path.join(self.folder, f"step_{step}.gif")
      video_io.write_video(frames, path, fps=self.config.data.fps)
      with open(path, "rb") as f:
        logger.log_gif("samples/heldout", f.read(), frames.shape[1], frames.shape[2], step)
      logging.info("step %d: sampled %s", step, path)


class _Preemption:
  """Notices a preemption (SIGTERM) so the loop can save and stop at the next step boundary.

  One process: a SIGTERM handler sets a flag. Several: every process must stop at the same
  step, so the JAX coordination service decides (`CheckpointManager.reached_preemption`,
  whose notifier catches SIGTERM on every host); no Python handler is installed then.
  """

  def __init__(self, manager):
    self.manager, self.requested, self.previous = manager, False, None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self.previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    logging.warning("SIGTERM received: saving a checkpoint at the end of this step.")
    self.requested = True

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      return self.manager.reached_preemption(step)
    return self.requested

  def close(self) -> None:
    if self.previous is not None:
      signal.signal(signal.SIGTERM, self.previous)


def _make_iterators(config: ml_collections.ConfigDict, directory: str,
                    state: state_lib.TrainState) -> dict[str, Any]:
  """This process's data iterators, by checkpoint item: "data" (videos, or the latent cache
  with `data.cache_latents`) and, for joint image training, "image_data"."""
  index, count = jax.process_index(), jax.process_count()
  if config.data.cache_latents:
    if count == 1:
      cache.build_cache(config, directory, state.params, state.frozen)
    videos = cache.make_cached_loader(config, directory, state.params, state.frozen, index,
                                      count)
  else:
    videos = pipeline.make_train_loader(config, directory, index, count)
  iterators = {"data": iter(videos)}
  if "image_data" in _iterator_names(config):
    iterators["image_data"] = iter(pipeline.make_image_loader(config, directory, index, count))
  return iterators


def _iterator_names(config: ml_collections.ConfigDict) -> list[str]:
  """The checkpoint items of the data iterators a run with `config` has."""
  return ["data"] + (["image_data"] if config.data.image_every_k_steps else [])


def _restore_or_initialise(config: ml_collections.ConfigDict, manager, mesh, abstract,
                           directory: str, rng: jax.Array):
  """(state, data iterators): resumed from the newest checkpoint, or fresh.

  A resumed run takes up its data order exactly when it has as many processes as the run that
  saved; with another count the iterators restart, reshuffled by the step, and say so.
  """
  step = manager.latest_step()
  if step is None:
    state = state_lib.create_train_state(config, mesh, rng)
    state = _initialise_from(state, abstract, config)
    return state, _make_iterators(config, directory, state)

  changed = checkpoints.check_resume_config(manager, step, config)
  for key, old, new in changed:
    logging.info("resuming with %s changed: %r -> %r", key, old, new)
  logging.info("resuming from checkpoint step %d", step)
  state = checkpoints.restore(manager, step, abstract)
  index, count = jax.process_index(), jax.process_count()
  if all(checkpoints.has_data_state(manager, step, name, index, count)
         for name in _iterator_names(config)):
    iterators = _make_iterators(config, directory, state)
    checkpoints.restore_iterators(manager, step, iterators)
    return state, iterators
  logging.warning("checkpoint %d has no data iterator state for %d processes (it was saved by "
                  "another number of processes, or without joint image training): the data "
                  "order restarts, reshuffled.", step, count)
  reshuffled = config.copy_and_resolve_references()
  with reshuffled.unlocked():
    reshuffled.data.shuffle_seed = config.data.shuffle_seed + step
  return state, _make_iterators(reshuffled, directory, state)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> state_lib.TrainState:
  """Trains (or resumes) in `workdir`: checkpoints, TensorBoard logs and config.json go there.

  Stops early, after saving, when preempted (SIGTERM); rerunning the same command resumes.
  """
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  directory = _prepare_data(config, workdir)
  mesh = mesh_lib.make_mesh(config.mesh)
  logging.info("mesh %s over %d devices in %d processes", dict(mesh.shape), mesh.size,
               jax.process_count())
  abstract, shardings = state_lib.abstract_state(config, mesh)
  manager = checkpoints.make_manager(workdir, config)
  init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
  state, iterators = _restore_or_initialise(config, manager, mesh, abstract, directory,
                                            init_rng)
  logging.info("parameters: U-Net %.2fM, text encoder %.2fM",
               state_lib.count_params(state.params["unet"]) / 1e6,
               state_lib.count_params(state.params["text_encoder"]) / 1e6)
  _write_config(config, workdir)

  loss = cache.cached_loss_fn if config.data.cache_latents else step_lib.loss_fn
  steps = {"train_step": step_lib.jit_train_step(config, mesh, shardings, loss=loss)}
  if config.data.image_every_k_steps:
    # Joint image training (PAPER.md): every k-th step, single frames with the temporal
    # layers off; always from decoded images (the cache holds video clips).
    steps["image_step"] = step_lib.jit_train_step(config, mesh, shardings, use_temporal=False)
  logger = _Logger(workdir, config)
  preview = _Preview(config, mesh, directory, workdir)
  last_saved, pending = manager.latest_step(), []
  timesteps = config.diffusion.num_train_timesteps
  preemption = _Preemption(manager)
  try:
    for step in range(int(state.step) + 1, config.num_train_steps + 1):
      name = "image_step" if pipeline.is_image_step(config, step) else "train_step"
      iterator = iterators["image_data" if name == "image_step" else "data"]
      batch = mesh_lib.global_batch(next(iterator), mesh)
      step_fn = steps[name]
      compiled = step_fn.compiled is not None
      state, metrics = step_fn(state, batch, train_rng)
      if not compiled:
        logger.log_compile(step_fn, name)
      pending.append((step, name, metrics))
      is_last = step == config.num_train_steps
      preempted = preemption.reached(step)
      if step % config.log_every_steps == 0 or is_last or preempted:
        logger.log(step, _check_finite(pending, last_saved, timesteps),
                   steps["train_step"].flops_per_device)
        pending = []
      if step % config.checkpoint_every_steps == 0 or is_last or preempted:
        _check_finite(pending, last_saved)
        pending = []
        checkpoints.save(manager, step, state, config, iterators)
        last_saved = step
      preview(state, step, logger)
      if preempted:
        manager.wait_until_finished()
        logging.warning("preempted: saved step %d in %s; rerun the same command to resume.",
                        step, checkpoints.checkpoint_dir(workdir))
        break
  finally:
    # Also on failure: the checkpoints already begun (asynchronously) must land.
    manager.wait_until_finished()
    preemption.close()
  return state

