"""One-step reconstructions: how well a trained model recovers held-out clips from one noisy
copy, per noise level, with the text and the first and last frames as conditions (magic mode).

Where sampled videos lose the shape, this says at which noise levels the model does: per
timestep, the training objective's loss and the clean clip the model's single prediction
implies, measured against the real clip (PSNR, the shape's IoU and colour error,
`metrics.fidelity`). A model that redraws the shape from little noise but samples blobs needs
another sampler or more steps; one that blurs it even from little noise needs training or
capacity.

    python -m pixeldance_jax.evaluate.denoising --workdir=workdirs/tiny --num_videos=16
"""

import math
import time
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from pixeldance_jax.cli import console
from pixeldance_jax.data import conditioning, tokenizer
from pixeldance_jax.diffusion import losses, schedules
from pixeldance_jax.evaluate import metrics, trained_run
from pixeldance_jax.models import autoencoder as autoencoder_lib
from pixeldance_jax.models import pixeldance
from pixeldance_jax.parallel import sharding
from pixeldance_jax.sampling import pipeline as sampling_pipeline

DEFAULT_TIMESTEPS = (10, 50, 100, 250, 500, 750, 999)
_FIELDS = ("loss",) + metrics.FIDELITY_FIELDS


def _reconstruct_fn(pipeline: sampling_pipeline.Pipeline):
  """Jitted `(videos uint8 [b, F, H, W, 3], token ids [b, L], timestep, rng) -> (the clean
  clips the model's prediction implies, uint8; the training loss per clip [b])`."""
  config = pipeline.config
  model = pixeldance.make_model(config)
  alpha_bar = jnp.asarray(schedules.alphas_cumprod(config.diffusion))
  prediction_type = config.diffusion.prediction_type
  noise_timestep = config.conditioning.noise_timestep if config.sample.condition_noise else 0

  @jax.jit
  def reconstruct(params, frozen, video, token_ids, timestep, rng):
    variables = {"params": params}
    autoencoder = autoencoder_lib.make_autoencoder(config, frozen.get("autoencoder"))
    batch = video.shape[0]
    noise_rng, first_rng, last_rng = jax.random.split(rng, 3)
    clean = autoencoder.encode(autoencoder_lib.to_pixels(video))
    # The conditions as the sampler builds them: each frame encoded alone, noised alike.
    first, last = (conditioning.noise_condition(
        jax.random.split(key, batch), autoencoder.encode(autoencoder_lib.to_pixels(frame)),
        alpha_bar, noise_timestep) for key, frame in ((first_rng, video[:, 0]),
                                                      (last_rng, video[:, -1])))
    image_condition = conditioning.image_condition(first, last, config.data.frames)
    if conditioning.mask_channels(config):
      ends = jnp.zeros(image_condition.shape[:2], bool).at[:, 0].set(True).at[:, -1].set(True)
      image_condition = conditioning.with_mask(image_condition, ends)
    timesteps = jnp.full((batch,), timestep, jnp.int32)
    noise = jax.random.normal(noise_rng, clean.shape, clean.dtype)
    noisy = schedules.add_noise(alpha_bar, clean, noise, timesteps)
    context = model.apply(variables, token_ids, method=pixeldance.PixelDance.encode_text)
    prediction = model.apply(variables, jnp.concatenate([noisy, image_condition], -1),
                             timesteps, context, method=pixeldance.PixelDance.denoise)
    loss = losses.per_example_loss(prediction_type, prediction, alpha_bar, clean, noise,
                                   timesteps, config.diffusion.min_snr_gamma)
    _, estimate = schedules.split_prediction(prediction, noisy, alpha_bar[timestep],
                                             prediction_type)
    if config.sample.clip_denoised:
      estimate = jnp.clip(estimate, -1.0, 1.0)
    return autoencoder_lib.to_uint8(autoencoder.decode(estimate)), loss

  rules = sharding.logical_rules(config)

  def run(video: np.ndarray, token_ids: np.ndarray, timestep: int, rng: jax.Array):
    with jax.set_mesh(pipeline.mesh), nn.logical_axis_rules(rules):
      reconstructed, loss = reconstruct(pipeline.params, pipeline.frozen, video, token_ids,
                                        np.int32(timestep), rng)
    return np.asarray(reconstructed), np.asarray(loss)
  return run


