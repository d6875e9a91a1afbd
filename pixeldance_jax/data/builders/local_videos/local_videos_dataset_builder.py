"""TFDS builder writing a local video collection as array_record files (no TensorFlow).

Each record is one video sampled at the target frame rate from its first frame, up to
`max_frames` frames, resized and centre-cropped, every frame JPEG- or PNG-encoded:

  key: str, caption: str, frames: bytes `[num_frames]`, num_frames: int32, source_fps: float32

Decoding the source (the expensive part) happens once here; the training loader picks the
training window (random or fixed start) and decodes only its `config.data.frames` images, so
every epoch can see a different part of each video. Inputs that cannot be used are skipped,
counted per reason and reported (log, and `metadata.json` in the dataset folder).

Splits: `test` holds out the first `num_test_clips` decodable videos in key-hash order (stable
when files are added); `train` is everything else. Records are in key order.
"""

import dataclasses
import os
from typing import Iterator

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from pixeldance_jax.data import local_sources
from pixeldance_jax.data import media
from pixeldance_jax.data.builders import build_report

SOURCES = ("video_folder", "webvid_csv")


@dataclasses.dataclass(kw_only=True)
class LocalVideosConfig(tfds.core.BuilderConfig):
  """Where the collection is and how it is sampled; `name` encodes all of it (`from_config`)."""
  source: str = "video_folder"
  video_dir: str = ""
  captions: str = ""
  image_size: int = 256
  fps: float = 4.0
  frame_stride: float = 0.0
  max_frames: int = 64
  min_frames: int = 16
  frame_format: str = "jpeg"
  num_test_clips: int = 0
  build_workers: int = 0  # Decoding processes; not part of the name (the output is the same).

  @classmethod
  def from_config(cls, data_config: ml_collections.ConfigDict,
                  data_dir: str | None = None) -> "LocalVideosConfig":
    """The config of `data_config`'s collection; its name holds the listing's digest (see
    `local_sources.collection_name`; `data_dir` finds a dataset whose folder is gone)."""
    if data_config.name not in SOURCES:
      raise ValueError(f"config.data.name={data_config.name!r} is not a local video source "
                       f"({SOURCES}).")
    if not data_config.video_dir:
      raise ValueError(f"config.data.name={data_config.name!r} needs config.data.video_dir "
                       "(the folder of videos).")
    if data_config.name == "webvid_csv" and not data_config.captions:
      raise ValueError("config.data.name='webvid_csv' needs config.data.captions (the CSV).")
    fields = dict(
        source=data_config.name,
        video_dir=os.path.abspath(data_config.video_dir),
        captions=os.path.abspath(data_config.captions) if data_config.captions else "",
        image_size=data_config.image_size,
        fps=float(data_config.fps),
        frame_stride=float(data_config.frame_stride),
        max_frames=max(data_config.max_stored_frames, data_config.frames),
        min_frames=data_config.frames,
        frame_format=data_config.frame_format,
        num_test_clips=data_config.num_test_clips,
    )
    digest = local_sources.path_digest(fields["video_dir"], fields["captions"])
    name = (f"{fields['source']}_{digest}"
            f"_s{fields['image_size']}_fps{fields['fps']:g}_stride{fields['frame_stride']:g}"
            f"_f{fields['min_frames']}-{fields['max_frames']}_{fields['frame_format']}"
            f"_test{fields['num_test_clips']}")
    name = local_sources.collection_name(
        name, fields["video_dir"], local_sources.VIDEO_EXTENSIONS, fields["captions"],
        os.path.join(data_dir, "local_videos") if data_dir else None)
    return cls(name=name, build_workers=data_config.build_workers, **fields)

  @property
  def sampling(self) -> media.FrameSampling:
    return media.FrameSampling(fps=self.fps, frame_stride=self.frame_stride,
                               max_frames=self.max_frames, min_frames=self.min_frames,
                               size=self.image_size)

  def list_entries(self) -> list[local_sources.Entry]:
    if self.source == "webvid_csv":
      return local_sources.list_webvid_csv(self.captions, self.video_dir)
    return local_sources.list_folder(self.video_dir, self.captions,
                                     local_sources.VIDEO_EXTENSIONS)


