"""Schedules, conditioning and the samplers (DDIM, DDPM, DPM-Solver++) on analytic denoisers."""

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


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample", "sample_skip"])
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


def test_the_skip_parameterisation_is_the_clean_latents_loss_with_z_t_passed_through():
  """'sample_skip': z_0 = c_skip z_t / sqrt(alpha_bar) + c_out F; its weighted loss is the
  squared error of that z_0, and at low noise z_0 is nearly z_t whatever F is."""
  alpha_bar = jnp.asarray(schedules.alphas_cumprod(_diffusion_config()))
  clean = jax.random.normal(jax.random.key(0), (3, 5))
  noise = jax.random.normal(jax.random.key(1), (3, 5))
  output = jax.random.normal(jax.random.key(2), (3, 5))  # Any model output.
  t = jnp.array([0, 500, 999])
  noisy = schedules.add_noise(alpha_bar, clean, noise, t)
  target = losses.target("sample_skip", alpha_bar, clean, noise, t)
  _, x0 = schedules.split_prediction(output, noisy, alpha_bar[t][:, None], "sample_skip")
  np.testing.assert_allclose(
      losses.per_example_mse(output, target) * losses.weight("sample_skip", alpha_bar, t),
      losses.per_example_mse(x0, clean), rtol=1e-4)
  c_skip, c_out = schedules.skip_scalings(alpha_bar[jnp.array([0, 999])])
  assert c_skip[0] > 0.999 and c_out[0] < 0.02 and c_skip[1] < 0.01
  np.testing.assert_array_equal(losses.weight("sample", alpha_bar, t), 1.0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample", "sample_skip"])
def test_min_snr_weighting_is_the_clean_latents_error_times_the_capped_snr(prediction_type):
  """Min-SNR-gamma: whatever the model predicts, the weighted loss is min(SNR, gamma) times the
  squared error of the z_0 its output implies (Hang et al., 2023, eq. 7)."""
  alpha_bar = jnp.asarray(schedules.alphas_cumprod(_diffusion_config()))
  clean = jax.random.normal(jax.random.key(0), (4, 5))
  noise = jax.random.normal(jax.random.key(1), (4, 5))
  output = jax.random.normal(jax.random.key(2), (4, 5))  # Any model output.
  t = jnp.array([0, 100, 500, 999])
  noisy = schedules.add_noise(alpha_bar, clean, noise, t)
  _, x0 = schedules.split_prediction(output, noisy, alpha_bar[t][:, None], prediction_type)
  snr = alpha_bar[t] / (1 - alpha_bar[t])
  loss = losses.per_example_loss(prediction_type, output, alpha_bar, clean, noise, t,
                                 min_snr_gamma=5.0)
  np.testing.assert_allclose(loss, jnp.minimum(snr, 5.0) * losses.per_example_mse(x0, clean),
                             rtol=2e-3)
  unweighted = losses.per_example_loss(prediction_type, output, alpha_bar, clean, noise, t)
  if prediction_type != "sample_skip":  # Its own c_out^2 weight: the test above.
    np.testing.assert_allclose(unweighted, losses.per_example_mse(
        output, losses.target(prediction_type, alpha_bar, clean, noise, t)), rtol=1e-6)


@pytest.mark.parametrize("spacing,first,last", [("trailing", 999, 39), ("leading", 960, 0),
                                                ("linspace", 999, 0)])
def test_sampling_timesteps(spacing, first, last):
  steps = samplers.sampling_timesteps(1000, 25, spacing)
  assert steps.shape == (25,) and steps[0] == first and steps[-1] == last
  assert np.all(np.diff(steps) < 0)


def _gaussian_denoiser(alpha_bar, mean, std, prediction_type="epsilon"):
  """The exact model for data ~ N(mean, std^2): E[eps | z_t] in closed form, as eps, v or z_0."""
  def denoise(model_input, timesteps, context):
    del context
    noisy = model_input[..., :1]
    a = alpha_bar[timesteps].reshape(-1, 1, 1, 1, 1)
    variance = a * std ** 2 + (1 - a)
    epsilon = jnp.sqrt(1 - a) * (noisy - jnp.sqrt(a) * mean) / variance
    clean = (noisy - jnp.sqrt(1 - a) * epsilon) / jnp.sqrt(a)
    c_skip, c_out = schedules.skip_scalings(a)
    return {"epsilon": epsilon, "sample": clean,
            "v_prediction": jnp.sqrt(a) * epsilon - jnp.sqrt(1 - a) * clean,
            "sample_skip": (clean - c_skip * noisy / jnp.sqrt(a)) / c_out}[prediction_type]
  return denoise


def _sample(denoise, alpha_bar, steps=50, eta=0.0, batch=4000, tau=0, guidance=1.0, seed=0,
            condition=None, condition_without_last=None, sampler="ddim",
            prediction_type="epsilon"):
  shape = (batch, 2, 1, 1, 1)
  condition = jnp.zeros(shape) if condition is None else condition
  without = jnp.zeros(shape) if condition_without_last is None else condition_without_last
  return samplers.sample(
      denoise, jax.random.split(jax.random.key(seed), batch), image_condition=condition,
      image_condition_without_last=without, context=jnp.zeros((batch, 1, 1)),
      null_context=jnp.zeros((batch, 1, 1)),
      schedule=samplers.make_schedule(np.asarray(alpha_bar), steps, "trailing"),
      tau=jnp.int32(tau), guidance_scale=jnp.float32(guidance), eta=jnp.float32(eta),
      sampler=sampler, prediction_type=prediction_type)


# Steps at which each sampler's discretisation error is within the tolerance for this narrow
# data (std 0.2) on the linear schedule: 50 steps shrink the std by 13% (DDIM), 21% (DDPM),
# 6% (DPM-Solver++(2M)); 100 DPM-Solver++ steps by 1.5%.
CONVERGED_STEPS = {"ddim": 1000, "ddpm": 1000, "dpmpp_2m": 100}


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0),
                                         ("dpmpp_2m", 0.0)])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample", "sample_skip"])
