"""TFDS builder writing generated moving-shape clips as array_record files.

No TensorFlow: array_record writing and `as_data_source` reading work with TFDS's numpy
serializer, and the clips are generated locally, so nothing is downloaded.
"""

import dataclasses
from typing import Iterator

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from pixeldance_jax.data import moving_shapes


@dataclasses.dataclass(kw_only=True)
class MovingShapesConfig(tfds.core.BuilderConfig):
  """Generator settings and split sizes; `name` must encode all of them (see `from_config`)."""
  frames: int = 8
  image_size: int = 32
  second_object_prob: float = 0.0
  background_color_prob: float = 0.0
  generator_seed: int = 0
  path_change_prob: float = 0.0
  num_train_clips: int = 8000
  num_test_clips: int = 64

  @classmethod
  def from_config(cls, data_config: ml_collections.ConfigDict) -> "MovingShapesConfig":
    fields = dict(
        frames=data_config.frames,
        image_size=data_config.image_size,
        second_object_prob=float(data_config.second_object_prob),
        background_color_prob=float(data_config.background_color_prob),
        generator_seed=data_config.generator_seed,
        path_change_prob=float(data_config.get("path_change_prob", 0.0)),
        num_train_clips=data_config.num_train_clips,
        num_test_clips=data_config.num_test_clips,
    )
    return cls(name=config_name(**fields), **fields)

  @property
  def spec(self) -> moving_shapes.MovingShapesSpec:
    return moving_shapes.MovingShapesSpec(
        frames=self.frames,
        image_size=self.image_size,
        second_object_prob=self.second_object_prob,
        background_color_prob=self.background_color_prob,
        seed=self.generator_seed,
        path_change_prob=self.path_change_prob,
    )


def config_name(*, frames: int, image_size: int, second_object_prob: float,
                background_color_prob: float, generator_seed: int, num_train_clips: int,
                num_test_clips: int, path_change_prob: float = 0.0) -> str:
  """A directory name unique per setting, so settings never share files in one data_dir (the
  path changes only where there are any: the straight-path data keeps its name)."""
  paths = f"_paths{path_change_prob:g}" if path_change_prob else ""
  return (f"f{frames}_s{image_size}_obj{second_object_prob:g}_bg{background_color_prob:g}"
          f"{paths}_seed{generator_seed}_train{num_train_clips}_test{num_test_clips}")


class MovingShapes(tfds.core.GeneratorBasedBuilder):
  """Captioned clips of one moving shape (see `moving_shapes.py`).

  No predefined BUILDER_CONFIGS: pass `config=MovingShapesConfig.from_config(config.data)`.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def _info(self) -> tfds.core.DatasetInfo:
    frames, size = self.builder_config.frames, self.builder_config.image_size
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "index": tfds.features.Scalar(dtype=np.int64),
            # zlib: solid backgrounds compress well, and decoding needs only numpy.
            "video": tfds.features.Tensor(
                shape=(frames, size, size, 3), dtype=np.uint8, encoding="zlib"),
            "caption": tfds.features.Text(),
            "centroids": tfds.features.Tensor(shape=(frames, 2), dtype=np.float32),
            "velocity": tfds.features.Tensor(shape=(2,), dtype=np.float32),
            "color": tfds.features.Tensor(shape=(3,), dtype=np.uint8),
            "background": tfds.features.Tensor(shape=(3,), dtype=np.uint8),
            "direction": tfds.features.Text(),
            "speed": tfds.features.Text(),
        }),
        supervised_keys=None,
        # Keep generation order, so record i of a split is `generate_clip(spec, split, i)`;
        # the grain sampler shuffles for training.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
    del dl_manager  # Generated locally.
    return {
        "train": self._generate_examples("train", self.builder_config.num_train_clips),
        "test": self._generate_examples("test", self.builder_config.num_test_clips),
    }

  def _generate_examples(self, split: str, count: int) -> Iterator[tuple[int, dict]]:
    spec = self.builder_config.spec
    for index in range(count):
      clip = moving_shapes.generate_clip(spec, split, index)
      del clip["path"]  # Not stored: the centroids hold the path, and `generate_clip` its name.
      yield index, {"index": index, **clip}
