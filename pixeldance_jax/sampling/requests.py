"""Requests: one video each, from arguments (the CLI's flags) or a line of a JSONL prompts file.

A request holds its resolved inputs (prompts, first and last frame) and settings; `run_requests`
samples a list of them in batches of requests that share a program run.
"""

import dataclasses
import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from pixeldance_jax.io import video_files
from pixeldance_jax.data import media
from pixeldance_jax.data import loaders
from pixeldance_jax.sampling import generate as generate_lib
from pixeldance_jax.sampling import settings as settings_lib
from pixeldance_jax.sampling.pipeline import Pipeline

# What a line of a prompts file may hold besides the settings (settings.SETTINGS).
INPUTS = ("prompt", "first_frame", "last_frame", "last_frame_edges", "keyframes",
          "heldout_index", "name")


@dataclasses.dataclass(frozen=True)
class Request:
  """One video to sample and the record of how."""
  prompts: tuple[str, ...]  # One per clip.
  first_frame: np.ndarray  # uint8 [H, W, 3]
  last_frame: np.ndarray | None  # uint8 [H, W, 3], guides the final clip.
  settings: dict[str, Any]  # Every key of settings.SETTINGS, resolved.
  record: dict[str, Any]  # Inputs as given, mode, and the settings: the JSON written beside it.
  name: str = ""
  keyframes: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)  # uint8 [H, W, 3]

  def batch_key(self) -> tuple[Any, ...]:
    """Requests batch together when they share the schedule, the sampler, the clip count and
    how their frames reach the program (so a video does not depend on its batch)."""
    s = self.settings
    return (s["steps"], s["sampler"], s["timestep_spacing"], s["num_clips"],
            s["overlap_frames"], s["redraw_frames"], bool(self.keyframes))


def resolve_settings(config: ml_collections.ConfigDict, prompt: str | Sequence[str] | None,
                     given: Mapping[str, Any]) -> dict[str, Any]:
  """Every setting: the given ones (None: not given), else config.sample's; checked."""
  given = {name: settings_lib.convert_setting(name, value) for name, value in given.items()
           if value is not None}
  if prompt is not None and not isinstance(prompt, str):
    given.setdefault("num_clips", len(prompt))  # One prompt per clip.
  settings = {**settings_lib.default_settings(config), **given}
  settings_lib.check_settings(settings, config.diffusion.num_train_timesteps)
  return settings


def _heldout_clip(config: ml_collections.ConfigDict, workdir: str, index: int) -> dict[str, Any]:
  return loaders.load_test_clips(config, loaders.data_dir(config, workdir),
                                       index + 1)[index]


def _resolve_inputs(pipeline: Pipeline, prompt: str | Sequence[str] | None,
                    first_frame: str | None, last_frame: str | None,
                    keyframes: Mapping[int, str], heldout_index: int, read: Any,
                    record: dict[str, Any]
                    ) -> tuple[str | Sequence[str], np.ndarray, np.ndarray | None,
                               dict[int, np.ndarray]]:
  """(prompt, first frame, last frame or None, keyframes) from `read(path)` or a held-out
  clip."""
  clip = None
  if first_frame is None or last_frame == "heldout" or "heldout" in keyframes.values():
    clip = _heldout_clip(pipeline.config, pipeline.workdir, heldout_index)
    record.update(heldout_index=heldout_index, heldout_caption=clip["caption"])
  if first_frame is None:
    logging.warning("No first frame: using the first frame of held-out clip %d (%r).",
                    heldout_index, clip["caption"])
    first = clip["video"][0]
    if prompt is None:
      prompt = clip["caption"]
      logging.warning("No prompt: using that clip's caption.")
  elif prompt is None:
    raise ValueError(f"a prompt is required with first_frame={first_frame!r}.")
  else:
    first = read(first_frame)
  frames = {index: clip["video"][index] if path == "heldout" else read(path)
            for index, path in keyframes.items()}
  if last_frame == "heldout":
    return prompt, first, clip["video"][-1], frames
  return prompt, first, None if last_frame is None else read(last_frame), frames


def parse_keyframes(keyframes: Any) -> dict[int, str]:
  """{frame index: image path or "heldout"} from a mapping (JSON: {"3": "mid.png"}) or a
  list of "INDEX:IMAGE" strings (the --keyframe flags)."""
  if not keyframes:
    return {}
  if isinstance(keyframes, Mapping):
    items = list(keyframes.items())
  elif isinstance(keyframes, (list, tuple)) and all(isinstance(k, str) for k in keyframes):
    items = [tuple(k.split(":", 1)) if ":" in k else (k, "") for k in keyframes]
  else:
    raise ValueError(f"keyframes={keyframes!r:.80} must map frame indices to images "
                     '({"3": "mid.png"}) or list "INDEX:IMAGE" strings')
  parsed = {}
  for index, image in items:
    try:
      position = int(index)
    except (TypeError, ValueError):
      position = None
    if position is None or str(index).strip() != str(position) or not isinstance(
        image, str) or not image:
      raise ValueError(f"keyframe {index!r}: {image!r:.60} is not INDEX:IMAGE (a frame number "
                       "and an image path, or 'heldout')")
    if position in parsed:
      raise ValueError(f"keyframe {position} is given twice")
    parsed[position] = image
  return dict(sorted(parsed.items()))


