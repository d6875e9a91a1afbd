"""Schedules, conditioning and the DDIM sampler on analytic denoisers."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import unit_test
from pixeldance_jax.data import conditioning
from pixeldance_jax.diffusion import losses, samplers, schedules


def _diffusion_config(schedule="linear"):
  return ml_collections.ConfigDict(dict(num_train_timesteps=1000, beta_schedule=schedule,
                                        beta_start=0.0001, beta_end=0.02))


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "cosine"])
def test_alphas_cumprod_decreasing(schedule):
  alpha_bar = schedules.alphas_cumprod(_diffusion_config(schedule))
  assert alpha_bar.shape == (1000,) and np.all(np.diff(alpha_bar) < 0)
  assert 0 < alpha_bar[-1] < 0.01 and alpha_bar[0] > 0.99


def test_linear_schedule_matches_ddpm():
  alpha_bar = schedules.alphas_cumprod(_diffusion_config())
  betas = np.linspace(1e-4, 0.02, 1000)
  np.testing.assert_allclose(alpha_bar, np.cumprod(1 - betas), rtol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_split_prediction_inverts_targets(prediction_type):
  alpha_bar = jnp.asarray(schedules.alphas_cumprod(_diffusion_config()))
  clean = jax.random.normal(jax.random.key(0), (3, 5))
  noise = jax.random.normal(jax.random.key(1), (3, 5))
  t = jnp.array([0, 500, 999])
  noisy = schedules.add_noise(alpha_bar, clean, noise, t)
  target = losses.target(prediction_type, alpha_bar, clean, noise, t)
  eps, x0 = schedules.split_prediction(target, noisy, alpha_bar[t][:, None], prediction_type)
  np.testing.assert_allclose(eps, noise, atol=1e-4)
  np.testing.assert_allclose(x0, clean, atol=2e-3)


@pytest.mark.parametrize("spacing,first,last", [("trailing", 999, 39), ("leading", 960, 0),
                                                ("linspace", 999, 0)])
def test_sampling_timesteps(spacing, first, last):
  steps = samplers.sampling_timesteps(1000, 25, spacing)
  assert steps.shape == (25,) and steps[0] == first and steps[-1] == last
  assert np.all(np.diff(steps) < 0)


def _gaussian_denoiser(alpha_bar, mean, std):
  """Exact epsilon for data ~ N(mean, std^2): E[eps | z_t] in closed form."""
  def denoise(model_input, timesteps, context):
    del context
    noisy = model_input[..., :1]
    a = alpha_bar[timesteps].reshape(-1, 1, 1, 1, 1)
    variance = a * std ** 2 + (1 - a)
    return jnp.sqrt(1 - a) * (noisy - jnp.sqrt(a) * mean) / variance
  return denoise


def _sample(denoise, alpha_bar, steps=50, eta=0.0, batch=4000, tau=0, guidance=1.0, seed=0,
            condition=None, condition_without_last=None):
  shape = (batch, 2, 1, 1, 1)
  condition = jnp.zeros(shape) if condition is None else condition
  without = jnp.zeros(shape) if condition_without_last is None else condition_without_last
  return samplers.ddim_sample(
      denoise, jax.random.key(seed), image_condition=condition,
      image_condition_without_last=without, context=jnp.zeros((batch, 1, 1)),
      null_context=jnp.zeros((batch, 1, 1)), alpha_bar=alpha_bar,
      timesteps=jnp.asarray(samplers.sampling_timesteps(1000, steps, "trailing")),
      tau=jnp.int32(tau), guidance_scale=jnp.float32(guidance), eta=jnp.float32(eta))


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_recovers_gaussian_data(eta):
  alpha_bar = jnp.asarray(schedules.alphas_cumprod(_diffusion_config()))
  # With every training timestep the DDIM discretisation error vanishes (50 steps of this
  # linear schedule shrink the std by ~12%).
  samples = np.asarray(_sample(_gaussian_denoiser(alpha_bar, 0.5, 0.2), alpha_bar, steps=1000,
                               eta=eta))
  assert abs(samples.mean() - 0.5) < 0.01
  assert abs(samples.std() - 0.2) < 0.01


def test_guidance_scale_one_is_the_conditional_model():
  alpha_bar = jnp.asarray(schedules.alphas_cumprod(_diffusion_config()))
  def denoise(model_input, timesteps, context):  # The "text" shifts the data mean.
    return _gaussian_denoiser(alpha_bar, 0.0, 0.2)(model_input, timesteps, None) + context[
        :, :1, :1, None, None]
  x = jnp.ones((2, 2, 1, 1, 2))
  context, null = jnp.full((2, 1, 1), 0.3), jnp.zeros((2, 1, 1))
  guided = samplers.guided_prediction(denoise, x, jnp.int32(10), context, null, 1.0)
  np.testing.assert_allclose(guided, denoise(x, jnp.full((2,), 10), context), atol=1e-6)


def _condition_sensitive_denoiser(alpha_bar):
  """Gaussian denoiser whose data mean is the condition channel: the condition matters."""
  def denoise(model_input, timesteps, context):
    del context
    condition = model_input[..., 1:].mean(axis=1, keepdims=True)
    return _gaussian_denoiser(alpha_bar, condition, 0.2)(model_input, timesteps, None)
  return denoise


@pytest.mark.parametrize("tau", [0, 3, 10])
def test_tau_counts_leading_steps(tau):
  """tau=0 never sees the last frame (bitwise); tau=steps is 'always conditioned'."""
  alpha_bar = jnp.asarray(schedules.alphas_cumprod(_diffusion_config()))
  denoise = _condition_sensitive_denoiser(alpha_bar)
  without = jnp.zeros((8, 2, 1, 1, 1))
  run = lambda with_last, tau, without=without: np.asarray(_sample(
      denoise, alpha_bar, steps=10, batch=8, tau=tau, condition=with_last,
      condition_without_last=without))
  a, b = run(without.at[:, -1].set(1.0), tau), run(without.at[:, -1].set(-1.0), tau)
  if tau == 0:
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, run(without, 10))
  else:
    assert np.abs(a - b).min() > 1e-3
  if tau == 10:
    with_last = without.at[:, -1].set(1.0)
    np.testing.assert_array_equal(a, run(with_last, 0, without=with_last))


def test_training_conditions_follow_the_paper():
  config = unit_test.get_config()
  config.conditioning.noise_timestep = 0
  config.conditioning.last_frame_drop_prob = 0.0
  config.conditioning.text_drop_prob = 0.0
  batch, frames = 64, 6
  latents = jnp.broadcast_to(jnp.arange(frames, dtype=jnp.float32)[None, :, None, None, None],
                             (batch, frames, 2, 2, 3))
  tokens = jnp.ones((batch, 4), jnp.int32)
  alpha_bar = jnp.asarray(schedules.alphas_cumprod(config.diffusion))
  c_image, _ = conditioning.training_conditions(jax.random.key(0), latents, tokens,
                                                jnp.zeros(4, jnp.int32), alpha_bar, config)
  c_image = np.asarray(c_image)
  assert np.all(c_image[:, 0] == 0.0)  # Frame 0 is the first frame.
  assert np.all(c_image[:, 1:-1] == 0.0)  # Zeros in between.
  assert set(np.unique(c_image[:, -1])) == {3.0, 4.0, 5.0}  # Drawn from the last 3.


def test_training_condition_dropouts():
  config = unit_test.get_config()
  config.conditioning.noise_timestep = 100
  config.conditioning.last_frame_drop_prob = 0.25
  config.conditioning.text_drop_prob = 0.5
  batch = 2000
  latents = jnp.ones((batch, 4, 1, 1, 1))
  tokens = jnp.ones((batch, 3), jnp.int32)
  alpha_bar = jnp.asarray(schedules.alphas_cumprod(config.diffusion))
  c_image, ids = conditioning.training_conditions(jax.random.key(0), latents, tokens,
                                                  jnp.zeros(3, jnp.int32), alpha_bar, config)
  dropped_last = np.mean(np.asarray(c_image[:, -1, 0, 0, 0]) == 0.0)
  dropped_text = np.mean(np.asarray(ids[:, 0]) == 0)
  assert abs(dropped_last - 0.25) < 0.04 and abs(dropped_text - 0.5) < 0.05
  # Noise of timestep 100: the first frame is no longer exactly the clean latent.
  first = np.asarray(c_image[:, 0, 0, 0, 0])
  expected_std = np.sqrt(1 - alpha_bar[100])
  assert abs(first.std() - expected_std) < 0.03
  assert abs(first.mean() - np.sqrt(alpha_bar[100])) < 0.03
