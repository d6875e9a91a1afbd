"""Writing sampled videos: OUTPUT.mp4/.gif + contact sheet + JSON record, or one folder per
video with its frames; `check_writable` refuses an unwritable destination before sampling."""

import json
import os
from typing import Any

import numpy as np

from pixeldance_jax.io import video_files

VIDEO_SUFFIXES = (".mp4", ".gif")


def _output_paths(output: str) -> dict[str, str]:
  """The files `write_outputs` writes for OUTPUT (.mp4 or .gif)."""
  stem, suffix = os.path.splitext(output)
  if suffix.lower() not in VIDEO_SUFFIXES:
    raise ValueError(f"--output={output!r} must end in .mp4 or .gif")
  return {"mp4": stem + ".mp4", "gif": stem + ".gif", "sheet": stem + "_frames.png",
          "json": stem + ".json"}


def _check_folder_writable(folder: str, what: str) -> None:
  """`folder` exists as a directory we may write in, or can be created: its nearest existing
  ancestor is a directory we may write in."""
  existing = os.path.abspath(folder)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise ValueError(f"cannot write {what}: {existing} is a file, not a directory")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise ValueError(f"cannot write {what}: no permission to write in {existing}")


def check_writable(path: str, *, folder: bool = False) -> None:
  """Raises a one-line ValueError unless the outputs of `write_outputs(path)` (or, with
  `folder`, of `write_folder(path)`: a directory) can be written: a wrong suffix, a file where
  a directory must be (or a directory where a file must be), no permission. Creates nothing."""
  if folder:
    _check_folder_writable(path, f"--output_dir={path!r}")
    return
  paths = _output_paths(path)
  for target in paths.values():
    if os.path.isdir(target):
      raise ValueError(f"cannot write --output={path!r}: {target} is a directory")
  _check_folder_writable(os.path.dirname(os.path.abspath(path)), f"--output={path!r}")


def _write_media(video: np.ndarray, paths: dict[str, str], fps: int, upscale: int,
                 record: dict[str, Any]) -> list[str]:
  video_files.write_video(video, paths["mp4"], fps=fps, upscale=upscale)
  video_files.write_video(video, paths["gif"], fps=fps, upscale=upscale)
  video_files.write_contact_sheet(video, paths["sheet"], upscale=upscale)
  with open(paths["json"], "w") as f:
    json.dump(record, f, indent=2)
  return list(paths.values())


def write_outputs(video: np.ndarray, output: str, fps: int, upscale: int,
                  record: dict[str, Any]) -> list[str]:
  """Writes OUTPUT.mp4, .gif, _frames.png (a contact sheet) and .json; returns the paths."""
  return _write_media(video, _output_paths(output), fps, upscale, record)


def write_folder(video: np.ndarray, folder: str, fps: int, upscale: int,
                 record: dict[str, Any]) -> list[str]:
  """FOLDER/video.mp4, video.gif, contact_sheet.png, record.json and frames/NNN.png."""
  paths = {"mp4": "video.mp4", "gif": "video.gif", "sheet": "contact_sheet.png",
           "json": "record.json"}
  written = _write_media(video, {key: os.path.join(folder, name) for key, name in paths.items()},
                         fps, upscale, record)
  for index, frame in enumerate(video):
    written.append(os.path.join(folder, "frames", f"{index:03d}.png"))
    video_files.save_image(frame, written[-1], upscale=upscale)
  return written
