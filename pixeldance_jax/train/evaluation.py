"""Periodic evaluation during training: every `config.eval_every_steps`, the metrics of
`python -m pixeldance_jax.evaluate` (config.eval: metrics, variants, number of held-out clips)
on the EMA weights, written to `<workdir>/eval/<step>.json` and TensorBoard (`eval/...`).

The feature networks and the sampling program are built on the first evaluation and reused;
the real clips' statistics come from the cache after the first one.
"""

import os
import time

import jax
import ml_collections
from absl import logging
from jax.sharding import Mesh

from pixeldance_jax.evaluate import suite
from pixeldance_jax.sampling import pipeline as sampling_pipeline
from pixeldance_jax.sampling import program
from pixeldance_jax.train import metrics_logger
from pixeldance_jax.train import state as state_lib


class PeriodicEvaluation:
  """Call it after every step; it evaluates on the multiples of the period."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh, directory: str,
               workdir: str):
    self.config, self.mesh, self.directory = config, mesh, directory
    self.every = config.get("eval_every_steps", 0)
    self.folder = os.path.join(workdir, "eval")
    self.networks, self.generate_fn = None, None

  def __call__(self, state: state_lib.TrainState, step: int,
               logger: metrics_logger.MetricsLogger) -> None:
    if not self.every or step % self.every:
      return
    started = time.time()
    settings = self.config.eval
    if self.networks is None:
      self.networks = suite.load_networks(settings.metrics, self.mesh, settings.batch_size,
                                          settings.fid_weights or None,
                                          settings.clip_model or None)
      self.generate_fn = program.make_generate_fn(self.config, self.mesh)
    sampler = sampling_pipeline.make_pipeline(
        self.config, state.ema_params, state.frozen, self.mesh, step=step, weights="ema",
        generate_fn=self.generate_fn)
    results = suite.evaluate_pipeline(
        sampler, self.directory, metric_names=settings.metrics, num_videos=settings.num_videos,
        variants=settings.variants, global_batch=settings.batch_size, floor=False,
        networks=self.networks, cache_dir=settings.cache_dir or suite.DEFAULT_CACHE_DIR,
        progress=False)
    seconds = time.time() - started
    scalars = suite.scalars(results)
    logger.leave_out(seconds)
    logger.log_scalars(scalars, step)
    if jax.process_index() == 0:
      paths = suite.write_results(results, os.path.join(self.folder, f"{step}.json"))
      figures = "  ".join(f"{tag[len('eval/'):]} {value:.4g}" for tag, value in scalars.items()
                          if tag.endswith(("/fvd", "/fid", "/clipsim", "_centroid_px")))
      logging.info("step %d: evaluation in %.0f s -> %s  %s", step, seconds, paths[0], figures)
