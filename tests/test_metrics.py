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


# --- Fidelity against the real clip --------------------------------------------------------------

def test_psnr_of_known_errors():
  frame = _frame_with_square(10, 30)
  assert metrics.psnr(frame, frame) == metrics.MAX_PSNR_DB
  off_by_16 = frame.astype(np.int32) + 16  # MSE 256: 20 log10(255 / 16) = 24.05 dB.
  assert metrics.psnr(off_by_16, frame) == pytest.approx(20 * math.log10(255 / 16))
  with pytest.raises(ValueError, match="different shapes"):
    metrics.psnr(frame, frame[:32])


def test_shape_iou_of_overlapping_squares():
  # 10 x 10 squares shifted by 5 columns: 50 shared pixels of 150.
  assert metrics.shape_iou(_frame_with_square(10, 30), _frame_with_square(10, 35),
                           _BACKGROUND) == pytest.approx(50 / 150)
  assert metrics.shape_iou(_frame_with_square(10, 30), _frame_with_square(10, 30),
                           _BACKGROUND) == 1.0
  empty = np.full((64, 64, 3), _BACKGROUND, np.uint8)
  assert metrics.shape_iou(empty, empty, _BACKGROUND) == 1.0
  assert metrics.shape_iou(empty, _frame_with_square(10, 30), _BACKGROUND) == 0.0


def test_colour_error_is_the_rms_of_the_mean_colours():
  frame = _frame_with_square(10, 30)
  recoloured = frame.copy()
  recoloured[10:20, 30:40] = (_SHAPE[0] - 30, _SHAPE[1], _SHAPE[2] + 30)  # -30, 0, +30.
  assert metrics.colour_error(recoloured, frame, _BACKGROUND) == pytest.approx(
      math.sqrt((30 ** 2 + 30 ** 2) / 3))
  # A shape drawn smaller in the right colour has the right colour.
  smaller = np.full_like(frame, _BACKGROUND)
  smaller[12:18, 32:38] = _SHAPE
  assert metrics.colour_error(smaller, frame, _BACKGROUND) == 0.0
  assert math.isnan(metrics.colour_error(np.full_like(frame, _BACKGROUND), frame, _BACKGROUND))


def test_fidelity_of_a_video_against_the_real_one():
  real = _moving_square_video((0, 2))
  found = metrics.fidelity(real, real, _BACKGROUND)
  assert found == {"psnr_db": metrics.MAX_PSNR_DB, "shape_iou": 1.0, "colour_error": 0.0,
                   "first_frame_psnr_db": metrics.MAX_PSNR_DB}
  # Frame 0 kept; in frames 1-3 the square lags 2 columns per frame behind and is 40 bluer;
  # in the last frame it is gone.
  bluer = (_SHAPE[0], _SHAPE[1], _SHAPE[2] + 40)
  fake = real.copy()
  for i in range(1, 4):
    fake[i] = np.full_like(real[i], _BACKGROUND)
    fake[i][20:30, 20 + 2 * (i - 1):30 + 2 * (i - 1)] = bluer
  fake[4] = np.full_like(real[4], _BACKGROUND)
  found = metrics.fidelity(fake, real, _BACKGROUND)
  # IoU per frame: 1, then 10 x 8 shared of 10 x 12 (frames 1-3), then 0.
  assert found["shape_iou"] == pytest.approx((1 + 3 * 80 / 120 + 0) / 5)
  assert found["colour_error"] == pytest.approx((0 + 3 * 40 / math.sqrt(3)) / 4)
  assert found["first_frame_psnr_db"] == metrics.MAX_PSNR_DB
  assert found["psnr_db"] < metrics.MAX_PSNR_DB
  with pytest.raises(ValueError, match="one shape"):
    metrics.fidelity(real, real[:3], _BACKGROUND)


# --- Keyframes and continuation ---------------------------------------------------------------


def test_keyframe_distance_is_the_mean_over_the_given_frames():
  video = _moving_square_video((2, 0), num_frames=5)  # Rows 20, 22, ..., 28.
  given = {1: _frame_with_square(22, 20), 3: _frame_with_square(20, 20)}  # 0 and 6 px off.
  assert metrics.keyframe_distance(video, given, _BACKGROUND) == pytest.approx(3.0)
  assert math.isnan(metrics.keyframe_distance(video, {}, _BACKGROUND))


def test_middle_off_line_measures_a_detour_and_a_pause():
  line = np.array([[0, 0], [2, 2], [4, 4], [6, 6], [8, 8]], float)
  assert metrics.middle_off_line(line, 2) == 0.0
  detour = line.copy()
  detour[2] = (7, 1)  # 3 px down and 3 px left of (4, 4).
  assert metrics.middle_off_line(detour, 2) == pytest.approx(math.hypot(3, 3))
  paused = np.array([[0, 0], [0, 0], [0, 0], [4, 4], [8, 8]], float)
  assert metrics.middle_off_line(paused, 2) == pytest.approx(math.hypot(4, 4))


def test_velocity_seam_is_the_jump_of_the_velocity_at_the_boundary():
  steady = _moving_square_video((0, 3), num_frames=6)
  assert metrics.velocity_seam(steady, 3, _BACKGROUND) == pytest.approx((0.0, 0.0))
  # From frame 3 on the square moves down 2 px a frame instead of right 3, and at frame 5
  # 1 px further down (a change of 1 px/frame, the only one away from the boundary).
  frames = [_frame_with_square(20, 20 + 3 * i) for i in range(3)]
  frames += [_frame_with_square(20 + 2 * i, 26) for i in range(1, 3)]
  frames.append(_frame_with_square(27, 26))
  turned = np.stack(frames)
  seam, elsewhere = metrics.velocity_seam(turned, 3, _BACKGROUND)
  assert seam == pytest.approx(math.hypot(2, 3))
  assert elsewhere == pytest.approx((0 + 0 + 1) / 3)
  np.testing.assert_allclose(metrics.velocity_changes(turned, _BACKGROUND),
                             [0, math.hypot(2, 3), 0, 1], atol=1e-9)
  with pytest.raises(ValueError, match="boundary 1 needs two frames before it"):
    metrics.velocity_seam(turned, 1, _BACKGROUND)
