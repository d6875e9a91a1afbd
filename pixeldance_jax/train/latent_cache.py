"""Latent and text-embedding cache: encode the frozen parts once, train without them.

`python -m pixeldance_jax.train.latent_cache --config=... --workdir=...` (or `build_cache`)
writes, for every record of the video dataset, the VAE posterior moments of every stored frame
and, when the text encoder is frozen (`config.text_encoder.trainable=False`), the caption's text
embedding, as array_record (`data/builders/latent_cache`). With `config.data.cache_latents=True`
the trainer reads them with `make_cached_loader` and computes the loss with `cached_loss_fn`,
which has `step.loss_fn`'s signature and, given the same rng, the same value: the posterior
sample uses the same noise, and the conditions (last frame from the last 3, condition noise, eta
and text drop) are drawn from the moments-derived latents exactly as from live ones.

Why moments and not latents: the KL posterior is sampled per step (as the live step does), so
the cache does not freeze one sample. A trainable text encoder cannot be cached: then the
batch carries token ids, as in live training. Reading the records is `data.cache`'s (no
models there); encoding and naming the cache after the encoder weights is this module's.
"""

import dataclasses
import functools
import hashlib
from typing import Any

from absl import app, flags, logging
import grain
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np
import tensorflow_datasets as tfds

from pixeldance_jax.io import checkpoints
from pixeldance_jax.cli import console
from pixeldance_jax.data import tokenizer
from pixeldance_jax.data import cache, conditioning, media, loaders
from pixeldance_jax.data.builders.latent_cache import LatentCache, LatentCacheConfig
from pixeldance_jax.diffusion import schedules
from pixeldance_jax.models import autoencoder as autoencoder_lib
from pixeldance_jax.models import autoencoder_kl, pixeldance
from pixeldance_jax.parallel import mesh as mesh_lib
from pixeldance_jax.train import state as state_lib
from pixeldance_jax.train import step as step_lib

Array = jax.Array


# --- Encoding ----------------------------------------------------------------------------------


def encode_moments(autoencoder: Any, pixels: Array) -> tuple[Array, Array | None]:
  """Pixels `[n, H, W, 3]` in [-1, 1] -> unscaled (mean, logvar), each `[n, h, w, c]`.

  Deterministic autoencoders (space-to-depth) have no posterior: logvar is None.
  """
  if isinstance(autoencoder, autoencoder_kl.KLAutoencoder):
    return autoencoder.module.apply({"params": autoencoder.params}, pixels,
                                    method=autoencoder_kl.AutoencoderKL.encode)
  return dataclasses.replace(autoencoder, scaling_factor=1.0).encode(pixels), None


def sample_latents(mean: Array, logvar: Array | None, rng: Array,
                   scaling_factor: float) -> Array:
  """Scaled latents `[..., h, w, c]` from cached moments, as `autoencoder.encode(pixels, rng)`.

  The noise is drawn over the flattened images, exactly as `KLAutoencoder.encode` draws it.
  """
  if logvar is None:
    return mean * scaling_factor
  images = mean.reshape((-1,) + mean.shape[-3:])
  noise = jax.random.normal(rng, images.shape, images.dtype)
  latents = images + jnp.exp(0.5 * logvar.reshape(images.shape)) * noise
  return (latents * scaling_factor).reshape(mean.shape)


def caches_text(config: ml_collections.ConfigDict) -> bool:
  """Text embeddings are cached only for a frozen text encoder (they would go stale)."""
  return not config.text_encoder.trainable


def fingerprint(tree: Any) -> str:
  """A short hash of a parameter tree's shapes and values (sums and sums of squares)."""
  leaves = jax.tree.leaves(tree)
  sums = jax.jit(lambda xs: [(jnp.sum(x.astype(jnp.float32)),
                              jnp.sum(jnp.square(x.astype(jnp.float32)))) for x in xs])(leaves)
  description = repr([(leaf.shape, str(leaf.dtype), float(a), float(b))
                      for leaf, (a, b) in zip(leaves, sums)])
  return hashlib.sha1(description.encode("utf-8")).hexdigest()[:10]


