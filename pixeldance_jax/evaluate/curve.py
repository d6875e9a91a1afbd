"""Evaluation figures against training time: a run's periodic evaluations beside the minutes
of training that led to each, as a table and, with `--out`, a picture of one chart per metric.

The evaluations are the run's `eval/<step>.json` (written in the run when
`config.eval_every_steps` is set, or by `python -m pixeldance_jax.evaluate` afterwards). The
minutes add up the step rates the run logged to TensorBoard (`train/steps_per_sec`), which leave
out compiles, evaluations and the time between a stop and its resume: minutes of training at
the speed the run had, on whatever shared the machine with it.

    python -m pixeldance_jax.evaluate.curve --workdir=workdirs/tiny_long \
      --workdir=workdirs/tiny_long_refiner --out=curve.png
"""

import json
import math
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import flags

from pixeldance_jax.cli import console
from pixeldance_jax.evaluate import figures, trained_run
from pixeldance_jax.io import tensorboard_files, video_files

# The figures a magic-mode evaluation (`--metrics=fvd,conditioning`) writes, with their labels.
METRICS = {"fvd": "FVD", "psnr_db": "PSNR dB", "shape_iou": "shape IoU",
           "colour_error": "colour error", "first_frame_psnr_db": "frame 0 PSNR dB",
           "last_frame_centroid_px": "last-frame px"}
_EVALUATION_FILE = re.compile(r"^(\d+)\.json$")
STALL = 10  # A logged rate this many times below the run's median is a stall, not training.


def training_minutes(tensorboard_dir: str) -> dict[int, float]:
  """`{step: minutes of training up to it}` at every step the run logged a rate at. A step
  logged twice (training resumed from an earlier checkpoint) counts the run that went on. An
  interval slower than 1/STALL of the run's median rate (a process paused, a machine suspended)
  counts at the median rate."""
  rates = _rates(tensorboard_dir)
  median, stalled = _median_and_stalls(rates)
  minutes, total, previous = {}, 0.0, 0
  for step, rate in rates.items():
    total += (step - previous) / (median if step in stalled else rate) / 60
    minutes[step], previous = total, step
  return minutes


def stalled_steps(tensorboard_dir: str) -> list[int]:
  """The logged steps whose interval `training_minutes` counted at the median rate."""
  return sorted(_median_and_stalls(_rates(tensorboard_dir))[1])


def _rates(tensorboard_dir: str) -> dict[int, float]:
  rates = tensorboard_files.scalars(tensorboard_dir, "train/steps_per_sec")
  if not rates:
    raise FileNotFoundError(f"no train/steps_per_sec in {tensorboard_dir}: not a training "
                            "run's TensorBoard folder, or it has not logged a step yet")
  return rates


def _median_and_stalls(rates: dict[int, float]) -> tuple[float, set[int]]:
  median = float(np.median(list(rates.values())))
  return median, {step for step, rate in rates.items() if rate < median / STALL}


def evaluations(eval_dir: str, variant: str) -> dict[int, dict[str, Any]]:
  """`{step: figures}` of `variant` from every `<step>.json` in `eval_dir` that evaluated it.
  (A second evaluation of a step is written beside the first, `<step>-2.json`, and not read:
  the first is the run's own.)"""
  if not os.path.isdir(eval_dir):
    raise FileNotFoundError(f"no evaluations in {eval_dir}: train with "
                            "--config.eval_every_steps=N, or run python -m pixeldance_jax.evaluate")
  found = {}
  for name in os.listdir(eval_dir):
    match = _EVALUATION_FILE.match(name)
    if match:
      with open(os.path.join(eval_dir, name)) as f:
        results = json.load(f)
      if variant in results.get("variants", {}):
        found[int(match.group(1))] = results["variants"][variant]
  return dict(sorted(found.items()))


def curve(workdir: str, variant: str = "magic") -> list[dict[str, Any]]:
  """One row per evaluation of `variant` in `workdir`, by step: `step`, `minutes` (None for a
  step outside the logged ones) and the evaluation's figures."""
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"workdir {workdir} does not exist")
  found = evaluations(os.path.join(workdir, "eval"), variant)
  if not found:
    raise FileNotFoundError(f"no evaluation of the {variant!r} variant in "
                            f"{os.path.join(workdir, 'eval')}")
  minutes = training_minutes(os.path.join(workdir, "tensorboard"))
  logged = np.array(list(minutes), float)
  rows = []
  for step, figures_at_step in found.items():
    inside = logged[0] <= step <= logged[-1]
    at = float(np.interp(step, logged, list(minutes.values()))) if inside else None
    rows.append({"step": step, "minutes": at, **figures_at_step})
  return rows


