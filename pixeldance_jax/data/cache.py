"""Reading the latent and text-embedding cache: its records as training windows.

The cache (`builders/latent_cache`) holds, for every record of a video dataset, the VAE
posterior moments of every stored frame and, for a frozen text encoder, the caption's text
embedding. It is written by `pixeldance_jax.train.latent_cache` (which owns the encoders and
names the cache after their weights); this module only opens a prepared cache and turns its
records into the same windows `loaders.SampleClip` picks from the videos. No models here.
"""

import dataclasses
from typing import Any

import grain
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from pixeldance_jax.data import tokenizer
from pixeldance_jax.data import loaders
from pixeldance_jax.data.builders.latent_cache import LatentCache, LatentCacheConfig

BUILD_COMMAND = "python -m pixeldance_jax.train.latent_cache --config=... --workdir=..."


def open_cache(cache_config: LatentCacheConfig, data_dir: str) -> tfds.core.DatasetBuilder:
  """The prepared cache named by `cache_config`; a clear error when it was not built."""
  builder = LatentCache(config=cache_config, data_dir=data_dir, file_format="array_record")
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"No latent cache {cache_config.name} under {data_dir} for these encoder weights: "
        f"build it with `{BUILD_COMMAND}` (same config and init_from as training).")
  return builder


@dataclasses.dataclass(frozen=True)
class SampleLatentClip(grain.transforms.RandomMap):
  """The training window of a cached record: the same start `loaders.SampleClip` draws for the
  video record with the same rng. Captions become token ids unless embeddings are cached."""
  frames: int
  random_start: bool
  max_length: int
  pad_token_id: int

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    stored = len(element["latent_mean"])
    start = int(rng.integers(0, stored - self.frames + 1)) if self.random_start else 0
    window = slice(start, start + self.frames)
    sample = {key: element[key][window] for key in ("latent_mean", "latent_logvar")
              if key in element}
    if "text_embedding" in element:
      sample["text_embedding"] = element["text_embedding"]
    else:
      caption = loaders.as_str(element["caption"])
      sample["tokens"] = tokenizer.tokenize([caption], self.max_length, self.pad_token_id)[0]
    return sample


def make_loader(config: ml_collections.ConfigDict, builder: tfds.core.DatasetBuilder,
                process_index: int = 0, process_count: int = 1) -> grain.DataLoader:
  """Like `loaders.make_train_loader`, over a prepared cache: same records, order and windows.

  Batches (per process): latent_mean float32 `[batch, frames, h, w, c]`, latent_logvar (KL
  autoencoder only) the same, and text_embedding float32 `[batch, length, hidden]` (frozen
  text encoder) or tokens int32 `[batch, length]`.
  """
  text = config.text_encoder
  sample = SampleLatentClip(config.data.frames, config.data.random_start, text.max_length,
                            text.pad_token_id)
  return loaders.make_loader(config, builder.as_data_source("train"), [sample],
                              config.batch_size, process_index, process_count)
