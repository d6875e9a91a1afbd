"""PixelDance 3D U-Net: an LDM 2D U-Net with temporal layers after every spatial layer.

Module and parameter names follow diffusers' `UNet3DConditionModel` (conv_in, transformer_in,
down_blocks_i/{resnets,temp_convs,attentions,temp_attentions}_j, mid_block, up_blocks_i,
conv_norm_out, conv_out), so its checkpoints map onto this tree by renaming alone
(`convert.unet_params_from_torch_state_dict`; parity is tested in tests/test_unet_parity.py).
Departures from diffusers, all PixelDance's: conv_in reads 2C channels (noisy latent ++ c_image),
temporal layers are skipped for image batches, temporal proj_outs start at zero, and the options
`pooled_text_embedding` and `temporal_position_embedding` (both off by default).
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from pixeldance_jax.models import layers

Array = jax.Array


# Names accepted by `config.unet.remat_policy` besides "none" (no remat) and "full" (save
# nothing, recompute the whole layer): the policies of `jax.checkpoint_policies`.
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable",
                  "nothing_saveable", "everything_saveable")
# Which inputs `config.unet.input_skip` adds to the output, each times a learned gain.
INPUT_SKIPS = ("none", "conditions", "all")


# jax.nn.dot_product_attention's implementations, and Pallas splash attention (TPU; see
# layers.attention for which sequences it takes).
ATTENTION_IMPLS = (None, "xla", "cudnn", "splash")


def _attention_impl(unet: ml_collections.ConfigDict) -> str | None:
  impl = unet.attention_impl or None
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"config.unet.attention_impl={unet.attention_impl!r} is not one of "
                     f"{ATTENTION_IMPLS}.")
  if impl == "cudnn" and jnp.dtype(unet.dtype).itemsize != 2:
    raise ValueError("config.unet.attention_impl='cudnn' needs a 16-bit config.unet.dtype "
                     f"(bfloat16 or float16), got {unet.dtype!r}.")
  return impl


@dataclasses.dataclass(frozen=True)
class UNetSpec:
  """Static hyper-parameters of the U-Net (a hashable copy of `config.unet`)."""
  out_channels: int
  block_out_channels: tuple[int, ...]
  attention_levels: tuple[bool, ...]
  layers_per_block: int = 2
  attention_head_dim: int = 64
  # Heads of the spatial transformers at every level; 0: channels // attention_head_dim
  # (UNet3DConditionModel, SD 2.x). SD 1.x checkpoints need 8.
  num_attention_heads: int = 0
  transformer_in_heads: int = 8  # Heads of attention_head_dim features (ModelScope: 8).
  cross_attention_dim: int = 768
  norm_num_groups: int = 32
  norm_eps: float = 1e-5  # ResNet and output GroupNorms (diffusers' `norm_eps`).
  temporal_position_embedding: bool = False
  pooled_text_embedding: bool = False
  input_skip: str = "none"  # One of INPUT_SKIPS: which inputs `_input_skip` adds to the output.
  refiner_channels: int = 0  # Width of `_refine`'s hidden layer; 0: no refiner.
  # Inputs after the noisy latent and c_image: the keyframe mask (conditioning.keyframe_mask).
  mask_channels: int = 0
  dropout: float = 0.0  # In the ResNets.
  temporal_conv_dropout: float = 0.1  # In the temporal convs (ModelScope: 0.1).
  remat_policy: str = "none"  # One of REMAT_POLICIES; applied to every layer module.
  dtype: Any = jnp.float32
  attention_impl: str | None = "xla"
  kernels: str = "auto"  # One of layers.KERNELS: which formulation of some layers to trace.

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "UNetSpec":
    unet = config.unet
    if len(unet.attention_levels) != len(unet.block_out_channels):
      raise ValueError(
          f"config.unet.attention_levels has {len(unet.attention_levels)} entries but "
          f"block_out_channels has {len(unet.block_out_channels)}; give one per level.")
    kernels = unet.kernels
    if kernels not in layers.KERNELS:
      raise ValueError(f"config.unet.kernels={kernels!r}; expected one of {layers.KERNELS}.")
    if unet.refiner_channels < 0:
      raise ValueError(f"config.unet.refiner_channels={unet.refiner_channels} must be >= 0 "
                       "(0: no refiner).")
    if unet.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"config.unet.remat_policy={unet.remat_policy!r}; expected one of "
                       f"{REMAT_POLICIES}.")
    return cls(out_channels=config.autoencoder.latent_channels,
               block_out_channels=tuple(unet.block_out_channels),
               attention_levels=tuple(unet.attention_levels),
               layers_per_block=unet.layers_per_block,
               attention_head_dim=unet.attention_head_dim,
               num_attention_heads=unet.num_attention_heads,
               transformer_in_heads=unet.transformer_in_heads,
               cross_attention_dim=unet.cross_attention_dim,
               norm_num_groups=unet.norm_num_groups,
               norm_eps=unet.norm_eps,
               temporal_position_embedding=unet.temporal_position_embedding,
               pooled_text_embedding=unet.pooled_text_embedding,
               input_skip=_input_skip_mode(unet),
               refiner_channels=unet.refiner_channels,
               mask_channels=1 if config.conditioning.keyframe_mask else 0,
               dropout=unet.dropout, temporal_conv_dropout=unet.temporal_conv_dropout,
               remat_policy=unet.remat_policy, dtype=jnp.dtype(unet.dtype),
               attention_impl=_attention_impl(unet), kernels=kernels)


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


def _remat(module: type[nn.Module], spec: UNetSpec, static_argnums: tuple[int, ...] = ()):
  """`module` recomputed in the backward pass under `spec.remat_policy` ("none": as is).

  Wrapping the class keeps the module's name, so the parameter tree is the same either way.
  `static_argnums` count `self` as 0 (Python bools such as `deterministic`).
  """
  if spec.remat_policy == "none":
    return module
  policy = None if spec.remat_policy == "full" else getattr(jax.checkpoint_policies,
                                                            spec.remat_policy)
  return nn.remat(module, policy=policy, static_argnums=static_argnums)


def _spatial_heads(spec: UNetSpec, channels: int) -> tuple[int, int]:
  """(heads, head_dim) of a spatial transformer on `channels`, as diffusers splits them."""
  if spec.num_attention_heads:
    return spec.num_attention_heads, channels // spec.num_attention_heads
  return channels // spec.attention_head_dim, spec.attention_head_dim


def _spatial_attention(spec: UNetSpec, name: str, h: Array, inputs: _Inputs) -> Array:
  heads, head_dim = _spatial_heads(spec, h.shape[-1])
  block = _remat(layers.SpatialTransformer, spec)
  return block(heads, head_dim, spec.norm_num_groups, spec.attention_impl, spec.dtype,
               name=name)(h, inputs.context)


def _temporal_attention(spec: UNetSpec, name: str, h: Array, frames: int,
                        heads: int | None = None) -> Array:
  """TransformerTemporalModel on `[b * f, h, w, c]`; heads default to c // attention_head_dim."""
  heads = heads or h.shape[-1] // spec.attention_head_dim
  block = _remat(layers.TemporalTransformer, spec)
  video = block(heads, spec.attention_head_dim, spec.norm_num_groups,
                spec.temporal_position_embedding, spec.attention_impl, spec.dtype,
                name=name)(_to_video(h, frames))
  return _to_images(video)


