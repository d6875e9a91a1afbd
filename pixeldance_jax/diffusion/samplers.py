"""Samplers with PixelDance's last-frame schedule and text-only classifier-free guidance.

The whole denoising loop is one `lax.fori_loop`. Everything that changes between calls of the
same shape is a traced array: the step schedule (padded to a fixed length, with the number of
steps traced), tau, the guidance scale and its rescale factor (per example), and eta. So a
jitted caller compiles once per batch shape and sampler; changing tau, the guidance, the number
of steps or their spacing reuses the program.

Samplers (`SAMPLERS`): DDIM with eta (Song et al. 2021), DDPM ancestral (Ho et al. 2020, the
"fixed_small" posterior variance) and DPM-Solver++(2M) (Lu et al. 2022), each on epsilon,
v- or z_0-predicting models. They follow diffusers' DDIMScheduler, DDPMScheduler and
DPMSolverMultistepScheduler (defaults) and are tested against the last two.
"""

from collections.abc import Callable
from typing import NamedTuple

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
  """Descending training timesteps visited by an N-step sampler (diffusers' DDIM conventions).

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


class Schedule(NamedTuple):
  """An N-step schedule as arrays of a fixed length L >= N (entries past N are never read).

  Step i moves the latent from timestep `timesteps[i]` (noise level `alpha_bar[i]`) to the
  next, less noisy one (`alpha_bar_prev[i]`; 1, i.e. clean, after the last step).
  """
  timesteps: Array  # int32 [L]
  alpha_bar: Array  # float32 [L]
  alpha_bar_prev: Array  # float32 [L]
  num_steps: Array  # int32 []


def make_schedule(alpha_bar: np.ndarray, num_steps: int, spacing: str = "trailing",
                  length: int | None = None) -> Schedule:
  """The schedule of `num_steps` steps, padded to `length` (default: T, one program for all N)."""
  timesteps = sampling_timesteps(len(alpha_bar), num_steps, spacing)
  length = len(alpha_bar) if length is None else length
  if length < num_steps:
    raise ValueError(f"schedule length {length} is shorter than steps={num_steps}")
  at_t = alpha_bar[timesteps]
  at_prev = np.append(at_t[1:], 1.0)
  pad = lambda values: np.pad(values, (0, length - num_steps), mode="edge")
  return Schedule(timesteps=jnp.asarray(pad(timesteps), jnp.int32),
                  alpha_bar=jnp.asarray(pad(at_t), jnp.float32),
                  alpha_bar_prev=jnp.asarray(pad(at_prev), jnp.float32),
                  num_steps=jnp.asarray(num_steps, jnp.int32))


def _per_example(values: Array, like: Array) -> Array:
  """`[b]` -> `[b, 1, ..., 1]` to broadcast against `like`."""
  return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))


def rescale_guidance(guided: Array, conditional: Array, rescale: Array) -> Array:
  """Lin et al. 2023 (sec. 3.4): pull the guided output's std back to the conditional one's.

  `rescale` `[b]` mixes the rescaled and the plain guided output; 0 leaves it exactly as is.
  """
  axes = tuple(range(1, guided.ndim))
  ratio = jnp.std(conditional, axis=axes, keepdims=True) / jnp.maximum(
      jnp.std(guided, axis=axes, keepdims=True), 1e-12)
  rescale = _per_example(rescale, guided)
  mixed = rescale * guided * ratio + (1.0 - rescale) * guided
  return jnp.where(rescale > 0, mixed, guided)


def guided_prediction(denoise_fn: DenoiseFn, model_input: Array, timestep: Array,
                      context: Array, null_context: Array, guidance_scale: Array,
                      guidance_rescale: Array | float = 0.0) -> Array:
  """Text-only CFG: both branches see the same image condition; one batched forward.

  guidance_scale, guidance_rescale: scalars or per example `[b]`. The branches are interleaved
  (example 0 with and without text, example 1, ...), not concatenated: with the batch sharded,
  each device then keeps its own examples' rows (no exchange between devices), in the same
  places whatever the device count.
  """
  batch = model_input.shape[0]
  pair = lambda a, b: jnp.stack([a, b], axis=1).reshape((2 * batch,) + a.shape[1:])
  both = denoise_fn(pair(model_input, model_input), jnp.full((2 * batch,), timestep, jnp.int32),
                    pair(context, null_context))
  both = both.reshape((batch, 2) + both.shape[1:])
  conditional, unconditional = both[:, 0], both[:, 1]
  scale = _per_example(jnp.broadcast_to(guidance_scale, (batch,)), conditional)
  guided = unconditional + scale * (conditional - unconditional)
  return rescale_guidance(guided, conditional, jnp.broadcast_to(guidance_rescale, (batch,)))


class StepInputs(NamedTuple):
  """What one update z_t -> z_{t_prev} may use; each sampler reads its part."""
  latents: Array  # z_t [b, f, h, w, c]
  epsilon: Array  # the noise the (guided) model implies
  clean: Array  # the z_0 it implies
  previous_clean: Array  # the z_0 of the step before (DPM-Solver's history)
  alpha_bar: Array  # at t
  alpha_bar_prev: Array  # at t_prev (1 after the last step)
  alpha_bar_before: Array  # at the step before t (DPM-Solver)
  has_history: Array  # bool: a step before this one exists
  noise: Array  # fresh N(0, 1) of the latents' shape
  eta: Array


def ddim_step(s: StepInputs) -> Array:
  """DDIM (Song et al. eq. 12); eta=0 is deterministic, eta=1 matches DDPM's variance."""
  variance = (1 - s.alpha_bar_prev) / (1 - s.alpha_bar) * (1 - s.alpha_bar / s.alpha_bar_prev)
  sigma = s.eta * jnp.sqrt(jnp.maximum(variance, 0.0))
  direction = jnp.sqrt(jnp.maximum(1.0 - s.alpha_bar_prev - sigma ** 2, 0.0)) * s.epsilon
  return jnp.sqrt(s.alpha_bar_prev) * s.clean + direction + sigma * s.noise


