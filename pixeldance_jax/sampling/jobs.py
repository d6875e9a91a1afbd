"""The CLI's two jobs end to end: one video (`sample`) or a JSONL prompts file
(`sample_prompts_file`). Everything that can be checked without weights (settings, the
destination, the prompts file's lines) is checked before the weights are read."""

import collections
import os
from typing import Any

from absl import logging

from pixeldance_jax.io import checkpoints
from pixeldance_jax.parallel import mesh as mesh_lib
from pixeldance_jax.sampling import outputs
from pixeldance_jax.sampling import pipeline as pipeline_lib
from pixeldance_jax.sampling import requests as requests_lib
from pixeldance_jax.sampling import settings as settings_lib

# make_request's arguments that are not settings.
_REQUEST_INPUTS = requests_lib.INPUTS + ("resize", "base_dir")


def _checkpoint_record(pipeline: pipeline_lib.Pipeline) -> dict[str, Any]:
  config = pipeline.config
  return {"workdir": pipeline.workdir, "checkpoint_step": pipeline.step,
          "weights": pipeline.weights, "prediction_type": config.diffusion.prediction_type,
          "clip_denoised": config.sample.clip_denoised,
          "condition_noise_timestep": config.conditioning.noise_timestep
          if config.sample.condition_noise else 0}


def _check_counts(**counts: int) -> None:
  for name, value in counts.items():
    if value < 1:
      raise ValueError(f"{name}={value} must be >= 1")


def sample(workdir: str, *, output: str, checkpoint_step: int | None = None,
           use_ema: bool = True, upscale: int = 4, **request_args: Any) -> list[str]:
  """Samples one video (`requests.make_request`'s arguments) from `workdir` and writes it."""
  settings = {key: value for key, value in request_args.items()
              if key not in _REQUEST_INPUTS}
  settings_lib.check_settings(settings)
  _check_counts(upscale=upscale)
  outputs.check_writable(output)
  step, config = checkpoints.find_config(workdir, checkpoint_step)
  settings = requests_lib.resolve_settings(config, request_args.get("prompt"), settings)
  requests_lib.check_keyframe_positions(  # With steps <= T, before any weights are read.
      config, requests_lib.parse_keyframes(request_args.get("keyframes")), settings)
  pipeline = pipeline_lib.load_pipeline(workdir, step, use_ema)
  request = requests_lib.make_request(pipeline, **request_args)
  logging.info("Sampling in %s mode.", request.record["mode"])
  (_, result), = requests_lib.run_requests(pipeline, [request], batch_size=1)
  record = {**request.record, **_checkpoint_record(pipeline)}
  return outputs.write_outputs(result.video[0], output, pipeline.config.data.fps, upscale,
                               record)


def sample_prompts_file(workdir: str, *, prompts_file: str, output_dir: str,
                        checkpoint_step: int | None = None, use_ema: bool = True,
                        batch_size: int = 8, upscale: int = 4, resize: bool = True,
                        **defaults: Any) -> list[str]:
  """Samples every line of a JSONL prompts file into OUTPUT_DIR/NAME/; returns the folders."""
  settings_lib.check_settings(defaults)
  _check_counts(batch_size=batch_size, upscale=upscale)
  outputs.check_writable(output_dir, folder=True)
  step, config = checkpoints.find_config(workdir, checkpoint_step)
  names = requests_lib.check_prompts_file(config, prompts_file, **defaults)
  duplicates = [name for name, count in collections.Counter(names).items() if count > 1]
  if duplicates:
    raise ValueError(f"{prompts_file}: duplicate names {duplicates}")
  pipeline = pipeline_lib.load_pipeline(workdir, step, use_ema)
  requests = requests_lib.read_prompts_file(pipeline, prompts_file, resize=resize, **defaults)
  logging.info("%d requests from %s, batches of up to %d over %d data-parallel device(s).",
               len(requests), prompts_file, batch_size, mesh_lib.batch_devices(pipeline.mesh))
  folders = []
  for request, result in requests_lib.run_requests(pipeline, requests, batch_size):
    folder = os.path.join(output_dir, request.name)
    record = {**request.record, **_checkpoint_record(pipeline), "name": request.name}
    outputs.write_folder(result.video[0], folder, pipeline.config.data.fps, upscale, record)
    folders.append(folder)
  return folders
