"""Denoising objectives."""

import jax
import jax.numpy as jnp

from pixeldance_jax.diffusion import schedules

Array = jax.Array

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "sample_skip")


def target(prediction_type: str, alpha_bar: Array, clean: Array, noise: Array,
           timesteps: Array) -> Array:
  """What the network regresses: the noise, the velocity, the clean latent ('sample'), or
  what the clean latent needs beyond the skip from z_t ('sample_skip',
  `schedules.skip_scalings`)."""
  if prediction_type == "epsilon":
    return noise
  if prediction_type == "v_prediction":
    return schedules.velocity(alpha_bar, clean, noise, timesteps)
  if prediction_type == "sample":
    return clean
  if prediction_type == "sample_skip":
    a = schedules.broadcast(alpha_bar[timesteps], clean)
    c_skip, c_out = schedules.skip_scalings(a)
    noisy = schedules.add_noise(alpha_bar, clean, noise, timesteps)
    return (clean - c_skip * noisy / jnp.sqrt(a)) / c_out
  raise ValueError(f"config.diffusion.prediction_type={prediction_type!r} is not one of "
                   f"{PREDICTION_TYPES}")


def weight(prediction_type: str, alpha_bar: Array, timesteps: Array,
           min_snr_gamma: float = 0.0) -> Array:
  """Per-example loss weight `[batch]`: c_out^2 for 'sample_skip', so that its loss is the
  clean latent's squared error as for 'sample'; 1 for the others. With `min_snr_gamma` > 0,
  times Min-SNR-gamma's weight (Hang et al., 2023): each prediction type's loss becomes the
  clean latent's squared error weighted by min(SNR, gamma), which keeps the nearly clean
  timesteps from dominating."""
  a = alpha_bar[timesteps]
  base = (schedules.skip_scalings(a)[1] ** 2 if prediction_type == "sample_skip"
          else jnp.ones(timesteps.shape, jnp.float32))
  if min_snr_gamma <= 0:
    return base
  snr = a / (1.0 - a)
  # The clean latent's squared error is the loss's times: 1/SNR for epsilon, 1/(SNR + 1) for v,
  # 1 for 'sample' (and for 'sample_skip' with its c_out^2).
  per_clean = {"epsilon": 1.0 / snr, "v_prediction": 1.0 / (snr + 1.0)}.get(prediction_type, 1.0)
  return base * jnp.minimum(snr, min_snr_gamma) * per_clean


def per_example_mse(prediction: Array, regression_target: Array) -> Array:
  """Mean squared error per example, `[batch, ...]` -> `[batch]`, in float32."""
  error = jnp.square(prediction.astype(jnp.float32) - regression_target.astype(jnp.float32))
  return error.reshape(error.shape[0], -1).mean(axis=1)


def per_example_loss(prediction_type: str, prediction: Array, alpha_bar: Array, clean: Array,
                     noise: Array, timesteps: Array, min_snr_gamma: float = 0.0) -> Array:
  """The denoising objective per example `[batch]`: the prediction's squared error against
  `target`, weighted by `weight`."""
  regression_target = target(prediction_type, alpha_bar, clean, noise, timesteps)
  return (per_example_mse(prediction, regression_target)
          * weight(prediction_type, alpha_bar, timesteps, min_snr_gamma))
