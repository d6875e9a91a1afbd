"""Autoencoders between pixels and the latent space the U-Net denoises.

All take pixels in [-1, 1] shaped `[..., height, width, 3]` and latents shaped
`[..., height / f, width / f, latent_channels]`; leading axes (batch, frames) pass through, so a
video is encoded as a batch of images.
"""

import dataclasses
from typing import Any

import einops
import jax
import jax.numpy as jnp
import ml_collections

from pixeldance_jax.models import autoencoder_kl

Array = jax.Array


def to_pixels(video: Array) -> Array:
  """uint8 `[..., 3]` -> float32 in [-1, 1]: the autoencoders' input scaling (the only one)."""
  return jnp.asarray(video).astype(jnp.float32) / 127.5 - 1.0


def to_uint8(pixels: Array) -> Array:
  """Pixels in [-1, 1] `[..., 3]` -> uint8 (rounded, values outside [-1, 1] clipped)."""
  return jnp.clip(jnp.round((pixels + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


@dataclasses.dataclass(frozen=True)
class SpaceToDepth:
  """A lossless, parameter-free 'autoencoder': pixel patches become latent channels.

  It lets the tiny config denoise in pixel space at a quarter of the spatial positions.
  """
  patch_size: int
  scaling_factor: float = 1.0

  @property
  def latent_channels(self) -> int:
    return 3 * self.patch_size ** 2

  def encode(self, pixels: Array, rng: Array | None = None) -> Array:
    del rng  # Deterministic: there is no posterior to sample.
    p = self.patch_size
    latents = einops.rearrange(pixels, "... (h p) (w q) c -> ... h w (p q c)", p=p, q=p)
    return latents * self.scaling_factor

  def decode(self, latents: Array) -> Array:
    p = self.patch_size
    pixels = einops.rearrange(latents / self.scaling_factor, "... h w (p q c) -> ... (h p) (w q) c",
                              p=p, q=p)
    return pixels


def _space_to_depth(config: ml_collections.ConfigDict, params: Any = None) -> SpaceToDepth:
  del params  # Parameter-free.
  ae = config.autoencoder
  autoencoder = SpaceToDepth(ae.patch_size, ae.scaling_factor)
  if autoencoder.latent_channels != ae.latent_channels:
    raise ValueError(
        f"config.autoencoder.latent_channels={ae.latent_channels} but space_to_depth with "
        f"patch_size={ae.patch_size} makes {autoencoder.latent_channels} channels (3 * p * p).")
  return autoencoder


def _kl(config: ml_collections.ConfigDict, params: Any = None) -> autoencoder_kl.KLAutoencoder:
  if params is None:
    raise ValueError(
        "config.autoencoder.kind='kl' needs parameters: convert a diffusers checkpoint with "
        "convert.vae_params_from_torch_state_dict(convert.load_safetensors_folder('<model>/vae'), "
        "spec) and pass them as make_autoencoder(config, params=...).")
  return autoencoder_kl.make_kl_autoencoder(autoencoder_kl.AutoencoderKLSpec.from_config(config),
                                            params)


AUTOENCODERS = {"space_to_depth": _space_to_depth, "kl": _kl}


def make_autoencoder(config: ml_collections.ConfigDict, params: Any = None):
  """The autoencoder `config.autoencoder.kind`; `params` are its weights if it has any."""
  kind = config.autoencoder.kind
  if kind not in AUTOENCODERS:
    raise ValueError(f"config.autoencoder.kind={kind!r} is not one of {sorted(AUTOENCODERS)}.")
  return AUTOENCODERS[kind](config, params)
