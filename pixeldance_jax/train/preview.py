"""Preview samples during training: every `config.sample_every_steps`, the first held-out clip
(its caption, first and last frame) sampled with the EMA weights into
`<workdir>/samples/step_<N>.gif` and TensorBoard's images tab."""

import os
import time

import jax
import ml_collections
from absl import logging
from jax.sharding import Mesh

from pixeldance_jax.io import video_files
from pixeldance_jax.data import loaders
from pixeldance_jax.sampling import generate, program
from pixeldance_jax.sampling import pipeline as sampling_pipeline
from pixeldance_jax.train import metrics_logger
from pixeldance_jax.train import state as state_lib


class Preview:
  """Call it after every step; it samples on the steps that are multiples of the period. The
  held-out clip is read and the sampling program compiled on the first preview only."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh, directory: str,
               workdir: str):
    self.config, self.mesh, self.every = config, mesh, config.sample_every_steps
    self.directory, self.folder = directory, os.path.join(workdir, "samples")
    self.clip, self.generate_fn = None, None

  def __call__(self, state: state_lib.TrainState, step: int,
               logger: metrics_logger.MetricsLogger) -> None:
    if not self.every or step % self.every:
      return
    started = time.time()
    if self.clip is None:
      self.clip = loaders.load_test_clips(self.config, self.directory, 1)[0]
      self.generate_fn = program.make_generate_fn(self.config, self.mesh)
    sampler = sampling_pipeline.make_pipeline(
        self.config, state.ema_params, state.frozen, self.mesh, step=step, weights="ema",
        generate_fn=self.generate_fn)
    video = self.clip["video"]
    frames = generate.generate(sampler, [self.clip["caption"]], video[None, 0], video[None, -1],
                               seed=0)[0]
    if jax.process_index() == 0:
      path = os.path.join(self.folder, f"step_{step}.gif")
      video_files.write_video(frames, path, fps=self.config.data.fps)
      with open(path, "rb") as f:
        logger.log_gif("samples/heldout", f.read(), frames.shape[1], frames.shape[2], step)
      logging.info("step %d: preview sample %s", step, path)
    logger.leave_out(time.time() - started)