def test_samplers_recover_gaussian_data(sampler, eta, prediction_type):
  alpha_bar = jnp.asarray(schedules.alphas_cumprod(_diffusion_config()))
  denoise = _gaussian_denoiser(alpha_bar, 0.5, 0.2, prediction_type)
  samples = np.asarray(_sample(denoise, alpha_bar, steps=CONVERGED_STEPS[sampler], eta=eta,
                               sampler=sampler, prediction_type=prediction_type))
  assert abs(samples.mean() - 0.5) < 0.01
  assert abs(samples.std() - 0.2) < 0.01


@pytest.mark.parametrize("sampler,order", [("ddim", 1), ("dpmpp_2m", 2)])
def test_ode_samplers_converge_at_their_order(sampler, order):
  """Doubling the steps divides the error (against a 1000-step solution) by about 2^order."""
  alpha_bar = jnp.asarray(schedules.alphas_cumprod(_diffusion_config()))
  denoise = _gaussian_denoiser(alpha_bar, 0.5, 0.2)
  run = lambda steps: np.asarray(_sample(denoise, alpha_bar, steps, batch=1000, sampler=sampler))
  reference = run(1000)
  error = lambda steps: np.sqrt(np.mean((run(steps) - reference) ** 2))
  ratio = error(50) / error(100)
  assert 2 ** order * 0.8 < ratio < 2 ** order * 1.5, ratio


def test_unknown_sampler_is_refused():
  alpha_bar = jnp.asarray(schedules.alphas_cumprod(_diffusion_config()))
  with pytest.raises(ValueError, match="dpm_solver"):
    _sample(_gaussian_denoiser(alpha_bar, 0.0, 1.0), alpha_bar, batch=2, sampler="dpm_solver")


