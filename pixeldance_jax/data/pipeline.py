"""Host input pipeline: TFDS array_record files read by grain, no TensorFlow.

`make_train_loader` yields per-process batches
`{"video": uint8 [batch, frames, height, width, 3], "tokens": int32 [batch, max_length]}`;
its iterator's `get_state()`/`set_state()` go into the training checkpoint.
"""

import dataclasses
from typing import Any, Callable

import grain
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from pixeldance_jax.data.builders.moving_shapes import MovingShapes
from pixeldance_jax.data.builders.moving_shapes import MovingShapesConfig
from pixeldance_jax.models import tokenizer

BuilderFactory = Callable[[ml_collections.ConfigDict, str], tfds.core.DatasetBuilder]


def moving_shapes_builder(data_config: ml_collections.ConfigDict,
                          data_dir: str) -> tfds.core.DatasetBuilder:
  return MovingShapes(config=MovingShapesConfig.from_config(data_config), data_dir=data_dir,
                      file_format="array_record")


DATASETS: dict[str, BuilderFactory] = {"moving_shapes": moving_shapes_builder}


def get_builder(data_config: ml_collections.ConfigDict,
                data_dir: str) -> tfds.core.DatasetBuilder:
  if data_config.name not in DATASETS:
    raise ValueError(f"Unknown dataset {data_config.name!r}; known: {sorted(DATASETS)}.")
  return DATASETS[data_config.name](data_config, data_dir)


def build_dataset(data_config: ml_collections.ConfigDict,
                  data_dir: str) -> tfds.core.DatasetBuilder:
  """The builder, with its array_record files prepared under `data_dir` if not there yet.

  A no-op when already prepared. With several processes on a shared `data_dir`, let process 0
  build first (TFDS writes to a temporary directory and renames it, but work is duplicated).
  """
  builder = get_builder(data_config, data_dir)
  # Everything is generated locally: never look for a prepared copy on GCS.
  download_config = tfds.download.DownloadConfig(try_download_gcs=False)
  builder.download_and_prepare(file_format="array_record", download_config=download_config)
  return builder


@dataclasses.dataclass(frozen=True)
class TokenizeCaption(grain.transforms.Map):
  """Keeps the video and replaces the caption by int32 `[max_length]` CLIP tokens."""
  max_length: int
  pad_token_id: int

  def map(self, element: dict[str, Any]) -> dict[str, np.ndarray]:
    caption = as_str(element["caption"])
    tokens = tokenizer.tokenize([caption], self.max_length, self.pad_token_id)[0]
    return {"video": element["video"], "tokens": tokens}


def as_str(text: bytes | str) -> str:
  return text.decode("utf-8") if isinstance(text, bytes) else text


def per_process_batch_size(batch_size: int, process_count: int) -> int:
  if batch_size % process_count:
    raise ValueError(f"batch_size={batch_size} is not divisible by {process_count} processes.")
  return batch_size // process_count


def make_train_loader(config: ml_collections.ConfigDict, data_dir: str, process_index: int = 0,
                      process_count: int = 1) -> grain.DataLoader:
  """Infinite, shuffled loader of this process's share of the train split.

  Batches: `{"video": uint8 [batch, frames, height, width, 3], "tokens": int32 [batch,
  max_length]}` with batch = config.batch_size // process_count.
  """
  batch_size = per_process_batch_size(config.batch_size, process_count)
  source = build_dataset(config.data, data_dir).as_data_source("train")
  # drop_remainder: every process sees the same number of records per epoch.
  shard_options = grain.sharding.ShardOptions(
      shard_index=process_index, shard_count=process_count, drop_remainder=True)
  sampler = grain.samplers.IndexSampler(
      num_records=len(source), shard_options=shard_options, shuffle=True, num_epochs=None,
      seed=config.data.shuffle_seed)
  operations = [
      TokenizeCaption(config.text_encoder.max_length, config.text_encoder.pad_token_id),
      grain.transforms.Batch(batch_size, drop_remainder=True),
  ]
  return grain.DataLoader(data_source=source, sampler=sampler, operations=operations,
                          worker_count=config.data.worker_count, shard_options=shard_options)


def load_test_clips(config: ml_collections.ConfigDict, data_dir: str,
                    count: int) -> list[dict[str, Any]]:
  """The first `count` held-out clips, in generation order, as numpy dicts.

  Each has video uint8 `[frames, height, width, 3]`, caption str, centroids float32
  `[frames, 2]`, velocity float32 `[2]`, and the generator's color, background, direction,
  speed and index.
  """
  source = build_dataset(config.data, data_dir).as_data_source("test")
  if count > len(source):
    raise ValueError(f"Asked for {count} test clips; the test split has {len(source)}.")
  return [decode_record(source[index]) for index in range(count)]


def decode_record(record: dict[str, Any]) -> dict[str, Any]:
  """TFDS Text features come back as bytes; make them str."""
  return {key: as_str(value) if isinstance(value, bytes) else value
          for key, value in record.items()}
