"""The paper's ablation as one command: train each variant, evaluate each alike, one table.

  python -m pixeldance_jax.evaluate.ablation --config=configs/tiny.py --workdir=DIR \\
      [--variants=full,no_text,no_last_frame,t2v] [--steps=N] [--num_videos=N]

(`--variants=full,keyframes --config.data.path_change_prob=0.5`: the paper's training against
ours with keyframes, on data whose middles only a keyframe decides.)

Each variant trains in DIR/<variant> from the same config and seed with only its own overrides
(`VARIANTS`; `--config.<key>=...` changes the base of all of them alike, and all read one
dataset, DIR/data unless the config names one). Each is then sampled on the same held-out clips
with the same seeds in the mode(s) the paper evaluates it in, plus the same inputs with the
empty prompt, and measured with FVD and the moving-shapes conditioning metrics. Writes
DIR/ablation.md (the table, the paper's figures beside the measured ones), DIR/ablation.json
and DIR/ablation.png (one row of frames per variant for the same inputs, and a bar chart per
metric).

Re-running skips what is done: a variant whose checkpoint is at the last step is not trained
again, and one whose evaluation with the same settings is on disk is not evaluated again; a
killed run resumes training from the variant's latest checkpoint.
"""

import copy
import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable, Iterable

import jax
import ml_collections
import numpy as np
from absl import flags, logging
from ml_collections import config_flags

from pixeldance_jax.io import checkpoints, tensorboard_files, video_files
from pixeldance_jax.cli import console
from pixeldance_jax.data import loaders
from pixeldance_jax.evaluate import curve, figures, suite, videos
from pixeldance_jax.sampling import pipeline as sampling_pipeline
from pixeldance_jax.train import trainer


@dataclasses.dataclass(frozen=True)
class AblationVariant:
  """A trained variant: its config overrides, the sampling modes it is evaluated in (keys of
  `suite.VARIANTS`), and the paper's UCF-101 figures (FID, FVD)."""
  description: str
  overrides: dict[str, Any]
  modes: tuple[str, ...]
  paper: tuple[float, float] | tuple[str, str]


VARIANTS = {
    "full": AblationVariant("full PixelDance", {}, ("basic", "magic"), (49.36, 242.82)),
    "no_text": AblationVariant("without text", {"conditioning.use_text": False}, ("magic",),
                               (51.26, 375.79)),
    "no_last_frame": AblationVariant("without last frame",
                                     {"conditioning.use_last_frame": False}, ("basic",),
                                     (49.45, 339.08)),
    "t2v": AblationVariant("text-to-video baseline (no image conditions)",
                           {"conditioning.use_first_frame": False,
                            "conditioning.use_last_frame": False}, ("text_only",),
                           (59.35, 450.58)),
    # Ours: middle keyframes and leading frames in training (docs/design.md, "Keyframes"), as
    # configs/tiny_keyframes.py trains them; compare with "full" on data.path_change_prob data.
    "keyframes": AblationVariant(
        "with keyframes and leading frames in training",
        {"conditioning.keyframe_prob": 0.5, "conditioning.keyframe_max_count": 2,
         "conditioning.leading_frames_prob": 0.25, "conditioning.max_leading_frames": 3,
         "conditioning.keyframe_mask": True},
        ("magic", "keyframe", "continued", "continued_overlap", "continued_redraw"), ("", "")),
}
# The paper's ablation: what runs unless --variants says otherwise.
PAPER_VARIANTS = ("full", "no_text", "no_last_frame", "t2v")
# The same inputs as each mode with the empty prompt: how much of the motion is the text's.
EMPTY_PROMPT = {"basic": "no_text", "magic": "magic_no_text", "text_only": "unconditional",
                "no_text": "no_text", "magic_no_text": "magic_no_text",
                "unconditional": "unconditional", "keyframe": None, "continued": None,
                "continued_overlap": None, "continued_redraw": None}
METRICS = ("fvd", "conditioning")
# Columns of the table and the bar charts: (result key, heading).
COLUMNS = (("fvd", "FVD"), ("first_frame_centroid_px", "first-frame px"),
           ("last_frame_centroid_px", "last-frame px"), ("direction_cosine", "direction cos"),
           ("empty_prompt_cosine", "empty-prompt cos"), ("psnr_db", "PSNR dB"),
           ("shape_iou", "shape IoU"), ("colour_error", "colour error"),
           ("keyframe_centroid_px", "keyframe px"), ("middle_centroid_px", "middle px"),
           ("velocity_seam_px", "seam px/frame"),
           ("velocity_change_px", "elsewhere px/frame"))