def ddpm_step(s: StepInputs) -> Array:
  """DDPM ancestral: a draw from the posterior q(z_{t_prev} | z_t, z_0), "fixed_small" variance.

  With skipped timesteps beta is that of the jump, 1 - alpha_bar_t / alpha_bar_prev.
  """
  alpha = s.alpha_bar / s.alpha_bar_prev
  beta = 1.0 - alpha
  clean_coef = jnp.sqrt(s.alpha_bar_prev) * beta / (1.0 - s.alpha_bar)
  latent_coef = jnp.sqrt(alpha) * (1.0 - s.alpha_bar_prev) / (1.0 - s.alpha_bar)
  variance = jnp.maximum((1.0 - s.alpha_bar_prev) / (1.0 - s.alpha_bar) * beta, 1e-20)
  return clean_coef * s.clean + latent_coef * s.latents + jnp.sqrt(variance) * s.noise


def _half_log_snr(alpha_bar: Array) -> Array:
  """lambda = log(alpha / sigma), with alpha^2 = alpha_bar, sigma^2 = 1 - alpha_bar."""
  return 0.5 * (jnp.log(alpha_bar) - jnp.log1p(-alpha_bar))


def dpm_solver_2m_step(s: StepInputs) -> Array:
  """DPM-Solver++(2M), data prediction, diffusers' default "midpoint" form.

  First order (DPM-Solver++ 1 = DDIM) at the first step, which has no history, and at the last,
  which lands on sigma = 0 (diffusers' `final_sigmas_type="zero"`).
  """
  alpha_s, sigma_s = jnp.sqrt(s.alpha_bar), jnp.sqrt(1.0 - s.alpha_bar)
  alpha_t, sigma_t = jnp.sqrt(s.alpha_bar_prev), jnp.sqrt(1.0 - s.alpha_bar_prev)
  decay = (sigma_t * alpha_s) / (sigma_s * alpha_t)  # exp(-h), finite when sigma_t = 0.
  second_order = s.has_history & (s.alpha_bar_prev < 1.0)
  # Placeholders where first order is used keep the unused branch finite.
  target = jnp.where(second_order, s.alpha_bar_prev, 0.5)
  before = jnp.where(second_order, s.alpha_bar_before, 0.25)
  step = _half_log_snr(target) - _half_log_snr(s.alpha_bar)
  previous_step = _half_log_snr(s.alpha_bar) - _half_log_snr(before)
  correction = 0.5 * (s.clean - s.previous_clean) * step / previous_step
  data = jnp.where(second_order, s.clean + correction, s.clean)
  return (sigma_t / sigma_s) * s.latents + alpha_t * (1.0 - decay) * data