def _resnet(spec: UNetSpec, j: int, out_channels: int, h: Array, inputs: _Inputs) -> Array:
  """ResNet -> temporal conv (skipped for image batches); names as diffusers."""
  resnet = _remat(layers.ResnetBlock, spec, static_argnums=(3,))
  h = resnet(out_channels, spec.norm_num_groups, spec.dropout, spec.norm_eps, spec.dtype,
             name=f"resnets_{j}")(h, inputs.temb, inputs.deterministic)
  if inputs.use_temporal:
    temporal_conv = _remat(layers.TemporalConvBlock, spec, static_argnums=(2,))
    h = _to_images(temporal_conv(spec.norm_num_groups, spec.temporal_conv_dropout, spec.dtype,
                                 name=f"temp_convs_{j}")(
                                     _to_video(h, inputs.frames), inputs.deterministic))
  return h


def _layer(spec: UNetSpec, j: int, out_channels: int, attention: bool, h: Array,
           inputs: _Inputs) -> Array:
  """ResNet -> temporal conv [-> spatial transformer -> temporal transformer]; names as diffusers."""
  h = _resnet(spec, j, out_channels, h, inputs)
  if attention:
    h = _spatial_attention(spec, f"attentions_{j}", h, inputs)
    if inputs.use_temporal:
      h = _temporal_attention(spec, f"temp_attentions_{j}", h, inputs.frames)
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
  """ResNet -> temporal conv -> spatial attn -> temporal attn -> ResNet -> temporal conv.

  The attentions are there whatever `attention_levels` says (UNetMidBlock3DCrossAttn).
  """
  spec: UNetSpec

  @nn.compact
  def __call__(self, h: Array, inputs: _Inputs) -> Array:
    spec, channels = self.spec, self.spec.block_out_channels[-1]
    h = _layer(spec, 0, channels, True, h, inputs)
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

  def __call__(self, sample: Array, timesteps: Array, context: Array,
               use_temporal: bool = True, deterministic: bool = True) -> Array:
    with layers.kernels(self.spec.kernels):
      return self._forward(sample, timesteps, context, use_temporal, deterministic)

  @nn.compact
  def _forward(self, sample: Array, timesteps: Array, context: Array, use_temporal: bool,
               deterministic: bool) -> Array:
    spec = self.spec
    batch, frames = sample.shape[:2]
    if context.shape[-1] != spec.cross_attention_dim:
      raise ValueError(f"context has {context.shape[-1]} features; the U-Net was built for "
                       f"cross_attention_dim={spec.cross_attention_dim}.")
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

    images = _to_images(sample.astype(spec.dtype))
    h = layers.conv(spec.block_out_channels[0], (3, 3), spec.dtype, "conv_in")(images)
    if use_temporal:
      h = _temporal_attention(spec, "transformer_in", h, frames, spec.transformer_in_heads)

    skips = [h]
    for level in range(len(spec.block_out_channels)):
      h, block_skips = DownBlock(spec, level, name=f"down_blocks_{level}")(h, inputs)
      skips.extend(block_skips)
    h = MidBlock(spec, name="mid_block")(h, inputs)
    for i, level in enumerate(reversed(range(len(spec.block_out_channels)))):
      h = UpBlock(spec, level, name=f"up_blocks_{i}")(h, skips, inputs)

    h = layers.group_norm(spec.norm_num_groups, "conv_norm_out", spec.norm_eps, silu=True)(h)
    h = h.astype(spec.dtype)
    features = h
    h = layers.conv(spec.out_channels, (3, 3), spec.dtype, "conv_out")(h)
    if spec.refiner_channels:
      h = h + _refine(spec, features, images)
    out = _to_video(h, frames).reshape(batch, frames, *h.shape[1:]).astype(jnp.float32)
    if spec.input_skip != "none":
      out = out + _input_skip(spec, sample, temb)
    return out


