"""Tests for pixeldance_jax.io.video_files: round trips, atomic writes, bad inputs (the image
reader, data.media.read_image, is tested in test_local_data.py)."""

import os

import numpy as np
from PIL import Image
from PIL import ImageSequence
import pytest

from pixeldance_jax.io import video_files
from pixeldance_jax.data import media

_BACKGROUND = (20, 30, 40)
_SHAPE = (230, 50, 40)


def _moving_square(num_frames: int = 6, height: int = 16,
                   width: int = 16) -> np.ndarray:
  """uint8 `[F, H, W, 3]`: a 4x4 square moving right by 1 px per frame."""
  frames = np.full((num_frames, height, width, 3), _BACKGROUND, np.uint8)
  for index in range(num_frames):
    frames[index, 4:8, 2 + index:6 + index] = _SHAPE
  return frames


def _read_gif(path: str) -> tuple[np.ndarray, list[int], dict]:
  with Image.open(path) as image:
    frames = [np.asarray(frame.convert("RGB"))
              for frame in ImageSequence.Iterator(image)]
    durations = []
    for index in range(image.n_frames):
      image.seek(index)
      durations.append(image.info["duration"])
    return np.stack(frames), durations, dict(image.info)


def test_mp4_round_trip_with_upscale(tmp_path):
  frames = _moving_square()
  path = str(tmp_path / "video.mp4")
  video_files.write_video(frames, path, fps=8, upscale=2)
  decoded = video_files.read_video(path).astype(np.int32)
  expected = np.repeat(np.repeat(frames, 2, axis=1), 2, axis=2)
  assert decoded.shape == (6, 32, 32, 3)
  # H.264 is lossy; with an even upscale each pixel covers whole 4:2:0 chroma
  # samples, so only compression noise remains.
  assert np.abs(decoded - expected).max() <= 40
  assert np.abs(decoded - expected).mean() < 4


def test_mp4_odd_size_is_padded_to_even(tmp_path):
  frames = _moving_square(num_frames=3, height=15, width=17)
  path = str(tmp_path / "odd.mp4")
  video_files.write_video(frames, path, fps=4)
  decoded = video_files.read_video(path)
  assert decoded.shape == (3, 16, 18, 3)
  error = np.abs(decoded[:, :15, :17].astype(np.int32) - frames)
  assert error.mean() < 8


def test_gif_round_trip_is_exact(tmp_path):
  frames = _moving_square()
  path = str(tmp_path / "video.gif")
  video_files.write_video(frames, path, fps=10, upscale=3)
  decoded, durations, info = _read_gif(path)
  expected = np.repeat(np.repeat(frames, 3, axis=1), 3, axis=2)
  np.testing.assert_array_equal(decoded, expected)
  assert durations == [100] * 6
  assert info["loop"] == 0


def test_gif_merges_identical_frames_but_keeps_timing(tmp_path):
  frames = _moving_square(num_frames=3)
  frames[1] = frames[0]
  path = str(tmp_path / "still.gif")
  video_files.write_video(frames, path, fps=10)
  decoded, durations, _ = _read_gif(path)
  assert len(decoded) == 2
  assert durations == [200, 100]


def test_write_creates_folders_and_leaves_no_temp_files(tmp_path):
  folder = tmp_path / "a" / "b"
  for name in ("video.mp4", "video.gif"):
    video_files.write_video(_moving_square(), str(folder / name), fps=8)
    video_files.write_video(_moving_square(), str(folder / name), fps=8)  # Over.
  assert sorted(os.listdir(folder)) == ["video.gif", "video.mp4"]
  mask = os.umask(0o022)
  try:
    video_files.save_image(_moving_square()[0], str(folder / "frame.png"))
  finally:
    os.umask(mask)
  assert os.stat(folder / "frame.png").st_mode & 0o777 == 0o644  # As open() makes it.


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
  path = tmp_path / "video.mp4"
  video_files.write_video(_moving_square(), str(path), fps=8)
  previous = path.read_bytes()

  def write_half_then_fail(frames, tmp_path_, fps):
    del frames, fps
    with open(tmp_path_, "wb") as f:
      f.write(b"half a video")
    raise RuntimeError("disk full")

  monkeypatch.setitem(video_files._VIDEO_WRITERS, ".mp4", write_half_then_fail)
  with pytest.raises(RuntimeError, match="disk full"):
    video_files.write_video(_moving_square(), str(path), fps=8)
  assert path.read_bytes() == previous
  assert os.listdir(tmp_path) == ["video.mp4"]


def test_unknown_suffix_is_named(tmp_path):
  with pytest.raises(ValueError, match=r"'\.avi'"):
    video_files.write_video(_moving_square(), str(tmp_path / "video.avi"), fps=8)
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize("frames", [
    np.zeros((4, 8, 8), np.uint8),
    np.zeros((4, 8, 8, 3), np.float32),
    np.zeros((0, 8, 8, 3), np.uint8),
])
def test_bad_frames_are_rejected(tmp_path, frames):
  with pytest.raises(ValueError):
    video_files.write_video(frames, str(tmp_path / "video.mp4"), fps=8)


def test_contact_sheet_layout(tmp_path):
  frames = np.stack([np.full((4, 4, 3), 10 * (i + 1), np.uint8)
                     for i in range(5)])
  path = str(tmp_path / "sheet.png")
  video_files.write_contact_sheet(frames, path, upscale=2)
  with Image.open(path) as image:
    sheet = np.asarray(image)
  # ceil(sqrt(5)) = 3 columns and 2 rows of 8x8 tiles with 2 px separators.
  assert sheet.shape == (2 * 8 + 2, 3 * 8 + 2 * 2, 3)
  assert (sheet[:8, :8] == 10).all() and (sheet[:8, 10:18] == 20).all()
  assert (sheet[10:, :8] == 40).all() and (sheet[10:, 10:18] == 50).all()
  assert (sheet[8:10] == 255).all() and (sheet[10:, 20:] == 255).all()


def test_save_image_round_trip(tmp_path):
  frame = _moving_square(num_frames=1)[0]
  path = str(tmp_path / "frame.png")
  video_files.save_image(frame, path, upscale=2)
  expected = np.repeat(np.repeat(frame, 2, axis=0), 2, axis=1)
  np.testing.assert_array_equal(media.read_image(path, 32), expected)


def test_read_video_corrupt_and_missing(tmp_path):
  path = tmp_path / "bad.mp4"
  path.write_bytes(b"\x00" * 100)
  with pytest.raises(ValueError, match="bad.mp4"):
    video_files.read_video(str(path))
  with pytest.raises(FileNotFoundError, match="nope.mp4"):
    video_files.read_video(str(tmp_path / "nope.mp4"))


def test_edge_map_draws_a_shapes_outline():
  image = np.zeros((12, 12, 3), np.uint8)
  image[3:9, 3:9] = (200, 40, 40)
  sketch = video_files.edge_map(image)
  assert sketch.shape == (12, 12, 3) and sketch.dtype == np.uint8
  lines = sketch[..., 0] == 0
  assert lines[3, 5] and lines[8, 5] and lines[5, 3] and lines[5, 8]  # The outline.
  assert not lines[0, 0] and not lines[5, 5]  # Flat background and interior stay white.
  assert (video_files.edge_map(np.full((8, 8, 3), 90, np.uint8)) == 255).all()