def _mode(last_frame: Any, edges: bool, keyframes: Mapping[int, Any], settings: Mapping[str, Any]
          ) -> str:
  mode = "basic" if last_frame is None else ("sketch" if edges else "magic")
  if keyframes:
    mode += f" + keyframes at {', '.join(map(str, keyframes))}"
  if settings["num_clips"] == 1:
    return mode
  overlap, redraw = settings["overlap_frames"], settings["redraw_frames"]
  carried = f", {overlap} frames carried" if overlap > 1 else ""
  carried += f", the last {redraw} redrawn" if redraw else ""
  return f"long video ({settings['num_clips']} clips{carried}, {mode} ending)"


def check_keyframe_positions(config: ml_collections.ConfigDict, keyframes: Mapping[int, Any],
                             settings: Mapping[str, Any]) -> None:
  """Keyframes at middle positions of a clip, past a long video's carried frames; an overlap
  that leaves a clip new frames."""
  frames, overlap = config.data.frames, settings["overlap_frames"]
  if overlap > frames - 2:
    raise ValueError(f"overlap_frames={overlap} must be at most {frames - 2} for this model's "
                     f"{frames}-frame clips")
  redraw = settings["redraw_frames"]
  if overlap + redraw > frames - 2:
    raise ValueError(f"overlap_frames={overlap} + redraw_frames={redraw} must be at most "
                     f"{frames - 2} for this model's {frames}-frame clips")
  low = overlap if settings["num_clips"] > 1 else 1
  for index in keyframes:
    if not low <= index <= frames - 2:
      raise ValueError(f"keyframe {index} is outside {low}..{frames - 2}: frame 0 is the first "
                       f"frame, {frames - 1} the last"
                       + (f", and 0..{overlap - 1} carry the previous clip" if low > 1 else ""))


def make_request(pipeline: Pipeline, *, prompt: str | Sequence[str] | None = None,
                 first_frame: str | None = None, last_frame: str | None = None,
                 last_frame_edges: bool = False, keyframes: Any = None, heldout_index: int = 0,
                 resize: bool = True, name: str = "", base_dir: str = "",
                 **settings: Any) -> Request:
  """A request from image paths (relative ones under `base_dir`) or a held-out clip.

  Without `first_frame` the first frame (and, without a prompt, the caption) of held-out clip
  `heldout_index` is used; `last_frame="heldout"` takes that clip's last frame.
  `last_frame_edges` turns the last frame into an edge map (the sketch mode). `keyframes`:
  {frame index: image} or ["INDEX:IMAGE", ...] (`parse_keyframes`; "heldout" takes that frame
  of the held-out clip). A list of prompts gives one per clip; one prompt serves every clip.
  `settings`: see settings.SETTINGS.
  """
  if name:
    check_name(name)
  settings = resolve_settings(pipeline.config, prompt, settings)
  keyframe_paths = parse_keyframes(keyframes)
  check_keyframe_positions(pipeline.config, keyframe_paths, settings)
  size = pipeline.config.data.image_size
  read = lambda path: media.read_image(
      path if os.path.isabs(path) else os.path.join(base_dir, path), size, resize=resize)
  record = {"prompt": prompt, "first_frame": first_frame, "last_frame": last_frame}
  prompt, first, last, frames = _resolve_inputs(pipeline, prompt, first_frame, last_frame,
                                                keyframe_paths, heldout_index, read, record)
  if last is not None and last_frame_edges:
    last = video_files.edge_map(last)
  prompts = (prompt,) * settings["num_clips"] if isinstance(prompt, str) else tuple(prompt)
  if len(prompts) != settings["num_clips"]:
    raise ValueError(f"{len(prompts)} prompts for num_clips={settings['num_clips']}")
  record.update(prompt=prompt, last_frame_edges=last_frame_edges,
                mode=_mode(last, last_frame_edges, keyframe_paths, settings), **settings)
  if keyframe_paths:
    record["keyframes"] = {str(index): path for index, path in keyframe_paths.items()}
  # The tau that acts: none without a last frame or keyframes; tau >= steps is "every step".
  record["tau"] = (0 if last is None and not frames
                   else min(settings["tau"], settings["steps"]))
  return Request(prompts=prompts, first_frame=first, last_frame=last, settings=settings,
                 record=record, name=name, keyframes=frames)


def check_name(name: Any) -> str:
  """A request's name, the folder its outputs go to under the output directory: one plain
  path component (no separator, not "." or "..")."""
  if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name
      or "\\" in name or "\0" in name):
    raise ValueError(f"name {name!r} must be a plain folder name (no '/', '\\', '.' or "
                     "'..'): the request's outputs go to <output_dir>/<name>")
  return name


