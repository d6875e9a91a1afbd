"""Object-position metrics for synthetic moving-shape videos.

The synthetic data draws shapes on a flat background of known colour, so the
object is simply every pixel far enough from that colour. The main use is
scoring a generated video against its conditioning: the distance between the
shape's centroid in the last generated frame and in the given last frame, and
whether the shape moved in the expected direction; and against the real clip it
was conditioned on: how well it draws the shape (PSNR, the shape's IoU and colour).
"""

import math
from typing import Sequence

import numpy as np

VectorLike = np.ndarray | Sequence[float]


def object_mask(frame: np.ndarray, background: VectorLike,
                threshold: float = 60.0) -> np.ndarray:
  """Marks pixels that differ from the background colour.

  Args:
    frame: `[H, W, 3]` RGB, uint8 or float in the same 0..255 range.
    background: `[3]` RGB background colour.
    threshold: Euclidean RGB distance above which a pixel is object. The
      default sits well above H.264/GIF noise and well below the contrast of
      the synthetic shapes.

  Returns:
    bool `[H, W]`.
  """
  frame = np.asarray(frame, np.float32)
  background = np.asarray(background, np.float32).reshape(3)
  if frame.ndim != 3 or frame.shape[-1] != 3:
    raise ValueError(f"expected a frame [H, W, 3], got {frame.shape}")
  return np.linalg.norm(frame - background, axis=-1) > threshold


def centroid(frame: np.ndarray, background: VectorLike,
             threshold: float = 60.0) -> np.ndarray:
  """Centre of mass of the object mask of `[H, W, 3]`.

  Returns:
    float64 `[2]` as (y, x) in pixel coordinates (pixel centres are
    integers); (NaN, NaN) if no pixel is object.
  """
  rows, cols = np.nonzero(object_mask(frame, background, threshold))
  if rows.size == 0:
    return np.full(2, np.nan)
  return np.array([rows.mean(), cols.mean()])


def centroid_distance(frame_a: np.ndarray, frame_b: np.ndarray,
                      background: VectorLike, threshold: float = 60.0) -> float:
  """Euclidean distance in pixels between the object centroids of two frames.

  Both frames are `[H, W, 3]` at the same resolution. NaN if either has no
  object pixels, so callers must count NaNs as failures rather than drop them.
  """
  offset = (centroid(frame_a, background, threshold)
            - centroid(frame_b, background, threshold))
  return float(np.linalg.norm(offset))


def motion_direction_agreement(video: np.ndarray,
                               expected_velocity: VectorLike,
                               background: VectorLike, threshold: float = 60.0,
                               min_displacement: float = 0.5) -> float:
  """Cosine of the angle between the object's motion and a velocity.

  The motion is the centroid displacement from the first to the last frame.

  Args:
    video: uint8 `[frames, H, W, 3]`.
    expected_velocity: `[2]` as (dy, dx); only its direction matters.
    background: `[3]` RGB background colour.
    threshold: see `object_mask`.
    min_displacement: displacements shorter than this (pixels) have a
      direction set by mask noise, so they count as undefined.

  Returns:
    A value in [-1, 1]: 1 moving along the velocity, -1 against it; NaN if the
    object is missing in the first or last frame, it (almost) did not move, or
    the velocity is zero.
  """
  return direction_cosine(displacement(video, background, threshold), expected_velocity,
                          min_displacement)


def displacement(video: np.ndarray, background: VectorLike,
                 threshold: float = 60.0) -> np.ndarray:
  """(dy, dx) of the object's centroid from the first to the last frame of `[frames, H, W, 3]`;
  NaN where the object is missing."""
  video = np.asarray(video)
  if video.ndim != 4 or video.shape[0] < 2:
    raise ValueError(
        f"expected a video [frames>=2, H, W, 3], got {video.shape}")
  return (centroid(video[-1], background, threshold)
          - centroid(video[0], background, threshold))


def direction_cosine(moved: VectorLike, expected_velocity: VectorLike,
                     min_displacement: float = 0.5) -> float:
  """Cosine between a displacement and a velocity; NaN if the displacement is shorter than
  `min_displacement` (or NaN) or the velocity is zero."""
  moved = np.asarray(moved, np.float64).reshape(2)
  velocity = np.asarray(expected_velocity, np.float64).reshape(2)
  length, speed = np.linalg.norm(moved), np.linalg.norm(velocity)
  # NaN comparisons are False, so a missing object also lands here.
  if not (length >= min_displacement and speed > 0):
    return float("nan")
  return float(np.dot(moved, velocity) / (length * speed))


# --- Fidelity: how well a generated clip draws the real one ----------------------------------

# What `fidelity` returns, in its order.
FIDELITY_FIELDS = ("psnr_db", "shape_iou", "colour_error", "first_frame_psnr_db")
# PSNR of identical frames is infinite; this cap keeps means finite (no uint8 frame that
# differs anywhere scores above 58 dB).
MAX_PSNR_DB = 100.0


def psnr(frame_a: np.ndarray, frame_b: np.ndarray) -> float:
  """Peak signal-to-noise ratio in dB of two `[..., 3]` images in 0..255, capped at
  `MAX_PSNR_DB`."""
  a, b = np.asarray(frame_a, np.float64), np.asarray(frame_b, np.float64)
  if a.shape != b.shape:
    raise ValueError(f"frames of different shapes: {a.shape} and {b.shape}")
  mse = float(np.mean((a - b) ** 2))
  return MAX_PSNR_DB if mse == 0 else min(MAX_PSNR_DB, 10.0 * math.log10(255.0 ** 2 / mse))


