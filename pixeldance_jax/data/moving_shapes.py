"""Deterministic captioned moving-shape clips (numpy only).

One coloured shape moves in a straight line at a constant velocity. The caption names the
direction and speed, which the first frame alone does not reveal, so a model must read the text
(or the last frame) to animate the clip correctly. Clips are a pure function of
(seed, split, index): the TFDS builder, the tests and the evaluator all regenerate the same clip.

With `path_change_prob`, a clip instead takes a path that its first and last frame and its
caption do not determine (PATHS): a detour through a random point, or a pause at a random time.
Its start, end and caption are those of the straight clip, so only a keyframe between them
tells the frames in the middle.
"""

import dataclasses
from typing import Any

import ml_collections
import numpy as np

# Unit step per frame in (dy, dx); image rows grow downwards, so "up" is dy = -1.
DIRECTIONS: dict[str, tuple[int, int]] = {
    "up": (-1, 0),
    "down": (1, 0),
    "left": (0, -1),
    "right": (0, 1),
    "upper left": (-1, -1),
    "upper right": (-1, 1),
    "lower left": (1, -1),
    "lower right": (1, 1),
}
# Fraction of the frame travelled (per moving axis) over the whole clip.
SPEEDS: dict[str, float] = {"slow": 0.15, "fast": 0.3}
SHAPES: tuple[str, ...] = ("square", "circle", "triangle")
# Every colour has a saturated (255) channel, so it stays distinct from the dark backgrounds.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "white": (255, 255, 255),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
    "orange": (255, 128, 0),
}
SPEED_ADVERBS: dict[str, str] = {"slow": "slowly", "fast": "quickly"}
DIRECTION_PHRASES: dict[str, str] = {
    name: name if name in ("up", "down") else f"to the {name}" for name in DIRECTIONS
}
SPLIT_IDS: dict[str, int] = {"train": 0, "test": 1}
OBJECT_FRACTION = 0.25  # Object side as a fraction of image_size (8 px at 32x32).
BACKGROUND_CHANNEL_RANGE = (20, 80)  # Dark, non-black backgrounds; objects have a 255 channel.
# Paths other than the straight line (MovingShapesSpec.path_change_prob), between the same ends.
PATHS = ("detour", "pause")


@dataclasses.dataclass(frozen=True)
class MovingShapesSpec:
  """Everything that determines the generated clips."""
  frames: int
  image_size: int
  second_object_prob: float = 0.0
  background_color_prob: float = 0.0
  seed: int = 0
  path_change_prob: float = 0.0  # Probability of a path from PATHS instead of a straight line.

  @classmethod
  def from_config(cls, data_config: ml_collections.ConfigDict) -> "MovingShapesSpec":
    return cls(
        frames=data_config.frames,
        image_size=data_config.image_size,
        second_object_prob=data_config.second_object_prob,
        background_color_prob=data_config.background_color_prob,
        seed=data_config.generator_seed,
        path_change_prob=data_config.get("path_change_prob", 0.0),
    )


def object_size(image_size: int) -> int:
  return max(3, round(OBJECT_FRACTION * image_size))


def shape_mask(shape: str, size: int) -> np.ndarray:
  """Boolean `[size, size]` mask of `shape` filling its box."""
  centres = np.arange(size) + 0.5
  ys, xs = np.meshgrid(centres, centres, indexing="ij")
  half = size / 2
  if shape == "square":
    return np.ones((size, size), bool)
  if shape == "circle":
    return (ys - half) ** 2 + (xs - half) ** 2 <= half**2
  if shape == "triangle":  # Apex up; the half width grows linearly down the rows.
    return np.abs(xs - half) <= (ys + 0.5) / 2
  raise ValueError(f"Unknown shape {shape!r}; known: {SHAPES}.")


def velocity(spec: MovingShapesSpec, direction: str, speed: str) -> np.ndarray:
  """`[2]` float32 (dy, dx) pixels per frame: SPEEDS[speed] of the frame over the clip."""
  step = SPEEDS[speed] * spec.image_size / max(spec.frames - 1, 1)
  return np.asarray(DIRECTIONS[direction], np.float32) * np.float32(step)


