"""Host input pipeline: TFDS array_record files read by grain, no TensorFlow.

Datasets (`DATASETS`, picked by `config.data.name`): `moving_shapes` (generated), `video_folder`
and `webvid_csv` (local videos, `builders/local_videos`), `image_folder` (local images for joint
training, `builders/local_images`).

`make_train_loader` yields per-process batches
`{"video": uint8 [batch, frames, height, width, 3], "tokens": int32 [batch, max_length]}`;
`make_image_loader` the same with one frame (`[image_batch, 1, height, width, 3]`) for the
image steps of joint training (`is_image_step`). Their iterators' `get_state()`/`set_state()`
go into the training checkpoint.

Where the paper's conditions are drawn: the training window of a stored video (random start)
is picked here, on the host, by a grain random map seeded per record, so it is part of the
iterator state. The first and last frame, the condition noise at timestep 100, the last-frame
drop (eta) and the text drop are drawn on device in the jitted step (`conditioning.py`): they
need the VAE latents, and `fold_in(rng, step)` makes a resumed run draw exactly the same.
"""

import dataclasses
import os
from typing import Any, Callable

import grain
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from pixeldance_jax.data import media
from pixeldance_jax.data.builders.local_images import LocalImages
from pixeldance_jax.data.builders.local_images import LocalImagesConfig
from pixeldance_jax.data.builders.local_videos import LocalVideos
from pixeldance_jax.data.builders.local_videos import LocalVideosConfig
from pixeldance_jax.data.builders.moving_shapes import MovingShapes
from pixeldance_jax.data.builders.moving_shapes import MovingShapesConfig
from pixeldance_jax.data import tokenizer

BuilderFactory = Callable[[ml_collections.ConfigDict, str], tfds.core.DatasetBuilder]
# Image sources for joint training besides DATASETS' image datasets: single frames of the
# video dataset itself.
VIDEO_FRAMES = "video_frames"


def data_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Where the run's datasets live: `config.data.data_dir`, else `<workdir>/data`."""
  return config.data.data_dir or os.path.join(os.path.abspath(workdir), "data")


def moving_shapes_builder(data_config: ml_collections.ConfigDict,
                          data_dir: str) -> tfds.core.DatasetBuilder:
  return MovingShapes(config=MovingShapesConfig.from_config(data_config), data_dir=data_dir,
                      file_format="array_record")


def local_videos_builder(data_config: ml_collections.ConfigDict,
                         data_dir: str) -> tfds.core.DatasetBuilder:
  return LocalVideos(config=LocalVideosConfig.from_config(data_config, data_dir),
                     data_dir=data_dir, file_format="array_record")


def local_images_builder(data_config: ml_collections.ConfigDict,
                         data_dir: str) -> tfds.core.DatasetBuilder:
  return LocalImages(config=LocalImagesConfig.from_config(data_config, data_dir),
                     data_dir=data_dir, file_format="array_record")


DATASETS: dict[str, BuilderFactory] = {
    "moving_shapes": moving_shapes_builder,
    "video_folder": local_videos_builder,
    "webvid_csv": local_videos_builder,
    "image_folder": local_images_builder,
}
IMAGE_DATASETS = ("image_folder",)


def get_builder(data_config: ml_collections.ConfigDict,
                data_dir: str) -> tfds.core.DatasetBuilder:
  if data_config.name not in DATASETS:
    raise ValueError(f"Unknown dataset {data_config.name!r}; known: {sorted(DATASETS)}.")
  return DATASETS[data_config.name](data_config, data_dir)


def build_dataset(data_config: ml_collections.ConfigDict,
                  data_dir: str) -> tfds.core.DatasetBuilder:
  """The builder, with its array_record files prepared under `data_dir` if not there yet.

  A no-op when already prepared: TFDS writes into a temporary folder and renames it when every
  split is complete, so an interrupted build leaves no partial dataset (it restarts) and never
  touches a finished one. With several processes on a shared `data_dir`, let process 0 build
  first. Local collections log the inputs they skipped (see `build_report`).
  """
  builder = get_builder(data_config, data_dir)
  # Everything is generated locally: never look for a prepared copy on GCS.
  download_config = tfds.download.DownloadConfig(try_download_gcs=False)
  builder.download_and_prepare(file_format="array_record", download_config=download_config)
  return builder


