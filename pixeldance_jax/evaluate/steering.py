"""Does the text steer the motion? Every direction and speed prompt from the same first frame.

For each of `num_videos` held-out moving-shapes clips, samples the clip's first frame (basic
mode: no last frame) with one prompt per direction and speed ("a red square moves quickly up",
...) and with the empty prompt, all from the same seed, so that only the text differs. Reports

- `direction_cosine`: the cosine between the generated motion (centroid, first to last frame)
  and the prompt's direction, over every clip and direction prompt;
- `empty_prompt_cosine`: the same for the empty prompt against the clip's own caption, which
  is high only if the first frame gives the direction away;
- `displacement_px` per speed word, and `speed_order_fraction`: the fraction of (clip,
  direction) pairs where "quickly" moves the shape further than "slowly" (by over 1 px);

and draws the first clip's videos, one row per prompt:

  python -m pixeldance_jax.evaluate.steering --workdir=workdirs/tiny --num_videos=16

Writes <workdir>/eval/steering-<step>.json, .md and .png (never overwriting).
"""

import math
import os
import time
from typing import Any, Sequence

import numpy as np
import tqdm
from absl import flags

from pixeldance_jax.cli import console
from pixeldance_jax.io import video_files
from pixeldance_jax.data import moving_shapes
from pixeldance_jax.evaluate import figures, metrics, suite, trained_run
from pixeldance_jax.sampling import generate as generate_lib
from pixeldance_jax.sampling import pipeline as sampling_pipeline


# "quickly" counts as further than "slowly" by more than this (centroids jitter by a fraction
# of a pixel between samples that differ only in the text).
_SPEED_MARGIN_PX = 1.0


def prompts_for(caption: str, directions: Sequence[str],
                speeds: Sequence[str]) -> list[tuple[str, str, str]]:
  """(direction, speed, prompt) for each pair, keeping the caption's subject ("a red square")."""
  subject = caption.split(" moves ")[0]
  return [(direction, speed, f"{subject} moves {moving_shapes.SPEED_ADVERBS[speed]} "
           f"{moving_shapes.DIRECTION_PHRASES[direction]}")
          for direction in directions for speed in speeds]


def measure(pipeline: sampling_pipeline.Pipeline, data_dir: str, *, num_videos: int = 16,
            directions: Sequence[str] = tuple(moving_shapes.DIRECTIONS),
            speeds: Sequence[str] = tuple(moving_shapes.SPEEDS), steps: int | None = None,
            seed: int = 0, progress: bool = True) -> tuple[dict[str, Any], np.ndarray]:
  """The steering metrics over `num_videos` held-out clips, and the figure of the first clip."""
  started = time.time()
  clips = trained_run.moving_shape_clips(pipeline.config, data_dir, num_videos, "steering")
  cosines, empty_cosines, failed = [], [], 0
  moved = {speed: [] for speed in speeds}
  ordered = []
  rows = []
  with tqdm.tqdm(total=num_videos, desc="prompts per clip", disable=not progress,
                 leave=False, dynamic_ncols=True) as bar:
    for index in range(num_videos):
      record = clips.record(index)
      grid = prompts_for(record["caption"], directions, speeds)
      prompts = [prompt for _, _, prompt in grid] + [""]
      first = np.repeat(record["video"][:1], len(prompts), axis=0)
      generated = generate_lib.generate(pipeline, prompts, first, None, tau=0, steps=steps,
                                        seed=np.full(len(prompts), seed + index))
      shifts = [metrics.displacement(video, record["background"]) for video in generated]
      by_pair = {}
      for (direction, speed, _), shift in zip(grid, shifts):
        cosine = metrics.direction_cosine(shift, moving_shapes.DIRECTIONS[direction])
        failed += math.isnan(cosine)
        cosines.append(cosine)
        moved[speed].append(float(np.linalg.norm(shift)))
        by_pair[direction, speed] = float(np.linalg.norm(shift))
      empty_cosines.append(metrics.direction_cosine(shifts[-1], record["velocity"]))
      if "slow" in speeds and "fast" in speeds:
        ordered += [by_pair[d, "fast"] > by_pair[d, "slow"] + _SPEED_MARGIN_PX
                    for d in directions
                    if not (math.isnan(by_pair[d, "fast"]) or math.isnan(by_pair[d, "slow"]))]
      if index == 0:
        rows = [("first frame", record["video"][:1])]
        rows += [(prompt or "(empty prompt)", video) for prompt, video in zip(prompts, generated)]
      bar.update(1)
  data_spec = moving_shapes.MovingShapesSpec.from_config(pipeline.config.data)
  frames = pipeline.config.data.frames
  results = {
      "step": pipeline.step, "weights": pipeline.weights, "num_videos": num_videos,
      "prompts_per_video": len(grid) + 1, "steps": steps or pipeline.config.sample.num_steps,
      "seed": seed,
      "direction_cosine": trained_run.finite_mean(cosines),
      "empty_prompt_cosine": trained_run.finite_mean(empty_cosines),
      "failed_fraction": failed / max(len(cosines), 1),
      "displacement_px": {speed: trained_run.finite_mean(values)
                          for speed, values in moved.items()},
      # What the data moves the shape over a clip (along an axis; diagonals x sqrt(2)).
      "data_displacement_px": {
          speed: float(np.abs(moving_shapes.velocity(data_spec, "right", speed)).max()
                       * (frames - 1)) for speed in speeds},
      "speed_order_fraction": float(np.mean(ordered)) if ordered else None,
      "seconds": round(time.time() - started, 1),
  }
  figure = figures.frame_rows(rows, upscale=2, title=f"held-out clip 0, tau = 0, seed {seed}, "
                              f"step {pipeline.step}: one row per prompt")
  return results, figure


