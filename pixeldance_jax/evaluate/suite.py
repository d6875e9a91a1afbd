"""The evaluation: FVD, FID, CLIPSIM and the conditioning metrics of video sets.

`evaluate_run` samples held-out clips of a run's dataset in several conditioning variants and
compares each with the real held-out clips; `compare_folders` compares two folders of videos.
Both stream: videos go through the feature networks one global batch at a time and only the
running statistics are kept (`frechet.RunningStats`; CLIPSIM and the conditioning metrics as
running sums too), reduced across processes at the end. Statistics of real sets are cached in
`cache_dir`, keyed by the set (dataset config and split, or folder listing) and the network and
preprocessing, so the real side of a comparison is computed once.
"""

import collections
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from typing import Any, Callable, Iterable, Iterator

import jax
import numpy as np
import tqdm
from absl import logging
from jax.experimental import multihost_utils

from pixeldance_jax.io import video_files
from pixeldance_jax.data import media
from pixeldance_jax.evaluate import features, frechet, metrics, videos
from pixeldance_jax.sampling import generate as generate_lib
from pixeldance_jax.sampling import pipeline as sampling_pipeline

METRICS = ("fvd", "fid", "clipsim", "conditioning")


@dataclasses.dataclass(frozen=True)
class Variant:
  """Which conditions a sampled variant gives the model (the held-out clip's caption, its first
  frame, its last frame and its middle frame (`middle_index`) for every sampler step), and
  whether it is a long video of two clips continued with `overlap` frames, the first clip's
  last `redraw` drawn again by the second (measured by the velocity seam alone: the real clips
  are one clip long)."""
  description: str
  text: bool
  first_frame: bool
  last_frame: bool
  middle_keyframe: bool = False
  clips: int = 1
  overlap: int = 1
  redraw: int = 0

  def given_frames(self, frames: int) -> list[int]:
    """The frames of its video (of clips of `frames`) this variant hands the model: the
    first, middle and last frame it gives, and a long video's carried frames."""
    given = ([0] if self.first_frame else []) + (
        [middle_index(frames)] if self.middle_keyframe else [])
    if self.clips > 1:
      overlap, redraw = self.continuation(frames)
      given += list(range(frames - redraw - overlap, frames - redraw))
    elif self.last_frame:
      given.append(frames - 1)
    return given

  def continuation(self, frames: int) -> tuple[int, int]:
    """(overlap_frames, redraw_frames) of a long video of clips of `frames`, as far as a clip
    has room for them (`generate_long`'s bounds)."""
    overlap = min(self.overlap, frames - 2)
    return overlap, min(self.redraw, frames - 2 - overlap)


VARIANTS = {
    "magic": Variant("text + first + last frame (tau = steps)", True, True, True),
    "basic": Variant("text + first frame (tau = 0)", True, True, False),
    "no_text": Variant("first frame, empty prompt (tau = 0)", False, True, False),
    "text_only": Variant("text only: no first or last frame", True, False, False),
    "magic_no_text": Variant("first + last frame, empty prompt (tau = steps)", False, True, True),
    "unconditional": Variant("empty prompt, no first or last frame", False, False, False),
    "keyframe": Variant("text + first + middle + last frame (tau = steps)", True, True, True,
                        middle_keyframe=True),
    "continued": Variant("2 clips, the second from the first's last frame (text + first)",
                         True, True, False, clips=2, overlap=1),
    "continued_overlap": Variant("2 clips, the second from the first's last 3 frames "
                                 "(at most frames - 2; text + first)", True, True, False,
                                 clips=2, overlap=3),
    "continued_redraw": Variant("2 clips, the second from the 3 frames before the first's last "
                                "2, which it draws again (text + first)", True, True, False,
                                clips=2, overlap=3, redraw=2),
}
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "pixeldance_jax",
                                 "eval_stats")
_CONDITIONING_FIELDS = ("last_frame_centroid_px", "first_frame_centroid_px",
                        "direction_cosine") + metrics.FIDELITY_FIELDS + (
                            "keyframe_centroid_px", "middle_centroid_px", "velocity_seam_px",
                            "velocity_change_px")
_SEAM = _CONDITIONING_FIELDS.index("velocity_seam_px")  # A long video's fields start here.


