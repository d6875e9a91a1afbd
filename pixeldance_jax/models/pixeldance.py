"""The trainable PixelDance network: CLIP-style text encoder + 3D U-Net, one parameter tree.

Parameters: `{"text_encoder": ..., "unet": ...}`. The autoencoder is frozen and separate: its
weights are the "frozen" tree, `{"autoencoder": ...}` for the KL VAE, `{}` for space_to_depth.
`abstract_weights` gives the shapes and shardings of both, which training (with the optimiser
around them) and sampling (without) restore or initialise onto.
"""

import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from pixeldance_jax.models import autoencoder_kl, text_encoder, unet3d
from pixeldance_jax.parallel import sharding

Array = jax.Array
Params = Any


class PixelDance(nn.Module):
  unet_spec: unet3d.UNetSpec
  text_spec: text_encoder.TextEncoderSpec

  def setup(self):
    self.text_encoder = text_encoder.TextEncoder(self.text_spec)
    self.unet = unet3d.UNet3D(self.unet_spec)

  def encode_text(self, token_ids: Array) -> Array:
    """`[batch, length]` -> `[batch, length, hidden]`."""
    return self.text_encoder(token_ids)

  def denoise(self, model_input: Array, timesteps: Array, context: Array,
              use_temporal: bool = True, deterministic: bool = True) -> Array:
    """`[b, f, h, w, 2c]` (noisy latent ++ c_image, ++ the keyframe mask where configured)
    -> prediction `[b, f, h, w, c]`."""
    return self.unet(model_input, timesteps, context, use_temporal, deterministic)

  def __call__(self, model_input: Array, timesteps: Array, token_ids: Array) -> Array:
    return self.denoise(model_input, timesteps, self.encode_text(token_ids))


def make_model(config: ml_collections.ConfigDict) -> PixelDance:
  return PixelDance(unet3d.UNetSpec.from_config(config),
                    text_encoder.TextEncoderSpec.from_config(config))


def dummy_inputs(config: ml_collections.ConfigDict, batch: int = 1) -> tuple[Array, Array, Array]:
  """Zero inputs of the configured shapes, for `init` and `eval_shape`."""
  size = config.data.image_size // config.autoencoder.patch_size
  channels = 2 * config.autoencoder.latent_channels + unet3d.UNetSpec.from_config(
      config).mask_channels
  model_input = jnp.zeros((batch, config.data.frames, size, size, channels), jnp.float32)
  return (model_input, jnp.zeros((batch,), jnp.int32),
          jnp.zeros((batch, config.text_encoder.max_length), jnp.int32))


def _init_frozen(rng: Array, config: ml_collections.ConfigDict) -> Params:
  """Randomly initialised frozen weights: their shapes; the values come from a converted
  checkpoint (`config.init_from`)."""
  if config.autoencoder.kind != "kl":
    return {}
  spec = autoencoder_kl.AutoencoderKLSpec.from_config(config)
  size = 8 * spec.downsample_factor
  variables = autoencoder_kl.AutoencoderKL(spec).init(rng, jnp.zeros((1, size, size, 3)))
  return {"autoencoder": flax.core.unfreeze(variables["params"])}


def init_boxed_params(rng: Array, config: ml_collections.ConfigDict) -> Params:
  """The trainable params, logically boxed (`nn.LogicallyPartitioned`: values + axis names)."""
  return flax.core.unfreeze(make_model(config).init(rng, *dummy_inputs(config))["params"])


def init_boxed_weights(rng: Array, config: ml_collections.ConfigDict) -> tuple[Params, Params]:
  """(params, frozen), logically boxed: the values, shapes and axis names of every weight."""
  model_rng, frozen_rng = jax.random.split(rng)
  return init_boxed_params(model_rng, config), _init_frozen(frozen_rng, config)


def abstract_weights(config: ml_collections.ConfigDict, mesh: Mesh) -> tuple[Params, Params]:
  """(params, frozen) as ShapeDtypeStructs carrying their shardings on `mesh`; nothing is
  materialised and there is no optimiser state (what sampling restores)."""
  boxed = jax.eval_shape(functools.partial(init_boxed_weights, config=config),
                         jax.random.key(0))
  return sharding.abstract_tree(boxed, mesh, sharding.logical_rules(config))


def init_weights(config: ml_collections.ConfigDict, mesh: Mesh, rng: Array
                 ) -> tuple[Params, Params]:
  """(params, frozen) initialised directly into their shards (never on one device first)."""
  params, frozen = abstract_weights(config, mesh)
  out_shardings = jax.tree.map(lambda x: x.sharding, (params, frozen))
  init = lambda r: nn.meta.unbox(init_boxed_weights(r, config))
  return jax.jit(init, out_shardings=out_shardings)(rng)