def markdown(results: dict[str, Any]) -> str:
  moved = results["displacement_px"]
  data = results["data_displacement_px"]
  lines = ["| measure | value |", "|---|---:|",
           f"| direction cosine, {results['prompts_per_video'] - 1} prompts x "
           f"{results['num_videos']} first frames | {_format(results['direction_cosine'])} |",
           f"| empty prompt: cosine with the caption's direction | "
           f"{_format(results['empty_prompt_cosine'])} |"]
  for speed, value in moved.items():
    lines.append(f"| displacement, \"{moving_shapes.SPEED_ADVERBS[speed]}\" (px; data "
                 f"{data[speed]:.1f} per axis) | {_format(value)} |")
  lines.append(f"| \"quickly\" moves > 1 px further than \"slowly\" (fraction of pairs) | "
               f"{_format(results['speed_order_fraction'])} |")
  lines.append(f"| shape lost or still (fraction) | {_format(results['failed_fraction'])} |")
  return "\n".join(lines)


def _format(value: float | None) -> str:
  return "" if value is None else f"{value:.3f}"


def write(results: dict[str, Any], figure: np.ndarray, workdir: str) -> list[str]:
  """`<workdir>/eval/steering-<step>.json` with its .md table and .png figure beside it."""
  paths = suite.write_results(results, os.path.join(workdir, "eval",
                                                    f"steering-{results['step']}.json"),
                              markdown(results))
  picture = os.path.splitext(paths[0])[0] + ".png"
  video_files.save_image(figure, picture)
  return paths + [picture]


def _define_flags() -> dict[str, Any]:
  """The command line's flags (defined only when run as a program)."""
  return {
      **trained_run.define_flags(raw_weights=False),
      "num_videos": flags.DEFINE_integer("num_videos", 16, "Held-out first frames; each is "
                                         "sampled with every prompt (17 videos per frame)."),
      "steps": flags.DEFINE_integer("steps", None, "Sampler steps. Default: "
                                    "config.sample.num_steps."),
      "seed": flags.DEFINE_integer("seed", 0, "Held-out clip i's prompts all use seed + i."),
  }


def main(argv: list[str], holders: dict[str, Any]) -> None:
  values = console.flag_values(argv, holders, required=("workdir",))
  results, figure = trained_run.measure_or_exit(
      values, "steering", lambda pipeline, data_dir: measure(
          pipeline, data_dir, num_videos=values["num_videos"], steps=values["steps"],
          seed=values["seed"]))
  paths = write(results, figure, values["workdir"])
  print(markdown(results))
  print(f"({results['seconds']:.0f} s); wrote {' '.join(paths)}")


if __name__ == "__main__":
  _holders = _define_flags()
  console.run(lambda argv: main(argv, _holders))
