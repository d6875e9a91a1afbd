"""The Inception-v3 network of FID, as pytorch-fid's `InceptionV3` computes it, in Flax Linen.

Images `[n, height, width, 3]` in [0, 1] -> pool3 features `[n, 2048]` float32, the features
whose statistics FID compares. pytorch-fid (`InceptionV3([3])`, `use_fid_inception=True`) is
the de facto reference: its network is TensorFlow's 2015 Inception graph (the weights file
`pt_inception-2015-12-05-6726825d.pth`), which differs from torchvision's `inception_v3` in the
pooling branches (average pools that leave padding out of the mean, a max pool in the last
block). The preprocessing is pytorch-fid's too: a bilinear resize to 299x299 as torch's
`F.interpolate(mode="bilinear", align_corners=False)` (no antialiasing, also when shrinking),
then `2x - 1`. Only the network up to the final average pool is built (no aux logits, no fc).

Variables are `{"params": ..., "batch_stats": ...}`. Module paths are torchvision's attribute
names, so a torch name maps to its path by splitting at the dots:
  `Mixed_5b.branch1x1.conv.weight`  -> params/Mixed_5b/branch1x1/conv/kernel (OIHW -> HWIO)
  `Mixed_5b.branch1x1.bn.weight`    -> params/Mixed_5b/branch1x1/bn/scale
  `Mixed_5b.branch1x1.bn.bias`      -> params/Mixed_5b/branch1x1/bn/bias
  `...bn.running_mean/running_var` -> batch_stats/.../bn/mean, batch_stats/.../bn/var
`params_from_state_dict` reads both the weights file's names (those of torchvision's
`Inception3`) and those of pytorch-fid's wrapper (`blocks.0.0.conv.weight`, ...).
"""

import functools
import os
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from pixeldance_jax.evaluate.networks import torch_checkpoint
from pixeldance_jax.io import mismatch

Array = jax.Array
PrecisionLike = Any

INPUT_SIZE = 299  # pytorch-fid's resize target (the graph's native input size).
FEATURE_DIM = 2048  # Pool3 features per image.
BN_EPS = 1e-3  # torchvision's BasicConv2d (TensorFlow's default).

# pytorch-fid's `InceptionV3.blocks`: `blocks.i.j` is module j of block i, one of torchvision
# Inception3's (the pools that end blocks 0, 1 and 3 hold no weights and are left out here).
_WRAPPER_BLOCKS = (
    ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"),
    ("Conv2d_3b_1x1", "Conv2d_4a_3x3"),
    ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
     "Mixed_6e"),
    ("Mixed_7a", "Mixed_7b", "Mixed_7c"),
)
_WRAPPER_NAME = re.compile(r"blocks\.(\d+)\.(\d+)\.(.+)")
# The weights file's 1008-way classifier (unused by FID) and BatchNorm's step counter.
_IGNORED = re.compile(r"fc\.(weight|bias)|.*\.num_batches_tracked")
# Flax leaf -> torch tensor suffix.
_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
               "var": "running_var"}


# ---------------------------------------------------------------------------------------------
# Preprocessing.