def measure(pipeline: sampling_pipeline.Pipeline, data_dir: str, *, num_videos: int = 16,
            timesteps: Sequence[int] = DEFAULT_TIMESTEPS, batch_size: int = 8,
            seed: int = 0) -> dict[str, Any]:
  """Per timestep, the means over `num_videos` held-out clips of the loss and the one-step
  reconstruction's fidelity (`metrics.fidelity`)."""
  config = pipeline.config
  train_timesteps = config.diffusion.num_train_timesteps
  bad = [t for t in timesteps if not 0 <= t < train_timesteps]
  if bad:
    raise ValueError(f"timesteps {bad} are outside [0, {train_timesteps})")
  clips = trained_run.moving_shape_clips(config, data_dir, num_videos,
                                         "one-step reconstruction")
  alpha_bar = schedules.alphas_cumprod(config.diffusion)
  reconstruct = _reconstruct_fn(pipeline)
  text = config.text_encoder
  sums = {t: dict.fromkeys(_FIELDS, 0.0) for t in timesteps}
  counts = {t: dict.fromkeys(_FIELDS, 0) for t in timesteps}
  start_time = time.time()
  for start in range(0, num_videos, batch_size):
    records = [clips.record(i) for i in range(start, min(start + batch_size, num_videos))]
    video = np.stack([r["video"] for r in records])
    captions = [r["caption"] if config.conditioning.use_text else "" for r in records]
    token_ids = tokenizer.tokenize(captions, text.max_length, text.pad_token_id)
    for t in timesteps:
      rng = jax.random.fold_in(jax.random.key(seed), start * train_timesteps + t)
      reconstructed, loss = reconstruct(video, token_ids, t, rng)
      for clip, record, clip_loss in zip(reconstructed, records, loss):
        values = dict(metrics.fidelity(clip, record["video"], record["background"]),
                      loss=float(clip_loss))
        for field in _FIELDS:
          if not math.isnan(values[field]):
            sums[t][field] += values[field]
            counts[t][field] += 1
  rows = {str(t): {"noise_std": float(math.sqrt(1.0 - alpha_bar[t])),
                   **{field: sums[t][field] / counts[t][field] if counts[t][field] else None
                      for field in _FIELDS}} for t in timesteps}
  return {"step": pipeline.step, "weights": pipeline.weights, "num_videos": num_videos,
          "prediction_type": config.diffusion.prediction_type, "timesteps": rows,
          "seconds": time.time() - start_time}


def markdown(results: dict[str, Any]) -> str:
  lines = ["| timestep | noise std | loss | PSNR dB | shape IoU | colour error | "
           "frame 0 PSNR dB |", "|---:|---:|---:|---:|---:|---:|---:|"]
  for t, row in results["timesteps"].items():
    cells = [trained_run.format_cell(row[key]) for key in ("noise_std",) + _FIELDS]
    lines.append(f"| {t} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _define_flags() -> dict[str, Any]:
  """The command line's flags (defined only when run as a program)."""
  return {
      **trained_run.define_flags(),
      "num_videos": flags.DEFINE_integer("num_videos", 16, "Held-out clips."),
      "timesteps": flags.DEFINE_list("timesteps", [str(t) for t in DEFAULT_TIMESTEPS],
                                     "Noise levels (training timesteps) to reconstruct from."),
      "batch_size": flags.DEFINE_integer("batch_size", 8, "Clips per model call."),
      "seed": flags.DEFINE_integer("seed", 0, "Seed of the noise."),
  }


def main(argv: list[str], holders: dict[str, Any]) -> None:
  values = console.flag_values(argv, holders, required=("workdir",))
  try:
    timesteps = [int(t) for t in values["timesteps"]]
  except ValueError as error:
    raise app.UsageError(f"--timesteps: {error}") from error
  results = trained_run.measure_or_exit(values, "denoising", lambda pipeline, data_dir: measure(
      pipeline, data_dir, num_videos=values["num_videos"], timesteps=timesteps,
      batch_size=values["batch_size"], seed=values["seed"]))
  trained_run.report(results, values["workdir"], "denoising", markdown(results))


if __name__ == "__main__":
  _holders = _define_flags()
  console.run(lambda argv: main(argv, _holders))
