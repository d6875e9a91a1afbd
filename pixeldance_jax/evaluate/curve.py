"""Evaluation figures against training time: a run's periodic evaluations beside the minutes
of training that led to each, as a table and, with `--out`, a picture of one chart per metric.

Both come from what the run logged to TensorBoard: the evaluations it made in training
(`eval/<variant>/<metric>`, every `config.eval_every_steps`) and its step rates
(`train/steps_per_sec`), which leave out compiles, evaluations and the time between a stop and
its resume. After a resume from an earlier checkpoint, what the abandoned run had logged past
that checkpoint is dropped. The minutes are training at the speed the run had, on whatever
shared the machine with it.

    python -m pixeldance_jax.evaluate.curve --workdir=workdirs/tiny_long \
      --workdir=workdirs/tiny_long_refiner --out=curve.png
"""

import math
import os
import sys
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
from absl import flags

from pixeldance_jax.cli import console
from pixeldance_jax.evaluate import figures, trained_run
from pixeldance_jax.io import tensorboard_files, video_files

# The figures a magic-mode evaluation (`--metrics=fvd,conditioning`) writes, with their labels.
METRICS = {"fvd": "FVD", "psnr_db": "PSNR dB", "shape_iou": "shape IoU",
           "colour_error": "colour error", "first_frame_psnr_db": "frame 0 PSNR dB",
           "last_frame_centroid_px": "last-frame px"}
STALL = 10  # A logged rate this many times below the run's median is a stall, not training.


class Curve(NamedTuple):
  """A run's evaluations, one row per evaluated step (`step`, `minutes` of training or None
  past the last logged rate, and the figures), and the logged steps whose interval was a stall
  (counted at the median rate)."""
  rows: list[dict[str, Any]]
  stalled_steps: list[int]


def training_minutes(rates: dict[int, float]) -> dict[int, float]:
  """`{step: minutes of training up to it}` from `{step: steps per second since the previous
  logged step}`. An interval slower than 1/STALL of the median rate (a process paused, a
  machine suspended) counts at the median rate."""
  median, stalled = _median_and_stalls(rates)
  minutes, total, previous = {}, 0.0, 0
  for step, rate in sorted(rates.items()):
    total += (step - previous) / (median if step in stalled else rate) / 60
    minutes[step], previous = total, step
  return minutes


def _median_and_stalls(rates: dict[int, float]) -> tuple[float, set[int]]:
  median = float(np.median(list(rates.values())))
  return median, {step for step, rate in rates.items() if rate < median / STALL}


def curve(workdir: str, variant: str = "magic") -> Curve:
  """The evaluations of `variant` that training logged in `workdir`, with their minutes."""
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"workdir {workdir} does not exist")
  folder = os.path.join(workdir, "tensorboard")
  logged = tensorboard_files.all_scalars(folder)
  rates = logged.get("train/steps_per_sec")
  if not rates:
    raise FileNotFoundError(f"no train/steps_per_sec in {folder}: not a training run's "
                            "TensorBoard folder, or it has not logged a step yet")
  prefix = f"eval/{variant}/"
  evaluated = {tag[len(prefix):]: values for tag, values in logged.items()
               if tag.startswith(prefix)}
  if not evaluated:
    raise FileNotFoundError(f"no evaluation of the {variant!r} variant in {folder}: train "
                            "with --config.eval_every_steps=N")
  minutes = training_minutes(rates)
  steps, totals = [0, *minutes], [0.0, *minutes.values()]
  rows = []
  for step in sorted(set().union(*evaluated.values())):
    at = float(np.interp(step, steps, totals)) if step <= steps[-1] else None
    rows.append({"step": step, "minutes": at,
                 **{name: values.get(step) for name, values in evaluated.items()}})
  return Curve(rows, sorted(_median_and_stalls(rates)[1]))


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
    runs = {name: curve(workdir, values["variant"])
            for name, workdir in zip(run_names(values["workdirs"]), values["workdirs"])}
  except (FileNotFoundError, ValueError) as error:
    sys.exit(f"pixeldance_jax.evaluate.curve: error: {error}")
  curves = {name: run.rows for name, run in runs.items()}
  print(markdown(curves, values["metrics"]))
  for name, run in runs.items():
    stalled = run.stalled_steps
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