def middle_index(frames: int) -> int:
  """The frame a variant's middle keyframe is given at, and the middle metric measures."""
  return frames // 2


def names(value: str | Iterable[str]) -> list[str]:
  """Metric or variant names from a list, a comma-separated string, or a mix: config overrides
  such as `--config.eval.metrics=fvd,fid` arrive as `("fvd,fid",)`."""
  items = [value] if isinstance(value, str) else list(value)
  return [name.strip() for item in items for name in item.split(",") if name.strip()]


def check_names(metric_names: Iterable[str], variants: Iterable[str] = ()) -> None:
  """Raises ValueError naming unknown metrics or variants."""
  for kind, given, known in (("metrics", metric_names, METRICS), ("variants", variants, VARIANTS)):
    unknown = sorted(set(given) - set(known))
    if unknown:
      raise ValueError(f"unknown {kind} {unknown}; known: {', '.join(known)}")


@dataclasses.dataclass
class Networks:
  """The loaded feature networks. `extractors` maps a metric (fvd, fid, clipsim) to its
  network; `encode_captions` gives unit CLIP text embeddings `[n, D]` for CLIPSIM; `notes` says
  which requested metrics are off and why."""
  extractors: dict[str, features.ShardedExtractor]
  encode_captions: Callable[[list[str]], np.ndarray] | None
  conditioning: bool
  notes: list[str]


def load_networks(metric_names: Iterable[str], mesh: jax.sharding.Mesh, global_batch: int,
                  fid_weights: str | None = None, clip_model: str | None = None) -> Networks:
  """Loads the networks of `metric_names`. FID without `fid_weights` and CLIPSIM without
  `clip_model` are skipped with a note (nothing downloads); a given file that is missing or does
  not match its network is an error."""
  metric_names = names(metric_names)
  check_names(metric_names)
  extractors, notes, encode_captions = {}, [], None
  make = lambda extractor: features.ShardedExtractor(extractor, mesh, global_batch)
  if "fvd" in metric_names:
    extractors["fvd"] = make(features.i3d_extractor())
  if "fid" in metric_names:
    if fid_weights:
      extractors["fid"] = make(features.inception_extractor(fid_weights))
    else:
      notes.append("FID skipped: no Inception weights. Pass --fid_weights=PATH to pytorch-fid's "
                   "pt_inception-2015-12-05-6726825d.pth (nothing is downloaded).")
  if "clipsim" in metric_names:
    if clip_model:
      image_extractor, encode_captions = features.clip_extractors(clip_model)
      extractors["clipsim"] = make(image_extractor)
    else:
      notes.append("CLIPSIM skipped: no CLIP model. Pass --clip_model=FOLDER, a transformers "
                   "CLIPModel folder (config.json + model.safetensors; nothing is downloaded).")
  return Networks(extractors, encode_captions, "conditioning" in metric_names, notes)


def _sum_over_processes(array: np.ndarray) -> np.ndarray:
  if jax.process_count() == 1:
    return array
  return np.asarray(multihost_utils.process_allgather(array)).sum(axis=0)