def _encoder_weights(config: ml_collections.ConfigDict, params: Any, frozen: Any) -> dict:
  weights = {"autoencoder": frozen.get("autoencoder", {})}
  if caches_text(config):
    weights["text_encoder"] = params["text_encoder"]
  return weights


def _stored_frames(source_builder: tfds.core.DatasetBuilder,
                   config: ml_collections.ConfigDict) -> int:
  """Frames per record at most: the padded length every record is encoded at (one compile)."""
  return getattr(source_builder.builder_config, "max_frames", config.data.frames)


def cache_config(config: ml_collections.ConfigDict, source_builder: tfds.core.DatasetBuilder,
                 params: Any, frozen: Any) -> LatentCacheConfig:
  """Shapes of the cached arrays; the name ties them to the source dataset and the weights."""
  autoencoder = autoencoder_lib.make_autoencoder(config, frozen.get("autoencoder"))
  size = config.data.image_size // config.autoencoder.patch_size
  text = config.text_encoder
  weights = fingerprint(_encoder_weights(config, params, frozen))
  name = (f"{source_builder.name}_{source_builder.builder_config.name}_{config.autoencoder.kind}"
          f"_text{int(caches_text(config))}_{weights}")
  return LatentCacheConfig(
      name=name, latent_shape=(size, size, config.autoencoder.latent_channels),
      has_logvar=isinstance(autoencoder, autoencoder_kl.KLAutoencoder),
      text_shape=(text.max_length, text.hidden_size) if caches_text(config) else None,
      splits=("train",))


def make_record_encoder(config: ml_collections.ConfigDict, params: Any, frozen: Any,
                        max_frames: int):
  """Source record -> cache record; frames are padded to `max_frames` so one program serves all."""
  autoencoder = autoencoder_lib.make_autoencoder(config, frozen.get("autoencoder"))
  model = pixeldance.make_model(config)
  text = config.text_encoder

  def moments(autoencoder, video):
    return encode_moments(autoencoder, autoencoder_lib.to_pixels(video))

  if isinstance(autoencoder, autoencoder_kl.KLAutoencoder):
    # A pytree argument: its weights are not baked into the program as constants.
    encode_frames = functools.partial(jax.jit(moments), autoencoder)
  else:
    encode_frames = jax.jit(functools.partial(moments, autoencoder))  # Parameter-free.

  @jax.jit
  def encode_text(text_params, token_ids):
    return model.apply({"params": {"text_encoder": text_params}}, token_ids,
                       method=pixeldance.PixelDance.encode_text)

  def encode_record(record: dict[str, Any]) -> dict[str, np.ndarray]:
    video = record["video"] if "video" in record else media.decode_frames(record["frames"])
    padded = np.zeros((max_frames,) + video.shape[1:], np.uint8)
    padded[:len(video)] = video
    mean, logvar = encode_frames(padded)
    caption = loaders.as_str(record["caption"])
    cached = {"caption": caption, "latent_mean": np.asarray(mean)[:len(video)]}
    if logvar is not None:
      cached["latent_logvar"] = np.asarray(logvar)[:len(video)]
    if caches_text(config):
      tokens = tokenizer.tokenize([caption], text.max_length, text.pad_token_id)
      cached["text_embedding"] = np.asarray(encode_text(params["text_encoder"], tokens))[0]
    return cached

  return encode_record


def build_cache(config: ml_collections.ConfigDict, data_dir: str, params: Any,
                frozen: Any) -> tfds.core.DatasetBuilder:
  """The cache of `config.data`'s dataset under `<data_dir>/latent_cache/`, built if missing.

  `params`/`frozen` are the weights training will use (the text encoder's and the VAE's are
  read). One process encodes: run it before training (the CLI below) on multi-host jobs.
  """
  source_builder = loaders.build_dataset(config.data, data_dir)
  builder = LatentCache(
      config=cache_config(config, source_builder, params, frozen), data_dir=data_dir,
      file_format="array_record",
      source={"train": source_builder.as_data_source("train")},
      encode_record=make_record_encoder(config, params, frozen,
                                        _stored_frames(source_builder, config)))
  builder.download_and_prepare(file_format="array_record", download_config=tfds.download.
                               DownloadConfig(try_download_gcs=False))
  return builder