def markdown(curves: dict[str, list[dict[str, Any]]], metrics: Sequence[str]) -> str:
  """A table of `curve`s, keyed by run name: a row per run and evaluated step."""
  lines = ["| run | step | training min | " + " | ".join(METRICS.get(m, m) for m in metrics)
           + " |", "|---|---:|---:|" + "---:|" * len(metrics)]
  for run, rows in curves.items():
    for row in rows:
      cells = [trained_run.format_cell(_finite(row.get(m))) for m in metrics]
      minutes = "" if row["minutes"] is None else f"{row['minutes']:.1f}"
      lines.append(f"| {run} | {row['step']} | {minutes} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def picture(curves: dict[str, list[dict[str, Any]]], metrics: Sequence[str],
            targets: dict[str, float] | None = None) -> np.ndarray:
  """One line chart per metric, each run a line against its training minutes, and a grey line
  at each metric's target (`{metric: value}`)."""
  charts = {}
  for metric in metrics:
    charts[METRICS.get(metric, metric)] = {
        run: [(row["minutes"], _finite(row.get(metric))) for row in rows
              if row["minutes"] is not None and _finite(row.get(metric)) is not None]
        for run, rows in curves.items()}
  targets = {METRICS.get(m, m): value for m, value in (targets or {}).items()}
  return figures.line_charts(charts, x_label="training minutes", targets=targets)


def parse_targets(items: Sequence[str], metrics: Sequence[str]) -> dict[str, float]:
  """`["fvd=191", ...]` as `{"fvd": 191.0}`; ValueError naming an item that is not
  `<metric>=<number>` of a shown metric."""
  targets = {}
  for item in items:
    metric, _, value = item.partition("=")
    try:
      targets[metric] = float(value)
    except ValueError:
      raise ValueError(f"--targets item {item!r} is not <metric>=<number>") from None
    if metric not in metrics:
      raise ValueError(f"--targets names {metric!r}, which is not among --metrics "
                       f"({','.join(metrics)})")
  return targets


def _finite(value: Any) -> float | None:
  return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def run_names(workdirs: Sequence[str]) -> list[str]:
  """Each workdir's folder name; the whole path where two runs share a folder name."""
  names = [os.path.basename(os.path.normpath(w)) for w in workdirs]
  return names if len(set(names)) == len(names) else list(workdirs)


def _define_flags() -> dict[str, Any]:
  """The command line's flags (defined only when run as a program)."""
  return {
      "workdirs": flags.DEFINE_multi_string("workdir", None, "Training workdir (repeat the "
                                            "flag to put runs side by side)."),
      "variant": flags.DEFINE_string("variant", "magic", "The evaluated variant to show."),
      "metrics": flags.DEFINE_list("metrics", list(METRICS), "The evaluation's figures to show."),
      "targets": flags.DEFINE_list("targets", [], "Lines to draw across the charts, "
                                   "<metric>=<value>, e.g. colour_error=20,shape_iou=0.8."),
      "out": flags.DEFINE_string("out", None, "A PNG of the charts, written here (an existing "
                                 "file is replaced)."),
  }


def main(argv: list[str], holders: dict[str, Any]) -> None:
  values = console.flag_values(argv, holders, required=("workdirs",))
  try:
    targets = parse_targets(values["targets"], values["metrics"])
    curves = {name: curve(workdir, values["variant"])
              for name, workdir in zip(run_names(values["workdirs"]), values["workdirs"])}
  except (FileNotFoundError, ValueError) as error:
    sys.exit(f"pixeldance_jax.evaluate.curve: error: {error}")
  print(markdown(curves, values["metrics"]))
  for name, workdir in zip(curves, values["workdirs"]):
    stalled = stalled_steps(os.path.join(workdir, "tensorboard"))
    if stalled:
      print(f"{name}: counted at the median rate, as pauses (under 1/{STALL} of it): the "
            f"logged interval{'s' if len(stalled) > 1 else ''} ending at step "
            f"{', '.join(map(str, stalled))}")
  if values["out"]:
    video_files.save_image(picture(curves, values["metrics"], targets), values["out"])
    print(f"wrote {values['out']}")


if __name__ == "__main__":
  _holders = _define_flags()
  console.run(lambda argv: main(argv, _holders))
