"""Video and image files: writing generated videos, stills and contact sheets atomically;
the one video decoder (`decode_video`) and the one crop-and-resize (`center_square`).

Videos are uint8 arrays `[frames, height, width, 3]`; images are uint8
`[height, width, 3]`. Every writer goes through a temporary file in the
destination folder and `os.replace`, so a crash or a full disk never leaves a
half-written file where a good one used to be. MP4 is encoded in-process with
PyAV (no ffmpeg subprocess: forking while JAX's threads run is unsafe). Input
images are read by `data.media.read_image`.
"""

import contextlib
import math
import os
import tempfile
from typing import Callable, Iterator

from absl import logging
import av
import numpy as np
from PIL import Image

# H.264 constant rate factor: 0 is lossless, 23 is the x264 default. 16 keeps
# few-pixel shapes and flat colours of tiny generated videos recognisable.
_MP4_CRF = 16
# yuv420p halves chroma resolution, so x264 needs even widths and heights.
_MP4_BLOCK = 2
_SEPARATOR_PX = 2
_SEPARATOR_VALUE = 255


def _check_frames(frames: np.ndarray) -> np.ndarray:
  """Validates `[frames, H, W, 3]` uint8 and returns it C-contiguous."""
  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
    raise ValueError(
        f"expected frames [frames>=1, H, W, 3], got {frames.shape}")
  if frames.dtype != np.uint8:
    raise ValueError(f"expected uint8 frames, got {frames.dtype}")
  return np.ascontiguousarray(frames)


def _upscale(frames: np.ndarray, upscale: int) -> np.ndarray:
  """Nearest-neighbour upscale of `[..., H, W, C]` to `[..., H*k, W*k, C]`."""
  if upscale < 1:
    raise ValueError(f"upscale must be >= 1, got {upscale}")
  if upscale == 1:
    return frames
  frames = np.repeat(frames, upscale, axis=-3)
  return np.repeat(frames, upscale, axis=-2)


