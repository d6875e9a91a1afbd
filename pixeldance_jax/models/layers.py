"""Building blocks of the 3D U-Net, laid out like diffusers' UNet3DConditionModel.

Activations are channels-last: videos are `[batch, frames, height, width, channels]`, images
`[batch * frames, height, width, channels]`, token sequences `[batch, length, embed]`.
Every parameter carries logical axis names; `pixeldance_jax.parallel` maps them to a mesh.

A few layers have two formulations of the same function with the same parameters (see
`kernels`): the portable one (flax's and XLA's own ops, what GPUs and TPUs compile) and one
written for XLA:CPU's kernels (GroupNorm's gradient, temporal and 1x1 convolutions, Dense's
reshape, GELU through erf).
"""

import contextlib
import contextvars
import functools
import math
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pixeldance_jax.models import splash
from pixeldance_jax.parallel import mesh as mesh_lib

Array = jax.Array
Dtype = Any

zeros_init = nn.initializers.zeros_init()
default_kernel_init = nn.initializers.lecun_normal()


def logical(init, axes: tuple[str | None, ...]):
  return nn.with_logical_partitioning(init, axes)


# `config.unet.kernels`: "auto" takes the CPU formulations in programs traced for CPU devices
# (`mesh_lib.target_platform`) and the portable ones elsewhere; the other two force one.
KERNELS = ("auto", "portable", "cpu")
_KERNELS = contextvars.ContextVar("pixeldance_kernels", default="auto")


@contextlib.contextmanager
def kernels(choice: str) -> Iterator[None]:
  """Layers called (traced) inside use the formulations `choice`, one of `KERNELS`."""
  if choice not in KERNELS:
    raise ValueError(f"kernels={choice!r} is not one of {KERNELS}.")
  token = _KERNELS.set(choice)
  try:
    yield
  finally:
    _KERNELS.reset(token)


def cpu_kernels() -> bool:
  """Whether the layer being traced takes its XLA:CPU formulation (see `kernels`)."""
  choice = _KERNELS.get()
  return mesh_lib.target_platform() == "cpu" if choice == "auto" else choice == "cpu"


class Dense(nn.Dense):
  """nn.Dense; on CPU kernels, leading axes are folded into one before the product.

  The same sums, but XLA:CPU lays out the kernel gradient of a product over `[n, length,
  features]` with a transposed copy of the output gradient and a slow strided matmul; over
  `[n * length, features]` both are plain row-major.
  """

  def __call__(self, inputs: Array) -> Array:
    if not cpu_kernels():
      return super().__call__(inputs)
    lead = inputs.shape[:-1]
    y = super().__call__(inputs.reshape(-1, inputs.shape[-1]))
    return y.reshape(lead + (self.features,))


def dense(features: int, axes: tuple[str, str], dtype: Dtype, name: str,
          use_bias: bool = True, zero_init: bool = False) -> Dense:
  """A Dense layer whose kernel `[in, out]` and bias `[out]` carry logical axis names."""
  kernel_init = zeros_init if zero_init else default_kernel_init
  return Dense(features, use_bias=use_bias, dtype=dtype, name=name,
               kernel_init=logical(kernel_init, axes),
               bias_init=logical(zeros_init, (axes[1],)))


# Logical names of the activation axes a convolution sees: images or videos, channels last.
_CONV_INPUT_AXES = {4: ("batch", "height", "width", "channels"),
                    5: ("batch", "frames", "height", "width", "channels")}


