"""A full CLIP (transformers' `CLIPModel` layout) in Flax Linen, for the CLIPSIM metric.

CLIPSIM scores a generated video against its caption: the mean over frames of the cosine
similarity between each frame's CLIP image embedding and the caption's CLIP text embedding.
This module holds the two towers and their projections, the frame preprocessing and the score;
`convert.load_clip` reads the weights of a transformers `CLIPModel` folder (no torch).

The text tower is `text_encoder.TextEncoder`; the vision tower (`VisionEncoder`) shares its
`EncoderLayer`, non-causal. Images are channels-last, `[N, image_size, image_size, 3]`.

Parameter tree of `CLIPModel(spec)` (transformers' names, Flax leaves):

  text_model/            `TextEncoder(spec.text)`'s tree: token_embedding/embedding
                         [vocab, text_hidden], position_embedding [max_length, text_hidden],
                         layers_{i}/{layer_norm1,layer_norm2}/{scale,bias},
                         layers_{i}/{q,k,v,out}_proj/{kernel,bias}, layers_{i}/{fc1,fc2}/...,
                         final_layer_norm/{scale,bias}
  vision_model/          class_embedding [vision_hidden],
                         patch_embedding/kernel [patch, patch, 3, vision_hidden] (no bias),
                         position_embedding [num_patches + 1, vision_hidden],
                         pre_layrnorm/{scale,bias} (transformers' spelling), layers_{i}/ as the
                         text tower's, post_layernorm/{scale,bias}
  text_projection/kernel    [text_hidden, projection_dim] (no bias)
  visual_projection/kernel  [vision_hidden, projection_dim] (no bias)
  logit_scale               [] (log of the contrastive temperature's inverse)
"""

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pixeldance_jax.models import layers
from pixeldance_jax.models import text_encoder

Array = jax.Array

# OpenAI CLIP's normalisation of RGB in [0, 1] (transformers' OPENAI_CLIP_MEAN / _STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# transformers' pre-2023 CLIP configs say eos_token_id=2; for those it pools at the largest id.
_LEGACY_EOS_TOKEN_ID = 2


