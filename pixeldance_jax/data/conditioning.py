"""PixelDance's image and text conditions (PAPER.md, Training).

These run on device inside the jitted train step: they need the VAE latents (computed there),
and drawing them from `fold_in(rng, step)` makes them part of the exactly reproducible step.

c_image = [first, 0, ..., 0, last] along frames, concatenated with z_t on channels.
"""

import jax
import jax.numpy as jnp
import ml_collections

from pixeldance_jax.diffusion import schedules

Array = jax.Array


def image_condition(first: Array, last: Array, frames: int) -> Array:
  """`[b, h, w, c]` x 2 -> c_image `[b, frames, h, w, c]`: first, zeros, last."""
  middle = jnp.zeros((first.shape[0], frames - 2) + first.shape[1:], first.dtype)
  return jnp.concatenate([first[:, None], middle, last[:, None]], axis=1)


def _bernoulli(rng: Array, prob: float, batch: int) -> Array:
  return jax.random.bernoulli(rng, prob, (batch,))


def _where_batch(mask: Array, a: Array, b: Array) -> Array:
  return jnp.where(mask.reshape(mask.shape + (1,) * (a.ndim - 1)), a, b)


def noise_condition(rng: Array, frame_latent: Array, alpha_bar: Array, timestep: int) -> Array:
  """Forward-process noise of `timestep` on a condition latent (0: unchanged)."""
  if timestep <= 0:
    return frame_latent
  noise = jax.random.normal(rng, frame_latent.shape, frame_latent.dtype)
  steps = jnp.full((frame_latent.shape[0],), timestep, jnp.int32)
  return schedules.add_noise(alpha_bar, frame_latent, noise, steps)


def training_conditions(rng: Array, latents: Array, token_ids: Array, null_token_ids: Array,
                        alpha_bar: Array, config: ml_collections.ConfigDict
                        ) -> tuple[Array, Array]:
  """Draws (c_image `[b, f, h, w, c]`, token ids `[b, length]`) for one training batch.

  latents: the clip `[b, f, h, w, c]`. The last frame is drawn uniformly from the clip's last
  `cond.last_frame_candidates` frames; first and last get `cond.noise_timestep` noise; the last
  frame is dropped (zeros) with probability eta; the text is replaced by the empty prompt with
  probability `cond.text_drop_prob`. The `use_*` switches turn a condition off entirely.
  """
  cond = config.conditioning
  batch, frames = latents.shape[:2]
  last_rng, first_noise_rng, last_noise_rng, drop_rng, text_rng = jax.random.split(rng, 5)
  candidates = min(cond.last_frame_candidates, frames - 1)
  last_index = frames - 1 - jax.random.randint(last_rng, (batch,), 0, candidates)
  last = jnp.take_along_axis(latents, last_index[:, None, None, None, None], axis=1)[:, 0]
  first = noise_condition(first_noise_rng, latents[:, 0], alpha_bar, cond.noise_timestep)
  last = noise_condition(last_noise_rng, last, alpha_bar, cond.noise_timestep)

  keep_last = ~_bernoulli(drop_rng, cond.last_frame_drop_prob, batch) & cond.use_last_frame
  last = _where_batch(keep_last, last, jnp.zeros_like(last))
  first = first if cond.use_first_frame else jnp.zeros_like(first)
  keep_text = ~_bernoulli(text_rng, cond.text_drop_prob, batch) & cond.use_text
  token_ids = _where_batch(keep_text, token_ids, jnp.broadcast_to(null_token_ids, token_ids.shape))
  return image_condition(first, last, frames), token_ids