class Conv(nn.Conv):
  """nn.Conv whose input is pinned to the activation layout (batch split, channels whole).

  Without the pin, XLA's SPMD partitioner (jax 0.10.2, CPU; Shardy and GSPMD alike) computes
  wrong input gradients for a chain of 3x3 convolutions on a mesh with data, fsdp and tensor
  all > 1 (kernels `[.., fsdp, tensor]`, batch over data x fsdp): three 3x3 convs in a row
  already give O(1) errors in the first kernel's gradient, while 1x1 convs and every mesh with
  an axis of size 1 agree. tests/test_parallel.py checks the gradients across meshes.

  On CPU kernels a 1x1 convolution (stride 1, no groups) runs as `row_conv` with one tap: the
  same parameters and results, a faster kernel gradient on XLA:CPU.
  """

  @nn.compact
  def __call__(self, inputs: Array) -> Array:
    inputs = nn.with_logical_constraint(inputs, _CONV_INPUT_AXES[inputs.ndim])
    pointwise = (cpu_kernels() and inputs.ndim == 4 and tuple(self.kernel_size) == (1, 1)
                 and self.strides in (1, (1, 1)) and self.input_dilation in (1, (1, 1))
                 and self.feature_group_count == 1
                 and self.padding in (0, (0, 0), ((0, 0), (0, 0)), "VALID", "SAME"))
    if not pointwise:
      return super().__call__(inputs)
    # A 1x1 convolution: nn.Conv's parameters, row_conv's kernel gradient.
    kernel = self.param("kernel", self.kernel_init, (1, 1, inputs.shape[-1], self.features),
                        self.param_dtype)
    y = row_conv(inputs.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,), self.param_dtype).astype(
          self.dtype)
    return y


