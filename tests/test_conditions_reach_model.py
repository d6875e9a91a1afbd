"""The prompt and the first frame reach the model and the samples; guidance keeps c_image.

Unit-test model with random weights (`helpers`: nothing zero, so the temporal layers carry the
first frame to every frame). The model-level checks share one U-Net program (batch 4) and one
text-encoder program; each batch holds a control pair of identical inputs, so a difference
comes from the changed condition and not from the position in the batch. The sampling-level
checks run `generate` twice with the examples swapped, for the same reason.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from configs import unit_test
from pixeldance_jax.data import tokenizer
from pixeldance_jax.data import conditioning
from pixeldance_jax.diffusion import samplers
from pixeldance_jax.models import pixeldance
from pixeldance_jax.sampling import generate as generate_lib

PROMPTS = ("a red square moves up", "a blue circle moves left")
SCALES = np.asarray([2.5, 7.5], np.float32)  # Guidance per example; neither is 1.
TIMESTEP = 400
# A prediction "changes" by more than this; identical inputs agree to float32 rounding.
CHANGED, SAME = 1e-3, 1e-5


@pytest.fixture(scope="module")
def model():
  """(config, encode ids `[4, length]`, denoise `[4, f, h, w, 2c]`), jitted with the params."""
  config = unit_test.get_config()
  module = pixeldance.make_model(config)
  params = helpers.random_params(config, seed=0)
  encode = jax.jit(lambda p, ids: module.apply({"params": p}, ids,
                                               method=pixeldance.PixelDance.encode_text))
  denoise = jax.jit(lambda p, x, t, context: module.apply(
      {"params": p}, x, t, context, method=pixeldance.PixelDance.denoise))
  return config, functools.partial(encode, params), functools.partial(denoise, params)


@pytest.fixture(scope="module")
def contexts(model):
  """Encoded texts `[length, hidden]`: PROMPTS[0], PROMPTS[1] and the empty prompt."""
  config, encode, _ = model
  text = config.text_encoder
  ids = tokenizer.tokenize([*PROMPTS, "", ""], text.max_length, text.pad_token_id)
  np.testing.assert_array_equal(ids[2], tokenizer.empty_prompt_tokens(text.max_length,
                                                                       text.pad_token_id))
  a, b, empty, _ = encode(jnp.asarray(ids))
  return a, b, empty


def _latents(config, seed: int, frames: int | None = None) -> jax.Array:
  """Normal latents `[frames, h, w, c]` (one frame `[h, w, c]` when frames is None)."""
  size = config.data.image_size // config.autoencoder.patch_size
  shape = (size, size, config.autoencoder.latent_channels)
  shape = shape if frames is None else (frames,) + shape
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _model_input(config, noisy: jax.Array, firsts: list[jax.Array]) -> jax.Array:
  """One noisy latent with c_image = [first, 0, ..., 0, last] per first frame: `[b, f, h, w, 2c]`.

  The last frame is the same for every example."""
  first = jnp.stack(firsts)
  last = jnp.broadcast_to(_latents(config, seed=10), first.shape)
  image = conditioning.image_condition(first, last, config.data.frames)
  return jnp.concatenate([jnp.broadcast_to(noisy, image.shape), image], axis=-1)


def _timesteps(batch: int) -> jax.Array:
  return jnp.full((batch,), TIMESTEP, jnp.int32)


def _max_difference(a: jax.Array, b: jax.Array, axes=None) -> np.ndarray:
  return np.abs(np.asarray(a) - np.asarray(b)).max(axis=axes)


def test_text_reaches_the_prediction(model, contexts):
  config, _, denoise = model
  a, b, _ = contexts
  first = _latents(config, seed=1)
  x = _model_input(config, _latents(config, 2, config.data.frames), [first] * 4)
  out = denoise(x, _timesteps(4), jnp.stack([a, b, a, a]))
  assert _max_difference(out[2], out[3]) <= SAME  # Control: same inputs, same prediction.
  assert _max_difference(out[0], out[1]) > CHANGED


def test_first_frame_reaches_every_predicted_frame(model, contexts):
  config, _, denoise = model
  a, _, _ = contexts
  first, other_first = _latents(config, seed=1), _latents(config, seed=3)
  x = _model_input(config, _latents(config, 2, config.data.frames),
                   [first, other_first, first, first])
  out = denoise(x, _timesteps(4), jnp.stack([a] * 4))
  assert _max_difference(out[2], out[3]) <= SAME
  # Through the temporal layers the first frame moves the prediction of every frame.
  per_frame = _max_difference(out[0], out[1], axes=(1, 2, 3))
  assert (per_frame > CHANGED).all(), per_frame


def test_guidance_keeps_c_image_in_the_unconditional_branch(model, contexts):
  """The guided prediction equals uncond + s * (cond - uncond) from two separate forwards, the
  unconditional one with c_image and the empty prompt.

  tests/test_guidance.py checks the same on a recording stand-in model.
  """
  config, _, denoise = model
  a, b, empty = contexts
  noisy = _latents(config, 2, config.data.frames)
  x = _model_input(config, noisy, [_latents(config, seed=1), _latents(config, seed=3)])
  without_image = x.at[..., x.shape[-1] // 2:].set(0.0)
  context, null_context = jnp.stack([a, b]), jnp.stack([empty, empty])
  guided = samplers.guided_prediction(denoise, x, TIMESTEP, context, null_context,
                                      jnp.asarray(SCALES))
  # By hand, in batches of 4 like the guided forward (one program).
  both = lambda first, second: jnp.concatenate([first, second])
  cond, uncond_without_image = jnp.split(
      denoise(both(x, without_image), _timesteps(4), both(context, null_context)), 2)
  uncond = denoise(both(x, x), _timesteps(4), both(null_context, null_context))[:2]
  # Text and c_image both move the prediction: dropping either would show.
  assert _max_difference(cond, uncond) > CHANGED
  assert _max_difference(uncond, uncond_without_image) > CHANGED
  expected = uncond + SCALES.reshape(-1, 1, 1, 1, 1) * (cond - uncond)
  np.testing.assert_allclose(guided, expected, rtol=0, atol=SAME * (1 + SCALES.max()))


# --- Sampling: `generate` with a random pipeline --------------------------------------------


@pytest.fixture(scope="module")
def pipeline():
  return helpers.random_pipeline(unit_test.get_config(), seed=1)


def _images(config, *seeds: int) -> np.ndarray:
  """Random uint8 frames `[len(seeds), H, W, 3]`."""
  size = config.data.image_size
  return np.stack([np.random.default_rng(seed).integers(0, 256, (size, size, 3), np.uint8)
                   for seed in seeds])


def _changed(a: np.ndarray, b: np.ndarray) -> float:
  """The fraction of uint8 values that differ (random weights: ~0.6 for another prompt)."""
  return float((a != b).mean())


@pytest.mark.slow
def test_prompt_changes_the_sample(pipeline):
  """Two prompts, the same first frame and seed. Swapping the prompts swaps the videos: the
  difference is the text's, not the batch position's."""
  first = _images(pipeline.config, 0, 0)
  videos = generate_lib.generate(pipeline, list(PROMPTS), first, seed=[3, 3])
  swapped = generate_lib.generate(pipeline, list(PROMPTS[::-1]), first, seed=[3, 3])
  np.testing.assert_array_equal(videos, swapped[::-1])
  assert _changed(videos[0], videos[1]) > 0.05


@pytest.mark.slow
def test_first_frame_changes_the_sample(pipeline):
  """One prompt and seed, two first frames; swapping them swaps the videos."""
  first = _images(pipeline.config, 0, 1)
  videos = generate_lib.generate(pipeline, [PROMPTS[0]] * 2, first, seed=[3, 3])
  swapped = generate_lib.generate(pipeline, [PROMPTS[0]] * 2, first[::-1], seed=[3, 3])
  np.testing.assert_array_equal(videos, swapped[::-1])
  # Every frame, not only frame 0: the first frame conditions the whole clip.
  assert all(_changed(a, b) > 0.05 for a, b in zip(videos[0], videos[1]))
