"""The jitted PixelDance train step."""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from pixeldance_jax.data import conditioning
from pixeldance_jax.diffusion import losses, schedules
from pixeldance_jax.models import autoencoder as autoencoder_lib
from pixeldance_jax.models import pixeldance, tokenizer
from pixeldance_jax.parallel import mesh as mesh_lib
from pixeldance_jax.parallel import sharding
from pixeldance_jax.train import state as state_lib

Array = jax.Array
Batch = dict[str, Array]


def video_to_pixels(video: Array) -> Array:
  """uint8 `[..., 3]` -> float32 in [-1, 1]."""
  return video.astype(jnp.float32) / 127.5 - 1.0


def null_token_ids(config: ml_collections.ConfigDict) -> Array:
  """Token ids of the empty prompt, the unconditional branch of classifier-free guidance."""
  text = config.text_encoder
  return jnp.asarray(tokenizer.empty_prompt_tokens(text.max_length, text.pad_token_id))


def loss_fn(params, frozen, batch: Batch, rng: Array, config: ml_collections.ConfigDict,
            use_temporal: bool = True) -> tuple[Array, dict[str, Array]]:
  """Denoising loss of one batch; conditions and noise are drawn from `rng`.

  `frozen` holds the pretrained weights that are not trained (the KL autoencoder's).
  """
  model = pixeldance.make_model(config)
  autoencoder = autoencoder_lib.make_autoencoder(config, frozen.get("autoencoder"))
  alpha_bar = jnp.asarray(schedules.alphas_cumprod(config.diffusion))
  cond_rng, time_rng, noise_rng, dropout_rng, encode_rng = jax.random.split(rng, 5)

  latents = autoencoder.encode(video_to_pixels(batch["video"]), encode_rng)
  image_condition, token_ids = conditioning.training_conditions(
      cond_rng, latents, batch["tokens"], null_token_ids(config), alpha_bar, config)
  batch_size = latents.shape[0]
  timesteps = jax.random.randint(time_rng, (batch_size,), 0, config.diffusion.num_train_timesteps)
  noise = jax.random.normal(noise_rng, latents.shape, latents.dtype)
  noisy = schedules.add_noise(alpha_bar, latents, noise, timesteps)

  variables = {"params": params}
  context = model.apply(variables, token_ids, method=pixeldance.PixelDance.encode_text)
  if not config.text_encoder.trainable:
    context = jax.lax.stop_gradient(context)
  prediction = model.apply(variables, jnp.concatenate([noisy, image_condition], axis=-1),
                           timesteps, context, use_temporal, False,
                           method=pixeldance.PixelDance.denoise, rngs={"dropout": dropout_rng})
  target = losses.target(config.diffusion.prediction_type, alpha_bar, latents, noise, timesteps)
  per_example = losses.per_example_mse(prediction, target)
  return per_example.mean(), {"loss": per_example.mean()}


def _update(state: state_lib.TrainState, grads, config: ml_collections.ConfigDict
            ) -> state_lib.TrainState:
  tx = state_lib.make_optimizer(config)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay = state_lib.ema_decay(config, state.step)
  ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
  return state.replace(step=state.step + 1, params=params, ema_params=ema_params,
                       opt_state=opt_state)


def train_step(state: state_lib.TrainState, batch: Batch, base_rng: Array,
               config: ml_collections.ConfigDict, use_temporal: bool = True
               ) -> tuple[state_lib.TrainState, dict[str, Array]]:
  """One optimiser step. A non-finite loss or gradient leaves the state unchanged.

  The step's randomness is `fold_in(base_rng, step)`, so a resumed run replays it exactly.
  """
  rng = jax.random.fold_in(base_rng, state.step)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (loss, metrics), grads = grad_fn(state.params, state.frozen, batch, rng, config, use_temporal)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  new_state = _update(state, grads, config)
  new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
  metrics.update(grad_norm=grad_norm, finite=finite,
                 learning_rate=state_lib.learning_rate_schedule(config)(state.step))
  return new_state, metrics


def jit_train_step(config: ml_collections.ConfigDict, mesh: Mesh, state_shardings: Any,
                   use_temporal: bool = True):
  """`train_step` jitted over the mesh with the state donated."""
  step = functools.partial(train_step, config=config, use_temporal=use_temporal)
  rules = sharding.logical_rules(config)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def step_in_mesh(state, batch, rng):
    with nn.logical_axis_rules(rules):
      return step(state, batch, rng)

  jitted = jax.jit(step_in_mesh, donate_argnums=0,
                   in_shardings=(state_shardings, mesh_lib.batch_sharding(mesh), replicated),
                   out_shardings=(state_shardings, replicated))

  def run(state, batch, rng):
    # The mesh context lets activation constraints (logical names) resolve while tracing.
    with jax.set_mesh(mesh):
      return jitted(state, batch, rng)

  return run