class SetStatistics:
  """Running statistics of one video set for every metric, and what was skipped."""

  def __init__(self, networks: Networks, metric_names: Iterable[str]):
    self.networks = networks
    # CLIPSIM keeps the per-video cosine (dim 1); FVD and FID the features.
    self.stats = {name: frechet.RunningStats(
        1 if name == "clipsim" else networks.extractors[name].extractor.dim)
                  for name in metric_names}
    self.skipped: collections.Counter = collections.Counter()
    self.videos = 0
    # Conditioning: sums and counts of the per-clip metrics; NaN (no shape found) counts as
    # failed. [sum, count] per field, then failed and total.
    self.conditioning = np.zeros(2 * len(_CONDITIONING_FIELDS) + 2, np.float64)

  @property
  def count(self) -> int:
    """Videos measured (statistics from the cache count theirs)."""
    return self.videos or (self.stats["fvd"].count if "fvd" in self.stats else 0)

  def add(self, batch: np.ndarray, captions: list[str | None],
          records: list[dict[str, Any]] | None = None) -> None:
    """A process's share of a global batch: uint8 `[n, T, H, W, 3]` (n may be 0)."""
    self.videos += batch.shape[0]
    for name in self.stats:
      output = self.networks.extractors[name](batch)
      if name == "clipsim":
        image = output / np.linalg.norm(output, axis=-1, keepdims=True)
        text = (self.networks.encode_captions(captions) if captions
                else np.zeros((0, image.shape[-1]), np.float32))
        output = np.einsum("bfd,bd->b", image, text)[:, None, None] / image.shape[1]
      self.stats[name].update(output.reshape(-1, output.shape[-1]))
    if records is not None:
      self._add_conditioning(batch, records)

  def _add_conditioning(self, batch: np.ndarray, records: list[dict[str, Any]]) -> None:
    for video, record in zip(batch, records):
      values = _conditioning_values(video, record)
      for i, value in enumerate(values):
        if not math.isnan(value):
          self.conditioning[2 * i:2 * i + 2] += (value, 1)
      failed = (math.isnan(values[_SEAM]) if "continued_from" in record
                else math.isnan(values[0]) or math.isnan(values[2]))
      self.conditioning[-2:] += (failed, 1)

  def reduce(self) -> "SetStatistics":
    """Sums everything over the processes (call on every process)."""
    for name in self.stats:
      self.stats[name] = self.stats[name].reduce(_sum_over_processes)
    self.conditioning = _sum_over_processes(self.conditioning)
    self.videos = int(_sum_over_processes(np.array([self.videos], np.float64))[0])
    reasons = list(media.SKIP_REASONS)
    counts = _sum_over_processes(np.array([self.skipped[r] for r in reasons], np.float64))
    self.skipped = collections.Counter({r: int(c) for r, c in zip(reasons, counts) if c})
    return self

  def summary(self) -> dict[str, Any]:
    result: dict[str, Any] = {"videos": self.count, "skipped": dict(self.skipped)}
    if "clipsim" in self.stats and self.stats["clipsim"].count:
      result["clipsim"] = float(self.stats["clipsim"].total[0] / self.stats["clipsim"].count)
    if self.conditioning[-1]:
      for i, field in enumerate(_CONDITIONING_FIELDS):
        total, count = self.conditioning[2 * i:2 * i + 2]
        result[field] = float(total / count) if count else None  # JSON has no NaN.
      result["failed_fraction"] = float(self.conditioning[-2] / self.conditioning[-1])
    return result


def _conditioning_values(video: np.ndarray, record: dict[str, Any]) -> list[float]:
  """`_CONDITIONING_FIELDS` of one generated video against the real clip it was conditioned
  on (NaN: not measured). A long video (`record["continued_from"]`: the frame its second clip
  starts at) has only its velocity seam and the velocity's change elsewhere."""
  nan = float("nan")
  background, real = record["background"], record["video"]
  if "continued_from" in record:
    return [nan] * _SEAM + list(metrics.velocity_seam(video, record["continued_from"],
                                                      background))
  fidelity = metrics.fidelity(video, real, background)
  middle = middle_index(len(real))
  decided = ("centroids" in record and
             metrics.middle_off_line(record["centroids"], middle) > metrics.OFF_LINE_PX)
  return [metrics.centroid_distance(video[-1], real[-1], background),
          metrics.centroid_distance(video[0], real[0], background),
          metrics.motion_direction_agreement(video, record["velocity"], background),
          *(fidelity[field] for field in metrics.FIDELITY_FIELDS),
          metrics.keyframe_distance(video, record.get("keyframes", {}), background),
          metrics.centroid_distance(video[middle], real[middle], background) if decided
          else nan,
          nan, nan]


def _cache_path(cache_dir: str, metric: str, set_description: str,
                extractor_description: str) -> str:
  key = hashlib.sha256(f"{set_description}\n{extractor_description}".encode()).hexdigest()
  return os.path.join(cache_dir, f"{metric}_{key[:24]}.npz")


def _progress(total: int, description: str, show: bool = True) -> tqdm.tqdm:
  return tqdm.tqdm(total=total, desc=description, unit="video", dynamic_ncols=True,
                   file=sys.stderr, disable=not show or jax.process_index() != 0, leave=False)