def variant_config(base: ml_collections.ConfigDict, name: str, data_dir: str,
                   steps: int | None = None) -> ml_collections.ConfigDict:
  """`base` with variant `name`'s overrides, the shared data directory and, when given, the
  number of training steps."""
  config = copy.deepcopy(base)
  overrides = dict(VARIANTS[name].overrides, **{"data.data_dir": data_dir})
  if steps is not None:
    overrides["num_train_steps"] = steps
  config.update_from_flattened_dict(overrides)
  return config


def _trained_step(workdir: str, config: ml_collections.ConfigDict) -> int | None:
  """The latest checkpoint's step in `workdir`, None without one; raises if that checkpoint
  was trained with another config (beyond its length), so variants never mix."""
  if not os.path.isdir(checkpoints.checkpoint_dir(workdir)):
    return None
  step, saved = checkpoints.find_config(workdir)
  different = [(key, old, new) for key, old, new
               in checkpoints.config_differences(saved.to_dict(), config.to_dict())
               if key != "num_train_steps"]
  if different:
    lines = "\n".join(f"  {key}: there {old!r}, here {new!r}" for key, old, new in different)
    raise ValueError(f"{workdir} holds a run trained with another config:\n{lines}\n"
                     "Use a new --workdir for other settings.")
  return step


def _read_json(path: str) -> dict[str, Any] | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _write_text(path: str, text: str) -> None:
  """Replaces `path` atomically (process 0 writes)."""
  if jax.process_index() == 0:
    with video_files.atomic_path(path) as partial, open(partial, "w") as f:
      f.write(text)


def _write_json(path: str, value: dict[str, Any]) -> None:
  _write_text(path, json.dumps(value, indent=2) + "\n")


class Preempted(RuntimeError):
  """A variant's training stopped before its last step: the ablation stops there too."""


@dataclasses.dataclass(frozen=True)
class Settings:
  """What an evaluation depends on besides the checkpoint."""
  num_videos: int
  global_batch: int
  sampler_steps: int | None
  seed: int

  def file_name(self, step: int) -> str:
    return (f"ablation-step{step}-{self.num_videos}videos-{self.sampler_steps or 'default'}"
            f"steps-seed{self.seed}")


