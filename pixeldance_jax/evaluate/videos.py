"""The video sets an evaluation compares: held-out clips of a dataset, or a folder of files.

A set is indexed (`len`, `load(i)`) so that each process reads only its share of every global
batch (`shares`). Loading returns uint8 `[frames, size, size, 3]` and the caption (None when the
folder gives none); an input that cannot be used raises `media.SkippedInput`, which the
evaluation counts per reason and skips, as the dataset builders do.
"""

import hashlib
import json
import os
from typing import Any, Iterator

import ml_collections
import numpy as np

from pixeldance_jax.io import video_files
from pixeldance_jax.data import local_sources, media
from pixeldance_jax.data import loaders


class HeldOutClips:
  """The test split of a run's dataset, in record order, clipped to `config.data.frames`."""

  def __init__(self, config: ml_collections.ConfigDict, data_dir: str, start: int = 0,
               count: int | None = None):
    self.config, self.source = config, loaders.test_source(config, data_dir)
    available = len(self.source) - start
    count = available if count is None else count
    if count > available or start < 0:
      raise ValueError(f"asked for held-out clips {start}..{start + count - 1}; the test split "
                       f"of {config.data.name!r} has {len(self.source)} (config.data."
                       "num_test_clips; rebuild with more)")
    self.start, self.count = start, count
    self.description = json.dumps({
        "dataset": config.data.name, "data_dir": os.path.abspath(data_dir),
        "data_config": config.data.to_dict(), "split": "test", "start": start,
        "count": count}, sort_keys=True, default=str)

  def __len__(self) -> int:
    return self.count

  @property
  def clip_shape(self) -> tuple[int, ...]:
    data = self.config.data
    return (data.frames, data.image_size, data.image_size, 3)

  def record(self, index: int) -> dict[str, Any]:
    """The decoded clip: video, caption and the generator's fields where the data has them."""
    return loaders.decode_record(self.source[self.start + index], self.config.data.frames)

  def load(self, index: int) -> tuple[np.ndarray, str | None]:
    record = self.record(index)
    return record["video"], record["caption"]


class VideoFolder:
  """Every video file under `folder` (sorted), its first `frames` frames, `size` x `size`
  (default: the shorter side of the first readable video).

  Captions come from `captions.csv` or a `.txt` beside each video, as for training data.
  Videos with fewer than `frames` frames are skipped as too short, undecodable ones as
  unreadable. Frames that are not `size` x `size` are centre-cropped and resized.
  """

  def __init__(self, folder: str, frames: int, size: int | None):
    if not os.path.isdir(folder):
      raise FileNotFoundError(f"video folder not found: {folder}")
    entries = local_sources.list_folder(folder, "", local_sources.VIDEO_EXTENSIONS)
    self.entries = sorted((e for e in entries if e.path), key=lambda e: e.key)
    if not self.entries:
      raise ValueError(f"{folder} holds no video files "
                       f"({', '.join(local_sources.VIDEO_EXTENSIONS)})")
    self.folder, self.frames = folder, frames
    self.size = size or self.native_size()
    listing = [(e.key, os.path.getsize(e.path), int(os.path.getmtime(e.path)), e.caption)
               for e in self.entries]
    self._listing = hashlib.sha256(json.dumps(listing).encode()).hexdigest()

  @property
  def description(self) -> str:
    """Identifies the set (files, sizes, times, captions; frames and size) for the cache."""
    return json.dumps({"folder": os.path.abspath(self.folder), "frames": self.frames,
                       "size": self.size, "files": self._listing}, sort_keys=True)

  def native_size(self) -> int:
    """The shorter side of the first readable video."""
    for entry in self.entries:
      try:
        return min(video_files.read_video(entry.path).shape[1:3])
      except (ValueError, OSError):
        continue
    raise ValueError(f"no readable video in {self.folder}")

  def __len__(self) -> int:
    return len(self.entries)

  @property
  def clip_shape(self) -> tuple[int, ...]:
    return (self.frames, self.size, self.size, 3)

  def load(self, index: int) -> tuple[np.ndarray, str | None]:
    entry = self.entries[index]
    try:
      video = video_files.read_video(entry.path)
    except (ValueError, OSError) as error:
      raise media.SkippedInput("unreadable", str(error)) from error
    if len(video) < self.frames:
      raise media.SkippedInput("too_short", f"{entry.path}: {len(video)} frames, fewer than "
                                            f"the {self.frames} compared")
    return np.stack([video_files.center_square(frame, self.size)
                     for frame in video[:self.frames]]), entry.caption


def shares(count: int, global_batch: int, process_index: int,
           process_count: int) -> Iterator[range]:
  """This process's indices of each global batch over `count` items. Every process gets the
  same number of (possibly empty) shares, so collective programs run in step."""
  local = global_batch // process_count
  for start in range(0, count, global_batch):
    begin = min(start + process_index * local, count)
    yield range(begin, min(begin + local, count, start + global_batch))