def _linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(first index, second index, weight of the second) of each output sample along one axis.

  torch's `upsample_bilinear2d` with align_corners=False and an output size: the source
  coordinate `(i + 0.5) * scale - 0.5`, clamped at 0, with the float32 `scale = in / out` and
  one rounding to float32 (torch's kernels compile it to a fused multiply-add; rounding twice
  moves the weights by up to ~1e-5 at 300 pixels).
  """
  scale = np.float64(np.float32(in_size) / np.float32(out_size))
  # Exact in float64 (a 24-bit scale times a short half-integer), then rounded once.
  source = ((np.arange(out_size) + 0.5) * scale - 0.5).astype(np.float32)
  source = np.maximum(source, np.float32(0.0))
  first = np.minimum(np.floor(source).astype(np.int32), in_size - 1)
  second = np.minimum(first + 1, in_size - 1)
  weight = np.clip(source - first.astype(np.float32), 0.0, 1.0).astype(np.float32)
  return first, second, weight


def _resize_axis(x: Array, axis: int, out_size: int) -> Array:
  if x.shape[axis] == out_size:
    return x  # torch's weights are then exactly (1, 0).
  first, second, weight = _linear_taps(x.shape[axis], out_size)
  shape = [1] * x.ndim
  shape[axis] = out_size
  weight = jnp.asarray(weight).reshape(shape)
  return (jnp.take(x, jnp.asarray(first), axis=axis) * (1.0 - weight)
          + jnp.take(x, jnp.asarray(second), axis=axis) * weight)


def resize_bilinear(images: Array, height: int, width: int) -> Array:
  """`[n, h, w, c]` -> `[n, height, width, c]` as torch's `F.interpolate(mode="bilinear",
  align_corners=False)`: two taps per axis whatever the scale (no antialiasing when shrinking,
  unlike `jax.image.resize`)."""
  return _resize_axis(_resize_axis(images, 2, width), 1, height)


def preprocess(images: Array) -> Array:
  """pytorch-fid's `resize_input` and `normalize_input`: `[n, h, w, 3]` in [0, 1] ->
  `[n, 299, 299, 3]` in [-1, 1]."""
  images = resize_bilinear(images.astype(jnp.float32), INPUT_SIZE, INPUT_SIZE)
  return 2.0 * images - 1.0


# ---------------------------------------------------------------------------------------------
# The network.

def _avg_pool_3x3(x: Array) -> Array:
  """The FID blocks' average pool: stride 1, padding 1, padding left out of the mean (as
  TensorFlow; torchvision's blocks count it)."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


def _max_pool_3x3(x: Array, stride: int, padding: int) -> Array:
  """torch's max pool: padding never wins the max; floor division of the output size."""
  pads = ((padding, padding), (padding, padding))
  return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=pads)


class BasicConv2d(nn.Module):
  """torchvision's BasicConv2d: conv (no bias), BatchNorm (eps 1e-3, running statistics),
  ReLU. `padding` is torch's symmetric (height, width) padding."""
  features: int
  kernel_size: tuple[int, int]
  strides: int = 1
  padding: tuple[int, int] = (0, 0)
  precision: PrecisionLike = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: Array) -> Array:
    pad_h, pad_w = self.padding
    x = nn.Conv(self.features, self.kernel_size, strides=self.strides,
                padding=((pad_h, pad_h), (pad_w, pad_w)), use_bias=False,
                precision=self.precision, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name="bn")(x)
    return nn.relu(x)


class InceptionA(nn.Module):
  """pytorch-fid's FIDInceptionA (Mixed_5b-d): `[n, 35, 35, c]` -> `[n, 35, 35, 224 + pool]`."""
  pool_features: int
  precision: PrecisionLike = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    branch1x1 = conv(64, (1, 1), name="branch1x1")(x)
    branch5x5 = conv(48, (1, 1), name="branch5x5_1")(x)
    branch5x5 = conv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(branch5x5)
    branch3x3dbl = conv(64, (1, 1), name="branch3x3dbl_1")(x)
    branch3x3dbl = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(branch3x3dbl)
    branch3x3dbl = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(branch3x3dbl)
    branch_pool = conv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nn.Module):
  """torchvision's InceptionB (Mixed_6a): `[n, 35, 35, 288]` -> `[n, 17, 17, 768]`."""
  precision: PrecisionLike = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    branch3x3 = conv(384, (3, 3), strides=2, name="branch3x3")(x)
    branch3x3dbl = conv(64, (1, 1), name="branch3x3dbl_1")(x)
    branch3x3dbl = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(branch3x3dbl)
    branch3x3dbl = conv(96, (3, 3), strides=2, name="branch3x3dbl_3")(branch3x3dbl)
    return jnp.concatenate([branch3x3, branch3x3dbl, _max_pool_3x3(x, 2, 0)], axis=-1)


class InceptionC(nn.Module):
  """pytorch-fid's FIDInceptionC (Mixed_6b-e): `[n, 17, 17, 768]` -> same shape."""
  channels_7x7: int
  precision: PrecisionLike = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    row = functools.partial(conv, kernel_size=(1, 7), padding=(0, 3))
    column = functools.partial(conv, kernel_size=(7, 1), padding=(3, 0))
    c7 = self.channels_7x7
    branch1x1 = conv(192, (1, 1), name="branch1x1")(x)
    branch7x7 = conv(c7, (1, 1), name="branch7x7_1")(x)
    branch7x7 = row(c7, name="branch7x7_2")(branch7x7)
    branch7x7 = column(192, name="branch7x7_3")(branch7x7)
    branch7x7dbl = conv(c7, (1, 1), name="branch7x7dbl_1")(x)
    branch7x7dbl = column(c7, name="branch7x7dbl_2")(branch7x7dbl)
    branch7x7dbl = row(c7, name="branch7x7dbl_3")(branch7x7dbl)
    branch7x7dbl = column(c7, name="branch7x7dbl_4")(branch7x7dbl)
    branch7x7dbl = row(192, name="branch7x7dbl_5")(branch7x7dbl)
    branch_pool = conv(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([branch1x1, branch7x7, branch7x7dbl, branch_pool], axis=-1)


class InceptionD(nn.Module):
  """torchvision's InceptionD (Mixed_7a): `[n, 17, 17, 768]` -> `[n, 8, 8, 1280]`."""
  precision: PrecisionLike = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    branch3x3 = conv(192, (1, 1), name="branch3x3_1")(x)
    branch3x3 = conv(320, (3, 3), strides=2, name="branch3x3_2")(branch3x3)
    branch7x7x3 = conv(192, (1, 1), name="branch7x7x3_1")(x)
    branch7x7x3 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(branch7x7x3)
    branch7x7x3 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(branch7x7x3)
    branch7x7x3 = conv(192, (3, 3), strides=2, name="branch7x7x3_4")(branch7x7x3)
    return jnp.concatenate([branch3x3, branch7x7x3, _max_pool_3x3(x, 2, 0)], axis=-1)


class InceptionE(nn.Module):
  """pytorch-fid's FIDInceptionE_1 (Mixed_7b, `max_pool=False`) and FIDInceptionE_2 (Mixed_7c,
  `max_pool=True`: the TensorFlow graph max-pools there): `[n, 8, 8, c]` -> `[n, 8, 8, 2048]`."""
  max_pool: bool
  precision: PrecisionLike = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    row = functools.partial(conv, 384, (1, 3), padding=(0, 1))
    column = functools.partial(conv, 384, (3, 1), padding=(1, 0))
    branch1x1 = conv(320, (1, 1), name="branch1x1")(x)
    branch3x3 = conv(384, (1, 1), name="branch3x3_1")(x)
    branch3x3 = jnp.concatenate([row(name="branch3x3_2a")(branch3x3),
                                 column(name="branch3x3_2b")(branch3x3)], axis=-1)
    branch3x3dbl = conv(448, (1, 1), name="branch3x3dbl_1")(x)
    branch3x3dbl = conv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(branch3x3dbl)
    branch3x3dbl = jnp.concatenate([row(name="branch3x3dbl_3a")(branch3x3dbl),
                                    column(name="branch3x3dbl_3b")(branch3x3dbl)], axis=-1)
    pooled = _max_pool_3x3(x, 1, 1) if self.max_pool else _avg_pool_3x3(x)
    branch_pool = conv(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([branch1x1, branch3x3, branch3x3dbl, branch_pool], axis=-1)


class FIDInceptionV3(nn.Module):
  """Images `[n, h, w, 3]` in [0, 1] (any size) -> pool3 features `[n, 2048]` float32.

  `precision` is the convolutions' (HIGHEST: full float32 on TPUs and GPUs too, where the
  default would round operands to bfloat16 / TF32 and move the features, hence FID).
  """
  precision: PrecisionLike = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, images: Array) -> Array:
    x = preprocess(images)
    conv = functools.partial(BasicConv2d, precision=self.precision)
    x = conv(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)
    x = conv(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = conv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3(x, 2, 0)
    x = conv(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = conv(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = _max_pool_3x3(x, 2, 0)
    for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
      x = InceptionA(pool_features, self.precision, name=name)(x)
    x = InceptionB(self.precision, name="Mixed_6a")(x)
    for name, channels_7x7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160),
                               ("Mixed_6e", 192)):
      x = InceptionC(channels_7x7, self.precision, name=name)(x)
    x = InceptionD(self.precision, name="Mixed_7a")(x)
    x = InceptionE(max_pool=False, precision=self.precision, name="Mixed_7b")(x)
    x = InceptionE(max_pool=True, precision=self.precision, name="Mixed_7c")(x)
    return jnp.mean(x, axis=(1, 2))  # AdaptiveAvgPool2d((1, 1)).


def extract_features(variables: Mapping[str, Any], images: Array) -> Array:
  """Pool3 features `[n, 2048]` of images `[n, h, w, 3]` in [0, 1]: the function to jit.

  The weights are an argument, so a caller's jit takes them as an input (sharded or
  replicated as it chooses) rather than baking ~90 MB of constants into the program.
  """
  return FIDInceptionV3().apply(variables, images)


# ---------------------------------------------------------------------------------------------
# Weights.

@functools.cache
def _expected_torch_tensors() -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
  """Torch name (the weights file's) -> (Flax variable path, torch shape), from the module."""
  images = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
  shapes = jax.eval_shape(FIDInceptionV3().init, jax.random.key(0), images)
  expected = {}
  for path, leaf in traverse_util.flatten_dict(shapes).items():
    shape = leaf.shape
    if path[-1] == "kernel":  # HWIO -> OIHW.
      shape = (shape[3], shape[2], shape[0], shape[1])
    expected[".".join(path[1:-1] + (_TORCH_LEAF[path[-1]],))] = (path, tuple(shape))
  return expected


def _canonical_name(torch_name: str) -> str:
  """pytorch-fid's wrapper names (`blocks.2.0.branch1x1...`) -> the weights file's
  (`Mixed_5b.branch1x1...`); other names are returned unchanged."""
  match = _WRAPPER_NAME.fullmatch(torch_name)
  if match is None:
    return torch_name
  block, index, rest = int(match[1]), int(match[2]), match[3]
  if block >= len(_WRAPPER_BLOCKS) or index >= len(_WRAPPER_BLOCKS[block]):
    return torch_name
  return f"{_WRAPPER_BLOCKS[block][index]}.{rest}"


def params_from_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """pytorch-fid state dict (tensor name -> array) -> variables of `FIDInceptionV3`.

  Takes the weights file's names (torchvision Inception3's, `fc.*` ignored) or pytorch-fid
  `InceptionV3`'s (`blocks.i.j.*`); `num_batches_tracked` is ignored. Returns numpy float32
  `{"params": ..., "batch_stats": ...}` (conv kernels HWIO).

  Raises:
    ValueError: listing the missing, unexpected and mis-shaped tensors (counts, first few).
  """
  expected = _expected_torch_tensors()
  found: dict[str, np.ndarray] = {}
  seen: set[str] = set()
  unexpected, duplicates, mis_shaped = [], [], []
  for torch_name, value in state_dict.items():
    if _IGNORED.fullmatch(torch_name):
      continue
    name = _canonical_name(torch_name)
    if name not in expected:
      unexpected.append(torch_name)
    elif name in seen:  # Both names of one tensor.
      duplicates.append(f"{torch_name} (as {name})")
    elif tuple(np.shape(value)) != expected[name][1]:
      mis_shaped.append(f"{torch_name}: {tuple(np.shape(value))}, expected {expected[name][1]}")
    else:
      found[name] = np.asarray(value, np.float32)
    seen.add(name)
  missing = sorted(name for name in expected if name not in seen)
  mismatch.check("The state dict is not pytorch-fid's Inception-v3", missing, unexpected,
                 mis_shaped, other=[("duplicate", duplicates)])
  flat = {}
  for name, value in found.items():
    path = expected[name][0]
    flat[path] = value.transpose(2, 3, 1, 0) if path[-1] == "kernel" else value
  return traverse_util.unflatten_dict(flat)


def load_fid_weights(path: str | os.PathLike) -> dict[str, Any]:
  """Variables of `FIDInceptionV3` from a pytorch-fid weights file (`torch.save`, read
  without torch), e.g. `pt_inception-2015-12-05-6726825d.pth`."""
  state_dict = torch_checkpoint.load_state_dict(path)  # Its errors name the file.
  try:
    return params_from_state_dict(state_dict)
  except ValueError as error:
    raise ValueError(f"{os.fspath(path)}: {error}") from error