SAMPLERS: dict[str, Callable[[StepInputs], Array]] = {
    "ddim": ddim_step,
    "ddpm": ddpm_step,
    "dpmpp_2m": dpm_solver_2m_step,
}


def _check_sampler(sampler: str) -> Callable[[StepInputs], Array]:
  if sampler not in SAMPLERS:
    raise ValueError(f"sampler={sampler!r} is not one of {sorted(SAMPLERS)}")
  return SAMPLERS[sampler]


def _normal(rngs: Array, shape: tuple[int, ...]) -> Array:
  """One N(0, 1) draw `[b, *shape]` per example key, so an example's noise ignores the batch."""
  return jax.vmap(lambda rng: jax.random.normal(rng, shape, jnp.float32))(rngs)


def sample(denoise_fn: DenoiseFn, rngs: Array, *, image_condition: Array,
           image_condition_without_last: Array, context: Array, null_context: Array,
           schedule: Schedule, tau: Array, guidance_scale: Array,
           guidance_rescale: Array | float = 0.0, eta: Array | float = 0.0,
           sampler: str = "ddim", prediction_type: str = "epsilon",
           clip_denoised: bool = False, latent_channels: int | None = None) -> Array:
  """Samples latents `[b, f, h, w, c]` from pure noise.

  Args:
    rngs: one key per example `[b]`; example i's sample depends only on `rngs[i]` and its own
      inputs, not on the batch it is in.
    image_condition: c_image `[b, f, h, w, c]` with the first and last frame latents.
    image_condition_without_last: the same with the last-frame slot zeroed (and any other
      frame that only the first `tau` steps see).
    schedule: see `make_schedule`.
    tau: `[b]` or scalar: the first `tau` sampler steps (counted from pure noise) see the last
      frame; the rest see `image_condition_without_last`. 0 never uses it, >= steps always does.
    guidance_scale, guidance_rescale: `[b]` or scalars (see `guided_prediction`).
    eta: `[b]` or scalar: DDIM's noise scale (0: deterministic); the other samplers ignore it.
    sampler, prediction_type, clip_denoised: static; clip_denoised clips z_0 to [-1, 1].
    latent_channels: static, the sampled latents' channels where c_image has more (a mask);
      default c_image's.
  """
  update = _check_sampler(sampler)
  batch, latent_shape = image_condition.shape[0], image_condition.shape[1:]
  if latent_channels is not None:
    latent_shape = latent_shape[:-1] + (latent_channels,)
  tau = jnp.broadcast_to(jnp.asarray(tau, jnp.int32), (batch,))
  eta = _per_example(jnp.broadcast_to(jnp.asarray(eta, jnp.float32), (batch,)), image_condition)
  init_rngs, step_rngs = jnp.moveaxis(jax.vmap(jax.random.split)(rngs), 1, 0)
  latents = _normal(init_rngs, latent_shape)

  def body(i, carry):
    noisy, previous_clean = carry
    alpha_bar = schedule.alpha_bar[i]
    sees_last = _per_example(i < tau, noisy)
    condition = jnp.where(sees_last, image_condition, image_condition_without_last)
    prediction = guided_prediction(
        denoise_fn, jnp.concatenate([noisy, condition], axis=-1), schedule.timesteps[i],
        context, null_context, guidance_scale, guidance_rescale)
    epsilon, clean = schedules.split_prediction(prediction, noisy, alpha_bar, prediction_type)
    if clip_denoised:
      clean = jnp.clip(clean, -1.0, 1.0)
      epsilon = (noisy - jnp.sqrt(alpha_bar) * clean) / jnp.sqrt(1.0 - alpha_bar)
    step_noise = _normal(jax.vmap(jax.random.fold_in, (0, None))(step_rngs, i), latent_shape)
    inputs = StepInputs(
        latents=noisy, epsilon=epsilon, clean=clean, previous_clean=previous_clean,
        alpha_bar=alpha_bar, alpha_bar_prev=schedule.alpha_bar_prev[i],
        alpha_bar_before=schedule.alpha_bar[jnp.maximum(i - 1, 0)], has_history=i > 0,
        noise=step_noise, eta=eta)
    return update(inputs), clean

  latents, _ = jax.lax.fori_loop(0, schedule.num_steps, body, (latents, jnp.zeros_like(latents)))
  return latents