def measure_loaded_set(video_set: Any, networks: Networks, metric_names: list[str],
                       global_batch: int, description: str,
                       cache_dir: str | None = None, progress: bool = True) -> SetStatistics:
  """Statistics of a set read from storage (`videos.HeldOutClips`, `videos.VideoFolder`: `len`,
  `load(i)`, `clip_shape`, `description`), each process reading its share. With `cache_dir`, FVD and FID statistics are cached there."""
  statistics = SetStatistics(networks, metric_names)
  cached = {}
  for name in metric_names:
    if cache_dir and name in ("fvd", "fid"):
      path = _cache_path(cache_dir, name, video_set.description,
                         networks.extractors[name].extractor.description)
      if os.path.isfile(path):
        cached[name] = frechet.RunningStats.load(path)
  todo = [name for name in metric_names if name not in cached]
  if todo:
    statistics.stats = {name: statistics.stats[name] for name in todo}
    with _progress(len(video_set), description, progress) as bar:
      for indices in videos.shares(len(video_set), global_batch, jax.process_index(),
                                   jax.process_count()):
        loaded, captions = [], []
        for index in indices:
          try:
            video, caption = video_set.load(index)
          except media.SkippedInput as error:
            statistics.skipped[error.reason] += 1
            logging.info("skipped: %s", error)
            continue
          loaded.append(video)
          captions.append(caption)
        # An empty share keeps the set's clip shape: the compiled programs are reused.
        batch = (np.stack(loaded) if loaded
                 else np.zeros((0,) + video_set.clip_shape, np.uint8))
        statistics.add(batch, captions)
        bar.update(global_batch)
    statistics.reduce()
    if cache_dir and jax.process_index() == 0:
      os.makedirs(cache_dir, exist_ok=True)
      for name in todo:
        if name in ("fvd", "fid"):
          statistics.stats[name].save(_cache_path(
              cache_dir, name, video_set.description,
              networks.extractors[name].extractor.description))
  statistics.stats.update(cached)
  if cached:
    logging.info("%s: %s statistics from the cache in %s", description, ", ".join(cached),
                 cache_dir)
  return statistics


def _generated_batches(pipeline: sampling_pipeline.Pipeline, clips: videos.HeldOutClips,
                       variant: str, global_batch: int, steps: int,
                       seed: int) -> Iterator[tuple[np.ndarray, list[str], list[dict]]]:
  """Samples `variant` for every held-out clip, a global batch at a time (every process runs
  the whole batch), and yields this process's share: (videos, captions, records)."""
  count = len(clips)
  local = global_batch // jax.process_count()
  for start in range(0, count, global_batch):
    records = [clips.record(i) for i in range(start, min(start + global_batch, count))]
    valid = len(records)
    records += [records[-1]] * (global_batch - valid)  # One batch shape: one compile.
    spec = VARIANTS[variant]
    prompts = [r["caption"] if spec.text else "" for r in records]
    first = np.stack([r["video"][0] for r in records]) if spec.first_frame else None
    last = np.stack([r["video"][-1] for r in records]) if spec.last_frame else None
    keyframes = None
    if spec.middle_keyframe:
      middle = middle_index(len(records[0]["video"]))
      keyframes = [{middle: r["video"][middle]} for r in records]
      records = [dict(r, keyframes=k) for r, k in zip(records, keyframes)]
    tau = steps if spec.last_frame or spec.middle_keyframe else 0
    if spec.clips == 1:
      generated = generate_lib.generate(pipeline, prompts, first, last, keyframes=keyframes,
                                        tau=tau, steps=steps, seed=seed + start)
    else:
      frames = len(records[0]["video"])
      overlap, redraw = spec.continuation(frames)
      generated = generate_lib.generate_long(
          pipeline, [[p] * spec.clips for p in prompts], first, last, keyframes=keyframes,
          tau=tau, overlap_frames=overlap, redraw_frames=redraw, steps=steps,
          seed=seed + start).video
      records = [dict(r, continued_from=frames - redraw) for r in records]
    generated = generated[:valid]
    mine = slice(jax.process_index() * local, (jax.process_index() + 1) * local)
    yield generated[mine], [r["caption"] for r in records[:valid]][mine], records[:valid][mine]