def trajectory_offsets(spec: MovingShapesSpec, vel: np.ndarray) -> np.ndarray:
  """`[frames, 2]` integer (dy, dx) displacement of the object's box from frame 0."""
  times = np.arange(spec.frames, dtype=np.float32)[:, None]
  return np.round(times * vel[None, :]).astype(np.int64)


def detour_offsets(rng: np.random.Generator, spec: MovingShapesSpec, offsets: np.ndarray,
                   size: int) -> np.ndarray:
  """Straight `offsets` bent through a waypoint: at a random middle frame the box is up to one
  object size off the line, on a random side; the path is straight before and after it."""
  frames = spec.frames
  turn = int(rng.integers(2, frames - 2)) if frames > 4 else frames // 2
  line = offsets[-1].astype(np.float64)
  across = np.array([line[1], -line[0]]) / max(np.linalg.norm(line), 1e-9)
  shift = across * rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.0) * size
  waypoint = offsets[turn] + shift
  times = np.arange(frames, dtype=np.float64)[:, None]
  before = waypoint * times / turn
  after = waypoint + (line - waypoint) * (times - turn) / (frames - 1 - turn)
  return np.round(np.where(times <= turn, before, after)).astype(np.int64)


def pause_offsets(rng: np.random.Generator, spec: MovingShapesSpec,
                  offsets: np.ndarray) -> np.ndarray:
  """Straight `offsets` with a pause: the shape stands still for half of the clip, from a
  random frame, and moves twice as fast the rest of the time to end where the line does."""
  steps = spec.frames - 1
  still = max(1, round(steps / 2))
  start = int(rng.integers(1, steps - still)) if steps - still > 1 else 0
  moving = np.ones(steps)
  moving[start:start + still] = 0.0
  progress = np.concatenate([[0.0], np.cumsum(moving)]) / moving.sum()
  return np.round(progress[:, None] * offsets[-1][None, :]).astype(np.int64)


def changed_path(rng: np.random.Generator, spec: MovingShapesSpec, offsets: np.ndarray,
                 size: int, start: np.ndarray) -> tuple[str, np.ndarray]:
  """(path name, `[frames, 2]` offsets): with probability `spec.path_change_prob` a path of
  PATHS between the straight line's ends, kept inside the frame; else the straight line."""
  if spec.path_change_prob <= 0.0 or rng.random() >= spec.path_change_prob:
    return "straight", offsets
  path = str(rng.choice(PATHS))
  changed = (detour_offsets(rng, spec, offsets, size) if path == "detour"
             else pause_offsets(rng, spec, offsets))
  changed = np.clip(start + changed, 0, spec.image_size - size) - start
  return path, changed


def sample_start(rng: np.random.Generator, spec: MovingShapesSpec, size: int,
                 offsets: np.ndarray) -> np.ndarray:
  """`[2]` top-left corner at frame 0 such that the box stays inside the frame throughout.

  The start is drawn from the box that is valid for every direction at this speed, so the first
  frame does not reveal where the object goes: only the caption (or the last frame) does.
  """
  travel = int(np.abs(offsets).max())
  low = np.full(2, travel)
  high = np.full(2, spec.image_size - size - travel)  # Inclusive.
  if np.any(high < low):
    raise ValueError(f"Object of size {size} cannot travel {offsets[-1]} inside {spec}.")
  return rng.integers(low, high + 1)


def boxes_overlap(corner_a: np.ndarray, corner_b: np.ndarray, size: int) -> bool:
  return bool(np.all(np.abs(corner_a - corner_b) < size))


def sample_distractor(rng: np.random.Generator, spec: MovingShapesSpec, size: int,
                      main_corner: np.ndarray, main_color: str,
                      main_shape: str) -> tuple[np.ndarray, str, str] | None:
  """A static (corner, colour, shape) not overlapping the main object at frame 0, if one fits."""
  color = rng.choice([c for c in COLORS if c != main_color])
  shape = rng.choice([s for s in SHAPES if s != main_shape])
  for _ in range(100):  # Rejection sampling; the frame is 4x the object side, so this succeeds.
    corner = rng.integers(0, spec.image_size - size + 1, size=2)
    if not boxes_overlap(corner, main_corner, size):
      return corner, str(color), str(shape)
  return None