def train_variant(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or resumes, or skips) one variant; returns {"step", "train_minutes"}: the minutes
  of training steps from the rates its runs logged (`curve.training_minutes`), a killed run's
  included, a step trained again after a resume counted once, compiles left out and a stall
  counted at the median rate."""
  step = _trained_step(workdir, config)
  if step != config.num_train_steps:
    trainer.train_and_evaluate(config, workdir)
    step = _trained_step(workdir, config)
    if step != config.num_train_steps:  # Preempted (SIGTERM): the trainer saved and returned.
      raise Preempted(f"{workdir}: training stopped at step {step} of "
                      f"{config.num_train_steps}; rerun the same command to resume.")
  rates = tensorboard_files.scalars(os.path.join(workdir, "tensorboard"), "train/steps_per_sec")
  minutes = curve.training_minutes(rates)[max(rates)] if rates else None
  return {"step": step, "train_minutes": None if minutes is None else round(minutes, 2)}


def evaluate_variant(name: str, workdir: str, step: int, settings: Settings,
                     networks: Callable[[jax.sharding.Mesh], suite.Networks],
                     cache_dir: str | None) -> dict[str, Any]:
  """Samples and measures variant `name` in each of its modes and their empty-prompt twins;
  the result (and each mode's first video) is kept beside its checkpoints and reused.
  `networks(mesh)` gives the feature networks (loaded once, when first needed)."""
  stem = os.path.join(workdir, settings.file_name(step))
  done = _read_json(stem + ".json")
  if done is not None:
    logging.info("%s: evaluated before (%s.json)", name, stem)
    return done
  pipeline = sampling_pipeline.load_pipeline(workdir, step)
  networks = networks(pipeline.mesh)
  data_dir = loaders.data_dir(pipeline.config, workdir)
  common = dict(num_videos=settings.num_videos, global_batch=settings.global_batch,
                steps=settings.sampler_steps, seed=settings.seed, cache_dir=cache_dir)
  examples: dict[str, np.ndarray] = {}
  modes = VARIANTS[name].modes
  measured = suite.evaluate_pipeline(pipeline, data_dir, metric_names=METRICS, variants=modes,
                                     networks=networks, examples=examples, **common)
  # A model trained without text samples every prompt as the empty one: no twins to sample.
  use_text = pipeline.config.conditioning.use_text
  twins = sorted({EMPTY_PROMPT[mode] for mode in modes} - set(modes) - {None}) if use_text else []
  empty = suite.evaluate_pipeline(
      pipeline, data_dir, metric_names=("conditioning",), variants=twins, floor=False,
      networks=dataclasses.replace(networks, extractors={}), **common) if twins else None
  rows = {}
  for mode in modes:
    row = dict(measured["variants"][mode])
    twin = EMPTY_PROMPT[mode] if use_text else mode
    row["empty_prompt_cosine"] = None
    if twin is not None:
      source = measured["variants"] if twin in modes else empty["variants"]
      row["empty_prompt_cosine"] = source[twin].get("direction_cosine")
    rows[mode] = row
  result = {"variant": name, "overrides": VARIANTS[name].overrides, "step": pipeline.step,
            "settings": dataclasses.asdict(settings), "rows": rows,
            "floor": measured.get("floor"), "notes": measured["notes"],
            "seconds": round(measured["seconds"] + (empty["seconds"] if empty else 0), 1)}
  if jax.process_index() == 0:
    with video_files.atomic_path(stem + ".npz") as partial, open(partial, "wb") as f:
      np.savez(f, **examples)
  _write_json(stem + ".json", result)
  return result


def _examples(workdir: str, settings: Settings, step: int) -> dict[str, np.ndarray]:
  with np.load(os.path.join(workdir, settings.file_name(step) + ".npz")) as loaded:
    return dict(loaded)


def _columns(results: dict[str, Any]) -> tuple[tuple[str, str], ...]:
  """COLUMNS that some row measured (the keyframe columns only where a mode gives keyframes)."""
  rows = [row for variant in results["variants"].values() for row in variant["rows"].values()]
  return tuple((key, heading) for key, heading in COLUMNS
               if any(row.get(key) is not None for row in rows))


def table(results: dict[str, Any]) -> str:
  """The ablation as markdown: one row per (variant, mode), the paper's figures beside."""
  columns = _columns(results)
  headings = [heading for _, heading in columns]
  lines = ["| variant | sampled with | paper FID | paper FVD | " + " | ".join(headings) + " |",
           "|---|---|---:|---:|" + "---:|" * len(headings)]
  for name, variant in results["variants"].items():
    for index, (mode, row) in enumerate(variant["rows"].items()):
      paper = VARIANTS[name].paper if index == len(variant["rows"]) - 1 else ("", "")
      cells = [_format(row.get(key)) for key, _ in columns]
      lines.append(f"| {VARIANTS[name].description} | {_sampled_with(name, mode)} | "
                   f"{paper[0]} | {paper[1]} | " + " | ".join(cells) + " |")
  if results.get("floor"):
    lines.append("| real vs disjoint real clips (the floor) | | | | "
                 f"{_format(results['floor'].get('fvd'))} |" + " |" * (len(headings) - 1))
  return "\n".join(lines)


def _sampled_with(name: str, mode: str) -> str:
  """The inputs of variant `name` in `mode`: a variant trained without text samples every
  prompt as the empty one (generate.generate), so its row names the empty-prompt mode."""
  if VARIANTS[name].overrides.get("conditioning.use_text", True) is False:
    mode = EMPTY_PROMPT[mode] or mode
  return suite.VARIANTS[mode].description


def _format(value: Any) -> str:
  if value is None or value == "":
    return ""
  return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3f}"


def figure(results: dict[str, Any], examples: dict[str, dict[str, np.ndarray]],
           real: np.ndarray) -> np.ndarray:
  """One row of frames per (variant, mode) for held-out clip 0, then a bar chart per metric."""
  rows, marked = [("real held-out clip 0", real)], [[]]
  columns = _columns(results)
  bars: dict[str, dict[str, float | None]] = {heading: {} for _, heading in columns}
  for name, variant in results["variants"].items():
    for mode, row in variant["rows"].items():
      label = name if len(variant["rows"]) == 1 else f"{name} ({mode})"
      rows.append((label, examples[name][mode]))
      marked.append(suite.VARIANTS[mode].given_frames(len(real)))
      for key, heading in columns:
        bars[heading][label] = row.get(key)
  settings = results["settings"]
  title = (f"held-out clip 0 in each variant's mode (seed {settings['seed']}; outlined: the "
           f"frames given); metrics over {settings['num_videos']} held-out clips")
  return figures.stack([figures.frame_rows(rows, upscale=3, title=title, marked=marked),
                        figures.bar_charts(bars)])