def shape_iou(frame: np.ndarray, reference: np.ndarray, background: VectorLike,
              threshold: float = 60.0) -> float:
  """Intersection over union of the object masks of two `[H, W, 3]` frames; 1 when neither
  has an object (nothing to draw, nothing drawn)."""
  mask, expected = (object_mask(f, background, threshold) for f in (frame, reference))
  union = np.logical_or(mask, expected).sum()
  return 1.0 if union == 0 else float(np.logical_and(mask, expected).sum() / union)


def shape_colour(frame: np.ndarray, background: VectorLike,
                 threshold: float = 60.0) -> np.ndarray:
  """Mean RGB `[3]` of the object's pixels; NaN where there is no object."""
  mask = object_mask(frame, background, threshold)
  if not mask.any():
    return np.full(3, np.nan)
  return np.asarray(frame, np.float64)[mask].mean(axis=0)


def colour_error(frame: np.ndarray, reference: np.ndarray, background: VectorLike,
                 threshold: float = 60.0) -> float:
  """Root mean square over the channels of the difference between the two frames' mean
  object colours, in 0..255 (a shape drawn 20 too red, green and blue scores 20); NaN where
  either frame has no object."""
  difference = (shape_colour(frame, background, threshold)
                - shape_colour(reference, background, threshold))
  return float(np.sqrt(np.mean(difference ** 2)))


def fidelity(video: np.ndarray, reference: np.ndarray, background: VectorLike,
             threshold: float = 60.0) -> dict[str, float]:
  """A generated clip against the real one, frame by frame (`[frames, H, W, 3]` both): the
  means over frames of PSNR, shape IoU and colour error (over the frames where both have an
  object; NaN if none), and the PSNR of frame 0 alone (the given first frame, redrawn)."""
  video, reference = np.asarray(video), np.asarray(reference)
  if video.shape != reference.shape or video.ndim != 4:
    raise ValueError(f"expected two videos [frames, H, W, 3] of one shape, got {video.shape} "
                     f"and {reference.shape}")
  colours = [colour_error(v, r, background, threshold) for v, r in zip(video, reference)]
  colours = [c for c in colours if not math.isnan(c)]
  return {"psnr_db": float(np.mean([psnr(v, r) for v, r in zip(video, reference)])),
          "shape_iou": float(np.mean([shape_iou(v, r, background, threshold)
                                      for v, r in zip(video, reference)])),
          "colour_error": float(np.mean(colours)) if colours else float("nan"),
          "first_frame_psnr_db": psnr(video[0], reference[0])}


# --- Keyframes and continuation ---------------------------------------------------------------

# A real clip's middle counts as decided by a middle keyframe when it is this far (px) from
# where constant motion between its ends would put it.
OFF_LINE_PX = 2.0


def middle_off_line(centroids: np.ndarray, index: int) -> float:
  """Distance (px) of frame `index`'s centroid from constant motion between the first and last
  (`centroids` `[frames, 2]`): how much a keyframe there tells that its ends do not."""
  centroids = np.asarray(centroids, np.float64)
  frames = len(centroids)
  expected = centroids[0] + (centroids[-1] - centroids[0]) * index / (frames - 1)
  return float(np.linalg.norm(centroids[index] - expected))


def keyframe_distance(video: np.ndarray, keyframes: dict[int, np.ndarray],
                      background: VectorLike, threshold: float = 60.0) -> float:
  """Mean distance (px) between the shape in frame i of `video` and in the keyframe given for
  frame i, over the keyframes; NaN without keyframes or where a shape is missing."""
  if not keyframes:
    return float("nan")
  return float(np.mean([centroid_distance(video[index], frame, background, threshold)
                        for index, frame in keyframes.items()]))


def velocity_changes(video: np.ndarray, background: VectorLike,
                     threshold: float = 60.0) -> np.ndarray:
  """`[frames - 2]`: entry i is |(c[i+2] - c[i+1]) - (c[i+1] - c[i])| for the shape's
  centroids c, in px per frame (NaN where the shape is missing)."""
  c = np.stack([centroid(frame, background, threshold) for frame in video])
  return np.linalg.norm(c[2:] - 2 * c[1:-1] + c[:-2], axis=-1)


def velocity_seam(video: np.ndarray, boundary: int, background: VectorLike,
                  threshold: float = 60.0) -> tuple[float, float]:
  """How much the shape's velocity jumps where a long video's next clip starts, and how much it
  changes from frame to frame elsewhere in the video (what the seam compares with).

  Frame `boundary` is the next clip's first new frame; the seam is
  |(c[b] - c[b-1]) - (c[b-1] - c[b-2])| in px per frame, the rest the mean of that at every
  other frame (NaN where the shape is missing)."""
  if not 2 <= boundary < len(video):
    raise ValueError(f"boundary {boundary} needs two frames before it in a video of "
                     f"{len(video)}")
  changes = velocity_changes(video, background, threshold)
  others = np.delete(changes, boundary - 2)
  others = others[~np.isnan(others)]
  return float(changes[boundary - 2]), float(others.mean()) if others.size else float("nan")
