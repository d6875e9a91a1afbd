"""DDIM sampling with PixelDance's last-frame schedule and text-only classifier-free guidance.

The whole denoising loop is one `lax.fori_loop`, so a jitted caller compiles it once per shape;
`tau` and `guidance_scale` are traced values and changing them does not recompile.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pixeldance_jax.diffusion import schedules

Array = jax.Array
# (model input [b, f, h, w, 2c], timesteps [b], text context [b, length, d]) -> prediction.
DenoiseFn = Callable[[Array, Array, Array], Array]

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def sampling_timesteps(num_train_timesteps: int, num_steps: int,
                       spacing: str = "trailing") -> np.ndarray:
  """Descending training timesteps visited by an N-step sampler (diffusers' conventions).

  'trailing' starts at T-1 (pure noise); 'leading' at (N-1) * T // N; 'linspace' spans both ends.
  """
  if not 1 <= num_steps <= num_train_timesteps:
    raise ValueError(f"steps={num_steps} must be in [1, {num_train_timesteps}]")
  if spacing == "trailing":
    steps = np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / num_steps)) - 1
  elif spacing == "leading":
    steps = (np.arange(num_steps) * (num_train_timesteps // num_steps))[::-1]
  elif spacing == "linspace":
    steps = np.round(np.linspace(0, num_train_timesteps - 1, num_steps))[::-1]
  else:
    raise ValueError(f"timestep_spacing={spacing!r} is not one of {TIMESTEP_SPACINGS}")
  return steps.astype(np.int32)


def guided_prediction(denoise_fn: DenoiseFn, model_input: Array, timestep: Array,
                      context: Array, null_context: Array, guidance_scale: Array) -> Array:
  """Text-only CFG: both branches see the same image condition; one batched forward."""
  batch = model_input.shape[0]
  both = denoise_fn(jnp.concatenate([model_input, model_input]),
                    jnp.full((2 * batch,), timestep, jnp.int32),
                    jnp.concatenate([context, null_context]))
  conditional, unconditional = both[:batch], both[batch:]
  return unconditional + guidance_scale * (conditional - unconditional)


def ddim_step(noisy: Array, prediction: Array, alpha_bar_t: Array, alpha_bar_prev: Array,
              noise: Array, eta: Array, prediction_type: str, clip_denoised: bool) -> Array:
  """One DDIM update z_t -> z_{t_prev} (Song et al. eq. 12; eta=1 is DDPM-like)."""
  epsilon, clean = schedules.split_prediction(prediction, noisy, alpha_bar_t, prediction_type)
  if clip_denoised:
    clean = jnp.clip(clean, -1.0, 1.0)
    epsilon = (noisy - jnp.sqrt(alpha_bar_t) * clean) / jnp.sqrt(1.0 - alpha_bar_t)
  variance = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)
  sigma = eta * jnp.sqrt(jnp.maximum(variance, 0.0))
  direction = jnp.sqrt(jnp.maximum(1.0 - alpha_bar_prev - sigma ** 2, 0.0)) * epsilon
  return jnp.sqrt(alpha_bar_prev) * clean + direction + sigma * noise


def ddim_sample(denoise_fn: DenoiseFn, rng: Array, *, image_condition: Array,
                image_condition_without_last: Array, context: Array, null_context: Array,
                alpha_bar: Array, timesteps: Array, tau: Array, guidance_scale: Array,
                eta: Array, prediction_type: str = "epsilon",
                clip_denoised: bool = False) -> Array:
  """Samples latents `[b, f, h, w, c]` from pure noise.

  Args:
    image_condition: c_image `[b, f, h, w, c]` with the first and last frame latents.
    image_condition_without_last: the same with the last-frame slot zeroed.
    timesteps: descending int32 `[num_steps]` (see `sampling_timesteps`).
    tau: the first `tau` sampler steps (counted from pure noise) see the last frame; the rest
      see `image_condition_without_last`. 0 never uses it, num_steps always does.
  """
  init_rng, step_rng = jax.random.split(rng)
  latents = jax.random.normal(init_rng, image_condition.shape, jnp.float32)
  num_steps = timesteps.shape[0]

  def body(i, noisy):
    t = timesteps[i]
    t_prev = jnp.where(i + 1 < num_steps, timesteps[jnp.minimum(i + 1, num_steps - 1)], -1)
    alpha_bar_prev = jnp.where(t_prev >= 0, alpha_bar[jnp.maximum(t_prev, 0)], 1.0)
    condition = jnp.where(i < tau, image_condition, image_condition_without_last)
    model_input = jnp.concatenate([noisy, condition], axis=-1)
    prediction = guided_prediction(denoise_fn, model_input, t, context, null_context,
                                   guidance_scale)
    noise = jax.random.normal(jax.random.fold_in(step_rng, i), noisy.shape, jnp.float32)
    return ddim_step(noisy, prediction, alpha_bar[t], alpha_bar_prev, noise, eta,
                     prediction_type, clip_denoised)

  return jax.lax.fori_loop(0, num_steps, body, latents)