def run(base: ml_collections.ConfigDict, workdir: str, *,
        variants: Iterable[str] = PAPER_VARIANTS, steps: int | None = None,
        num_videos: int | None = None, global_batch: int | None = None,
        sampler_steps: int | None = None,
        seed: int = 0, cache_dir: str | None = suite.DEFAULT_CACHE_DIR,
        networks: suite.Networks | None = None) -> dict[str, Any]:
  """Trains and evaluates each variant (skipping what is done) and writes the ablation's table,
  JSON and figure into `workdir`. Returns the JSON's content. `num_videos` and `global_batch`
  default to the config's eval.num_videos and eval.batch_size."""
  variants = suite.names(variants)
  unknown = sorted(set(variants) - set(VARIANTS))
  if unknown:
    raise ValueError(f"unknown ablation variants {unknown}; known: {', '.join(VARIANTS)}")
  workdir = os.path.abspath(workdir)
  data_dir = base.data.data_dir or os.path.join(workdir, "data")
  configs = {name: variant_config(base, name, data_dir, steps) for name in variants}
  for name, config in configs.items():  # Every mismatch before hours of training.
    _trained_step(os.path.join(workdir, name), config)
  num_videos = num_videos or base.eval.num_videos
  global_batch = global_batch or base.eval.batch_size
  settings = Settings(num_videos, global_batch, sampler_steps, seed)
  started = time.time()
  trained = {}
  for index, (name, config) in enumerate(configs.items()):
    logging.info("ablation %d/%d: %s (%s)", index + 1, len(configs), name,
                 VARIANTS[name].description)
    trained[name] = train_variant(config, os.path.join(workdir, name))
  loaded = [networks] if networks is not None else []

  def load_networks(mesh: jax.sharding.Mesh) -> suite.Networks:
    if not loaded:
      loaded.append(suite.load_networks(METRICS, mesh, global_batch))
    return loaded[0]

  evaluated, examples = {}, {}
  for name in variants:
    logging.info("evaluating %s", name)
    variant_dir = os.path.join(workdir, name)
    result = evaluate_variant(name, variant_dir, trained[name]["step"], settings,
                              load_networks, cache_dir)
    evaluated[name] = dict(result, train_minutes=trained[name]["train_minutes"])
    examples[name] = _examples(variant_dir, settings, evaluated[name]["step"])
  floor = next((r["floor"] for r in evaluated.values() if r.get("floor")), None)
  results = {"config": base.to_dict(), "data_dir": data_dir, "settings": dataclasses.asdict(
      settings), "variants": evaluated, "floor": floor,
      "minutes_this_run": round((time.time() - started) / 60, 1)}
  real = videos.HeldOutClips(next(iter(configs.values())), data_dir, 0, 1).record(0)
  if jax.process_index() == 0:
    _write_json(os.path.join(workdir, "ablation.json"), results)
    _write_text(os.path.join(workdir, "ablation.md"), table(results) + "\n")
    video_files.save_image(figure(results, examples, real["video"]),
                        os.path.join(workdir, "ablation.png"))
  return results


def _define_flags() -> dict[str, Any]:
  """The command line's flags (defined only when run as a program, so that importing this
  module beside other entry points defines nothing)."""
  return {
      "config": config_flags.DEFINE_config_file(
          "config", None, "Base config (get_config()); --config.<key>=... changes every "
          "variant alike.", lock_config=True),
      "workdir": flags.DEFINE_string("workdir", None, "One subdirectory per variant, and the "
                                     "table, JSON and figure."),
      "variants": flags.DEFINE_list("variants", list(PAPER_VARIANTS),
                                    f"Of {', '.join(VARIANTS)}."),
      "steps": flags.DEFINE_integer("steps", None, "Training steps per variant. Default: "
                                    "config.num_train_steps."),
      "num_videos": flags.DEFINE_integer("num_videos", None, "Held-out clips sampled per "
                                         "mode. Default: config.eval.num_videos."),
      "global_batch": flags.DEFINE_integer("batch_size", None, "Videos per global batch when "
                                           "evaluating. Default: config.eval.batch_size."),
      "sampler_steps": flags.DEFINE_integer("sampler_steps", None, "Default: "
                                            "config.sample.num_steps."),
      "seed": flags.DEFINE_integer("seed", 0, "Sampling seed: held-out clip i gets seed + i."),
      "cache_dir": flags.DEFINE_string("cache_dir", suite.DEFAULT_CACHE_DIR, "Cached real-data "
                                       "feature statistics ('' to recompute)."),
  }


def main(argv: list[str], holders: dict[str, Any]) -> None:
  values = console.flag_values(argv, holders, required=("config", "workdir"))
  base, workdir = values.pop("config"), values.pop("workdir")
  values["cache_dir"] = values["cache_dir"] or None
  try:
    results = run(base, workdir, **values)
  except (FileNotFoundError, ValueError) as error:
    sys.exit(f"pixeldance_jax.evaluate.ablation: error: {error}")
  except Preempted as error:
    sys.exit(f"pixeldance_jax.evaluate.ablation: preempted: {error}")
  print(table(results))
  print(f"({results['minutes_this_run']:.1f} min); wrote "
        + " ".join(os.path.join(workdir, f"ablation.{e}") for e in ("md", "json", "png")))


if __name__ == "__main__":
  _holders = _define_flags()
  console.run(lambda argv: main(argv, _holders), reuse_freed_memory=True)
