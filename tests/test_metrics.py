"""Tests for pixeldance_jax.evaluate.metrics on drawn squares."""

import math

import numpy as np
import pytest

from pixeldance_jax.io import video_files
from pixeldance_jax.evaluate import metrics

_BACKGROUND = (10, 20, 30)
_SHAPE = (240, 200, 40)


def _frame_with_square(top: int, left: int, side: int = 10,
                       size: int = 64) -> np.ndarray:
  frame = np.full((size, size, 3), _BACKGROUND, np.uint8)
  frame[top:top + side, left:left + side] = _SHAPE
  return frame


def _moving_square_video(step: tuple[int, int], num_frames: int = 5):
  """uint8 `[F, 64, 64, 3]`: the square moves by `step` (dy, dx) per frame."""
  return np.stack([
      _frame_with_square(20 + i * step[0], 20 + i * step[1])
      for i in range(num_frames)
  ])


def test_mask_ignores_small_noise():
  frame = _frame_with_square(10, 30)
  noisy = frame.astype(np.int32) + np.random.default_rng(0).integers(
      -15, 16, frame.shape)
  mask = metrics.object_mask(np.clip(noisy, 0, 255), _BACKGROUND)
  assert mask.dtype == bool and mask.shape == (64, 64)
  assert mask.sum() == 100 and mask[10:20, 30:40].all()


def test_centroid_is_geometric_centre():
  centre = metrics.centroid(_frame_with_square(10, 30), _BACKGROUND)
  np.testing.assert_allclose(centre, [14.5, 34.5])


def test_empty_mask_gives_nan():
  empty = np.full((16, 16, 3), _BACKGROUND, np.uint8)
  assert np.isnan(metrics.centroid(empty, _BACKGROUND)).all()
  assert math.isnan(metrics.centroid_distance(
      empty, _frame_with_square(0, 0), _BACKGROUND))


def test_centroid_distance():
  distance = metrics.centroid_distance(
      _frame_with_square(10, 10), _frame_with_square(13, 14), _BACKGROUND)
  assert distance == pytest.approx(5.0)


@pytest.mark.parametrize("velocity, expected", [
    ((2, 3), 1.0),
    ((-4, -6), -1.0),
    ((3, -2), 0.0),
])
def test_direction_agreement(velocity, expected):
  video = _moving_square_video((2, 3))
  agreement = metrics.motion_direction_agreement(video, velocity, _BACKGROUND)
  assert agreement == pytest.approx(expected, abs=1e-9)


def test_direction_agreement_undefined_cases():
  still = _moving_square_video((0, 0))
  assert math.isnan(
      metrics.motion_direction_agreement(still, (1, 0), _BACKGROUND))
  moving = _moving_square_video((1, 1))
  assert math.isnan(
      metrics.motion_direction_agreement(moving, (0, 0), _BACKGROUND))
  moving[-1] = _BACKGROUND  # The object vanished.
  assert math.isnan(
      metrics.motion_direction_agreement(moving, (1, 1), _BACKGROUND))


def test_centroid_survives_mp4_round_trip(tmp_path):
  video = _moving_square_video((2, 3))
  path = str(tmp_path / "video.mp4")
  video_files.write_video(video, path, fps=8, upscale=2)
  decoded = video_files.read_video(path)
  shrunk = decoded[:, ::2, ::2]  # Undo the upscale.
  for original, round_trip in zip(video, shrunk):
    assert metrics.centroid_distance(original, round_trip, _BACKGROUND) < 0.5
  assert metrics.motion_direction_agreement(
      shrunk, (2, 3), _BACKGROUND) == pytest.approx(1.0, abs=1e-3)
