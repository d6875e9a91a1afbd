"""Fidelity frame by frame: magic-mode samples of held-out clips (their text, first and last
frame) against the real clips, one row per frame position.

The suite's fidelity figures are means over a clip's frames, in which the given first and last
frames count as much as any other. Here they stand apart from the frames the model draws, with
where the shape is (its centroid's distance from the real one) and how many pixels it covers: a
model that places the shape right but blurs it draws more pixels than the real shape has.
The sampler's settings can be changed for the measurement, without retraining.

    python -m pixeldance_jax.evaluate.frames --workdir=workdirs/tiny --num_videos=16
"""

import time
from typing import Any

import numpy as np
from absl import app, flags

from pixeldance_jax.cli import console
from pixeldance_jax.evaluate import metrics, trained_run
from pixeldance_jax.sampling import generate as generate_lib
from pixeldance_jax.sampling import pipeline as sampling_pipeline

# Per frame: metrics.fidelity's figures, the centroids' distance (px) and the shape's pixels in
# the generated and the real frame.
FIELDS = ("psnr_db", "shape_iou", "colour_error", "centroid_px", "shape_pixels",
          "real_shape_pixels")


def frame_figures(frame: np.ndarray, real: np.ndarray, background: Any) -> dict[str, float]:
  """FIELDS for one generated `[H, W, 3]` frame against the real one (NaN where a figure needs
  a shape that a frame lacks)."""
  return {"psnr_db": metrics.psnr(frame, real),
          "shape_iou": metrics.shape_iou(frame, real, background),
          "colour_error": metrics.colour_error(frame, real, background),
          "centroid_px": metrics.centroid_distance(frame, real, background),
          "shape_pixels": float(metrics.object_mask(frame, background).sum()),
          "real_shape_pixels": float(metrics.object_mask(real, background).sum())}


def summarise(values: list[list[dict[str, float]]]) -> dict[str, dict[str, float | None]]:
  """Per frame position (`"0"` ...), over the frames between the given ones (`"middle"`, in
  clips of more than two frames) and over all frames (`"all"`), each field's
  `trained_run.finite_mean`, from `values[clip][frame]`. A frame without a shape scores no colour or centroid, so
  `shape_frames` says in how many of the frames the generated one had one."""
  frames = len(values[0])
  groups = {str(f): [f] for f in range(frames)}
  if frames > 2:
    groups["middle"] = list(range(1, frames - 1))
  groups["all"] = list(range(frames))
  rows = {}
  for name, positions in groups.items():
    cells = [clip[f] for clip in values for f in positions]
    row = {field: trained_run.finite_mean([c[field] for c in cells]) for field in FIELDS}
    row["shape_frames"] = float(np.mean([c["shape_pixels"] > 0 for c in cells]))
    rows[name] = row
  return rows


def measure(pipeline: sampling_pipeline.Pipeline, data_dir: str, *, num_videos: int = 16,
            batch_size: int = 8, steps: int | None = None, eta: float | None = None,
            guidance_scale: float | None = None, seed: int = 0) -> dict[str, Any]:
  """`summarise`d figures of `num_videos` held-out clips sampled in magic mode (the last frame
  seen at every step); the sampler's settings default to config.sample's."""
  config = pipeline.config
  if not config.conditioning.use_first_frame or not config.conditioning.use_last_frame:
    raise ValueError("magic mode needs a model trained with first and last frames "
                     "(config.conditioning.use_first_frame and use_last_frame)")
  clips = trained_run.moving_shape_clips(config, data_dir, num_videos, "fidelity frame by frame")
  steps = steps or config.sample.num_steps
  start_time, values = time.time(), []
  for start in range(0, num_videos, batch_size):
    records = [clips.record(i) for i in range(start, min(start + batch_size, num_videos))]
    valid = len(records)
    records += [records[-1]] * (batch_size - valid)  # One batch shape: one compile.
    real = np.stack([r["video"] for r in records])
    prompts = [r["caption"] if config.conditioning.use_text else "" for r in records]
    generated = generate_lib.generate(pipeline, prompts, real[:, 0], real[:, -1], tau=steps,
                                      steps=steps, eta=eta, guidance_scale=guidance_scale,
                                      seed=seed + start)
    for video, record in zip(generated[:valid], records[:valid]):
      values.append([frame_figures(frame, real_frame, record["background"])
                     for frame, real_frame in zip(video, record["video"])])
  sample = config.sample
  return {"step": pipeline.step, "weights": pipeline.weights, "num_videos": num_videos,
          "sampler": {"name": sample.sampler, "steps": steps,
                      "eta": sample.eta if eta is None else eta,
                      "guidance_scale": sample.guidance_scale if guidance_scale is None
                      else guidance_scale},
          "frames": summarise(values), "seconds": time.time() - start_time}


def markdown(results: dict[str, Any]) -> str:
  lines = ["| frame | PSNR dB | shape IoU | colour error | centroid px | shape pixels | "
           "real shape pixels | frames with a shape |", "|---|" + "---:|" * 7]
  for name, row in results["frames"].items():
    cells = [trained_run.format_cell(row[key]) for key in FIELDS + ("shape_frames",)]
    label = {"middle": "between the given ones", "all": "all"}.get(name, name)
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _define_flags() -> dict[str, Any]:
  """The command line's flags (defined only when run as a program)."""
  return {
      **trained_run.define_flags(),
      "num_videos": flags.DEFINE_integer("num_videos", 16, "Held-out clips."),
      "batch_size": flags.DEFINE_integer("batch_size", 8, "Clips per sampler call."),
      "steps": flags.DEFINE_integer("steps", None, "Sampler steps. Default: "
                                    "config.sample.num_steps."),
      "eta": flags.DEFINE_float("eta", None, "DDIM eta. Default: config.sample.eta."),
      "guidance_scale": flags.DEFINE_float("guidance_scale", None, "Default: "
                                           "config.sample.guidance_scale."),
      "seed": flags.DEFINE_integer("seed", 0, "Sampling seed: held-out clip i gets seed + i."),
  }


def main(argv: list[str], holders: dict[str, Any]) -> None:
  values = console.flag_values(argv, holders, required=("workdir",))
  if values["batch_size"] < 1 or values["num_videos"] < 1:
    raise app.UsageError("--batch_size and --num_videos must be at least 1")
  results = trained_run.measure_or_exit(values, "frames", lambda pipeline, data_dir: measure(
      pipeline, data_dir, num_videos=values["num_videos"], batch_size=values["batch_size"],
      steps=values["steps"], eta=values["eta"], guidance_scale=values["guidance_scale"],
      seed=values["seed"]))
  trained_run.report(results, values["workdir"], "frames", markdown(results))


if __name__ == "__main__":
  _holders = _define_flags()
  console.run(lambda argv: main(argv, _holders))
