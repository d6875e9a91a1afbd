"""Denoising objectives."""

import jax
import jax.numpy as jnp

from pixeldance_jax.diffusion import schedules

Array = jax.Array

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def target(prediction_type: str, alpha_bar: Array, clean: Array, noise: Array,
           timesteps: Array) -> Array:
  """What the network regresses: the noise, the velocity, or the clean latent ('sample')."""
  if prediction_type == "epsilon":
    return noise
  if prediction_type == "v_prediction":
    return schedules.velocity(alpha_bar, clean, noise, timesteps)
  if prediction_type == "sample":
    return clean
  raise ValueError(f"config.diffusion.prediction_type={prediction_type!r} is not one of "
                   f"{PREDICTION_TYPES}")


def per_example_mse(prediction: Array, regression_target: Array) -> Array:
  """Mean squared error per example, `[batch, ...]` -> `[batch]`, in float32."""
  error = jnp.square(prediction.astype(jnp.float32) - regression_target.astype(jnp.float32))
  return error.reshape(error.shape[0], -1).mean(axis=1)
