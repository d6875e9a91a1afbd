"""What the commands that measure one trained run share (`evaluate.denoising`, `.frames`,
`.steering`): its flags, loading its checkpoint, and its held-out moving-shape clips."""

import math
import os
import sys
from typing import Any, Callable, Mapping, Sequence

import ml_collections
import numpy as np
from absl import flags

from pixeldance_jax.data import loaders
from pixeldance_jax.evaluate import suite, videos
from pixeldance_jax.sampling import pipeline as sampling_pipeline

# The flags below belong to the command that asks for them (its --helpshort lists them).
flags.disclaim_key_flags()


def define_flags(raw_weights: bool = True) -> dict[str, Any]:
  """`--workdir`, `--checkpoint_step` and (with `raw_weights`) `--raw_weights` holders, keyed
  "workdir", "step" and "raw_weights"."""
  holders = {
      "workdir": flags.DEFINE_string("workdir", None, "Training workdir (its checkpoint and "
                                     "its dataset's held-out clips)."),
      "step": flags.DEFINE_integer("checkpoint_step", None, "Checkpoint step. Default: the "
                                   "latest."),
  }
  if raw_weights:
    holders["raw_weights"] = flags.DEFINE_bool("raw_weights", False, "The raw weights instead "
                                               "of the EMA's.")
  return holders


def load(values: Mapping[str, Any]) -> tuple[sampling_pipeline.Pipeline, str]:
  """(the pipeline of the run's checkpoint, its dataset's directory) from `define_flags`'
  values (the EMA's weights unless "raw_weights" is set)."""
  pipeline = sampling_pipeline.load_pipeline(values["workdir"], values["step"],
                                             use_ema=not values.get("raw_weights", False))
  return pipeline, loaders.data_dir(pipeline.config, values["workdir"])


def measure_or_exit(values: Mapping[str, Any], command: str,
                    measure: Callable[[sampling_pipeline.Pipeline, str], Any]) -> Any:
  """`measure(pipeline, data_dir)` on the run `load` finds; a missing checkpoint or unusable
  run exits with the error, named after `command` (`pixeldance_jax.evaluate.<command>`)."""
  try:
    return measure(*load(values))
  except (FileNotFoundError, ValueError) as error:
    sys.exit(f"pixeldance_jax.evaluate.{command}: error: {error}")


def moving_shape_clips(config: ml_collections.ConfigDict, data_dir: str, count: int,
                       needs: str) -> videos.HeldOutClips:
  """The first `count` held-out clips; raises ValueError unless they are moving shapes (a
  record with its background colour): what `needs` (a sentence's subject) needs."""
  clips = videos.HeldOutClips(config, data_dir, count=count)
  if "background" not in clips.record(0):
    raise ValueError(f"{needs} needs the moving-shapes dataset (its background colour and "
                     "captions); this run's dataset is not it")
  return clips


def finite_mean(values: Sequence[float]) -> float | None:
  """The mean of the values that are not NaN; None if none is (JSON has no NaN)."""
  finite = [v for v in values if not math.isnan(v)]
  return float(np.mean(finite)) if finite else None


def format_cell(value: float | None) -> str:
  """A table cell: four significant digits, empty for None (JSON's stand-in for NaN)."""
  return "" if value is None else f"{value:.4g}"


def report(results: dict[str, Any], workdir: str, name: str, table: str) -> None:
  """Writes `results` to `<workdir>/eval/<name>-<step>.json` with `table` beside it (.md; an
  existing file is kept, `suite.write_results`) and prints the table."""
  paths = suite.write_results(results, os.path.join(workdir, "eval",
                                                    f"{name}-{results['step']}.json"), table)
  print(table)
  print(f"({results['seconds']:.0f} s); wrote {' '.join(paths)}")
