"""Writing generated videos, stills and contact sheets; reading videos back.

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
from typing import Iterator

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


def read_video(path: str) -> np.ndarray:
  """Decodes every frame of the first video stream with PyAV.

  Returns:
    uint8 `[frames, height, width, 3]`.

  Raises:
    FileNotFoundError: `path` does not exist.
    ValueError: the file is not a decodable video or has no frames.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"video not found: {path}")
  try:
    with av.open(path) as container:
      if not container.streams.video:
        raise ValueError(f"no video stream in {path}")
      frames = [frame.to_ndarray(format="rgb24")
                for frame in container.decode(video=0)]
  except av.FFmpegError as e:
    raise ValueError(f"cannot read video {path}: {e}") from e
  if not frames:
    raise ValueError(f"video {path} has no frames")
  return np.stack(frames)
