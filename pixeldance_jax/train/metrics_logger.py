"""Training metrics: fetched from the device in batches, checked finite, averaged, and written
as a console progress line and TensorBoard scalars (process 0)."""

import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from pixeldance_jax.io import tensorboard_files
from pixeldance_jax.train import step as step_lib
from pixeldance_jax.train import throughput


class PendingMetrics:
  """The steps' metrics still on the device: the loop adds one per step, and `flush` fetches
  them all at once (every log or checkpoint).

  `add` waits only while more than `max_in_flight` steps could still be running: the host
  prepares the next batches while the device works, but never runs far ahead of it. Far
  ahead, a preemption's save (of the step the host is at) would first wait for every queued
  step, and those steps' batches would all be held on the device.
  """

  def __init__(self, num_train_timesteps: int, max_in_flight: int = 2):
    self.num_train_timesteps = num_train_timesteps
    self.max_in_flight = max_in_flight
    self.pending: list[tuple[int, str, dict]] = []

  def add(self, step: int, name: str, metrics: dict) -> None:
    self.pending.append((step, name, metrics))
    if len(self.pending) > self.max_in_flight:
      # Steps run in order: once this one is done, so are all before it.
      jax.block_until_ready(self.pending[-self.max_in_flight - 1][2]["finite"])

  def flush(self, last_saved: int | None) -> dict[str, float]:
    """Fetches the pending (step, step kind, metrics); stops the run at the first non-finite
    step (FloatingPointError naming it and the last good checkpoint `last_saved`).

    Returns their means: `loss` over the video steps, `image_loss` over the image steps of joint
    training, and the video loss per quarter of the timestep range (`loss_t0-249`, ...).
    """
    pending, self.pending = self.pending, []
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
    images = [m["loss"] for _, name, m in fetched if name == "image_step"]
    if images:
      means["image_loss"] = float(np.mean(images))
    videos = [m for _, name, m in fetched if name == "train_step"]
    if videos:
      means["loss"] = float(np.mean([m["loss"] for m in videos]))
      means.update(self._bucket_losses(videos))
    return means

  def _bucket_losses(self, videos: list[dict]) -> dict[str, float]:
    sums = np.sum([m["bucket_loss_sum"] for m in videos], axis=0)
    counts = np.sum([m["bucket_count"] for m in videos], axis=0)
    width = self.num_train_timesteps // step_lib.TIMESTEP_BUCKETS
    return {f"loss_t{bucket * width}-{(bucket + 1) * width - 1}": float(total / count)
            for bucket, (total, count) in enumerate(zip(sums, counts)) if count}


def _eta(seconds: float) -> str:
  if seconds >= 3600:
    return f"{seconds / 3600:.1f} h"
  return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


class MetricsLogger:
  """Console progress line and TensorBoard scalars (process 0 only); rates exclude compiles."""

  def __init__(self, workdir: str, config: ml_collections.ConfigDict):
    self.total_steps = config.num_train_steps
    self.clips_per_step = config.batch_size
    self.peak_flops = throughput.peak_flops_per_device(jax.devices()[0],
                                                       config.peak_flops_per_device)
    self.tensorboard_dir = os.path.join(workdir, "tensorboard")
    self.writer = (tensorboard_files.SummaryWriter(self.tensorboard_dir)
                   if jax.process_index() == 0 else None)
    self.last_time, self.last_step = time.time(), None

  def start(self, step: int, state: Any) -> None:
    """Starts the rate clock at `step`, the run's first, once `state` (its initialisation or
    restore may still be running) is ready; a step that compiles restarts the clock after."""
    jax.block_until_ready(state)
    self.last_time, self.last_step = time.time(), step - 1

  def log(self, step: int, metrics: dict[str, float], flops_per_device: float = 0.0) -> None:
    """Adds the rates since the last call (steps/s, clips/s, TFLOP/s, MFU) and writes."""
    now = time.time()
    if self.last_step is not None and step > self.last_step:
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
    logging.info("%s", self._progress_line(step, metrics))

  def _progress_line(self, step: int, metrics: dict[str, float]) -> str:
    """`step 100/1500  loss 0.1234  grad_norm 0.53  lr 1.00e-03  2.31 steps/s  ...  eta 10 min`."""
    parts = [f"step {step}/{self.total_steps}"]
    for key, text in (("loss", "loss {:.4f}"), ("image_loss", "image_loss {:.4f}"),
                      ("grad_norm", "grad_norm {:.3f}"), ("learning_rate", "lr {:.2e}")):
      if key in metrics:
        parts.append(text.format(metrics[key]))
    rate = metrics.get("steps_per_sec")
    if rate:
      parts += [f"{rate:.2f} steps/s", f"{metrics['clips_per_sec']:.1f} clips/s"]
      if "mfu" in metrics:
        parts.append(f"mfu {metrics['mfu']:.1%}")
      parts.append(f"eta {_eta((self.total_steps - step) / rate)}")
    return "  ".join(parts)

  def leave_out(self, seconds: float) -> None:
    """`seconds` spent since the last log on something other than training (a preview, an
    evaluation) are left out of the next rate."""
    self.last_time += seconds

  def log_scalars(self, scalars: dict[str, float], step: int) -> None:
    """Scalars under their own tags (e.g. `eval/magic/fvd`)."""
    if self.writer is None:
      return
    for tag, value in scalars.items():
      self.writer.add_scalar(tag, value, step)
    self.writer.flush()

  def log_gif(self, tag: str, gif: bytes, height: int, width: int, step: int) -> None:
    """An animated gif in TensorBoard's images tab."""
    if self.writer is None:
      return
    protos = tensorboard_files.summary_pb2
    image = protos.Summary.Image(height=height, width=width, colorspace=3,
                                 encoded_image_string=gif)
    summary = protos.Summary(value=[protos.Summary.Value(tag=tag, image=image)])
    self.writer.file_writer.add_summary(summary, step)
    self.writer.flush()

  def close(self) -> None:
    """Writes every event still queued and closes the file. tensorboardX's `flush` only
    flushes what its writer thread has already taken from the queue, so without this the last
    steps' events may be missing when training returns."""
    if self.writer is not None:
      self.writer.close()
      self.writer = None

  def compiling(self, name: str) -> None:
    logging.info("compiling %s (the first step waits for it)", name)

  def log_compile(self, step_fn: step_lib.CompiledStep, name: str, step: int) -> None:
    """Reports a compile that just ended at `step`; the rate clock restarts at that step, which
    is executing now, so no rate includes compile time."""
    logging.info("%s compiled in %.1f s; %.3f TFLOP per device per step", name,
                 step_fn.compile_seconds, step_fn.flops_per_device / 1e12)
    self.last_time, self.last_step = time.time(), step - 1
    if self.writer is not None:
      self.writer.add_scalar(f"compile/{name}_seconds", step_fn.compile_seconds, 0)