def evaluate_pipeline(pipeline: sampling_pipeline.Pipeline, data_dir: str, *,
                      metric_names: Iterable[str] = ("fvd",), num_videos: int = 256,
                      variants: Iterable[str] = ("magic", "basic", "text_only"),
                      global_batch: int = 16, steps: int | None = None, seed: int = 0,
                      floor: bool = True, networks: Networks | None = None,
                      fid_weights: str | None = None, clip_model: str | None = None,
                      cache_dir: str | None = DEFAULT_CACHE_DIR, progress: bool = True,
                      examples: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
  """Samples `num_videos` held-out clips per variant and compares them with the real ones.

  Returns a JSON-ready dict: per variant the metrics, the real set's own CLIPSIM, the floor
  (FVD/FID between the real clips and the next `num_videos` held-out clips, when the test split
  has them), settings and notes. `examples`, when given, receives each variant's video of
  held-out clip 0 (on process 0).
  """
  started = time.time()
  config = pipeline.config
  metric_names, variants = names(metric_names), names(variants)
  check_names(metric_names, variants)
  if networks is None:
    networks = load_networks(metric_names, pipeline.mesh, global_batch, fid_weights, clip_model)
  notes = list(networks.notes)
  feature_metrics = [m for m in metric_names if m in networks.extractors]
  real = videos.HeldOutClips(config, data_dir, 0, num_videos)
  conditioning = networks.conditioning and "background" in real.record(0)
  if networks.conditioning and not conditioning:
    notes.append("conditioning metrics skipped: they need the moving-shapes dataset.")
  steps = steps or config.sample.num_steps
  results: dict[str, Any] = {"step": pipeline.step, "weights": pipeline.weights,
                             "dataset": config.data.name, "num_videos": num_videos,
                             "steps": steps, "seed": seed, "global_batch": global_batch,
                             "variants": {}, "notes": notes}
  real_stats = measure_loaded_set(real, networks, feature_metrics, global_batch,
                                  "real held-out clips", cache_dir, progress)
  results["real"] = real_stats.summary()
  if floor and feature_metrics:
    try:
      other = videos.HeldOutClips(config, data_dir, num_videos, num_videos)
    except ValueError as error:
      notes.append(f"floor skipped: {error}")
    else:
      floor_stats = measure_loaded_set(other, networks, feature_metrics, global_batch,
                                       "real clips (floor)", cache_dir, progress)
      results["floor"] = _compare(real_stats, floor_stats)
  for variant in variants:
    if VARIANTS[variant].last_frame and not config.conditioning.use_last_frame:
      notes.append(f"{variant} skipped: the model was trained without last frames.")
      continue
    # Long videos are not comparable with one-clip real sets: the velocity seam alone.
    long_video = VARIANTS[variant].clips > 1
    if long_video and not conditioning:
      notes.append(f"{variant} skipped: long videos are measured by the conditioning metrics.")
      continue
    stats = SetStatistics(networks, [] if long_video else feature_metrics)
    with _progress(num_videos, f"sampling {variant}", progress) as bar:
      for batch, captions, records in _generated_batches(
          pipeline, real, variant, global_batch, steps, seed):
        stats.add(batch, captions, records if conditioning else None)
        if examples is not None and variant not in examples and jax.process_index() == 0:
          examples[variant] = batch[0]
        bar.update(global_batch)
    stats.reduce()
    results["variants"][variant] = _compare(real_stats, stats)
    logging.info("%s: %s", variant, results["variants"][variant])
  results["seconds"] = round(time.time() - started, 1)
  return results


def _compare(real: SetStatistics, fake: SetStatistics) -> dict[str, Any]:
  """FVD / FID between the two sets, and the second set's own summary."""
  result = fake.summary()
  for name in ("fvd", "fid"):
    if name in real.stats and name in fake.stats:
      result[name] = frechet.frechet_distance_of(real.stats[name], fake.stats[name])
  return result


def compare_folders(real_folder: str, fake_folder: str, *, metric_names: Iterable[str],
                    frames: int, size: int, mesh: jax.sharding.Mesh, global_batch: int = 16,
                    fid_weights: str | None = None, clip_model: str | None = None,
                    cache_dir: str | None = DEFAULT_CACHE_DIR,
                    networks: Networks | None = None) -> dict[str, Any]:
  """FVD / FID between two folders of videos (first `frames` frames, `size` x `size`; default
  the first real video's shorter side), and each folder's CLIPSIM where every video has a
  caption. Unreadable and too short videos are skipped and counted."""
  started = time.time()
  metric_names = [m for m in names(metric_names) if m != "conditioning"]
  if networks is None:
    networks = load_networks(metric_names, mesh, global_batch, fid_weights, clip_model)
  notes = list(networks.notes)
  feature_metrics = [m for m in metric_names if m in networks.extractors]
  sets = {}
  real_set = videos.VideoFolder(real_folder, frames, size)
  for role, folder, cache in (("real", real_folder, cache_dir), ("fake", fake_folder, None)):
    video_set = real_set if role == "real" else videos.VideoFolder(folder, frames, real_set.size)
    set_metrics = list(feature_metrics)
    if "clipsim" in set_metrics and any(e.caption is None for e in video_set.entries):
      set_metrics.remove("clipsim")
      notes.append(f"CLIPSIM of {role} skipped: not every video in {folder} has a caption.")
    sets[role] = measure_loaded_set(video_set, networks, set_metrics, global_batch,
                                    f"{role} videos", cache)
  results = {"real_folder": os.path.abspath(real_folder),
             "fake_folder": os.path.abspath(fake_folder), "frames": frames, "size": size,
             "real": sets["real"].summary(), "fake": _compare(sets["real"], sets["fake"]),
             "notes": notes, "seconds": round(time.time() - started, 1)}
  return results


def _write_new(path: str, text: str) -> str:
  """Writes `text` to `path`, or beside it (`name-2.ext`, ...) when it exists: earlier results
  are never overwritten. Returns the path written."""
  stem, extension = os.path.splitext(path)
  candidate, index = path, 1
  while os.path.exists(candidate):
    index += 1
    candidate = f"{stem}-{index}{extension}"
  with video_files.atomic_path(candidate) as partial, open(partial, "w") as f:
    f.write(text)
  return candidate


def write_results(results: dict[str, Any], json_path: str,
                  markdown: str | None = None) -> list[str]:
  """The results as JSON at `json_path` and their table as markdown beside it (.md; default
  `markdown_table(results)`). Existing files are kept: see `_write_new`."""
  written = _write_new(json_path, json.dumps(results, indent=2) + "\n")
  table = markdown_table(results) if markdown is None else markdown
  return [written, _write_new(os.path.splitext(written)[0] + ".md", table + "\n")]


def scalars(results: dict[str, Any]) -> dict[str, float]:
  """TensorBoard scalars of `evaluate_pipeline`'s results: `eval/<variant>/<metric>`."""
  rows = dict(results["variants"], **({"floor": results["floor"]} if "floor" in results else {}))
  return {f"eval/{name}/{key}": value for name, values in rows.items()
          for key, value in values.items() if isinstance(value, float) and not math.isnan(value)}


def markdown_table(results: dict[str, Any]) -> str:
  """The rows of an `evaluate_pipeline` / `compare_folders` result as a markdown table."""
  rows = []
  if "variants" in results:
    rows += [(VARIANTS[name].description, values)
             for name, values in results["variants"].items()]
    if "floor" in results:
      rows.append(("real vs disjoint real clips (the floor)", results["floor"]))
    if results["real"].get("videos"):  # Only where the real clips went through a network.
      rows.append(("real held-out clips", results["real"]))
  else:
    rows += [("fake folder vs real folder", results["fake"]), ("real folder", results["real"])]
  columns = [c for c in ("fvd", "fid", "clipsim") + _CONDITIONING_FIELDS
             if any(c in values for _, values in rows)]
  lines = ["| set | videos | " + " | ".join(columns) + " |",
           "|---|---:|" + "---:|" * len(columns)]
  for name, values in rows:
    cells = [_format(values.get(c)) for c in columns]
    lines.append(f"| {name} | {values.get('videos', '')} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _format(value: Any) -> str:
  if value is None:
    return ""
  if isinstance(value, float):
    return "nan" if math.isnan(value) else f"{value:.4g}" if abs(value) < 10 else f"{value:.1f}"
  return str(value)