def _parse_line(line: str) -> dict[str, Any] | None:
  """A prompts-file line as a dict (None for blank lines and # comments); ValueError if bad."""
  if not line.strip() or line.lstrip().startswith("#"):
    return None
  try:
    item = json.loads(line)
  except json.JSONDecodeError as error:
    raise ValueError(f"not JSON ({error})") from error
  known = INPUTS + settings_lib.SETTINGS
  unknown = set(item) - set(known) if isinstance(item, dict) else None
  if unknown is None or unknown:
    raise ValueError(f"expected an object with keys from {sorted(known)}; "
                     f"unknown: {sorted(unknown or [])}")
  return item


def _prompt_lines(path: str, defaults: Mapping[str, Any]) -> Iterator[tuple[int, dict[str, Any]]]:
  """(line number, the request's arguments) per request line: `defaults` under the line's
  keys, the seed `defaults["seed"] + k` and the name "000k" for request k unless given."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"prompts file not found: {path}")
  count = 0
  with open(path) as f:
    for number, line in enumerate(f, 1):
      try:
        item = _parse_line(line)
      except ValueError as error:
        raise ValueError(f"{path}:{number}: {error}") from error
      if item is not None:
        arguments = {**defaults, "seed": (defaults.get("seed") or 0) + count,
                     "name": f"{count:04d}", **item}
        try:
          check_name(arguments["name"])
        except ValueError as error:
          raise ValueError(f"{path}:{number}: {error}") from error
        yield number, arguments
        count += 1
  if not count:
    raise ValueError(f"{path} holds no requests")


def check_prompts_file(config: ml_collections.ConfigDict, path: str, **defaults: Any
                       ) -> list[str]:
  """Parses every line of a prompts file and checks its settings against `config`, reading no
  image: the errors `read_prompts_file` would raise for them, before weights are loaded.
  Returns the requests' names."""
  names = []
  for number, arguments in _prompt_lines(path, defaults):
    settings = {key: value for key, value in arguments.items() if key not in INPUTS}
    try:
      settings = resolve_settings(config, arguments.get("prompt"), settings)
      check_keyframe_positions(config, parse_keyframes(arguments.get("keyframes")), settings)
    except ValueError as error:
      raise ValueError(f"{path}:{number}: {error}") from error
    names.append(arguments["name"])
  return names


def read_prompts_file(pipeline: Pipeline, path: str, resize: bool = True,
                      **defaults: Any) -> list[Request]:
  """Requests from a JSONL file, one JSON object a line (blank lines and # comments skipped).

  Keys: INPUTS and settings.SETTINGS (see `make_request`); `defaults` (e.g. the CLI flags) fill the
  settings a line leaves out; without a seed, request k (from 0) gets seed `defaults["seed"] +
  k`. Relative image paths are relative to the file; each request is named by its "name" or
  its index ("0000", "0001", ...). Errors name the line.
  """
  base_dir = os.path.dirname(os.path.abspath(path))
  requests = []
  for number, arguments in _prompt_lines(path, defaults):
    try:
      requests.append(make_request(pipeline, resize=resize, base_dir=base_dir, **arguments))
    except (ValueError, FileNotFoundError) as error:
      raise ValueError(f"{path}:{number}: {error}") from error
  return requests


def _batches(requests: Sequence[Request], batch_size: int) -> list[list[Request]]:
  """Groups requests that can share a program run, in file order, then cuts groups to size."""
  groups: dict[tuple, list[Request]] = {}
  for request in requests:
    groups.setdefault(request.batch_key(), []).append(request)
  return [group[start:start + batch_size] for group in groups.values()
          for start in range(0, len(group), batch_size)]


def run_requests(pipeline: Pipeline, requests: Sequence[Request], batch_size: int = 8,
                 log: bool = True) -> Iterator[tuple[Request, generate_lib.LongVideo]]:
  """Samples every request, `batch_size` at a time, yielding (request, one-example LongVideo);
  `log`: a line per batch."""
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1")
  batches = _batches(requests, batch_size)
  for number, batch in enumerate(batches, 1):
    start = time.perf_counter()
    settings = batch[0].settings
    lasts = [r.last_frame for r in batch]
    result = generate_lib.generate_long(
        pipeline, [r.prompts for r in batch], np.stack([r.first_frame for r in batch]),
        None if all(last is None for last in lasts) else lasts,
        tau=[0 if r.last_frame is None and not r.keyframes else r.settings["tau"]
             for r in batch],
        keyframes=[r.keyframes for r in batch], overlap_frames=settings["overlap_frames"],
        redraw_frames=settings["redraw_frames"],
        **{key: [r.settings[key] for r in batch]
           for key in ("seed", "guidance_scale", "guidance_rescale", "eta")},
        steps=settings["steps"], sampler=settings["sampler"],
        timestep_spacing=settings["timestep_spacing"])
    if log:
      logging.info("batch %d/%d (videos: %d, %s, %d steps, clips: %d) sampled in %.1f s", number,
                   len(batches), len(batch), settings["sampler"], settings["steps"],
                   settings["num_clips"], time.perf_counter() - start)
    for index, request in enumerate(batch):
      yield request, dataclasses.replace(
          result, video=result.video[index:index + 1], clips=result.clips[index:index + 1],
          first_frames=result.first_frames[index:index + 1])