def test_guidance_scale_one_is_the_conditional_model():
  alpha_bar = jnp.asarray(schedules.alphas_cumprod(_diffusion_config()))
  def denoise(model_input, timesteps, context):  # The "text" is the data mean.
    mean = context[:, :1, :1, None, None]
    return _gaussian_denoiser(alpha_bar, mean, 0.2)(model_input, timesteps, None)
  x = jnp.ones((2, 2, 1, 1, 2))
  context, null = jnp.full((2, 1, 1), 0.3), jnp.zeros((2, 1, 1))
  guided = samplers.guided_prediction(denoise, x, jnp.int32(10), context, null, 1.0)
  np.testing.assert_allclose(guided, denoise(x, jnp.full((2,), 10), context), atol=1e-6)
  # A whole run at scale 1 equals the conditional model alone (both branches conditional).
  batch = 4000
  run = lambda null_value: np.asarray(samplers.sample(
      denoise, jax.random.split(jax.random.key(0), batch),
      image_condition=jnp.zeros((batch, 2, 1, 1, 1)),
      image_condition_without_last=jnp.zeros((batch, 2, 1, 1, 1)),
      context=jnp.full((batch, 1, 1), 0.3), null_context=jnp.full((batch, 1, 1), null_value),
      schedule=samplers.make_schedule(np.asarray(alpha_bar), 100), tau=0, guidance_scale=1.0,
      sampler="dpmpp_2m"))
  guided, conditional = run(0.0), run(0.3)
  np.testing.assert_allclose(guided, conditional, atol=1e-5)
  assert abs(guided.mean() - 0.3) < 0.01 and abs(guided.std() - 0.2) < 0.01


def test_guidance_rescale_matches_diffusers():
  torch = pytest.importorskip("torch")
  from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion as sd
  guided = np.random.default_rng(0).normal(size=(3, 2, 4, 4, 2)).astype(np.float32) * 3
  conditional = np.random.default_rng(1).normal(size=guided.shape).astype(np.float32)
  rescale = np.array([0.0, 0.7, 1.0], np.float32)
  ours = samplers.rescale_guidance(jnp.asarray(guided), jnp.asarray(conditional),
                                   jnp.asarray(rescale))
  for i, phi in enumerate(rescale):
    theirs = sd.rescale_noise_cfg(torch.from_numpy(guided[i:i + 1]),
                                  torch.from_numpy(conditional[i:i + 1]), float(phi))
    np.testing.assert_allclose(ours[i:i + 1], theirs.numpy(), rtol=1e-5, atol=1e-5)