def build_report(builder: tfds.core.DatasetBuilder) -> dict[str, Any]:
  """What a local collection's build wrote and skipped (per split and reason), from its
  `metadata.json`; empty for generated datasets. The trainer can log it as a metric."""
  metadata = builder.info.metadata
  return dict(metadata) if metadata else {}


def report_metrics(report: dict[str, Any]) -> dict[str, int]:
  """A build report as flat counts for TensorBoard: `data/written`, `data/skipped/<reason>`."""
  metrics = {"data/written": sum(report.get("written", {}).values())}
  for counts in report.get("skipped", {}).values():
    for reason, count in counts.items():
      metrics[f"data/skipped/{reason}"] = metrics.get(f"data/skipped/{reason}", 0) + count
  return metrics


def image_data_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config.data` with `name` set to the image dataset of joint training."""
  name = config.data.image_dataset
  if name == VIDEO_FRAMES:
    return config.data
  if name not in IMAGE_DATASETS:
    raise ValueError(f"config.data.image_dataset={name!r}: use one of "
                     f"{[VIDEO_FRAMES, *IMAGE_DATASETS]} for joint image training.")
  image_config = config.data.copy_and_resolve_references()
  with image_config.unlocked():
    image_config.name = name
  return image_config


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


@dataclasses.dataclass(frozen=True)
class SampleClip(grain.transforms.RandomMap):
  """A record -> `{"video": uint8 [frames, H, W, 3], "caption"}`: its training window.

  Stored videos (`frames`: encoded images) may be longer than a clip: the window starts at a
  random frame (`random_start`) or at the first; only its frames are decoded. Records that hold
  exactly one clip (`video`: uint8, moving shapes) pass through.
  """
  frames: int
  random_start: bool

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    stored = element["video"] if "video" in element else element["frames"]
    if len(stored) < self.frames:
      raise ValueError(f"A record holds {len(stored)} frames; config.data.frames="
                       f"{self.frames}. Rebuild the dataset with this frame count.")
    start = int(rng.integers(0, len(stored) - self.frames + 1)) if self.random_start else 0
    window = stored[start:start + self.frames]
    video = window if "video" in element else media.decode_frames(window)
    return {"video": video, "caption": element["caption"]}


@dataclasses.dataclass(frozen=True)
class SampleImage(grain.transforms.RandomMap):
  """A record -> `{"video": uint8 [1, H, W, 3], "caption"}`: an image, or a random frame."""

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    if "image" in element:
      return {"video": media.decode_frames([element["image"]]), "caption": element["caption"]}
    stored = element["video"] if "video" in element else element["frames"]
    index = int(rng.integers(0, len(stored)))
    frame = stored[index:index + 1]
    video = frame if "video" in element else media.decode_frames(frame)
    return {"video": video, "caption": element["caption"]}


def make_loader(config: ml_collections.ConfigDict, source: Any, operations: list,
                batch_size: int, process_index: int, process_count: int,
                seed_offset: int = 0) -> grain.DataLoader:
  """Infinite, shuffled, per-process sharded loader: `operations` per record, then batches of
  `batch_size // process_count` (the global `batch_size` split over processes). The order and
  the per-record rngs of random maps come from `config.data.shuffle_seed + seed_offset`."""
  batch_size = per_process_batch_size(batch_size, process_count)
  if len(source) < process_count:
    raise ValueError(f"The dataset has {len(source)} records, fewer than the "
                     f"{process_count} processes reading it.")
  # drop_remainder: every process sees the same number of records per epoch.
  shard_options = grain.sharding.ShardOptions(
      shard_index=process_index, shard_count=process_count, drop_remainder=True)
  sampler = grain.samplers.IndexSampler(
      num_records=len(source), shard_options=shard_options, shuffle=True, num_epochs=None,
      seed=config.data.shuffle_seed + seed_offset)
  operations = [*operations, grain.transforms.Batch(batch_size, drop_remainder=True)]
  return grain.DataLoader(data_source=source, sampler=sampler, operations=operations,
                          worker_count=config.data.worker_count, shard_options=shard_options)


def _tokenize(config: ml_collections.ConfigDict) -> TokenizeCaption:
  return TokenizeCaption(config.text_encoder.max_length, config.text_encoder.pad_token_id)


def make_train_loader(config: ml_collections.ConfigDict, data_dir: str, process_index: int = 0,
                      process_count: int = 1) -> grain.DataLoader:
  """Infinite, shuffled loader of this process's share of the train split.

  Batches: `{"video": uint8 [batch, frames, height, width, 3], "tokens": int32 [batch,
  max_length]}` with batch = config.batch_size // process_count.
  """
  source = build_dataset(config.data, data_dir).as_data_source("train")
  sample = SampleClip(config.data.frames, config.data.random_start)
  return make_loader(config, source, [sample, _tokenize(config)], config.batch_size,
                     process_index, process_count)


def image_batch_size(config: ml_collections.ConfigDict) -> int:
  """Global images per image step; 0 in the config: batch_size * frames (as many frames as a
  video batch, so an image step costs about what a video step does)."""
  return config.data.image_batch_size or config.batch_size * config.data.frames


def is_image_step(config: ml_collections.ConfigDict, step: int) -> bool:
  """Whether training step `step` (counted from 1) is an image batch: every k-th step."""
  every = config.data.image_every_k_steps
  return every > 0 and step % every == 0


def make_image_loader(config: ml_collections.ConfigDict, data_dir: str, process_index: int = 0,
                      process_count: int = 1) -> grain.DataLoader:
  """Infinite, shuffled loader of images for the image steps of joint training.

  Batches: `{"video": uint8 [image_batch, 1, height, width, 3], "tokens": int32 [image_batch,
  max_length]}`, image_batch = `image_batch_size(config) // process_count`. The source is
  `config.data.image_dataset`: `image_folder` (`config.data.image_dir`), or `video_frames` (a
  random frame of each video of the training set). Run the step with `use_temporal=False`.
  """
  image_config = image_data_config(config)
  source = build_dataset(image_config, data_dir).as_data_source("train")
  # Another seed: `video_frames` would otherwise visit the videos in the video loader's order.
  return make_loader(config, source, [SampleImage(), _tokenize(config)],
                     image_batch_size(config), process_index, process_count, seed_offset=1)


def test_source(config: ml_collections.ConfigDict, data_dir: str) -> Any:
  """The held-out (test) split's records, read by index; builds the dataset if needed."""
  builder = build_dataset(config.data, data_dir)
  if "test" not in builder.info.splits:
    raise ValueError(f"Dataset {config.data.name!r} has no test split: set "
                     "config.data.num_test_clips > 0 and rebuild.")
  return builder.as_data_source("test")


def load_test_clips(config: ml_collections.ConfigDict, data_dir: str,
                    count: int) -> list[dict[str, Any]]:
  """The first `count` held-out clips, in record order, as numpy dicts.

  Each has video uint8 `[frames, height, width, 3]` and caption str. Moving shapes add
  centroids float32 `[frames, 2]`, velocity float32 `[2]`, and the generator's color,
  background, direction, speed and index; local videos their key, and the video is the first
  `config.data.frames` frames of the held-out video.
  """
  source = test_source(config, data_dir)
  if count > len(source):
    raise ValueError(f"Asked for {count} test clips; the test split has {len(source)}.")
  return [decode_record(source[index], config.data.frames) for index in range(count)]


def decode_record(record: dict[str, Any], frames: int | None = None) -> dict[str, Any]:
  """TFDS Text features come back as bytes; make them str. Stored videos (encoded `frames`)
  become `video` uint8 `[frames, H, W, 3]`: their first `frames` frames (fixed start)."""
  record = {key: as_str(value) if isinstance(value, bytes) else value
            for key, value in record.items()}
  if "frames" in record:
    encoded = record.pop("frames")
    record["video"] = media.decode_frames(encoded[:frames] if frames else encoded)
  return record
