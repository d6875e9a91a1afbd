"""PixelDance 3D U-Net: an LDM 2D U-Net with temporal layers after every spatial layer.

Module and parameter names follow diffusers' `UNet3DConditionModel` (conv_in, transformer_in,
down_blocks_i/{resnets,temp_convs,attentions,temp_attentions}_j, mid_block, up_blocks_i,
conv_norm_out, conv_out), so its checkpoints map onto this tree by renaming alone.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from pixeldance_jax.models import layers

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class UNetSpec:
  """Static hyper-parameters of the U-Net (a hashable copy of `config.unet`)."""
  out_channels: int
  block_out_channels: tuple[int, ...]
  attention_levels: tuple[bool, ...]
  layers_per_block: int = 2
  attention_head_dim: int = 64
  norm_num_groups: int = 32
  temporal_position_embedding: bool = False
  pooled_text_embedding: bool = False
  dropout: float = 0.0
  dtype: Any = jnp.float32
  attention_impl: str | None = "xla"

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "UNetSpec":
    unet = config.unet
    if len(unet.attention_levels) != len(unet.block_out_channels):
      raise ValueError(
          f"config.unet.attention_levels has {len(unet.attention_levels)} entries but "
          f"block_out_channels has {len(unet.block_out_channels)}; give one per level.")
    return cls(out_channels=config.autoencoder.latent_channels,
               block_out_channels=tuple(unet.block_out_channels),
               attention_levels=tuple(unet.attention_levels),
               layers_per_block=unet.layers_per_block,
               attention_head_dim=unet.attention_head_dim,
               norm_num_groups=unet.norm_num_groups,
               temporal_position_embedding=unet.temporal_position_embedding,
               pooled_text_embedding=unet.pooled_text_embedding,
               dropout=unet.dropout, dtype=jnp.dtype(unet.dtype),
               attention_impl=unet.attention_impl or None)


@dataclasses.dataclass
class _Inputs:
  """What every layer of one forward pass needs besides the hidden states."""
  temb: Array  # [batch * frames, embed]
  context: Array  # [batch * frames, length, cross_embed]
  frames: int
  use_temporal: bool
  deterministic: bool


def _to_video(x: Array, frames: int) -> Array:
  return x.reshape((-1, frames) + x.shape[1:])


def _to_images(x: Array) -> Array:
  return x.reshape((-1,) + x.shape[2:])


def _layer(spec: UNetSpec, j: int, out_channels: int, attention: bool, h: Array,
           inputs: _Inputs) -> Array:
  """ResNet -> temporal conv [-> spatial transformer -> temporal transformer]; names as diffusers."""
  groups, dtype, impl = spec.norm_num_groups, spec.dtype, spec.attention_impl
  h = layers.ResnetBlock(out_channels, groups, spec.dropout, dtype, name=f"resnets_{j}")(
      h, inputs.temb, inputs.deterministic)
  if inputs.use_temporal:
    h = _to_images(layers.TemporalConvBlock(groups, spec.dropout, dtype, name=f"temp_convs_{j}")(
        _to_video(h, inputs.frames), inputs.deterministic))
  if attention:
    h = layers.SpatialTransformer(spec.attention_head_dim, groups, impl, dtype,
                                  name=f"attentions_{j}")(h, inputs.context)
    if inputs.use_temporal:
      h = _to_images(layers.TemporalTransformer(
          spec.attention_head_dim, groups, spec.temporal_position_embedding, impl, dtype,
          name=f"temp_attentions_{j}")(_to_video(h, inputs.frames)))
  return nn.with_logical_constraint(h, ("batch", "height", "width", "channels"))


class DownBlock(nn.Module):
  spec: UNetSpec
  level: int

  @nn.compact
  def __call__(self, h: Array, inputs: _Inputs) -> tuple[Array, list[Array]]:
    spec, skips = self.spec, []
    channels = spec.block_out_channels[self.level]
    for j in range(spec.layers_per_block):
      h = _layer(spec, j, channels, spec.attention_levels[self.level], h, inputs)
      skips.append(h)
    if self.level < len(spec.block_out_channels) - 1:
      h = layers.Downsample(spec.dtype, name="downsamplers_0")(h)
      skips.append(h)
    return h, skips


class MidBlock(nn.Module):
  """ResNet -> temporal conv -> (spatial attn -> temporal attn -> ResNet -> temporal conv)."""
  spec: UNetSpec

  @nn.compact
  def __call__(self, h: Array, inputs: _Inputs) -> Array:
    spec, channels = self.spec, self.spec.block_out_channels[-1]
    h = _layer(spec, 0, channels, False, h, inputs)
    h = layers.SpatialTransformer(spec.attention_head_dim, spec.norm_num_groups,
                                  spec.attention_impl, spec.dtype, name="attentions_0")(
                                      h, inputs.context)
    if inputs.use_temporal:
      h = _to_images(layers.TemporalTransformer(
          spec.attention_head_dim, spec.norm_num_groups, spec.temporal_position_embedding,
          spec.attention_impl, spec.dtype, name="temp_attentions_0")(_to_video(h, inputs.frames)))
    return _layer(spec, 1, channels, False, h, inputs)


class UpBlock(nn.Module):
  spec: UNetSpec
  level: int  # Index into block_out_channels (the deepest level is the first up block).

  @nn.compact
  def __call__(self, h: Array, skips: list[Array], inputs: _Inputs) -> Array:
    spec = self.spec
    channels = spec.block_out_channels[self.level]
    for j in range(spec.layers_per_block + 1):
      h = jnp.concatenate([h, skips.pop()], axis=-1)
      h = _layer(spec, j, channels, spec.attention_levels[self.level], h, inputs)
    if self.level > 0:
      h = layers.Upsample(spec.dtype, name="upsamplers_0")(h)
    return h


class UNet3D(nn.Module):
  """Predicts noise (or v) for a video, or for images when `use_temporal` is False.

  Inputs: `sample` `[batch, frames, height, width, in_channels]` (the noisy latent concatenated
  with c_image on channels), `timesteps` `[batch]`, `context` `[batch, length, cross_embed]`.
  Returns `[batch, frames, height, width, out_channels]`. With `use_temporal=False` (joint image
  training) every temporal layer is skipped and each frame is an independent image.
  """
  spec: UNetSpec

  @nn.compact
  def __call__(self, sample: Array, timesteps: Array, context: Array,
               use_temporal: bool = True, deterministic: bool = True) -> Array:
    spec = self.spec
    batch, frames = sample.shape[:2]
    sample = nn.with_logical_constraint(
        sample, ("batch", "frames", "height", "width", "channels"))
    temb = layers.TimestepEmbedding(4 * spec.block_out_channels[0], spec.block_out_channels[0],
                                    spec.dtype, name="time_embedding")(timesteps)
    if spec.pooled_text_embedding:
      # A global text signal for every ResNet, beside cross-attention (as Imagen and SDXL add).
      pooled = context.astype(spec.dtype).mean(axis=1)
      temb = temb + layers.dense(temb.shape[-1], ("channels", "embed"), spec.dtype,
                                 "text_embedding")(pooled)
    inputs = _Inputs(temb=jnp.repeat(temb, frames, axis=0),
                     context=jnp.repeat(context.astype(spec.dtype), frames, axis=0),
                     frames=frames, use_temporal=use_temporal, deterministic=deterministic)

    h = layers.conv(spec.block_out_channels[0], (3, 3), spec.dtype, "conv_in")(
        _to_images(sample.astype(spec.dtype)))
    if use_temporal:
      h = _to_images(layers.TemporalTransformer(
          spec.attention_head_dim, spec.norm_num_groups, spec.temporal_position_embedding,
          spec.attention_impl, spec.dtype, name="transformer_in")(_to_video(h, frames)))

    skips = [h]
    for level in range(len(spec.block_out_channels)):
      h, block_skips = DownBlock(spec, level, name=f"down_blocks_{level}")(h, inputs)
      skips.extend(block_skips)
    h = MidBlock(spec, name="mid_block")(h, inputs)
    for i, level in enumerate(reversed(range(len(spec.block_out_channels)))):
      h = UpBlock(spec, level, name=f"up_blocks_{i}")(h, skips, inputs)

    h = nn.silu(layers.group_norm(spec.norm_num_groups, "conv_norm_out")(h)).astype(spec.dtype)
    h = layers.conv(spec.out_channels, (3, 3), spec.dtype, "conv_out")(h)
    return _to_video(h, frames).reshape(batch, frames, *h.shape[1:]).astype(jnp.float32)
