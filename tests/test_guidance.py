"""Text-only classifier-free guidance: uncond + s * (cond - uncond), c_image in both branches.

The unconditional branch of PixelDance's guidance drops only the text (the empty prompt): it
keeps the image condition. Checked here on a recording stand-in model (the guided prediction,
one sampler step); tests/test_conditions_reach_model.py checks it on the unit-test model.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import unit_test
from pixeldance_jax.data import conditioning
from pixeldance_jax.diffusion import samplers, schedules

BATCH, FRAMES, SIZE, CHANNELS, LENGTH, WIDTH = 2, 4, 4, 3, 5, 8
SCALES = np.asarray([2.5, 7.5], np.float32)  # Per example; neither is 1.


def _stand_in(model_input: jax.Array, timesteps: jax.Array, context: jax.Array) -> jax.Array:
  """A denoiser `[b, f, h, w, 2c]` -> `[b, f, h, w, c]` that is nonlinear in all three inputs,
  so that guidance is not linear in the text and a dropped c_image shows."""
  noisy, image = jnp.split(model_input, 2, axis=-1)
  text = jnp.mean(jnp.sin(context), axis=(1, 2))[:, None, None, None, None]
  time = timesteps.astype(jnp.float32)[:, None, None, None, None] / 1000.0
  return jnp.tanh(noisy * (1.0 + text) + 0.7 * image * (1.0 - text) + time)


class Recorder:
  """The stand-in model, remembering the inputs of every call (from inside jit too)."""

  def __init__(self):
    self.calls = []

  def __call__(self, model_input, timesteps, context):
    record = lambda *args: self.calls.append(tuple(np.asarray(x) for x in args))
    jax.debug.callback(record, model_input, timesteps, context)
    return _stand_in(model_input, timesteps, context)


def _normal(seed: int, shape: tuple[int, ...]) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


@pytest.fixture(scope="module")
def inputs():
  """(image condition `[b, f, h, w, c]` with first and last frames, text, empty-prompt text)."""
  first, last = _normal(0, (BATCH, SIZE, SIZE, CHANNELS)), _normal(1, (BATCH, SIZE, SIZE, CHANNELS))
  return (conditioning.image_condition(first, last, FRAMES), _normal(2, (BATCH, LENGTH, WIDTH)),
          _normal(3, (BATCH, LENGTH, WIDTH)))


def _interleave(a, b):
  """The batch the guided forward runs: example 0 with and without text, example 1, ..."""
  return np.stack([a, b], axis=1).reshape((2 * len(a),) + a.shape[1:])


def _by_hand(model_input, timestep, context, null_context, scale):
  """Two separate model calls, combined as uncond + s * (cond - uncond)."""
  timesteps = jnp.full((BATCH,), timestep, jnp.int32)
  cond = _stand_in(model_input, timesteps, context)
  uncond = _stand_in(model_input, timesteps, null_context)
  assert np.abs(cond - uncond).max() > 1e-2  # Else any scale would pass.
  return uncond + scale.reshape(-1, 1, 1, 1, 1) * (cond - uncond)


def test_guided_prediction_is_uncond_plus_scale_times_difference(inputs):
  image, context, null_context = inputs
  model_input = jnp.concatenate([_normal(4, image.shape), image], axis=-1)
  model = Recorder()
  guided = jax.jit(lambda x, scale: samplers.guided_prediction(
      model, x, 500, context, null_context, scale))(model_input, jnp.asarray(SCALES))
  jax.effects_barrier()  # The recorder's callbacks have run.
  (seen_input, seen_timesteps, seen_context), = model.calls  # One batched forward.
  # Both branches see the noisy latent and c_image; only the text differs.
  np.testing.assert_array_equal(seen_input, _interleave(model_input, model_input))
  np.testing.assert_array_equal(seen_context, _interleave(context, null_context))
  np.testing.assert_array_equal(seen_timesteps, np.full((2 * BATCH,), 500))
  expected = _by_hand(model_input, 500, context, null_context, SCALES)
  np.testing.assert_allclose(guided, expected, rtol=1e-5, atol=1e-5)


def test_one_sampler_step_applies_guidance_with_c_image_in_both_branches(inputs):
  """One DDIM step to t = 0 of a z_0-predicting model returns the guided z_0 itself."""
  image, context, null_context = inputs
  alpha_bar = schedules.alphas_cumprod(unit_test.get_config().diffusion)
  schedule = samplers.make_schedule(alpha_bar, num_steps=1)
  model = Recorder()
  latents = jax.jit(lambda scale: samplers.sample(
      model, jax.random.split(jax.random.key(0), BATCH), image_condition=image,
      image_condition_without_last=jnp.zeros_like(image), context=context,
      null_context=null_context, schedule=schedule, tau=1, guidance_scale=scale,
      prediction_type="sample"))(jnp.asarray(SCALES))
  jax.effects_barrier()  # The recorder's callbacks have run.
  (seen_input, seen_timesteps, seen_context), = model.calls
  noisy, seen_image = np.split(seen_input, 2, axis=-1)
  for branch in (slice(0, None, 2), slice(1, None, 2)):  # Conditional, unconditional.
    np.testing.assert_array_equal(seen_image[branch], image)
  np.testing.assert_array_equal(noisy[0::2], noisy[1::2])
  np.testing.assert_array_equal(seen_context, _interleave(context, null_context))
  assert (seen_timesteps == len(alpha_bar) - 1).all()
  model_input = jnp.concatenate([noisy[0::2], image], axis=-1)
  expected = _by_hand(model_input, len(alpha_bar) - 1, context, null_context, SCALES)
  np.testing.assert_allclose(latents, expected, rtol=1e-5, atol=1e-5)
