"""Decoding local videos and images into model frames (PyAV, Pillow; numpy only).

Used when building datasets (`builders/local_videos`, `builders/local_images`, whose decoding
worker processes call `encode_video_file` / `encode_image_file`), by the grain transforms and
the latent cache, which decode stored frames, and by sampling, which reads its condition images
with `read_image`: the one image reader, so a sampled first frame is prepared exactly as a
training image. Numpy, PyAV and Pillow only: no JAX or TFDS.

A video is sampled at a target frame rate: kept source frame k is `floor(k * stride + 0.5)` with
`stride = source_fps / target_fps` (or a fixed `frame_stride`), starting at the first frame.
Every kept frame is centre-cropped to a square and resized to `[size, size, 3]`
(`io.video_files`: the one decoder and the one crop-and-resize).
"""

import dataclasses
import io
import os

from absl import logging
import numpy as np
from PIL import Image
from PIL import ImageOps

from pixeldance_jax.io import video_files

# Why an input was skipped; the build reports a count for each.
SKIP_REASONS = ("missing_file", "missing_caption", "duplicate", "unreadable", "truncated",
                "too_short", "failed", "crashed")
FRAME_FORMATS = {"jpeg": "JPEG", "png": "PNG"}
_JPEG_QUALITY = 95


class SkippedInput(ValueError):
  """An input that cannot be used; `reason` is one of SKIP_REASONS.

  The builders count and skip them; elsewhere (sampling's inputs, the CLIs) it is the
  ValueError that reports a bad input file without a traceback.
  """

  def __init__(self, reason: str, message: str):
    if reason not in SKIP_REASONS:
      raise ValueError(f"Unknown skip reason {reason!r}; known: {SKIP_REASONS}.")
    super().__init__(message)
    self.reason = reason

  def __reduce__(self):  # Pickled by worker processes: rebuild from both arguments.
    return type(self), (self.reason, str(self))


@dataclasses.dataclass(frozen=True)
class FrameSampling:
  """How frames are taken from a source video.

  fps: target frames per second (the paper: 4).
  frame_stride: source frames between kept frames; 0 derives it as source_fps / fps.
  max_frames: frames kept per video (from its start); at least `min_frames`.
  min_frames: videos with fewer kept frames are skipped as too short (a training clip's length).
  size: output height and width.
  """
  fps: float
  frame_stride: float
  max_frames: int
  min_frames: int
  size: int

  def __post_init__(self):
    if self.fps <= 0 and self.frame_stride <= 0:
      raise ValueError(f"Set fps > 0 or frame_stride > 0 (got fps={self.fps}, "
                       f"frame_stride={self.frame_stride}).")
    if self.max_frames < self.min_frames:
      raise ValueError(f"max_frames={self.max_frames} is below the clip length "
                       f"min_frames={self.min_frames}.")

  def stride(self, source_fps: float) -> float:
    return self.frame_stride if self.frame_stride > 0 else source_fps / self.fps

  def min_duration(self) -> float:
    """Seconds a video needs to give `min_frames` kept frames; 0 (unknown before decoding)
    with a fixed `frame_stride`, whose duration depends on the source's frame rate."""
    if self.frame_stride > 0:
      return 0.0
    return (self.min_frames - 1) / self.fps


def decode_video(path: str, sampling: FrameSampling) -> tuple[np.ndarray, float]:
  """Decodes `path` at the sampling's frame rate (`video_files.decode_video`).

  Returns:
    (uint8 `[frames, size, size, 3]` with min_frames <= frames <= max_frames, source fps).

  Raises:
    SkippedInput: the file is missing, unreadable, truncated (a decode error after opening, or
      fewer frames than the container declares) or too short.
  """
  try:
    frames, source_fps = video_files.decode_video(path, sampling.stride, sampling.max_frames,
                                                  sampling.size)
  except FileNotFoundError as error:
    raise SkippedInput("missing_file", f"{path}: not found.") from error
  except video_files.UnreadableVideo as error:
    raise SkippedInput(error.reason, str(error)) from error
  if len(frames) < sampling.min_frames:
    raise SkippedInput("too_short", f"{path}: {len(frames)} frames at the target rate, "
                                    f"fewer than the {sampling.min_frames} a clip needs.")
  return frames, source_fps


