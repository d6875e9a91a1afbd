"""The trainable PixelDance network: CLIP-style text encoder + 3D U-Net, one parameter tree.

Parameters: `{"text_encoder": ..., "unet": ...}`. The autoencoder is frozen and separate.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from pixeldance_jax.models import text_encoder, unet3d

Array = jax.Array


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
    """`[b, f, h, w, 2c]` (noisy latent ++ c_image) -> prediction `[b, f, h, w, c]`."""
    return self.unet(model_input, timesteps, context, use_temporal, deterministic)

  def __call__(self, model_input: Array, timesteps: Array, token_ids: Array) -> Array:
    return self.denoise(model_input, timesteps, self.encode_text(token_ids))


def make_model(config: ml_collections.ConfigDict) -> PixelDance:
  return PixelDance(unet3d.UNetSpec.from_config(config),
                    text_encoder.TextEncoderSpec.from_config(config))


def dummy_inputs(config: ml_collections.ConfigDict, batch: int = 1) -> tuple[Array, Array, Array]:
  """Zero inputs of the configured shapes, for `init` and `eval_shape`."""
  size = config.data.image_size // config.autoencoder.patch_size
  channels = 2 * config.autoencoder.latent_channels
  model_input = jnp.zeros((batch, config.data.frames, size, size, channels), jnp.float32)
  return (model_input, jnp.zeros((batch,), jnp.int32),
          jnp.zeros((batch, config.text_encoder.max_length), jnp.int32))
