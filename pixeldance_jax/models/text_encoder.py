"""CLIP text transformer (transformers' `CLIPTextModel` layout) in Flax Linen.

Token ids `[batch, length]` -> hidden states `[batch, length, hidden]`, the keys and values of the
U-Net's cross-attention. Causal self-attention, pre-LayerNorm, quick-GELU MLP, as CLIP.

`use_penultimate_layer` conditions on the second-to-last layer's output through
`final_layer_norm`, as Stability's SD 2.x (`layer="penultimate"`) and diffusers' `clip_skip=1`
do. diffusers' SD 2.x `text_encoder` checkpoints already have that last layer removed
(`num_hidden_layers=23` of OpenCLIP ViT-H's 24): load those with the option off.

`EncoderLayer` also serves CLIP's vision tower (`clip.VisionEncoder`), without the causal mask.
"""

import dataclasses
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from pixeldance_jax.models import layers

Array = jax.Array

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


@dataclasses.dataclass(frozen=True)
class TextEncoderSpec:
  vocab_size: int
  max_length: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  hidden_act: str = "quick_gelu"
  use_penultimate_layer: bool = False

  @property
  def num_layers_run(self) -> int:
    """Layers evaluated (and holding parameters): the last one is dropped for the penultimate."""
    return self.num_layers - 1 if self.use_penultimate_layer else self.num_layers

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "TextEncoderSpec":
    text = config.text_encoder
    if text.hidden_act not in ACTIVATIONS:
      raise ValueError(f"config.text_encoder.hidden_act={text.hidden_act!r} is not one of "
                       f"{sorted(ACTIVATIONS)}")
    if config.unet.cross_attention_dim != text.hidden_size:
      raise ValueError(
          f"config.unet.cross_attention_dim ({config.unet.cross_attention_dim}) must equal "
          f"config.text_encoder.hidden_size ({text.hidden_size}).")
    use_penultimate_layer = text.use_penultimate_layer
    if use_penultimate_layer and text.num_layers < 2:
      raise ValueError("config.text_encoder.use_penultimate_layer needs num_layers >= 2, got "
                       f"{text.num_layers}.")
    return cls(vocab_size=text.vocab_size, max_length=text.max_length,
               hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
               num_layers=text.num_layers, num_heads=text.num_heads, hidden_act=text.hidden_act,
               use_penultimate_layer=use_penultimate_layer)


class LayerSpec(Protocol):
  """What an `EncoderLayer` reads: a `TextEncoderSpec`, or `clip.VisionSpec` for the image tower."""

  @property
  def hidden_size(self) -> int: ...

  @property
  def intermediate_size(self) -> int: ...

  @property
  def num_heads(self) -> int: ...

  @property
  def hidden_act(self) -> str: ...


# The hidden states stay split by example, as the batch comes in: left to itself, the
# partitioner may instead gather the whole batch onto every device and split the matmuls by
# their fsdp-sharded weights, all-reducing every layer's activations.
HIDDEN_AXES = ("batch", "length", None)


class EncoderLayer(nn.Module):
  """transformers' `CLIPEncoderLayer`: `[batch, length, hidden]` -> the same shape.

  Causal for the text tower; CLIP's vision tower (`causal=False`) attends between all patches.
  """
  spec: LayerSpec
  causal: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    spec = self.spec
    head_dim = spec.hidden_size // spec.num_heads
    h = layers.layer_norm("layer_norm1")(x)
    split = lambda t: t.reshape(t.shape[:-1] + (spec.num_heads, head_dim))
    q, k, v = (split(layers.dense(spec.hidden_size, ("embed", "heads"), jnp.float32, name)(h))
               for name in ("q_proj", "k_proj", "v_proj"))
    attended = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal)
    attended = attended.reshape(attended.shape[:-2] + (spec.hidden_size,))
    x = x + layers.dense(spec.hidden_size, ("heads", "embed"), jnp.float32, "out_proj")(attended)
    h = layers.layer_norm("layer_norm2")(x)
    h = layers.dense(spec.intermediate_size, ("embed", "mlp"), jnp.float32, "fc1")(h)
    h = ACTIVATIONS[spec.hidden_act](h)
    x = x + layers.dense(spec.hidden_size, ("mlp", "embed"), jnp.float32, "fc2")(h)
    return nn.with_logical_constraint(x, HIDDEN_AXES)


class TextEncoder(nn.Module):
  """`[batch, length]` int token ids -> hidden state `[batch, length, hidden]`.

  The last layer's output (transformers' `last_hidden_state`) or, with `use_penultimate_layer`,
  the one before it; either through `final_layer_norm`. Only a causal mask, no padding mask:
  CLIP and Stable Diffusion run padded prompts this way.
  """
  spec: TextEncoderSpec

  @nn.compact
  def __call__(self, token_ids: Array) -> Array:
    spec = self.spec
    length = token_ids.shape[-1]
    if length > spec.max_length:
      raise ValueError(f"{length} tokens exceed the {spec.max_length} position embeddings.")
    init = layers.logical(nn.initializers.normal(0.02), ("vocab", "embed"))
    token_embedding = nn.Embed(spec.vocab_size, spec.hidden_size, embedding_init=init,
                               name="token_embedding")
    position_embedding = self.param(
        "position_embedding", layers.logical(nn.initializers.normal(0.01), ("length", "embed")),
        (spec.max_length, spec.hidden_size))
    x = token_embedding(token_ids) + position_embedding[None, :length]
    x = nn.with_logical_constraint(x, HIDDEN_AXES)
    for i in range(spec.num_layers_run):
      x = EncoderLayer(spec, name=f"layers_{i}")(x)
    return layers.layer_norm("final_layer_norm")(x)


def pool_at_first_eos(hidden_states: Array, token_ids: Array, eos_token_id: int) -> Array:
  """`[batch, length, hidden]` -> `[batch, hidden]` at each row's first `eos_token_id`.

  transformers' `pooler_output`: the first match, because padding may reuse the EOS id. A row
  without EOS pools position 0, as `argmax` of all-False does in transformers.
  """
  first_eos = jnp.argmax(token_ids == eos_token_id, axis=-1)
  return jnp.take_along_axis(hidden_states, first_eos[:, None, None], axis=1)[:, 0]


def param_shapes(spec: TextEncoderSpec) -> Any:
  """The parameter tree as `jax.ShapeDtypeStruct`s, without allocating any weights."""
  token_ids = jax.ShapeDtypeStruct((1, spec.max_length), jnp.int32)
  variables = jax.eval_shape(TextEncoder(spec).init, jax.random.key(0), token_ids)
  return nn.meta.unbox(variables["params"])