def _open_image(path: str) -> Image.Image:
  """The fully decoded image, upright; raises SkippedInput (missing_file, unreadable)."""
  if not os.path.isfile(path):
    raise SkippedInput("missing_file", f"{path}: image not found.")
  try:
    with Image.open(path) as image:
      image.load()
      # Phone JPEGs store their rotation in EXIF; applying it makes "up" up.
      return ImageOps.exif_transpose(image)
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
    raise SkippedInput("unreadable", f"{path}: cannot read image ({error}).") from error


def _has_alpha(image: Image.Image) -> bool:
  return image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info


def _to_rgb(image: Image.Image, path: str, log: bool) -> Image.Image:
  """Any Pillow mode -> RGB; transparency is composited onto black."""
  if image.mode.startswith("I;16") or image.mode == "I":
    # Pillow's convert clips 16-bit values at 255 instead of scaling them. Mode "I" (32-bit)
    # holds 16-bit data when its values pass 255, else 8-bit data.
    grey = np.asarray(image, np.float64)
    if image.mode.startswith("I;16") or grey.max() > 255:
      grey = grey / 257.0
    image = Image.fromarray(np.clip(grey.round(), 0, 255).astype(np.uint8), "L")
  if _has_alpha(image):
    if log:
      logging.info("Image %s has an alpha channel; compositing onto black.", path)
    rgba = image.convert("RGBA")
    black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
    return Image.alpha_composite(black, rgba).convert("RGB")
  if image.mode != "RGB" and log:
    logging.info("Image %s is in mode %s; converting to RGB.", path, image.mode)
  return image.convert("RGB")


def read_image(path: str, size: int, resize: bool = True, *, log: bool = True) -> np.ndarray:
  """An image file -> the model's square RGB input, uint8 `[size, size, 3]`.

  EXIF orientation is applied; grayscale, 16-bit and palette images become RGB; transparency
  is composited onto black (noted in the log). Another size is centre-cropped to a square and
  resized (bicubic, antialiased) with a logged warning when `resize`, an error otherwise.
  `log=False` silences the notes and warning (the dataset builders resize every image).

  Raises:
    SkippedInput (a ValueError): reason missing_file or unreadable.
    ValueError: the image is not `size` x `size` and `resize` is False.
  """
  image = _to_rgb(_open_image(path), path, log)
  width, height = image.size
  if (width, height) != (size, size):
    if not resize:
      raise ValueError(f"{path}: image is {width}x{height}, the model needs {size}x{size}")
    if log:
      crop = "centre-cropped and " if width != height else ""
      logging.warning("Image %s is %dx%d; %sresized to %dx%d.", path, width, height, crop,
                      size, size)
    return video_files.center_square(np.asarray(image, np.uint8), size,
                                     Image.Resampling.BICUBIC)
  return np.asarray(image, np.uint8)


def encode_frame(frame: np.ndarray, frame_format: str) -> bytes:
  """uint8 `[H, W, 3]` -> JPEG (quality 95) or PNG (lossless) bytes."""
  if frame_format not in FRAME_FORMATS:
    raise ValueError(f"frame_format={frame_format!r} is not one of {sorted(FRAME_FORMATS)}.")
  buffer = io.BytesIO()
  options = {"quality": _JPEG_QUALITY} if frame_format == "jpeg" else {}
  Image.fromarray(frame).save(buffer, format=FRAME_FORMATS[frame_format], **options)
  return buffer.getvalue()


def decode_frames(encoded: list[bytes] | np.ndarray) -> np.ndarray:
  """JPEG/PNG bytes -> uint8 `[frames, H, W, 3]`."""
  frames = []
  for data in encoded:
    with Image.open(io.BytesIO(data)) as image:
      frames.append(np.asarray(image.convert("RGB"), np.uint8))
  return np.stack(frames)


def encode_video_file(path: str, sampling: FrameSampling,
                      frame_format: str) -> tuple[list[bytes], float]:
  """(encoded sampled frames, source fps) of a video file; raises SkippedInput."""
  frames, source_fps = decode_video(path, sampling)
  return [encode_frame(frame, frame_format) for frame in frames], source_fps


def encode_image_file(path: str, size: int, frame_format: str) -> bytes:
  """The resized, centre-cropped image, encoded; raises SkippedInput."""
  return encode_frame(read_image(path, size, log=False), frame_format)