def cache_builder(config: ml_collections.ConfigDict, data_dir: str, params: Any,
                  frozen: Any) -> tfds.core.DatasetBuilder:
  """The prepared cache for these weights; a clear error when it was not built."""
  source_builder = loaders.build_dataset(config.data, data_dir)
  return cache.open_cache(cache_config(config, source_builder, params, frozen), data_dir)


def make_cached_loader(config: ml_collections.ConfigDict, data_dir: str, params: Any,
                       frozen: Any, process_index: int = 0,
                       process_count: int = 1) -> grain.DataLoader:
  """`data.cache.make_loader` over the cache of these weights (see there for the batches)."""
  return cache.make_loader(config, cache_builder(config, data_dir, params, frozen),
                           process_index, process_count)


# --- Loss --------------------------------------------------------------------------------------


def cached_loss_fn(params, frozen, batch: dict[str, Array], rng: Array,
                   config: ml_collections.ConfigDict, use_temporal: bool = True,
                   condition_rates: dict[str, Array] | None = None
                   ) -> tuple[Array, dict[str, Array]]:
  """`step.loss_fn` on a cached batch (see `make_cached_loader`): same rng, same loss.

  Only the empty prompt's embedding (one row, for text dropout) is computed by the text encoder.
  """
  del frozen  # The autoencoder's work is in the cache.
  model = pixeldance.make_model(config)
  alpha_bar = jnp.asarray(schedules.alphas_cumprod(config.diffusion))
  # The split of step.loss_fn: the same key draws the same thing in both.
  cond_rng, time_rng, noise_rng, dropout_rng, encode_rng = jax.random.split(rng, 5)
  latents = sample_latents(batch["latent_mean"], batch.get("latent_logvar"), encode_rng,
                           config.autoencoder.scaling_factor)
  encode_text = lambda ids: model.apply({"params": params}, ids,
                                        method=pixeldance.PixelDance.encode_text)
  null_ids = step_lib.null_token_ids(config)
  if "text_embedding" in batch:
    text, null_text = batch["text_embedding"], encode_text(null_ids[None])[0]
  else:
    text, null_text = batch["tokens"], null_ids
  image_condition, text = conditioning.training_conditions(
      cond_rng, latents, text, null_text, alpha_bar, config, condition_rates)
  context = text if "text_embedding" in batch else encode_text(text)
  if not config.text_encoder.trainable:
    context = jax.lax.stop_gradient(context)
  return step_lib.denoising_loss(params, model, latents, image_condition, context,
                                 (time_rng, noise_rng, dropout_rng), alpha_bar, config,
                                 use_temporal)


# --- CLI ---------------------------------------------------------------------------------------


def pretrained_weights(config: ml_collections.ConfigDict) -> tuple[Any, Any]:
  """(params, frozen) the training run will start from: `config.init_from`'s weights."""
  abstract, _ = state_lib.abstract_state(config, mesh_lib.make_mesh(config.mesh))
  if config.init_from:
    return checkpoints.restore_pretrained(config.init_from, abstract.params, abstract.frozen)
  if config.autoencoder.kind == "kl" or caches_text(config):
    raise ValueError("Caching a KL autoencoder's latents or a frozen text encoder's embeddings "
                     "needs their pretrained weights: set --config.init_from.")
  return jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), (abstract.params, abstract.frozen))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = flags.FLAGS.config
  data_dir = loaders.data_dir(config, flags.FLAGS.workdir)
  builder = build_cache(config, data_dir, *pretrained_weights(config))
  logging.info("Latent cache ready: %s", builder.data_dir)


if __name__ == "__main__":
  # Defined here only: the trainer imports this module beside train.py's own --config.
  config_flags.DEFINE_config_file("config", None, "Training config (get_config()).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "The training workdir (its data/ folder).")
  flags.mark_flags_as_required(["config", "workdir"])
  console.run(main)