def _pad_to_multiple(frames: np.ndarray, block: int) -> np.ndarray:
  """Pads `[F, H, W, 3]` at the bottom/right by edge replication to `block`."""
  height, width = frames.shape[1:3]
  pad_h, pad_w = -height % block, -width % block
  if not pad_h and not pad_w:
    return frames
  # Padding (rather than letting ffmpeg rescale) keeps every pixel intact.
  logging.info("Padding video from %dx%d to %dx%d for H.264.", width, height,
               width + pad_w, height + pad_h)
  return np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """Yields a temporary path next to `path`, moved onto `path` on success."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  stem, suffix = os.path.splitext(os.path.basename(path))
  # Same folder, so os.replace is an atomic rename; same suffix, so pillow
  # picks the format from the name.
  handle, tmp_path = tempfile.mkstemp(
      prefix=f".{stem}.", suffix=f".tmp{suffix}", dir=folder)
  os.close(handle)
  try:
    yield tmp_path
    # mkstemp makes the file private (0600); give it the mode a plain open() would.
    os.chmod(tmp_path, 0o666 & ~_umask())
    os.replace(tmp_path, path)
  finally:
    if os.path.exists(tmp_path):
      os.remove(tmp_path)


def _write_mp4(frames: np.ndarray, path: str, fps: int) -> None:
  """Encodes `[F, H, W, 3]` (even H, W) as H.264 yuv420p, moov atom first (faststart)."""
  height, width = frames.shape[1:3]
  with av.open(path, mode="w", format="mp4",
               options={"movflags": "+faststart"}) as container:
    stream = container.add_stream("libx264", rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.options = {"crf": str(_MP4_CRF)}
    for frame in frames:
      # The encoder converts rgb24 to the stream's yuv420p (libswscale).
      container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
    container.mux(stream.encode())  # Flushes the frames x264 still holds.


def _write_gif(frames: np.ndarray, path: str, fps: int) -> None:
  """Writes `[F, H, W, 3]` as a GIF that loops forever."""
  images = [Image.fromarray(frame) for frame in frames]
  # GIF stores delays in 1/100 s; pillow rounds milliseconds down to that.
  images[0].save(path, format="GIF", save_all=True, append_images=images[1:],
                 duration=1000.0 / fps, loop=0)


_VIDEO_WRITERS = {".mp4": _write_mp4, ".gif": _write_gif}


def write_video(frames: np.ndarray, path: str, fps: int,
                upscale: int = 1) -> None:
  """Writes a video as .mp4 (H.264) or .gif, picked by the suffix of `path`.

  Args:
    frames: uint8 `[frames, height, width, 3]`.
    path: destination; parent folders are created.
    fps: frames per second.
    upscale: integer nearest-neighbour upscale, so tiny frames stay visible.

  MP4 frames with an odd height or width (after upscaling) are padded by one
  replicated row/column, as yuv420p needs even sizes. Pillow merges identical
  consecutive GIF frames into one longer frame, so a GIF read back can have
  fewer frames than were written (it plays the same).
  """
  suffix = os.path.splitext(path)[1].lower()
  if suffix not in _VIDEO_WRITERS:
    raise ValueError(f"unknown video suffix {suffix!r} in {path!r}; "
                     f"use one of {sorted(_VIDEO_WRITERS)}")
  if fps <= 0:
    raise ValueError(f"fps must be positive, got {fps}")
  frames = _upscale(_check_frames(frames), upscale)
  if suffix == ".mp4":
    frames = _pad_to_multiple(frames, _MP4_BLOCK)
  with atomic_path(path) as tmp_path:
    _VIDEO_WRITERS[suffix](frames, tmp_path, fps)


def _save_still(image: np.ndarray, path: str) -> None:
  """Writes uint8 `[H, W, 3]` atomically; the format follows the suffix."""
  suffix = os.path.splitext(path)[1].lower()
  image_format = Image.registered_extensions().get(suffix, "PNG")
  with atomic_path(path) as tmp_path:
    Image.fromarray(image).save(tmp_path, format=image_format)


def save_image(frame: np.ndarray, path: str, upscale: int = 1) -> None:
  """Writes uint8 `[H, W, 3]` as an image (PNG unless the suffix says else)."""
  frame = _check_frames(np.asarray(frame)[None])[0]
  _save_still(_upscale(frame, upscale), path)


def contact_sheet(frames: np.ndarray, columns: int | None = None) -> np.ndarray:
  """Tiles `[F, H, W, 3]` into one uint8 image with separators between tiles.

  Returns:
    uint8 `[rows*(H+s)-s, columns*(W+s)-s, 3]`, `s` the separator width;
    `columns` defaults to ceil(sqrt(F)).
  """
  frames = _check_frames(frames)
  num_frames, height, width = frames.shape[:3]
  columns = columns or math.ceil(math.sqrt(num_frames))
  rows = math.ceil(num_frames / columns)
  step_h, step_w = height + _SEPARATOR_PX, width + _SEPARATOR_PX
  sheet = np.full((rows * step_h - _SEPARATOR_PX,
                   columns * step_w - _SEPARATOR_PX, 3), _SEPARATOR_VALUE,
                  np.uint8)
  for index, frame in enumerate(frames):
    top, left = (index // columns) * step_h, (index % columns) * step_w
    sheet[top:top + height, left:left + width] = frame
  return sheet


def write_contact_sheet(frames: np.ndarray, path: str, upscale: int = 1,
                        columns: int | None = None) -> None:
  """Writes `[F, H, W, 3]` as a PNG grid, frames in reading order."""
  frames = _upscale(_check_frames(frames), upscale)
  _save_still(contact_sheet(frames, columns), path)


def edge_map(image: np.ndarray, threshold: float = 0.2) -> np.ndarray:
  """A sketch of an image: its Sobel edges as black lines on white, for the sketch mode.

  Args:
    image: uint8 `[H, W, 3]`.
    threshold: fraction of the strongest gradient above which a pixel is an edge.

  Returns:
    uint8 `[H, W, 3]`, 0 on edges and 255 elsewhere.
  """
  grey = np.asarray(image, np.float64) @ np.array([0.299, 0.587, 0.114])
  height, width = grey.shape
  padded = np.pad(grey, 1, mode="edge")

  def shifted(dy: int, dx: int) -> np.ndarray:
    return padded[1 + dy:1 + dy + height, 1 + dx:1 + dx + width]

  # Sobel: a [1, 2, 1] smoothing across each central difference.
  across = lambda dy: shifted(dy, -1) + 2 * shifted(dy, 0) + shifted(dy, 1)
  down = lambda dx: shifted(-1, dx) + 2 * shifted(0, dx) + shifted(1, dx)
  magnitude = np.hypot(down(1) - down(-1), across(1) - across(-1))
  edges = magnitude > threshold * magnitude.max()
  sketch = np.where(edges, 0, 255).astype(np.uint8)
  return np.repeat(sketch[..., None], 3, axis=-1)


class UnreadableVideo(ValueError):
  """A video file that cannot be decoded: `reason` "unreadable" (cannot be opened, no video
  stream or frame rate) or "truncated" (a decode error after opening, or fewer frames than the
  container declares)."""

  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason

  def __reduce__(self):  # Pickled by worker processes: rebuild from both arguments.
    return type(self), (self.reason, str(self))


MAX_ASPECT = 8  # Longer side over shorter side, past which a picture is refused.


def center_square(image: np.ndarray, size: int,
                  resample: Image.Resampling = Image.Resampling.BOX) -> np.ndarray:
  """uint8 `[H, W, 3]` -> `[size, size, 3]`: the central square, resized (`resample`; BOX
  averages when shrinking). The one crop-and-resize: video frames, images, evaluated videos."""
  height, width = image.shape[:2]
  side = min(height, width)
  if max(height, width) > MAX_ASPECT * side:
    raise ValueError(f"a {width}x{height} picture is more than {MAX_ASPECT}:1; its central "
                     "square would be a sliver of it")
  top, left = (height - side) // 2, (width - side) // 2
  image = image[top:top + side, left:left + side]
  if side == size:
    return np.ascontiguousarray(image)
  # reducing_gap: large inputs are first shrunk by a box filter, much faster and, per Pillow's
  # documentation, indistinguishable from a plain resize in most cases at 3.0.
  return np.asarray(Image.fromarray(image).resize((size, size), resample, reducing_gap=3.0),
                    np.uint8)


def kept_frame(k: int, stride: float) -> int:
  """The source frame of kept frame k at `stride` source frames per kept frame:
  `floor(k * stride + 0.5)` (round half up), from frame 0; a stride below 1 repeats frames."""
  return math.floor(k * stride + 0.5)


def sample_frame_indices(num_source_frames: int, stride: float, max_frames: int) -> np.ndarray:
  """`kept_frame` for k < max_frames, those below `num_source_frames`."""
  if stride <= 0:
    raise ValueError(f"stride must be positive, got {stride}.")
  indices = [kept_frame(k, stride) for k in range(max_frames)]
  return np.array([i for i in indices if i < num_source_frames], np.int64)


def decode_video(path: str, stride: Callable[[float], float] | None = None,
                 max_frames: int | None = None, size: int | None = None
                 ) -> tuple[np.ndarray, float]:
  """The one video decoder (PyAV): (uint8 `[frames, H, W, 3]`, the source's frame rate).

  `stride(source_fps)`: source frames per kept frame (`kept_frame`), default 1
  (every frame); at most `max_frames`; `size`: each kept frame `center_square`d.

  Raises:
    FileNotFoundError: `path` does not exist.
    UnreadableVideo: the file cannot be opened or decoded, or has no frames.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"video not found: {path}")
  try:
    container = av.open(path)
  except (av.FFmpegError, OSError) as error:
    raise UnreadableVideo("unreadable", f"{path}: cannot open ({error}).") from error
  with container:
    if not container.streams.video:
      raise UnreadableVideo("unreadable", f"{path}: no video stream.")
    video = container.streams.video[0]
    video.thread_type = "AUTO"
    rate = video.average_rate or video.guessed_rate
    if not rate or float(rate) <= 0:
      raise UnreadableVideo("unreadable", f"{path}: the video stream has no frame rate.")
    source_fps = float(rate)
    # The container's frame count is often missing or wrong: decode until the stream ends.
    step = stride(source_fps) if stride else 1.0
    limit = max_frames if max_frames is not None else float("inf")
    if step <= 0:
      raise ValueError(f"stride must be positive, got {step}.")
    kept, decoded = [], 0
    try:
      for frame in container.decode(video):
        while len(kept) < limit and kept_frame(len(kept), step) == decoded:
          rgb = frame.to_ndarray(format="rgb24")
          kept.append(rgb if size is None else center_square(rgb, size))
        decoded += 1
        if len(kept) >= limit:
          break
    except av.FFmpegError as error:
      raise UnreadableVideo("truncated", f"{path}: decoding failed after {decoded} frames "
                                         f"({error}).") from error
    if len(kept) < limit and video.frames and decoded < video.frames:
      raise UnreadableVideo("truncated", f"{path}: {decoded} of the {video.frames} frames "
                                         f"the container declares could be decoded.")
  if not kept:
    raise UnreadableVideo("unreadable", f"{path}: the video has no frames.")
  return np.stack(kept), source_fps


def read_video(path: str) -> np.ndarray:
  """Every frame of the first video stream, uint8 `[frames, height, width, 3]`
  (`decode_video`'s errors)."""
  return decode_video(path)[0]