class LocalVideos(tfds.core.GeneratorBasedBuilder):
  """Captioned videos from local files. Pass `config=LocalVideosConfig.from_config(...)`."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self.report = build_report.BuildReport()

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "key": tfds.features.Text(),
            "caption": tfds.features.Text(),
            "frames": tfds.features.Tensor(shape=(None,), dtype=np.object_),
            "num_frames": tfds.features.Scalar(dtype=np.int32),
            "source_fps": tfds.features.Scalar(dtype=np.float32),
        }),
        supervised_keys=None,
        # Sorted by key: record i is stable across rebuilds, and the latent cache aligns with it.
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
    del dl_manager  # Local files only.
    usable = self._usable(self.builder_config.list_entries())
    test, held_out = self._held_out_examples(usable)
    train = [entry for entry in usable if entry.key not in held_out]
    splits = {"train": self._generate_examples("train", train)}
    if test:
      splits["test"] = iter(test)
    return splits

  def _usable(self, entries: list[local_sources.Entry]) -> list[local_sources.Entry]:
    """Entries worth decoding; the others are counted as skipped."""
    min_duration, usable, seen = self.builder_config.sampling.min_duration(), [], set()
    for entry in entries:
      if entry.key in seen:
        self.report.skip("listing", "duplicate", f"{entry.key}: listed more than once.")
      elif entry.path is None:
        self.report.skip("listing", "missing_file", f"{entry.key}: listed, but no such video.")
      elif entry.caption is None:
        self.report.skip("listing", "missing_caption", f"{entry.path}: no caption.")
      elif entry.duration is not None and entry.duration < min_duration:
        self.report.skip("listing", "too_short", f"{entry.path}: {entry.duration:g} s listed, "
                                                 f"a clip needs {min_duration:g} s.")
      else:
        usable.append(entry)
      seen.add(entry.key)
    return usable

  def _held_out_examples(self, usable: list[local_sources.Entry]
                         ) -> tuple[list[tuple[str, dict]], set[str]]:
    """(test examples, keys of every entry tried for them): the first `num_test_clips` entries
    in hash order (`local_sources.hash_order`) that decode. Kept in memory: a few hundred."""
    config = self.builder_config
    ordered = sorted(usable, key=local_sources.hash_order)
    examples, tried = [], 0
    while len(examples) < config.num_test_clips and tried < len(ordered):
      # Entries that fail to decode are replaced by the next ones in hash order.
      candidates = ordered[tried:tried + config.num_test_clips - len(examples)]
      tried += len(candidates)
      examples += self._decoded_examples("test", candidates, config.build_workers)
    return (sorted(examples, key=lambda example: example[0]),
            {entry.key for entry in ordered[:tried]})

  def _decoded_examples(self, split: str, entries: list[local_sources.Entry],
                        workers: int) -> Iterator[tuple[str, dict]]:
    config = self.builder_config
    arguments = ((entry.path, config.sampling, config.frame_format) for entry in entries)
    results = build_report.map_inputs(media.encode_video_file, arguments, len(entries), workers,
                                      f"Decoding {split} videos")
    for entry, (result, skip) in zip(entries, results):
      if skip is not None:
        self.report.skip(split, *skip)
        continue
      frames, source_fps = result
      self.report.written[split] += 1
      yield entry.key, {"key": entry.key, "caption": entry.caption, "frames": frames,
                        "num_frames": len(frames), "source_fps": source_fps}

  def _generate_examples(self, split: str, entries: list[local_sources.Entry]
                         ) -> Iterator[tuple[str, dict]]:
    yield from self._decoded_examples(split, entries, self.builder_config.build_workers)
    if not self.report.written[split]:
      raise ValueError(f"No usable video for the {split} split of "
                       f"{self.builder_config.video_dir}:\n{self.report.summary()}")
    # DatasetInfo (and so metadata.json) is written after all splits are generated.
    self.info.metadata.update(self.report.as_dict())
    build_report.log_report(self.builder_config.name, self.report)
