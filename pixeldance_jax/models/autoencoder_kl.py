"""The KL autoencoder of Stable Diffusion, laid out like diffusers' `AutoencoderKL`.

Channels-last: images `[n, height, width, 3]`, latents `[n, height / f, width / f, latent]` with
`f = 2 ** (len(block_out_channels) - 1)`. Parameter paths mirror diffusers' module names
(`encoder/down_blocks_0/resnets_0/conv1/kernel` for `encoder.down_blocks.0.resnets.0.conv1.weight`)
so `convert.vae_params_from_torch_state_dict` only renames and transposes.
"""

import dataclasses
import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from pixeldance_jax.models.layers import Upsample, conv, dense, group_norm

Array = jax.Array
Dtype = Any

# diffusers builds every VAE norm with eps=1e-6 (resnets, attention, conv_norm_out).
NORM_EPS = 1e-6
# DiagonalGaussianDistribution clamps the log-variance to this range.
LOGVAR_RANGE = (-30.0, 20.0)


@dataclasses.dataclass(frozen=True)
class AutoencoderKLSpec:
  """Hyper-parameters; the defaults are SD 1.x/2.x's VAE (`vae/config.json`)."""
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  latent_channels: int = 4
  in_channels: int = 3
  scaling_factor: float = 0.18215
  decode_chunk_frames: int = 8  # Images decoded at once; <= 0 decodes everything at once.

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "AutoencoderKLSpec":
    """Reads `config.autoencoder`; its `patch_size` must equal the downsampling factor."""
    ae = config.autoencoder
    spec = cls(block_out_channels=tuple(ae.block_out_channels),
               layers_per_block=ae.layers_per_block, norm_num_groups=ae.norm_num_groups,
               latent_channels=ae.latent_channels, scaling_factor=ae.scaling_factor,
               decode_chunk_frames=ae.decode_chunk_frames)
    # The U-Net sizes its input from patch_size, so a disagreement would fail much later.
    if ae.patch_size != spec.downsample_factor:
      raise ValueError(
          f"config.autoencoder.patch_size={ae.patch_size} but a KL autoencoder with "
          f"block_out_channels={spec.block_out_channels} downsamples by {spec.downsample_factor} "
          "(2 ** (levels - 1)).")
    return spec


def _downsample_conv(features: int, dtype: Dtype, name: str) -> nn.Conv:
  """Stride-2 3x3 conv padded (0, 1) per spatial axis, as diffusers' Downsample2D(padding=0)."""
  return conv(features, (3, 3), dtype, name, strides=2, padding=((0, 1), (0, 1)))


def _norm_silu(groups: int, name: str, x: Array, dtype: Dtype) -> Array:
  return group_norm(groups, name, epsilon=NORM_EPS, silu=True)(x).astype(dtype)


class ResnetBlock(nn.Module):
  """diffusers ResnetBlock2D without a time embedding: `[n, h, w, c_in]` -> `[n, h, w, c_out]`."""
  out_channels: int
  groups: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = conv(self.out_channels, (3, 3), self.dtype, "conv1")(
        _norm_silu(self.groups, "norm1", x, self.dtype))
    h = conv(self.out_channels, (3, 3), self.dtype, "conv2")(
        _norm_silu(self.groups, "norm2", h, self.dtype))
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, (1, 1), self.dtype, "conv_shortcut")(x)
    return x + h


class AttentionBlock(nn.Module):
  """diffusers' single-head VAE Attention with a residual: `[n, h, w, c]` -> same shape."""
  groups: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    n, height, width, channels = x.shape
    h = group_norm(self.groups, "group_norm", epsilon=NORM_EPS)(x).astype(self.dtype)
    h = h.reshape(n, height * width, 1, channels)  # One head of width `channels`.
    q, k, v = (dense(channels, ("embed", "heads"), self.dtype, name)(h)
               for name in ("to_q", "to_k", "to_v"))
    out = jax.nn.dot_product_attention(q, k, v).reshape(n, height, width, channels)
    return x + dense(channels, ("heads", "embed"), self.dtype, "to_out_0")(out)