@dataclasses.dataclass(frozen=True)
class VisionSpec:
  """transformers' `CLIPVisionConfig` fields that shape the vision tower."""
  image_size: int
  patch_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  hidden_act: str = "quick_gelu"

  @property
  def num_positions(self) -> int:
    """Patches (a stride-`patch_size` grid, remainder dropped as torch's conv does) + CLS."""
    return (self.image_size // self.patch_size) ** 2 + 1


@dataclasses.dataclass(frozen=True)
class CLIPSpec:
  """Both towers, the shared embedding width and the text pooling token.

  `eos_token_id` is the text config's: the text embedding is read at each row's first
  `eos_token_id`, or, when it is 2 (transformers' legacy configs, e.g. OpenAI's Hub
  checkpoints), at the row's largest id, as transformers does. CLIP's tokenizer makes
  END_OF_TEXT (49407) the largest id, so both rules agree on its output.
  """
  text: text_encoder.TextEncoderSpec
  vision: VisionSpec
  projection_dim: int
  eos_token_id: int = 49407


class VisionEncoder(nn.Module):
  """transformers' `CLIPVisionTransformer`: `[N, S, S, 3]` pixels -> pooled `[N, hidden]`.

  Patch embedding (a stride-`patch_size` conv without bias), CLS token first, position
  embeddings, `pre_layrnorm`, non-causal encoder layers, then `post_layernorm` of the CLS token
  (transformers' `pooler_output`).
  """
  spec: VisionSpec

  @nn.compact
  def __call__(self, pixel_values: Array) -> Array:
    spec = self.spec
    size = spec.image_size
    if pixel_values.shape[1:] != (size, size, 3):
      raise ValueError(f"pixel_values must be [N, {size}, {size}, 3] (see preprocess_frames), "
                       f"got {pixel_values.shape}.")
    patch = (spec.patch_size, spec.patch_size)
    patches = nn.Conv(
        spec.hidden_size, patch, strides=patch, padding="VALID", use_bias=False,
        dtype=jnp.float32, name="patch_embedding",
        kernel_init=layers.logical(layers.default_kernel_init, (None, None, None, "embed")),
    )(pixel_values.astype(jnp.float32))
    patches = patches.reshape(patches.shape[0], -1, spec.hidden_size)  # Row-major, as torch.
    class_embedding = self.param(
        "class_embedding", layers.logical(nn.initializers.normal(spec.hidden_size ** -0.5),
                                          ("embed",)), (spec.hidden_size,))
    position_embedding = self.param(
        "position_embedding", layers.logical(nn.initializers.normal(0.02), ("length", "embed")),
        (spec.num_positions, spec.hidden_size))
    cls = jnp.broadcast_to(class_embedding, (patches.shape[0], 1, spec.hidden_size))
    x = jnp.concatenate([cls, patches], axis=1) + position_embedding[None]
    x = layers.layer_norm("pre_layrnorm")(x)
    for i in range(spec.num_layers):
      x = text_encoder.EncoderLayer(spec, causal=False, name=f"layers_{i}")(x)
    return layers.layer_norm("post_layernorm")(x[:, 0])


def _projection(features: int) -> nn.Dense:
  """A bias-free linear map to the shared embedding space; kernel `[hidden, features]`."""
  return nn.Dense(features, use_bias=False, dtype=jnp.float32,
                  kernel_init=layers.logical(layers.default_kernel_init, ("embed", None)))


def pool_text(hidden_states: Array, token_ids: Array, eos_token_id: int) -> Array:
  """`[N, length, hidden]` -> `[N, hidden]` where transformers' CLIPTextModel pools.

  At each row's first `eos_token_id`; with the legacy `eos_token_id` 2, at its largest id (the
  first one if repeated).
  """
  if eos_token_id == _LEGACY_EOS_TOKEN_ID:
    position = jnp.argmax(token_ids, axis=-1)
    return jnp.take_along_axis(hidden_states, position[:, None, None], axis=1)[:, 0]
  return text_encoder.pool_at_first_eos(hidden_states, token_ids, eos_token_id)


def _normalize(x: Array) -> Array:
  """Unit L2 norm along the last axis (a zero vector stays zero, as torch's F.normalize)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class CLIPModel(nn.Module):
  """transformers' `CLIPModel`: `encode_text`, `encode_image` and contrastive logits.

  Apply a method as `CLIPModel(spec).apply({"params": params}, x, method="encode_image")`.
  Embeddings are unnormalised, as transformers' `get_text_features` / `get_image_features`.
  """
  spec: CLIPSpec

  def setup(self) -> None:
    spec = self.spec
    self.text_model = text_encoder.TextEncoder(spec.text)
    self.vision_model = VisionEncoder(spec.vision)
    self.text_projection = _projection(spec.projection_dim)
    self.visual_projection = _projection(spec.projection_dim)
    self.logit_scale = self.param(
        "logit_scale", layers.logical(nn.initializers.constant(math.log(1 / 0.07)), ()), ())

  def encode_text(self, token_ids: Array) -> Array:
    """int `[N, length]` (length <= max_length, with an EOS per row) -> `[N, projection_dim]`."""
    hidden_states = self.text_model(token_ids)
    return self.text_projection(pool_text(hidden_states, token_ids, self.spec.eos_token_id))

  def encode_image(self, pixel_values: Array) -> Array:
    """`[N, image_size, image_size, 3]` (`preprocess_frames`' output) -> `[N, projection_dim]`."""
    return self.visual_projection(self.vision_model(pixel_values))

  def __call__(self, token_ids: Array, pixel_values: Array) -> Array:
    """transformers' `logits_per_image` `[N_images, N_texts]`: scaled cosine similarities."""
    images = _normalize(self.encode_image(pixel_values))
    texts = _normalize(self.encode_text(token_ids))
    return jnp.exp(self.logit_scale) * images @ texts.T


def param_shapes(spec: CLIPSpec) -> Any:
  """The parameter tree as `jax.ShapeDtypeStruct`s, without allocating any weights."""
  token_ids = jax.ShapeDtypeStruct((1, spec.text.max_length), jnp.int32)
  size = spec.vision.image_size
  pixel_values = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  variables = jax.eval_shape(CLIPModel(spec).init, jax.random.key(0), token_ids, pixel_values)
  return nn.meta.unbox(variables["params"])


def preprocess_frames(frames: Array, image_size: int) -> Array:
  """RGB frames `[..., H, W, 3]` in [0, 1], any size -> CLIP's input `[..., S, S, 3]`.

  As CLIP's preprocessing, with S = `image_size`: bicubic resize of the shorter side to S (the
  longer to `int(S * long / short)`), centre crop (offset `(resized - S) // 2`, as
  transformers), then normalisation by `CLIP_MEAN` / `CLIP_STD`. Jittable (shapes are static).

  The kernel is PIL's and torch's antialiased bicubic (Keys cubic, a = -0.5, widened when
  downsampling, weights renormalised at the borders), but on float frames in one separable
  pass, clipped to [0, 1] only at the end. OpenAI's `preprocess` and transformers'
  `CLIPImageProcessorPil` resize a uint8 PIL image, which PIL does in two passes (horizontal,
  then vertical), each clipped and rounded to uint8: on smooth images the two agree to about
  1/255; on pixel noise, where the intermediate clipping bites, by up to ~20/255.
  transformers 5's torchvision-backed `CLIPImageProcessor` also resizes 8-bit images.
  """
  height, width = frames.shape[-3:-1]
  if frames.shape[-1] != 3:
    raise ValueError(f"frames must be RGB [..., H, W, 3], got {frames.shape}.")
  short, long = min(height, width), max(height, width)
  resized_long = int(image_size * long / short)
  new_height, new_width = ((image_size, resized_long) if height <= width
                           else (resized_long, image_size))
  flat = frames.reshape((-1, height, width, 3)).astype(jnp.float32)
  flat = jax.image.resize(flat, (flat.shape[0], new_height, new_width, 3), "bicubic",
                          antialias=True)
  top, left = (new_height - image_size) // 2, (new_width - image_size) // 2
  flat = jnp.clip(flat[:, top:top + image_size, left:left + image_size], 0.0, 1.0)
  flat = (flat - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)
  return flat.reshape(frames.shape[:-3] + (image_size, image_size, 3))


def clipsim(image_embeds: Array, text_embeds: Array) -> Array:
  """Cosine similarity of image and text embeddings `[..., D]` (broadcast) -> `[...]`.

  Raw cosine in [-1, 1]: not scaled by 100 and not clamped at 0 as some CLIPScore
  implementations do. A video's CLIPSIM is the mean over its frames of
  `clipsim(frame embeddings [F, D], caption embedding [D])` (`video_clipsim`), then averaged
  over videos; PixelDance reports 0.3125 on MSR-VTT in these units.
  """
  return jnp.sum(_normalize(image_embeds) * _normalize(text_embeds), axis=-1)


def video_clipsim(frame_embeds: Array, text_embeds: Array) -> Array:
  """Frames `[B, F, D]` and captions `[B, D]` -> per-video CLIPSIM `[B]` (mean over frames)."""
  return jnp.mean(clipsim(frame_embeds, text_embeds[:, None]), axis=-1)
