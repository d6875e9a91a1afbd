"""Does each condition matter? Centroid metrics of generated held-out moving-shape clips.

For N held-out clips (first frame, caption and last frame known) this samples:
  - magic mode, tau = steps (the last frame guides every step),
  - basic mode, tau = 0 (the last frame never seen),
  - tau = 0 with the empty prompt (no text),
and reports, per variant, the mean distance in pixels between the shape's centroid in the
last generated frame and in the given last frame, the same for the first frame, and the
cosine between the generated motion and the caption's direction.

  python -m pixeldance_jax.evaluate.conditioning_eval --workdir=/tmp/run --num_clips=32
"""

import json
import math

import numpy as np
from absl import flags, logging

from pixeldance_jax import console
from pixeldance_jax.data import pipeline as data_pipeline
from pixeldance_jax.evaluate import metrics
from pixeldance_jax.sampling import generate as generate_lib
from pixeldance_jax.sampling import pipeline as sampling_pipeline


def _variant_metrics(videos: np.ndarray, clips: list[dict]) -> dict[str, float]:
  """Means over clips; an empty mask or a shape that did not move counts as a failure (NaN)."""
  last, first, direction = [], [], []
  for video, clip in zip(videos, clips):
    background = clip["background"]
    last.append(metrics.centroid_distance(video[-1], clip["video"][-1], background))
    first.append(metrics.centroid_distance(video[0], clip["video"][0], background))
    direction.append(metrics.motion_direction_agreement(video, clip["velocity"], background))
  summary = lambda values: float(np.mean([v for v in values if not math.isnan(v)] or [np.nan]))
  return {"last_frame_centroid_px": summary(last), "first_frame_centroid_px": summary(first),
          "direction_cosine": summary(direction),
          "failed_fraction": float(np.mean([math.isnan(v) for v in last + direction]))}


def evaluate(workdir: str, num_clips: int = 32, steps: int | None = None, seed: int = 0,
             batch_size: int = 16) -> dict[str, dict[str, float]]:
  pipeline = sampling_pipeline.load_pipeline(workdir)
  config = pipeline.config
  clips = data_pipeline.load_test_clips(config, data_pipeline.data_dir(config, workdir), num_clips)
  steps = steps or config.sample.num_steps
  variants = {"text+first+last (tau=steps)": dict(tau=steps, text=True),
              "text+first (tau=0)": dict(tau=0, text=True),
              "first only (tau=0, empty prompt)": dict(tau=0, text=False)}
  results = {}
  for name, variant in variants.items():
    videos = []
    for start in range(0, num_clips, batch_size):
      batch = clips[start:start + batch_size]
      prompts = [clip["caption"] if variant["text"] else "" for clip in batch]
      videos.append(generate_lib.generate(
          pipeline, prompts, np.stack([c["video"][0] for c in batch]),
          np.stack([c["video"][-1] for c in batch]), tau=variant["tau"], steps=steps,
          seed=seed + start))  # Clip i gets seed + i, whatever the batch size.
    results[name] = _variant_metrics(np.concatenate(videos), clips)
    logging.info("%s: %s", name, results[name])
  return results


_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir.")
_NUM_CLIPS = flags.DEFINE_integer("num_clips", 32, "Held-out clips to generate per variant.")
_STEPS = flags.DEFINE_integer("steps", None, "Sampler steps (default: config.sample.num_steps).")
_OUTPUT = flags.DEFINE_string("output", None, "Optional JSON file for the results.")


def main(argv):
  del argv
  results = evaluate(_WORKDIR.value, _NUM_CLIPS.value, _STEPS.value)
  print(f"{'variant':36s} {'last-frame px':>13s} {'first-frame px':>14s} {'direction cos':>13s}")
  for name, values in results.items():
    print(f"{name:36s} {values['last_frame_centroid_px']:13.2f} "
          f"{values['first_frame_centroid_px']:14.2f} {values['direction_cosine']:13.3f}")
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  console.run(main)