class MidBlock(nn.Module):
  """diffusers UNetMidBlock2D (resnet, attention, resnet) without time embedding."""
  groups: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    channels = x.shape[-1]
    x = ResnetBlock(channels, self.groups, self.dtype, name="resnets_0")(x)
    x = AttentionBlock(self.groups, self.dtype, name="attentions_0")(x)
    return ResnetBlock(channels, self.groups, self.dtype, name="resnets_1")(x)


class DownEncoderBlock(nn.Module):
  """diffusers DownEncoderBlock2D: resnets, then a stride-2 conv when `downsample`."""
  out_channels: int
  num_layers: int
  groups: int
  downsample: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    for i in range(self.num_layers):
      x = ResnetBlock(self.out_channels, self.groups, self.dtype, name=f"resnets_{i}")(x)
    if self.downsample:
      x = Downsample(self.dtype, name="downsamplers_0")(x)
    return x


class Downsample(nn.Module):
  """diffusers Downsample2D(padding=0): pad bottom/right by one, then a stride-2 3x3 conv."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return _downsample_conv(x.shape[-1], self.dtype, "conv")(x)


class UpDecoderBlock(nn.Module):
  """diffusers UpDecoderBlock2D: resnets, then 2x nearest upsampling + conv when `upsample`."""
  out_channels: int
  num_layers: int
  groups: int
  upsample: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    for i in range(self.num_layers):
      x = ResnetBlock(self.out_channels, self.groups, self.dtype, name=f"resnets_{i}")(x)
    if self.upsample:
      x = Upsample(self.dtype, name="upsamplers_0")(x)  # The U-Net's: same layout.
    return x


class Encoder(nn.Module):
  """Pixels `[n, H, W, in]` -> moments `[n, H / f, W / f, 2 * latent]` (before quant_conv)."""
  spec: AutoencoderKLSpec
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixels: Array) -> Array:
    spec, dtype = self.spec, self.dtype
    groups, last = spec.norm_num_groups, len(spec.block_out_channels) - 1
    h = conv(spec.block_out_channels[0], (3, 3), dtype, "conv_in")(pixels.astype(dtype))
    for level, channels in enumerate(spec.block_out_channels):
      h = DownEncoderBlock(channels, spec.layers_per_block, groups, level < last, dtype,
                           name=f"down_blocks_{level}")(h)
    h = MidBlock(groups, dtype, name="mid_block")(h)
    h = _norm_silu(groups, "conv_norm_out", h, dtype)
    return conv(2 * spec.latent_channels, (3, 3), dtype, "conv_out")(h)


class Decoder(nn.Module):
  """Latents `[n, h, w, latent]` (after post_quant_conv) -> pixels `[n, h * f, w * f, in]`."""
  spec: AutoencoderKLSpec
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, latents: Array) -> Array:
    spec, dtype = self.spec, self.dtype
    groups, last = spec.norm_num_groups, len(spec.block_out_channels) - 1
    h = conv(spec.block_out_channels[-1], (3, 3), dtype, "conv_in")(latents.astype(dtype))
    h = MidBlock(groups, dtype, name="mid_block")(h)
    for level, channels in enumerate(reversed(spec.block_out_channels)):
      h = UpDecoderBlock(channels, spec.layers_per_block + 1, groups, level < last, dtype,
                         name=f"up_blocks_{level}")(h)
    h = _norm_silu(groups, "conv_norm_out", h, dtype)
    return conv(spec.in_channels, (3, 3), dtype, "conv_out")(h)


class AutoencoderKL(nn.Module):
  """diffusers AutoencoderKL. `init` through `__call__` creates every parameter."""
  spec: AutoencoderKLSpec
  dtype: Dtype = jnp.float32

  def setup(self):
    latent = self.spec.latent_channels
    self.encoder = Encoder(self.spec, self.dtype)
    self.quant_conv = conv(2 * latent, (1, 1), self.dtype, "quant_conv")
    self.post_quant_conv = conv(latent, (1, 1), self.dtype, "post_quant_conv")
    self.decoder = Decoder(self.spec, self.dtype)

  def encode(self, pixels: Array) -> tuple[Array, Array]:
    """Pixels `[n, H, W, 3]` in [-1, 1] -> (mean, logvar), each `[n, H / f, W / f, latent]`."""
    moments = self.quant_conv(self.encoder(pixels)).astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def decode(self, latents: Array) -> Array:
    """Unscaled latents `[n, h, w, latent]` -> pixels `[n, h * f, w * f, 3]`, float32."""
    return self.decoder(self.post_quant_conv(latents.astype(self.dtype))).astype(jnp.float32)

  def __call__(self, pixels: Array) -> Array:
    return self.decode(self.encode(pixels)[0])


def _flatten_images(x: Array) -> tuple[Array, tuple[int, ...]]:
  """`[..., h, w, c]` -> (`[n, h, w, c]`, leading shape)."""
  return x.reshape((-1,) + x.shape[-3:]), x.shape[:-3]


def map_in_chunks(fn, images: Array, chunk: int) -> Array:
  """Applies `fn` to `chunk` images at a time with `lax.map`, so one chunk's activations live.

  images `[n, ...]`; `n` is padded up to a multiple of `chunk` and the padding dropped after.
  """
  n = images.shape[0]
  if chunk <= 0 or chunk >= n:
    return fn(images)
  num_chunks = math.ceil(n / chunk)
  padded = jnp.pad(images, [(0, num_chunks * chunk - n)] + [(0, 0)] * (images.ndim - 1))
  out = jax.lax.map(fn, padded.reshape((num_chunks, chunk) + images.shape[1:]))
  return out.reshape((num_chunks * chunk,) + out.shape[2:])[:n]


@flax.struct.dataclass
class KLAutoencoder:
  """A frozen KL autoencoder with the interface of `autoencoder.SpaceToDepth`.

  A pytree whose only leaves are `params`, so it can be passed into `jax.jit` as an argument
  instead of being captured (which would bake the weights into the program as constants).
  """
  params: Any
  module: AutoencoderKL = flax.struct.field(pytree_node=False)
  scaling_factor: float = flax.struct.field(pytree_node=False, default=0.18215)
  decode_chunk_frames: int = flax.struct.field(pytree_node=False, default=8)

  @property
  def latent_channels(self) -> int:
    return self.module.spec.latent_channels

  def encode(self, pixels: Array, rng: Array | None = None) -> Array:
    """Pixels `[..., H, W, 3]` in [-1, 1] -> scaled latents `[..., H / f, W / f, latent]`.

    The posterior mean, or a posterior sample when `rng` is given.
    """
    images, leading = _flatten_images(pixels)
    mean, logvar = self.module.apply({"params": self.params}, images,
                                     method=AutoencoderKL.encode)
    latents = mean
    if rng is not None:
      latents = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
    latents = latents * self.scaling_factor
    return latents.reshape(leading + latents.shape[1:])

  def decode(self, latents: Array) -> Array:
    """Scaled latents `[..., h, w, latent]` -> pixels `[..., h * f, w * f, 3]`, float32.

    Frames are decoded `decode_chunk_frames` at a time: the decoder's full-resolution
    activations dominate memory, and a video's frames would otherwise all be live at once.
    """
    images, leading = _flatten_images(latents / self.scaling_factor)
    decode = lambda chunk: self.module.apply({"params": self.params}, chunk,
                                             method=AutoencoderKL.decode)
    pixels = map_in_chunks(decode, images, self.decode_chunk_frames)
    return pixels.reshape(leading + pixels.shape[1:])


def make_kl_autoencoder(spec: AutoencoderKLSpec, params: Any,
                        dtype: Dtype = jnp.float32) -> KLAutoencoder:
  """Wraps converted parameters (see `convert.vae_params_from_torch_state_dict`)."""
  return KLAutoencoder(params=params, module=AutoencoderKL(spec, dtype),
                       scaling_factor=spec.scaling_factor,
                       decode_chunk_frames=spec.decode_chunk_frames)


def param_shapes(spec: AutoencoderKLSpec) -> Any:
  """The parameter tree as `jax.ShapeDtypeStruct`s, without allocating any weights."""
  size = spec.downsample_factor
  pixels = jax.ShapeDtypeStruct((1, size, size, spec.in_channels), jnp.float32)
  variables = jax.eval_shape(AutoencoderKL(spec).init, jax.random.key(0), pixels)
  return nn.meta.unbox(variables["params"])
