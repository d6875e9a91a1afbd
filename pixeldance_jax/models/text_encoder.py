"""CLIP text transformer (transformers' `CLIPTextModel` layout) in Flax Linen.

Token ids `[batch, length]` -> hidden states `[batch, length, hidden]`, the keys and values of the
U-Net's cross-attention. Causal self-attention, pre-LayerNorm, quick-GELU MLP, as CLIP.
"""

import dataclasses

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
    return cls(vocab_size=text.vocab_size, max_length=text.max_length,
               hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
               num_layers=text.num_layers, num_heads=text.num_heads, hidden_act=text.hidden_act)


class EncoderLayer(nn.Module):
  spec: TextEncoderSpec

  @nn.compact
  def __call__(self, x: Array) -> Array:
    spec = self.spec
    head_dim = spec.hidden_size // spec.num_heads
    h = layers.layer_norm("layer_norm1")(x)
    split = lambda t: t.reshape(t.shape[:-1] + (spec.num_heads, head_dim))
    q, k, v = (split(layers.dense(spec.hidden_size, ("embed", "heads"), jnp.float32, name)(h))
               for name in ("q_proj", "k_proj", "v_proj"))
    attended = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    attended = attended.reshape(attended.shape[:-2] + (spec.hidden_size,))
    x = x + layers.dense(spec.hidden_size, ("heads", "embed"), jnp.float32, "out_proj")(attended)
    h = layers.layer_norm("layer_norm2")(x)
    h = layers.dense(spec.intermediate_size, ("embed", "mlp"), jnp.float32, "fc1")(h)
    h = ACTIVATIONS[spec.hidden_act](h)
    return x + layers.dense(spec.hidden_size, ("mlp", "embed"), jnp.float32, "fc2")(h)


class TextEncoder(nn.Module):
  """`[batch, length]` int token ids -> last hidden state `[batch, length, hidden]`."""
  spec: TextEncoderSpec

  @nn.compact
  def __call__(self, token_ids: Array) -> Array:
    spec = self.spec
    init = layers.logical(nn.initializers.normal(0.02), ("vocab", "embed"))
    token_embedding = nn.Embed(spec.vocab_size, spec.hidden_size, embedding_init=init,
                               name="token_embedding")
    position_embedding = self.param(
        "position_embedding", layers.logical(nn.initializers.normal(0.01), ("length", "embed")),
        (spec.max_length, spec.hidden_size))
    length = token_ids.shape[-1]
    x = token_embedding(token_ids) + position_embedding[None, :length]
    for i in range(spec.num_layers):
      x = EncoderLayer(spec, name=f"layers_{i}")(x)
    return layers.layer_norm("final_layer_norm")(x)
