"""Decoding local videos and images into training frames (PyAV, Pillow; numpy only).

Used when building datasets (`builders/local_videos`, `builders/local_images`, whose decoding
worker processes call `encode_video_file` / `encode_image_file`) and by the grain transforms
that decode stored frames at load time. Numpy, PyAV and Pillow only: no JAX or TFDS.

A video is sampled at a target frame rate: kept source frame k is `floor(k * stride + 0.5)` with
`stride = source_fps / target_fps` (or a fixed `frame_stride`), starting at the first frame.
Every kept frame is resized (short side to `size`) and centre-cropped to `[size, size, 3]`.
"""

import dataclasses
import io

import av
import numpy as np
from PIL import Image

# Why an input was skipped; the build reports a count for each.
SKIP_REASONS = ("missing_file", "missing_caption", "duplicate", "unreadable", "truncated",
                "too_short")
FRAME_FORMATS = {"jpeg": "JPEG", "png": "PNG"}
_JPEG_QUALITY = 95


class SkippedInput(Exception):
  """An input that cannot become a training example; `reason` is one of SKIP_REASONS."""

  def __init__(self, reason: str, message: str):
    if reason not in SKIP_REASONS:
      raise ValueError(f"Unknown skip reason {reason!r}; known: {SKIP_REASONS}.")
    super().__init__(message)
    self.reason = reason


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


def sample_frame_indices(num_source_frames: int, stride: float, max_frames: int) -> np.ndarray:
  """Source frame indices kept at `stride` source frames per kept frame, from frame 0.

  Index k is `floor(k * stride + 0.5)` (round half up); at most `max_frames`, all below
  `num_source_frames`. A stride below 1 (target fps above the source's) repeats frames.
  """
  if stride <= 0:
    raise ValueError(f"stride must be positive, got {stride}.")
  indices = np.floor(np.arange(max_frames) * stride + 0.5).astype(np.int64)
  return indices[indices < num_source_frames]


def _resized_shape(width: int, height: int, size: int) -> tuple[int, int]:
  """(width, height) with the short side `size`, keeping the aspect ratio."""
  scale = size / min(width, height)
  return max(size, round(width * scale)), max(size, round(height * scale))


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """`[H, W, C]` (both >= size) -> the central `[size, size, C]`."""
  top, left = (image.shape[0] - size) // 2, (image.shape[1] - size) // 2
  return image[top:top + size, left:left + size]


def _frame_to_rgb(frame: av.VideoFrame, size: int) -> np.ndarray:
  width, height = _resized_shape(frame.width, frame.height, size)
  # libswscale resizes while converting to RGB; AREA averages when downscaling (no aliasing).
  rgb = frame.reformat(width=width, height=height, format="rgb24", interpolation="AREA")
  return center_crop(rgb.to_ndarray(), size)


def _source_fps(stream: av.video.stream.VideoStream, path: str) -> float:
  rate = stream.average_rate or stream.guessed_rate
  if not rate or float(rate) <= 0:
    raise SkippedInput("unreadable", f"{path}: the video stream has no frame rate.")
  return float(rate)


def decode_video(path: str, sampling: FrameSampling) -> tuple[np.ndarray, float]:
  """Decodes `path` at the sampling's frame rate.

  Returns:
    (uint8 `[frames, size, size, 3]` with min_frames <= frames <= max_frames, source fps).

  Raises:
    SkippedInput: the file is missing, unreadable, truncated (a decode error after opening, or
      fewer frames than the container declares) or too short.
  """
  try:
    container = av.open(path)
  except FileNotFoundError as error:
    raise SkippedInput("missing_file", f"{path}: not found.") from error
  except (av.FFmpegError, OSError) as error:
    raise SkippedInput("unreadable", f"{path}: cannot open ({error}).") from error
  with container:
    if not container.streams.video:
      raise SkippedInput("unreadable", f"{path}: no video stream.")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    source_fps = _source_fps(stream, path)
    frames = _decode_sampled_frames(container, stream, path, sampling, source_fps)
  if len(frames) < sampling.min_frames:
    raise SkippedInput("too_short", f"{path}: {len(frames)} frames at the target rate, "
                                    f"fewer than the {sampling.min_frames} a clip needs.")
  return np.stack(frames), source_fps


def _decode_sampled_frames(container, stream, path: str, sampling: FrameSampling,
                           source_fps: float) -> list[np.ndarray]:
  """Decodes in order, converting only the kept frames; stops after `max_frames`."""
  # The container's frame count is often missing or wrong: decode until the stream ends.
  wanted = sample_frame_indices(np.iinfo(np.int64).max, sampling.stride(source_fps),
                                sampling.max_frames)
  kept, decoded = [], 0
  try:
    for frame in container.decode(stream):
      while len(kept) < len(wanted) and wanted[len(kept)] == decoded:  # stride < 1 repeats.
        kept.append(_frame_to_rgb(frame, sampling.size))
      decoded += 1
      if len(kept) == len(wanted):
        return kept
  except av.FFmpegError as error:
    raise SkippedInput("truncated", f"{path}: decoding failed after {decoded} frames "
                                    f"({error}).") from error
  if stream.frames and decoded < stream.frames:
    raise SkippedInput("truncated", f"{path}: {decoded} of the {stream.frames} frames the "
                                    f"container declares could be decoded.")
  return kept


def read_image(path: str, size: int) -> np.ndarray:
  """An image file -> uint8 `[size, size, 3]` (short side resized, centre-cropped, RGB).

  Raises SkippedInput (missing_file, unreadable) for files that cannot be used.
  """
  try:
    with Image.open(path) as image:
      image.load()
      rgb = image.convert("RGB")
  except FileNotFoundError as error:
    raise SkippedInput("missing_file", f"{path}: not found.") from error
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
    raise SkippedInput("unreadable", f"{path}: cannot read image ({error}).") from error
  width, height = _resized_shape(rgb.width, rgb.height, size)
  resized = rgb.resize((width, height), Image.Resampling.BICUBIC, reducing_gap=3.0)
  return center_crop(np.asarray(resized, np.uint8), size)


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
  return encode_frame(read_image(path, size), frame_format)
