"""TFDS builder writing a local folder of captioned images as array_record files.

Records: key: str, caption: str, image: bytes (JPEG or PNG, resized and centre-cropped to
`image_size`). Captions come from `captions.csv` or `.txt` side files as for `video_folder`
(see `local_sources`); images without one, and unreadable files, are skipped and reported.
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


@dataclasses.dataclass(kw_only=True)
class LocalImagesConfig(tfds.core.BuilderConfig):
  image_dir: str = ""
  captions: str = ""
  image_size: int = 256
  frame_format: str = "jpeg"
  build_workers: int = 0  # Decoding processes; not part of the name.

  @classmethod
  def from_config(cls, data_config: ml_collections.ConfigDict,
                  data_dir: str | None = None) -> "LocalImagesConfig":
    """As `LocalVideosConfig.from_config`: the name holds the listing's digest."""
    if not data_config.image_dir:
      raise ValueError("The image_folder dataset needs config.data.image_dir (the folder of "
                       "images).")
    fields = dict(
        image_dir=os.path.abspath(data_config.image_dir),
        captions=os.path.abspath(data_config.image_captions) if data_config.image_captions
        else "",
        image_size=data_config.image_size,
        frame_format=data_config.frame_format,
    )
    digest = local_sources.path_digest(fields["image_dir"], fields["captions"])
    name = local_sources.collection_name(
        f"image_folder_{digest}_s{fields['image_size']}_{fields['frame_format']}",
        fields["image_dir"], local_sources.IMAGE_EXTENSIONS, fields["captions"],
        os.path.join(data_dir, "local_images") if data_dir else None)
    return cls(name=name, build_workers=data_config.build_workers, **fields)


class LocalImages(tfds.core.GeneratorBasedBuilder):
  """Captioned images from local files. Pass `config=LocalImagesConfig.from_config(...)`."""

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
            "image": tfds.features.Scalar(dtype=np.object_),
        }),
        supervised_keys=None,
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
    del dl_manager  # Local files only.
    config = self.builder_config
    entries = local_sources.list_folder(config.image_dir, config.captions,
                                        local_sources.IMAGE_EXTENSIONS)
    return {"train": self._generate_examples(sorted(entries, key=lambda e: e.key))}

  def _generate_examples(self, entries: list[local_sources.Entry]
                         ) -> Iterator[tuple[str, dict]]:
    config, usable = self.builder_config, []
    for entry in entries:
      if entry.path is None:
        self.report.skip("listing", "missing_file", f"{entry.key}: listed, but no such image.")
      elif entry.caption is None:
        self.report.skip("listing", "missing_caption", f"{entry.path}: no caption.")
      else:
        usable.append(entry)
    arguments = ((entry.path, config.image_size, config.frame_format) for entry in usable)
    results = build_report.map_inputs(media.encode_image_file, arguments, len(usable),
                                      config.build_workers, "Decoding images")
    for entry, (image, skip) in zip(usable, results):
      if skip is not None:
        self.report.skip("train", *skip)
        continue
      self.report.written["train"] += 1
      yield entry.key, {"key": entry.key, "caption": entry.caption, "image": image}
    if not self.report.written["train"]:
      raise ValueError(f"No usable image in {config.image_dir}:\n{self.report.summary()}")
    self.info.metadata.update(self.report.as_dict())
    build_report.log_report(config.name, self.report)
