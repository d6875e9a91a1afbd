"""TFDS builder writing a video dataset's VAE latent moments (and text embeddings) once.

Record i is the encoding of record i of the source split (same order, every stored frame), so
the training loader can pick the same windows from it as from the videos:

  caption: str, latent_mean: float32 `[frames, h, w, c]` (unscaled posterior mean),
  latent_logvar: float32 `[frames, h, w, c]` (stochastic autoencoders only),
  text_embedding: float32 `[length, hidden]` (when the text encoder is frozen).

The encoders are passed in (`encode_record`); the config name carries a fingerprint of their
weights, so a cache is never read with other weights than it was written with.
"""

import dataclasses
from typing import Any, Callable, Iterator

import numpy as np
import tensorflow_datasets as tfds
import tqdm

# Source record -> cache record (the arrays above).
RecordEncoder = Callable[[dict[str, Any]], dict[str, np.ndarray]]


@dataclasses.dataclass(kw_only=True)
class LatentCacheConfig(tfds.core.BuilderConfig):
  """`name`: source dataset config + encoder fingerprint (`latent_cache.cache_config`)."""
  latent_shape: tuple[int, int, int] = (32, 32, 4)  # (h, w, c) of one frame's latent.
  has_logvar: bool = True
  text_shape: tuple[int, int] | None = None  # (length, hidden); None: captions only.
  splits: tuple[str, ...] = ("train",)


class LatentCache(tfds.core.GeneratorBasedBuilder):
  """Pass `config=LatentCacheConfig(...)`, `source` (split -> data source) and `encode_record`."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def __init__(self, *, source: dict[str, Any] | None = None,
               encode_record: RecordEncoder | None = None, **kwargs):
    # Reading a prepared cache needs neither.
    self._source, self._encode_record = source, encode_record
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    per_frame = tfds.features.Tensor(shape=(None, *config.latent_shape), dtype=np.float32,
                                     encoding=tfds.features.Encoding.BYTES)
    features = {"caption": tfds.features.Text(), "latent_mean": per_frame}
    if config.has_logvar:
      features["latent_logvar"] = per_frame
    if config.text_shape is not None:
      features["text_embedding"] = tfds.features.Tensor(shape=config.text_shape,
                                                        dtype=np.float32)
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict(features), supervised_keys=None,
        disable_shuffling=True)  # Record i must stay the encoding of source record i.

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
    del dl_manager
    if self._source is None or self._encode_record is None:
      raise ValueError(f"The latent cache {self.builder_config.name} is not built yet; build "
                       "it with `python -m pixeldance_jax.train.latent_cache --config=... "
                       "--workdir=...` (or latent_cache.build_cache).")
    return {split: self._generate_examples(split) for split in self.builder_config.splits}

  def _generate_examples(self, split: str) -> Iterator[tuple[int, dict]]:
    source = self._source[split]
    for index in tqdm.trange(len(source), desc=f"Encoding {split}", unit="clip"):
      yield index, self._encode_record(source[index])