def conv(features: int, kernel_size: tuple[int, ...], dtype: Dtype, name: str,
         strides: int | tuple[int, ...] = 1, zero_init: bool = False,
         padding: tuple[tuple[int, int], ...] | None = None) -> Conv:
  """A convolution, 'same'-padded unless `padding` is given; kernel `[*window, in, out]`."""
  window_axes = (None,) * len(kernel_size)
  kernel_init = zeros_init if zero_init else default_kernel_init
  padding = tuple((k // 2, k // 2) for k in kernel_size) if padding is None else padding
  return Conv(features, kernel_size, strides=strides, padding=padding, dtype=dtype,
              name=name, kernel_init=logical(kernel_init, window_axes + ("conv_in", "conv_out")),
              bias_init=logical(zeros_init, ("conv_out",)))


def _positions(x: Array) -> tuple[int, ...]:
  """The axes GroupNorm sums over per channel: all but the batch (first) and channels (last)."""
  return tuple(range(1, x.ndim - 1))


def _group_size(x: Array, groups: int) -> int:
  """Values per (example, group): positions x channels of one group."""
  return math.prod(x.shape[1:-1]) * (x.shape[-1] // groups)


def _sum_per_group(t: Array, groups: int) -> Array:
  """`[batch, channels]` -> `[batch, groups]`, summing each group's channels."""
  return t.reshape(t.shape[0], groups, -1).sum(-1)


def _per_channel(t: Array, channels: int) -> Array:
  """`[batch, groups]` -> `[batch, channels]`, each group's value on its channels."""
  return jnp.repeat(t, channels // t.shape[-1], axis=-1)


def _over_positions(t: Array, ndim: int) -> Array:
  """`[batch, channels]` -> `[batch, 1, ..., 1, channels]`, broadcastable against x."""
  return t.reshape((t.shape[0],) + (1,) * (ndim - 2) + (t.shape[-1],))


def _group_stats(x: Array, groups: int, epsilon: float) -> tuple[Array, Array]:
  """Mean and 1/std `[batch, groups]` of x `[batch, ..., channels]`, in float32.

  Sums over the positions first, per channel (`[batch, channels]`, a reduction that keeps the
  contiguous channel axis), then over the channels of each group: XLA:CPU reduces
  `[b, positions, groups, channels_per_group]` straight to `[b, groups]` four times slower.
  """
  x = x.astype(jnp.float32)
  count = _group_size(x, groups)
  mean = _sum_per_group(jnp.sum(x, axis=_positions(x)), groups) / count
  mean_square = _sum_per_group(jnp.sum(jnp.square(x), axis=_positions(x)), groups) / count
  variance = jnp.maximum(mean_square - jnp.square(mean), 0.0)  # As flax's fast variance.
  return mean, jax.lax.rsqrt(variance + epsilon)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def group_norm_fn(x: Array, scale: Array, bias: Array, groups: int, epsilon: float,
                  silu: bool = False) -> Array:
  """GroupNorm of x `[batch, ..., channels]` over every non-batch axis, then SiLU if `silu`.

  The same function as flax's nn.GroupNorm (statistics in float32, variance as E[x^2] - E[x]^2,
  float32 out) and jax.nn.silu, with a hand-written gradient that keeps only x: the forward pass
  writes one array, the backward pass reads (dy, x) for two per-channel sums and once more for
  dx, where autodiff keeps x - mean, the sigmoid and the output and takes more passes over them
  (benchmarks/profile_step.py shows the normalisation's share of the step). The CPU kernels'
  GroupNorm; `portable_group_norm` is the same function left to autodiff.
  """
  return _group_norm_fwd(x, scale, bias, groups, epsilon, silu)[0]


def _group_norm_affine(x: Array, scale: Array, bias: Array, mean: Array, rstd: Array) -> Array:
  """(x - mean) * rstd * scale + bias, as one multiply-add per element."""
  channels = x.shape[-1]
  gain = _per_channel(rstd, channels) * scale
  shift = bias - _per_channel(mean, channels) * gain
  return x.astype(jnp.float32) * _over_positions(gain, x.ndim) + _over_positions(shift, x.ndim)


def _group_norm_fwd(x, scale, bias, groups, epsilon, silu):
  mean, rstd = _group_stats(x, groups, epsilon)
  y = _group_norm_affine(x, scale, bias, mean, rstd)
  return (nn.silu(y) if silu else y), (x, scale, bias, mean, rstd)


def _group_norm_bwd(groups, epsilon, silu, residuals, dy):
  del epsilon  # In rstd already.
  x, scale, bias, mean, rstd = residuals
  if silu:  # d silu(u) / du = s * (1 + u * (1 - s)), s = sigmoid(u); u recomputed from x.
    u = _group_norm_affine(x, scale, bias, mean, rstd)
    s = jax.nn.sigmoid(u)
    dy = dy * s * (1 + u * (1 - s))
  channels, ndim = x.shape[-1], x.ndim
  count = _group_size(x, groups)
  x32 = x.astype(jnp.float32)
  # Per example and channel: sum(dy) and sum(dy * (x - mean)).
  dy_sum = jnp.sum(dy, axis=_positions(x))
  mean_c, rstd_c = _per_channel(mean, channels), _per_channel(rstd, channels)
  dy_centred = jnp.sum(dy * x32, axis=_positions(x)) - mean_c * dy_sum
  d_bias = dy_sum.sum(0)
  d_scale = (rstd_c * dy_centred).sum(0)
  # dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat)) with g = dy * scale, means over a group:
  # an affine map of (dy, x) per example and channel.
  g_mean = _sum_per_group(scale * dy_sum, groups) / count
  g_xhat_mean = _sum_per_group(scale * rstd_c * dy_centred, groups) / count
  x_coef = -jnp.square(rstd) * g_xhat_mean
  offset = -rstd * g_mean - mean * x_coef
  dx = (dy * _over_positions(rstd_c * scale, ndim)
        + x32 * _over_positions(_per_channel(x_coef, channels), ndim)
        + _over_positions(_per_channel(offset, channels), ndim))
  return dx.astype(x.dtype), d_scale.astype(scale.dtype), d_bias.astype(bias.dtype)


group_norm_fn.defvjp(_group_norm_fwd, _group_norm_bwd)


def portable_group_norm(x: Array, scale: Array, bias: Array, groups: int, epsilon: float,
                        silu: bool = False) -> Array:
  """`group_norm_fn` as flax's nn.GroupNorm computes it, differentiated by autodiff."""
  grouped = x.astype(jnp.float32).reshape(x.shape[:-1] + (groups, x.shape[-1] // groups))
  axes = tuple(range(1, grouped.ndim - 2)) + (grouped.ndim - 1,)
  mean = jnp.mean(grouped, axes, keepdims=True)
  variance = jnp.maximum(jnp.mean(jnp.square(grouped), axes, keepdims=True) - jnp.square(mean),
                         0.0)
  y = ((grouped - mean) * jax.lax.rsqrt(variance + epsilon)).reshape(x.shape) * scale + bias
  return nn.silu(y) if silu else y


class GroupNorm(nn.Module):
  """nn.GroupNorm's parameters (`scale`, `bias` `[channels]`) over `group_norm_fn`."""
  num_groups: int
  epsilon: float = 1e-5
  silu: bool = False  # Apply SiLU to the normalised output (fused, see group_norm_fn).

  @nn.compact
  def __call__(self, x: Array) -> Array:
    channels = x.shape[-1]
    if channels % self.num_groups:
      raise ValueError(f"GroupNorm {self.name}: {channels} channels do not split into "
                       f"{self.num_groups} groups.")
    scale = self.param("scale", logical(nn.initializers.ones_init(), ("norm",)), (channels,),
                       jnp.float32)
    bias = self.param("bias", logical(zeros_init, ("norm",)), (channels,), jnp.float32)
    norm = group_norm_fn if cpu_kernels() else portable_group_norm
    return norm(x, scale, bias, self.num_groups, self.epsilon, self.silu)


def group_norm(groups: int, name: str, epsilon: float = 1e-5, silu: bool = False) -> GroupNorm:
  """GroupNorm over every non-batch axis, as torch does on `[N, C, *spatial]`; float32 stats.

  `silu`: SiLU of the result, in the same pass and gradient.
  """
  return GroupNorm(num_groups=groups, epsilon=epsilon, silu=silu, name=name)


def layer_norm(name: str, epsilon: float = 1e-5) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=epsilon, dtype=jnp.float32, name=name,
                      scale_init=logical(nn.initializers.ones_init(), ("norm",)),
                      bias_init=logical(zeros_init, ("norm",)))


def timestep_embedding(timesteps: Array, dim: int, max_period: float = 10000.0) -> Array:
  """Sinusoidal embedding `[n, dim]` as diffusers' Timesteps(flip_sin_to_cos=True, shift=0)."""
  half = dim // 2
  exponent = -jnp.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half
  angles = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


class TimestepEmbedding(nn.Module):
  """Sinusoidal features -> linear_1 -> SiLU -> linear_2: `[batch]` -> `[batch, features]`."""
  features: int
  sinusoidal_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, timesteps: Array) -> Array:
    emb = timestep_embedding(timesteps, self.sinusoidal_dim).astype(self.dtype)
    emb = dense(self.features, ("channels", "embed"), self.dtype, "linear_1")(emb)
    return dense(self.features, ("embed", "mlp"), self.dtype, "linear_2")(nn.silu(emb))


class ResnetBlock(nn.Module):
  """diffusers ResnetBlock2D: `[n, h, w, c_in]`, time embedding `[n, e]` -> `[n, h, w, c_out]`."""
  out_channels: int
  groups: int
  dropout: float = 0.0
  epsilon: float = 1e-5  # The U-Net's `norm_eps`.
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, temb: Array, deterministic: bool = True) -> Array:
    h = group_norm(self.groups, "norm1", self.epsilon, silu=True)(x).astype(self.dtype)
    h = conv(self.out_channels, (3, 3), self.dtype, "conv1")(h)
    t = dense(self.out_channels, ("embed", "conv_out"), self.dtype, "time_emb_proj")(nn.silu(temb))
    h = h + t[:, None, None, :]
    h = group_norm(self.groups, "norm2", self.epsilon, silu=True)(h).astype(self.dtype)
    h = nn.Dropout(self.dropout, deterministic=deterministic)(h)
    h = conv(self.out_channels, (3, 3), self.dtype, "conv2")(h)
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, (1, 1), self.dtype, "conv_shortcut")(x)
    return x + h


class TemporalConvBlock(nn.Module):
  """diffusers TemporalConvLayer: 4 x (GroupNorm, SiLU, Conv3d (3,1,1)), last conv zero-init.

  `[b, f, h, w, c]` -> same shape. The residual plus a zero last conv makes it the identity at
  init, so a pretrained 2D network keeps its behaviour when inflated. GroupNorm statistics span
  frames too (torch's GroupNorm on `[b, c, f, h, w]`), with torch's default eps: diffusers does
  not pass the U-Net's `norm_eps` here. Dropout precedes convs 2-4, as in ModelScope.
  """
  groups: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    channels = x.shape[-1]
    h = x
    for i in range(4):
      h = group_norm(self.groups, f"conv{i + 1}_norm", silu=True)(h).astype(self.dtype)
      if i > 0:
        h = nn.Dropout(self.dropout, deterministic=deterministic)(h)
      h = FrameConv(channels, self.dtype, zero_init=i == 3, name=f"conv{i + 1}")(h)
    return x + h


class FrameConv(nn.Module):
  """A Conv3d with kernel (3, 1, 1) over `[b, f, h, w, c]`, zero-padded in time.

  Its parameters are nn.Conv's (kernel `[3, 1, 1, c_in, c_out]`, bias `[c_out]`, the same
  logical axes), so checkpoints and diffusers' weights load unchanged. On CPU kernels it runs
  as a (3, 1) image convolution over `[b, f, h * w, c]` (a free reshape), which XLA:CPU runs on
  its fast 2-D path instead of the slow generic 5-D one; a convolution rather than a matrix
  product of stacked frames, so that its results do not depend on the batch size.
  """
  features: int
  dtype: Dtype = jnp.float32
  zero_init: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = nn.with_logical_constraint(x, _CONV_INPUT_AXES[5])
    b, frames, height, width, channels = x.shape
    kernel_init = zeros_init if self.zero_init else default_kernel_init
    kernel = self.param("kernel", logical(kernel_init, (None, None, None, "conv_in", "conv_out")),
                        (3, 1, 1, channels, self.features), jnp.float32)
    bias = self.param("bias", logical(zeros_init, ("conv_out",)), (self.features,), jnp.float32)
    if not cpu_kernels():
      y = jax.lax.conv_general_dilated(x.astype(self.dtype), kernel.astype(self.dtype),
                                       (1, 1, 1), ((1, 1), (0, 0), (0, 0)),
                                       dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
      return y + bias.astype(self.dtype)
    images = x.astype(self.dtype).reshape(b, frames, height * width, channels)
    y = row_conv(images, kernel.reshape(3, 1, channels, self.features).astype(self.dtype))
    return y.reshape(b, frames, height, width, self.features) + bias.astype(self.dtype)


def _row_conv(x: Array, kernel: Array) -> Array:
  pad = kernel.shape[0] // 2
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((pad, pad), (0, 0)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


@jax.custom_vjp
def row_conv(x: Array, kernel: Array) -> Array:
  """A convolution along rows: x `[n, rows, cols, c]`, kernel `[taps, 1, c, out]` (taps odd),
  zero-padded to the same rows; a 1x1 convolution is one tap.

  Forward and input gradient are XLA's convolutions (whose results do not depend on the batch
  size). The kernel gradient is one matrix product per tap, `x[rows + d]^T @ dy` over every
  position: XLA:CPU runs it as a convolution whose batch is the channels, with transposed
  copies of both operands, at about half the speed.
  """
  return _row_conv(x, kernel)


def _row_conv_fwd(x: Array, kernel: Array):
  return _row_conv(x, kernel), (x, kernel)


def _row_conv_bwd(residuals, dy: Array):
  x, kernel = residuals
  dx, = jax.vjp(lambda x: _row_conv(x, kernel), x)[1](dy)
  rows, taps = x.shape[1], kernel.shape[0]
  matrix = lambda t: t.reshape(-1, t.shape[-1])
  taps_grads = []
  for tap in range(taps):
    shift = tap - taps // 2  # Output row r reads input row r + shift.
    xs = x[:, max(shift, 0):rows + min(shift, 0)]
    ys = dy[:, max(-shift, 0):rows - max(shift, 0)]
    taps_grads.append(jax.lax.dot_general(matrix(xs), matrix(ys), (((0,), (0,)), ((), ())),
                                          preferred_element_type=jnp.float32))
  return dx, jnp.stack(taps_grads)[:, None].astype(kernel.dtype)


row_conv.defvjp(_row_conv_fwd, _row_conv_bwd)


def attention(q: Array, k: Array, v: Array, impl: str | None) -> Array:
  """Softmax attention `[n, length, heads, head_dim]`; `impl` is config.unet.attention_impl.

  "splash" runs Pallas splash attention on sequences of at least one 128-position block (the
  spatial self-attention, and its cross-attention to the text); shorter ones (the temporal
  attention over frames) would be mostly padding there and go to XLA.
  """
  if impl == "splash":
    if q.shape[1] >= splash.BLOCK:
      return splash.splash_attention(q, k, v)
    impl = "xla"
  return jax.nn.dot_product_attention(q, k, v, implementation=impl)


class Attention(nn.Module):
  """Multi-head attention with diffusers' to_q/to_k/to_v (no bias) and to_out.

  x `[n, length, embed]`; context `[n, context_length, context_embed]` or None (self-attention).
  """
  heads: int
  head_dim: int
  impl: str | None = "xla"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, context: Array | None = None) -> Array:
    context = x if context is None else context
    inner = self.heads * self.head_dim
    split = lambda t: t.reshape(t.shape[:-1] + (self.heads, self.head_dim))
    q = split(dense(inner, ("embed", "heads"), self.dtype, "to_q", use_bias=False)(x))
    k = split(dense(inner, ("embed", "heads"), self.dtype, "to_k", use_bias=False)(context))
    v = split(dense(inner, ("embed", "heads"), self.dtype, "to_v", use_bias=False)(context))
    out = attention(q, k, v, self.impl)
    out = out.reshape(out.shape[:-2] + (inner,))
    return dense(x.shape[-1], ("heads", "embed"), self.dtype, "to_out")(out)


def gelu(x: Array) -> Array:
  """Exact GELU; on CPU kernels as torch computes it, `x / 2 * (1 + erf(x / sqrt(2)))`.

  jax.nn.gelu(approximate=False) goes through erfc, which XLA:CPU expands into exponentials and
  selects; the two differ by a few float32 ulps.
  """
  if not cpu_kernels():
    return jax.nn.gelu(x, approximate=False)
  return 0.5 * x * (1 + jax.lax.erf(x * (1 / math.sqrt(2))).astype(x.dtype))


class FeedForward(nn.Module):
  """GEGLU feed-forward (diffusers FeedForward, activation 'geglu', mult 4)."""
  mult: int = 4
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    inner = x.shape[-1] * self.mult
    hidden, gate = jnp.split(dense(2 * inner, ("embed", "mlp"), self.dtype, "proj")(x), 2, -1)
    hidden = hidden * gelu(gate)
    return dense(x.shape[-1], ("mlp", "embed"), self.dtype, "out")(hidden)


class TransformerBlock(nn.Module):
  """diffusers BasicTransformerBlock: pre-LN self-attention, second attention, feed-forward.

  The second attention attends to `context` (text) when given, else to x itself (the
  "double self-attention" of the temporal transformer).
  """
  heads: int
  head_dim: int
  attention_impl: str | None = "xla"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, context: Array | None = None) -> Array:
    attn = lambda name: Attention(self.heads, self.head_dim, self.attention_impl, self.dtype,
                                  name=name)
    x = x + attn("attn1")(layer_norm("norm1")(x).astype(self.dtype))
    x = x + attn("attn2")(layer_norm("norm2")(x).astype(self.dtype), context)
    return x + FeedForward(dtype=self.dtype, name="ff")(layer_norm("norm3")(x).astype(self.dtype))


class SpatialTransformer(nn.Module):
  """diffusers Transformer2DModel: per-frame self-attention + cross-attention to text + FF.

  x `[n, h, w, c]`, context `[n, length, d]` -> `[n, h, w, c]`. proj_in/proj_out are linear
  (`use_linear_projection`, as in UNet3DConditionModel and SD 2.x); a 1x1 conv (SD 1.x) is the
  same map, so its checkpoints load squeezed.
  """
  heads: int
  head_dim: int
  groups: int
  attention_impl: str | None = "xla"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, context: Array) -> Array:
    n, height, width, channels = x.shape
    inner = self.heads * self.head_dim
    h = group_norm(self.groups, "norm", epsilon=1e-6)(x).astype(self.dtype)
    h = h.reshape(n, height * width, channels)
    h = dense(inner, ("channels", "embed"), self.dtype, "proj_in")(h)
    h = nn.with_logical_constraint(h, ("batch", "length", "embed"))
    h = TransformerBlock(self.heads, self.head_dim, self.attention_impl, self.dtype,
                         name="transformer_blocks_0")(h, context)
    h = dense(channels, ("embed", "channels"), self.dtype, "proj_out")(h)
    return x + h.reshape(n, height, width, channels)


class TemporalTransformer(nn.Module):
  """diffusers TransformerTemporalModel: bidirectional self-attention over frames per pixel.

  x `[b, f, h, w, c]` -> same shape. Tokens are the f frames of one pixel, projected to
  `heads * head_dim` features, which may differ from c (ModelScope's `transformer_in` has 8 heads
  of `attention_head_dim`). The block's second attention is self-attention too (diffusers'
  `double_self_attention`). proj_out is zero-initialised, so the block starts as the identity
  (diffusers initialises it randomly; ModelScope checkpoints overwrite it). `position_embedding`
  adds a sinusoidal frame-index embedding to the tokens (not in diffusers).
  """
  heads: int
  head_dim: int
  groups: int
  position_embedding: bool = False
  attention_impl: str | None = "xla"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, f, height, width, channels = x.shape
    inner = self.heads * self.head_dim
    h = group_norm(self.groups, "norm", epsilon=1e-6)(x).astype(self.dtype)
    h = h.transpose(0, 2, 3, 1, 4).reshape(b * height * width, f, channels)
    h = dense(inner, ("channels", "embed"), self.dtype, "proj_in")(h)
    if self.position_embedding:
      h = h + timestep_embedding(jnp.arange(f), inner).astype(self.dtype)[None]
    h = TransformerBlock(self.heads, self.head_dim, self.attention_impl, self.dtype,
                         name="transformer_blocks_0")(h)
    h = dense(channels, ("embed", "channels"), self.dtype, "proj_out", zero_init=True)(h)
    h = h.reshape(b, height, width, f, channels).transpose(0, 3, 1, 2, 4)
    return x + h


class Downsample(nn.Module):
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return conv(x.shape[-1], (3, 3), self.dtype, "conv", strides=2)(x)


class Upsample(nn.Module):
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    n, height, width, channels = x.shape
    x = jax.image.resize(x, (n, 2 * height, 2 * width, channels), "nearest")
    return conv(channels, (3, 3), self.dtype, "conv")(x)