def _refine(spec: UNetSpec, features: Array, sample: Array) -> Array:
  """A two-conv head on the U-Net's last features beside its raw inputs (z_t, c_image), zero
  at init: each latent value is decided with the inputs' own values at hand, which otherwise
  reach the output only through conv_in's first-level width.

  It takes no time embedding: that embedding carries the pooled text, and a bias from it here
  kept the tiny model from learning the text's direction at all (docs/fidelity.md)."""
  h = layers.conv(spec.refiner_channels, (3, 3), spec.dtype, "refiner_conv1")(
      jnp.concatenate([features, sample], axis=-1))
  return layers.conv(spec.out_channels, (3, 3), spec.dtype, "refiner_conv2", zero_init=True)(
      nn.silu(h))


def _input_skip_mode(unet: ml_collections.ConfigDict) -> str:
  """`unet.input_skip` as one of INPUT_SKIPS; configs saved before it was a string hold a bool
  (True: "all")."""
  mode = unet.input_skip
  if isinstance(mode, bool):
    mode = "all" if mode else "none"
  if mode not in INPUT_SKIPS:
    raise ValueError(f"config.unet.input_skip={mode!r}; expected one of {INPUT_SKIPS}.")
  return mode


def _input_skip(spec: UNetSpec, sample: Array, temb: Array) -> Array:
  """A per-channel gain of some inputs added to the output, set by the time embedding and zero
  at init: the copy a deep stack of convolutions learns slowly (a clip from little noise, the
  given first frame) is one multiply here. "all": the noisy latent and c_image; "conditions":
  c_image alone, so the noisy latent's noise never reaches the output unfiltered. (Not the
  keyframe mask: it has no output channel to add to.)"""
  out = spec.out_channels
  if spec.mask_channels:
    sample = sample[..., :-spec.mask_channels]
  groups = sample.shape[-1] // out
  if groups * out != sample.shape[-1] or groups < 2:
    raise ValueError(f"unet.input_skip needs inputs in whole copies of the {out} output "
                     f"channels (the noisy latent, then the conditions), got {sample.shape[-1]}.")
  if spec.input_skip == "conditions":
    sample, groups = sample[..., out:], groups - 1
  gain = layers.dense(sample.shape[-1], ("embed", "channels"), jnp.float32, "input_skip",
                      zero_init=True)(nn.silu(temb.astype(jnp.float32)))
  skip = sample.astype(jnp.float32) * gain[:, None, None, None, :]
  return skip.reshape(*skip.shape[:-1], groups, out).sum(axis=-2)


def init_params(spec: UNetSpec, rng: Array, in_channels: int | None = None) -> Any:
  """Fresh parameters (logically boxed) for `in_channels` inputs (None: the noisy latent,
  c_image and the mask channels).

  Traced on a one-frame video of the smallest size every level can halve, so the cost is that of
  the weights alone.
  """
  in_channels = in_channels or 2 * spec.out_channels + spec.mask_channels
  size = 2 ** (len(spec.block_out_channels) - 1)
  sample = jnp.zeros((1, 1, size, size, in_channels), jnp.float32)
  context = jnp.zeros((1, 1, spec.cross_attention_dim), jnp.float32)
  return UNet3D(spec).init(rng, sample, jnp.zeros((1,), jnp.int32), context)["params"]


def param_shapes(spec: UNetSpec, in_channels: int | None = None) -> Any:
  """The parameter tree as unboxed `jax.ShapeDtypeStruct`s, without allocating any weights."""
  shapes = jax.eval_shape(lambda rng: init_params(spec, rng, in_channels), jax.random.key(0))
  return nn.meta.unbox(shapes)