def sample_background(rng: np.random.Generator, spec: MovingShapesSpec) -> np.ndarray:
  if rng.random() < spec.background_color_prob:
    return rng.integers(*BACKGROUND_CHANNEL_RANGE, size=3, endpoint=True).astype(np.uint8)
  return np.zeros(3, np.uint8)


def paint(frame: np.ndarray, mask: np.ndarray, corner: np.ndarray, color: np.ndarray) -> None:
  """Paints `mask` at top-left `corner` of `frame` `[H, W, 3]` in place."""
  y, x = corner
  region = frame[y:y + mask.shape[0], x:x + mask.shape[1]]
  region[mask] = color


def mask_centroid(mask: np.ndarray, corner: np.ndarray) -> np.ndarray:
  """`[2]` (y, x) centroid of the drawn pixels, pixel centres at integer coordinates."""
  ys, xs = np.nonzero(mask)
  return np.array([ys.mean() + corner[0], xs.mean() + corner[1]], np.float32)


def render(spec: MovingShapesSpec, background: np.ndarray,
           distractor: tuple[np.ndarray, str, str] | None, mask: np.ndarray, rgb: np.ndarray,
           corners: np.ndarray) -> np.ndarray:
  """uint8 `[frames, H, W, 3]` with the main object's `mask` at `corners` `[frames, 2]`."""
  video = np.broadcast_to(background, (spec.frames, spec.image_size, spec.image_size, 3)).copy()
  if distractor is not None:
    corner, other_color, other_shape = distractor
    other_mask = shape_mask(other_shape, mask.shape[0])
    for frame in video:
      paint(frame, other_mask, corner, np.asarray(COLORS[other_color], np.uint8))
  # Drawn last, so the main object is never occluded and its centroid is exact.
  for frame, corner in zip(video, corners):
    paint(frame, mask, corner, rgb)
  return video


def caption(color: str, shape: str, direction: str, speed: str) -> str:
  return f"a {color} {shape} moves {SPEED_ADVERBS[speed]} {DIRECTION_PHRASES[direction]}"


def clip_rng(spec: MovingShapesSpec, split: str, index: int) -> np.random.Generator:
  if split not in SPLIT_IDS:
    raise ValueError(f"Unknown split {split!r}; known: {sorted(SPLIT_IDS)}.")
  return np.random.default_rng(np.random.SeedSequence([spec.seed, SPLIT_IDS[split], index]))


def generate_clip(spec: MovingShapesSpec, split: str, index: int) -> dict[str, Any]:
  """Clip `index` of `split`, a pure function of (spec, split, index).

  Returns:
    video: uint8 `[frames, image_size, image_size, 3]`.
    caption: e.g. "a red square moves slowly to the upper left".
    centroids: float32 `[frames, 2]` (y, x) centroid of the main object's pixels.
    background, color: uint8 `[3]` RGB.
    direction, speed: keys of DIRECTIONS and SPEEDS.
    velocity: float32 `[2]` (dy, dx) pixels per frame (of the straight path).
    path: "straight" or one of PATHS.
  """
  rng = clip_rng(spec, split, index)
  color, shape = str(rng.choice(list(COLORS))), str(rng.choice(SHAPES))
  direction, speed = str(rng.choice(list(DIRECTIONS))), str(rng.choice(list(SPEEDS)))
  size = object_size(spec.image_size)
  vel = velocity(spec, direction, speed)
  offsets = trajectory_offsets(spec, vel)
  start = sample_start(rng, spec, size, offsets)
  background = sample_background(rng, spec)
  distractor = None
  if rng.random() < spec.second_object_prob:
    distractor = sample_distractor(rng, spec, size, start, color, shape)
  # Drawn last: with path_change_prob 0 the stream, and so every clip, is the straight one's.
  path, offsets = changed_path(rng, spec, offsets, size, start)

  mask = shape_mask(shape, size)
  rgb = np.asarray(COLORS[color], np.uint8)
  video = render(spec, background, distractor, mask, rgb, start + offsets)
  return {
      "video": video,
      "caption": caption(color, shape, direction, speed),
      "centroids": np.stack([mask_centroid(mask, corner) for corner in start + offsets]),
      "background": background,
      "color": rgb,
      "direction": direction,
      "speed": speed,
      "velocity": vel,
      "path": path,
  }