def _step_inputs(latents, prediction, schedule, i, previous_clean, noise,
                 prediction_type="epsilon"):
  """What `samplers.sample` hands a sampler at step i, for stepping by hand."""
  schedule_at = lambda name, index: getattr(schedule, name)[index]
  a_t = schedule_at("alpha_bar", i)
  epsilon, clean = schedules.split_prediction(prediction, latents, a_t, prediction_type)
  return samplers.StepInputs(
      latents=latents, epsilon=epsilon, clean=clean, previous_clean=previous_clean,
      alpha_bar=a_t, alpha_bar_prev=schedule_at("alpha_bar_prev", i),
      alpha_bar_before=schedule_at("alpha_bar", max(i - 1, 0)), has_history=jnp.bool_(i > 0),
      noise=noise, eta=jnp.float32(0.0))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_dpm_solver_2m_matches_diffusers(prediction_type):
  """A whole 25-step trajectory against DPMSolverMultistepScheduler's defaults."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  config = _diffusion_config("scaled_linear")
  config.beta_start, config.beta_end = 0.00085, 0.012
  scheduler = diffusers.DPMSolverMultistepScheduler(
      num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
      beta_end=0.012, prediction_type=prediction_type, timestep_spacing="trailing")
  scheduler.set_timesteps(25)
  alpha_bar = jnp.asarray(schedules.alphas_cumprod(config))
  schedule = samplers.make_schedule(np.asarray(alpha_bar), 25, "trailing")
  np.testing.assert_array_equal(scheduler.timesteps.numpy(), schedule.timesteps[:25])
  denoise = _gaussian_denoiser(alpha_bar, 0.5, 0.2, prediction_type)
  start = np.random.default_rng(0).normal(size=(2, 2, 1, 1, 1)).astype(np.float32)
  theirs, ours, previous_clean = torch.from_numpy(start), jnp.asarray(start), jnp.zeros_like(start)
  for i, t in enumerate(scheduler.timesteps):
    output = np.array(denoise(jnp.asarray(theirs.numpy()), jnp.full((2,), int(t)), None))
    theirs = scheduler.step(torch.from_numpy(output), t, theirs).prev_sample
    inputs = _step_inputs(ours, denoise(ours, jnp.full((2,), int(t)), None), schedule, i,
                          previous_clean, None, prediction_type)
    ours, previous_clean = samplers.dpm_solver_2m_step(inputs), inputs.clean
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-4, atol=1e-4, err_msg=f"step {i}")


def test_ddpm_step_matches_diffusers():
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                      clip_sample=False, timestep_spacing="trailing")
  scheduler.set_timesteps(25)
  alpha_bar = jnp.asarray(schedules.alphas_cumprod(_diffusion_config()))
  schedule = samplers.make_schedule(np.asarray(alpha_bar), 25, "trailing")
  rng = np.random.default_rng(0)
  for i in (0, 12, 24):  # First, middle, last (no noise) step.
    t = int(schedule.timesteps[i])
    latents = rng.normal(size=(2, 3)).astype(np.float32)
    output = rng.normal(size=(2, 3)).astype(np.float32)
    generator = torch.Generator().manual_seed(i)
    theirs = scheduler.step(torch.from_numpy(output), t, torch.from_numpy(latents),
                            generator=generator).prev_sample
    noise = torch.randn((2, 3), generator=torch.Generator().manual_seed(i)).numpy()
    ours = samplers.ddpm_step(_step_inputs(jnp.asarray(latents), jnp.asarray(output), schedule,
                                           i, None, jnp.asarray(noise)))
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-5, atol=1e-5, err_msg=f"step {i}")


def test_changing_the_schedule_does_not_recompile():
  """Steps, spacing, tau, guidance and eta are traced: one program for all of them."""
  alpha_bar = jnp.asarray(schedules.alphas_cumprod(_diffusion_config()))
  traces = []
  def denoise(model_input, timesteps, context):
    traces.append(1)
    return _gaussian_denoiser(alpha_bar, 0.0, 1.0)(model_input, timesteps, context)
  run = jax.jit(lambda schedule, tau, guidance, eta: samplers.sample(
      denoise, jax.random.split(jax.random.key(0), 2), image_condition=jnp.zeros((2, 2, 1, 1, 1)),
      image_condition_without_last=jnp.zeros((2, 2, 1, 1, 1)), context=jnp.zeros((2, 1, 1)),
      null_context=jnp.zeros((2, 1, 1)), schedule=schedule, tau=tau, guidance_scale=guidance,
      eta=eta))
  for steps, spacing, tau in [(10, "trailing", 0), (25, "leading", 3), (7, "linspace", 7)]:
    run(samplers.make_schedule(np.asarray(alpha_bar), steps, spacing), jnp.int32(tau),
        jnp.float32(tau + 1.0), jnp.float32(tau / 10))
  assert len(traces) == 1


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


def test_switched_off_conditions_are_dropped_with_probability_one():
  config = unit_test.get_config()
  assert conditioning.rates(config) == {"text_drop_prob": 0.1, "last_frame_drop_prob": 0.25,
                                        "first_frame_weight": 1.0,
                                        "last_frame_warmup_steps": 0.0}
  config.conditioning.use_text = False
  config.conditioning.use_last_frame = False
  config.conditioning.use_first_frame = False
  assert conditioning.rates(config) == {"text_drop_prob": 1.0, "last_frame_drop_prob": 1.0,
                                        "first_frame_weight": 0.0,
                                        "last_frame_warmup_steps": 0.0}
  config.conditioning.last_frame_drop_prob = 1.5
  with pytest.raises(ValueError, match="last_frame_drop_prob=1.5 is a probability"):
    conditioning.rates(config)


def test_last_frame_warmup_drops_every_last_frame_until_its_step():
  config = unit_test.get_config()
  config.conditioning.noise_timestep = 0
  config.conditioning.last_frame_warmup_steps = 10
  rates = {k: jnp.float32(v) for k, v in conditioning.rates(config).items()}
  latents = jnp.ones((2000, 4, 1, 1, 1))
  alpha_bar = jnp.asarray(schedules.alphas_cumprod(config.diffusion))
  kept = []
  for step in (0, 9, 10):
    c_image, _ = conditioning.training_conditions(
        jax.random.key(0), latents, jnp.ones((2000, 3), jnp.int32), jnp.zeros(3, jnp.int32),
        alpha_bar, config, conditioning.rates_at_step(rates, jnp.int32(step)))
    kept.append(float(np.mean(np.asarray(c_image[:, -1, 0, 0, 0]) != 0.0)))
  assert kept[:2] == [0.0, 0.0] and abs(kept[2] - 0.75) < 0.04
