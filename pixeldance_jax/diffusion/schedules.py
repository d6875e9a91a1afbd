"""DDPM noise schedules and the forward process q(z_t | z_0)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

Array = jax.Array


def _linear(config) -> np.ndarray:
  return np.linspace(config.beta_start, config.beta_end, config.num_train_timesteps,
                     dtype=np.float64)


def _scaled_linear(config) -> np.ndarray:
  """Stable Diffusion's schedule: linear in sqrt(beta)."""
  return np.linspace(config.beta_start ** 0.5, config.beta_end ** 0.5,
                     config.num_train_timesteps, dtype=np.float64) ** 2


def _cosine(config) -> np.ndarray:
  """Nichol & Dhariwal's cosine schedule, betas capped at 0.999."""
  steps = np.arange(config.num_train_timesteps + 1, dtype=np.float64) / config.num_train_timesteps
  alpha_bar = np.cos((steps + 0.008) / 1.008 * np.pi / 2) ** 2
  return np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], 0.999)


BETA_SCHEDULES = {"linear": _linear, "scaled_linear": _scaled_linear, "cosine": _cosine}


def alphas_cumprod(diffusion_config: ml_collections.ConfigDict) -> np.ndarray:
  """alpha_bar_t for t = 0 .. T-1, float32 `[T]` (computed in float64 like diffusers)."""
  name = diffusion_config.beta_schedule
  if name not in BETA_SCHEDULES:
    raise ValueError(f"config.diffusion.beta_schedule={name!r} is not one of "
                     f"{sorted(BETA_SCHEDULES)}")
  betas = BETA_SCHEDULES[name](diffusion_config)
  return np.cumprod(1.0 - betas).astype(np.float32)


def broadcast(values: Array, like: Array) -> Array:
  """`[batch]` values shaped to multiply `[batch, ...]` arrays."""
  return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))


def add_noise(alpha_bar: Array, clean: Array, noise: Array, timesteps: Array) -> Array:
  """z_t = sqrt(alpha_bar_t) z_0 + sqrt(1 - alpha_bar_t) eps; timesteps `[batch]`."""
  a = broadcast(alpha_bar[timesteps], clean)
  return jnp.sqrt(a) * clean + jnp.sqrt(1.0 - a) * noise


def velocity(alpha_bar: Array, clean: Array, noise: Array, timesteps: Array) -> Array:
  """v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) z_0 (Salimans & Ho)."""
  a = broadcast(alpha_bar[timesteps], clean)
  return jnp.sqrt(a) * noise - jnp.sqrt(1.0 - a) * clean


# "sample_skip": the data's standard deviation the skip is tuned for (pixels in [-1, 1]).
SIGMA_DATA = 0.5


def skip_scalings(alpha_bar_t: Array) -> tuple[Array, Array]:
  """(c_skip, c_out) of Karras et al. (2022)'s preconditioning at the noise level of
  alpha_bar_t, for z_t / sqrt(alpha_bar_t) = z_0 + sigma eps: z_0 is predicted as
  c_skip z_t / sqrt(alpha_bar_t) + c_out F. Nearly z_t itself at low noise, nearly F at high."""
  sigma_squared = (1.0 - alpha_bar_t) / alpha_bar_t
  c_skip = SIGMA_DATA ** 2 / (sigma_squared + SIGMA_DATA ** 2)
  c_out = jnp.sqrt(sigma_squared) * SIGMA_DATA / jnp.sqrt(sigma_squared + SIGMA_DATA ** 2)
  return c_skip, c_out


def split_prediction(prediction: Array, noisy: Array, alpha_bar_t: Array,
                     prediction_type: str) -> tuple[Array, Array]:
  """(epsilon, z_0) implied by a model output of the given type; alpha_bar_t broadcastable."""
  sqrt_a, sqrt_1ma = jnp.sqrt(alpha_bar_t), jnp.sqrt(1.0 - alpha_bar_t)
  if prediction_type == "epsilon":
    return prediction, (noisy - sqrt_1ma * prediction) / sqrt_a
  if prediction_type == "v_prediction":
    return sqrt_a * prediction + sqrt_1ma * noisy, sqrt_a * noisy - sqrt_1ma * prediction
  if prediction_type == "sample":
    return (noisy - sqrt_a * prediction) / sqrt_1ma, prediction
  if prediction_type == "sample_skip":
    c_skip, c_out = skip_scalings(alpha_bar_t)
    clean = c_skip * noisy / sqrt_a + c_out * prediction
    return (noisy - sqrt_a * clean) / sqrt_1ma, clean
  raise ValueError(f"prediction_type={prediction_type!r} is not 'epsilon', 'v_prediction', "
                   "'sample' or 'sample_skip'")
