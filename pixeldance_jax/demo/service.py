"""The demo's model side: one restored pipeline, some held-out clips, and a queue of one.

`Demo.generate(payload)` checks a request (the JSON the page posts, see `parse_request`),
queues it behind the requests already waiting, samples it on the single worker thread, and
writes its files to OUTPUT_DIR/<name>/ (16 random hex digits; the newest `max_outputs` kept). Requests never run in parallel: one device, one
program at a time, and the compiled program is reused across requests (tau, guidance, steps,
seed, eta and the number of clips are traced inputs; only another sampler compiles again).
"""

import base64
import binascii
import concurrent.futures
import dataclasses
import io
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging
from PIL import Image, ImageOps, UnidentifiedImageError

from pixeldance_jax.io import video_files
from pixeldance_jax.data import conditioning as conditioning_lib
from pixeldance_jax.diffusion import samplers
from pixeldance_jax.sampling import outputs, program
from pixeldance_jax.sampling import requests as requests_lib
from pixeldance_jax.sampling import settings as settings_lib
from pixeldance_jax.sampling.pipeline import Pipeline

# What a generate request may hold besides the sampling settings (settings.SETTINGS).
INPUTS = ("prompt", "first_frame", "last_frame", "last_frame_edges", "keyframes")
# How a frame is given: a held-out clip's (its index), an uploaded image, or a drawn sketch
# (last frame and keyframes only; images are PNG / JPEG data URLs or plain base64).
FRAME_KINDS = {"first_frame": ("heldout", "image"), "last_frame": ("heldout", "image", "sketch"),
               "keyframe": ("heldout", "image", "sketch")}
MAX_KEYFRAMES = 64
MAX_IMAGE_BYTES = 16 << 20
# Uploads: pixels read from the header before anything is decoded; what is kept is at most
# this side (the model reads far fewer).
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_STORED_SIDE = 1024
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
MAX_PROMPT_CHARS = 2000
_DATA_URL = re.compile(r"^data:image/[\w.+-]+;base64,")
OUTPUT_NAME = re.compile(r"^[0-9a-f]{16}$")  # Unguessable: one request cannot list another's.


class Busy(RuntimeError):
  """Too many requests are already waiting."""


class TooLarge(ValueError):
  """An upload past the server's limits (answered 413)."""


class GenerationFailed(RuntimeError):
  """Sampling or writing a checked request failed: the server's fault (answered 500)."""


@dataclasses.dataclass(frozen=True)
class FrameInput:
  kind: str  # One of FRAME_KINDS.
  heldout: int = 0  # kind "heldout": the clip's index.
  image: bytes = b""  # kinds "image" and "sketch": the encoded image.


@dataclasses.dataclass(frozen=True)
class DemoRequest:
  """A checked request: its inputs and the settings it gave (the rest come from the config)."""
  prompt: str | tuple[str, ...]
  first_frame: FrameInput
  last_frame: FrameInput | None
  last_frame_edges: bool
  settings: dict[str, Any]
  keyframes: dict[int, FrameInput] = dataclasses.field(default_factory=dict)


def _frame_input(name: str, value: Any, num_heldout: int, kind_of: str = "") -> FrameInput | None:
  if value is None and name == "last_frame":
    return None
  kinds = FRAME_KINDS[kind_of or name]
  if not isinstance(value, dict) or len(value) != 1 or next(iter(value)) not in kinds:
    raise ValueError(f"{name} must be an object with one key of {list(kinds)}"
                     f"{' (or null)' if name == 'last_frame' else ''}; got {value!r:.80}")
  (kind, item), = value.items()
  if kind == "heldout":
    if isinstance(item, bool) or not isinstance(item, int) or not 0 <= item < num_heldout:
      raise ValueError(f"{name}: held-out clip {item!r} does not exist"
                       + (f" (0 to {num_heldout - 1})" if num_heldout else
                          "; this demo has no held-out clips: upload an image"))
    return FrameInput(kind, heldout=item)
  return FrameInput(kind, image=decode_image_data(item, name))


def _keyframes(value: Any, num_heldout: int) -> dict[int, FrameInput]:
  """{"3": {"heldout": i} | {"image": ...} | {"sketch": ...}, ...} -> {3: FrameInput}; which
  positions a clip has is checked with the model's config (requests.check_keyframe_positions)."""
  if value is None:
    return {}
  if not isinstance(value, dict) or len(value) > MAX_KEYFRAMES:
    raise ValueError(f"keyframes must be an object of at most {MAX_KEYFRAMES} frame indices, "
                     f'each with a frame ({{"3": {{"heldout": 0}}}}); got {value!r:.80}')
  parsed = {}
  for index, frame in value.items():
    if not str(index).isdigit():
      raise ValueError(f"keyframe index {index!r:.20} is not a frame number")
    parsed[int(index)] = _frame_input(f"keyframe {index}", frame, num_heldout, "keyframe")
  return dict(sorted(parsed.items()))


def decode_image_data(data: Any, name: str) -> bytes:
  """An image sent as a data URL (`data:image/png;base64,...`) or plain base64, as PNG bytes."""
  if not isinstance(data, str) or not data:
    raise ValueError(f"{name}: expected an image as a base64 data URL")
  try:
    encoded = base64.b64decode(_DATA_URL.sub("", data, count=1), validate=True)
  except (binascii.Error, ValueError) as error:
    raise ValueError(f"{name}: the image is not valid base64 ({error})") from error
  if len(encoded) > MAX_IMAGE_BYTES:
    raise TooLarge(f"{name}: the image is {len(encoded) >> 20} MiB, more than "
                   f"{MAX_IMAGE_BYTES >> 20} MiB")
  try:
    with Image.open(io.BytesIO(encoded), formats=IMAGE_FORMATS) as image:
      width, height = image.size  # From the header: nothing is decoded yet.
      if width * height > MAX_IMAGE_PIXELS:
        raise TooLarge(f"{name}: the image is {width}x{height}, more than "
                       f"{MAX_IMAGE_PIXELS} pixels")
      # Re-encoded as PNG: what is kept (and served) is pixels, not the upload's metadata.
      image = ImageOps.exif_transpose(image)
      image.thumbnail((MAX_STORED_SIDE, MAX_STORED_SIDE), Image.Resampling.BICUBIC)
      png = io.BytesIO()
      image.save(png, format="PNG")
  except Image.DecompressionBombError as error:
    raise TooLarge(f"{name}: the image is too large ({error})") from error
  except TooLarge:
    raise
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
    raise ValueError(f"{name}: the upload is not an image this server reads (PNG, JPEG or "
                     "WebP)") from error
  return png.getvalue()


def _prompt(value: Any, num_clips: int | None) -> str | tuple[str, ...]:
  """One prompt for every clip, or (several lines and several clips) one line per clip."""
  if not isinstance(value, str):
    raise ValueError(f"prompt must be a string; got {value!r:.80}")
  if len(value) > MAX_PROMPT_CHARS:
    raise ValueError(f"the prompt is {len(value)} characters, more than {MAX_PROMPT_CHARS}")
  lines = [line.strip() for line in value.strip().splitlines() if line.strip()]
  if len(lines) > 1 and (num_clips or 1) > 1:
    if len(lines) != num_clips:
      raise ValueError(f"{len(lines)} prompt lines for num_clips={num_clips}: give one line "
                       "for every clip, or one prompt for all")
    return tuple(lines)
  return " ".join(lines)


def parse_request(payload: Any, num_heldout: int,
                  num_train_timesteps: int | None = None) -> DemoRequest:
  """A generate request, checked before it waits in the queue. ValueError names the problem.

  `payload`: {"prompt": str, "first_frame": {"heldout": i} | {"image": data URL},
  "last_frame": null | {"heldout": i} | {"image": data URL} | {"sketch": data URL},
  "last_frame_edges": bool (turn a held-out or uploaded last frame into an edge map),
  "keyframes": {"<frame index>": a frame as the last frame's}, and any of settings.SETTINGS
  (tau, guidance_scale, steps, sampler, seed, num_clips, overlap_frames, ...)}.
  """
  if not isinstance(payload, dict):
    raise ValueError("the request must be a JSON object")
  unknown = sorted(set(payload) - set(INPUTS) - set(settings_lib.SETTINGS))
  if unknown:
    raise ValueError(f"unknown field(s) {unknown}; known: {list(INPUTS + settings_lib.SETTINGS)}")
  settings = {name: settings_lib.convert_setting(name, payload[name])
              for name in settings_lib.SETTINGS if payload.get(name) not in (None, "")}
  settings_lib.check_settings(settings, num_train_timesteps)
  edges = payload.get("last_frame_edges", False)
  if not isinstance(edges, bool):
    raise ValueError(f"last_frame_edges must be true or false; got {edges!r:.40}")
  return DemoRequest(
      prompt=_prompt(payload.get("prompt", ""), settings.get("num_clips")),
      first_frame=_frame_input("first_frame", payload.get("first_frame"), num_heldout),
      last_frame=_frame_input("last_frame", payload.get("last_frame"), num_heldout),
      last_frame_edges=edges, settings=settings,
      keyframes=_keyframes(payload.get("keyframes"), num_heldout))


def _claim_name(output_dir: str) -> str:
  """A new unguessable name in `output_dir`, created empty (two demos sharing the folder never
  take the same one)."""
  while True:
    name = secrets.token_hex(8)
    try:
      os.mkdir(os.path.join(output_dir, name))
      return name
    except FileExistsError:
      continue


def prune_outputs(output_dir: str, keep: int) -> list[str]:
  """Removes the oldest outputs (by modification time) beyond the newest `keep`; returns
  their names."""
  names = [name for name in os.listdir(output_dir) if OUTPUT_NAME.match(name)]
  names.sort(key=lambda name: os.path.getmtime(os.path.join(output_dir, name)), reverse=True)
  removed = names[keep:]
  for name in removed:
    shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
  return removed


class Demo:
  """Samples the demo's requests one at a time on a worker thread, with one restored model."""

  def __init__(self, pipeline: Pipeline, heldout: Sequence[Mapping[str, Any]], output_dir: str,
               *, max_clips: int = 8, max_waiting: int = 8, upscale: int = 4,
               max_outputs: int = 1000):
    """`heldout`: clips with `video` uint8 [F, H, W, 3] and `caption` (may be empty).
    `max_outputs`: the newest outputs kept in `output_dir` (older ones are removed)."""
    self.pipeline = pipeline
    self.heldout = list(heldout)
    self.output_dir = os.path.abspath(output_dir)
    self.max_clips, self.max_waiting, self.upscale = max_clips, max_waiting, upscale
    self.max_outputs = max_outputs
    os.makedirs(self.output_dir, exist_ok=True)
    self._executor = concurrent.futures.ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="demo-sampler")
    self._lock = threading.Lock()
    self._waiting = 0  # Requests queued or running.
    self.generated = 0

  def info(self) -> dict[str, Any]:
    """What the page needs to build its form: the model, the defaults, the held-out clips."""
    config = self.pipeline.config
    conditioning = config.conditioning
    return {
        "checkpoint_step": self.pipeline.step, "weights": self.pipeline.weights,
        "run": os.path.basename(os.path.normpath(self.pipeline.workdir)),
        "image_size": config.data.image_size,
        "frames": config.data.frames, "fps": config.data.fps,
        "use_text": bool(conditioning.use_text),
        "use_first_frame": bool(conditioning.use_first_frame),
        "use_last_frame": bool(conditioning.use_last_frame),
        "keyframes": conditioning_lib.Keyframes.from_config(config).drawn,
        "defaults": settings_lib.default_settings(config),
        "samplers": sorted(samplers.SAMPLERS),
        "timestep_spacings": list(samplers.TIMESTEP_SPACINGS),
        "max_steps": config.diffusion.num_train_timesteps, "max_clips": self.max_clips,
        "heldout": [{"index": index, "caption": str(clip.get("caption", ""))}
                    for index, clip in enumerate(self.heldout)],
        "waiting": self._waiting, "generated": self.generated,
        "compiles": sum(program.trace_counts.values()),
    }

  def heldout_frame(self, index: int, which: str | int) -> np.ndarray:
    """uint8 [H, W, 3]: the first, last or `which`-th frame of held-out clip `index`."""
    if not 0 <= index < len(self.heldout):
      raise KeyError(f"no held-out clip {index}")
    video = self.heldout[index]["video"]
    position = {"first": 0, "last": len(video) - 1}.get(which, which)
    if not isinstance(position, int) or not 0 <= position < len(video):
      raise KeyError(f"no frame {which!r} in held-out clip {index}")
    return video[position]

  def generate(self, payload: Any) -> dict[str, Any]:
    """Checks `payload` (see `parse_request`), waits for its turn, samples and writes it.

    Returns the output's name, files (relative to the output dir), record, timings and
    whether the program was compiled for it. Raises Busy when `max_waiting` requests are
    already waiting (before reading the request), ValueError for bad input (TooLarge past the
    upload limits), GenerationFailed when sampling the checked request fails.
    """
    with self._lock:
      if self._waiting >= self.max_waiting:
        raise Busy(f"{self._waiting} requests are already waiting; try again later")
      self._waiting += 1
    try:
      request = parse_request(payload, len(self.heldout),
                              self.pipeline.config.diffusion.num_train_timesteps)
      num_clips = request.settings.get("num_clips", 1)
      if num_clips > self.max_clips:
        raise ValueError(f"num_clips={num_clips} is more than this demo's --max_clips="
                         f"{self.max_clips}")
      queued = time.perf_counter()
      return self._executor.submit(self._run, request, queued).result()
    finally:
      with self._lock:
        self._waiting -= 1

  def warm_up(self) -> concurrent.futures.Future:
    """Queues a one-step generation with the default sampler, so that the first request
    finds the program compiled. Returns its future (the seconds it took)."""
    return self._executor.submit(self._warm_up)

  def close(self) -> None:
    self._executor.shutdown(wait=True, cancel_futures=True)

  def _warm_up(self) -> float:
    start = time.perf_counter()
    size = self.pipeline.config.data.image_size
    frame = np.zeros((size, size, 3), np.uint8)
    settings = requests_lib.resolve_settings(self.pipeline.config, "", {"steps": 1})
    warm = requests_lib.Request(prompts=("",), first_frame=frame, last_frame=frame,
                                settings=settings, record={})
    list(requests_lib.run_requests(self.pipeline, [warm], batch_size=1, log=False))
    seconds = time.perf_counter() - start
    logging.info("The sampling program is compiled (%.1f s): ready.", seconds)
    return seconds

  def _frame_path(self, frame: FrameInput, which: str | int, folder: str) -> str:
    """The "first" or "last" frame as FOLDER/inputs/WHICH_frame.png, keyframe k as
    FOLDER/inputs/keyframe_k.png."""
    name = f"keyframe_{which}.png" if isinstance(which, int) else f"{which}_frame.png"
    path = os.path.join(folder, "inputs", name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if frame.kind == "heldout":
      video_files.save_image(self.heldout_frame(frame.heldout, which), path)
    else:
      with open(path, "wb") as f:
        f.write(frame.image)
    return path

  def _make_request(self, request: DemoRequest, folder: str) -> requests_lib.Request:
    first = self._frame_path(request.first_frame, "first", folder)
    last = (None if request.last_frame is None else
            self._frame_path(request.last_frame, "last", folder))
    edges = request.last_frame_edges and request.last_frame is not None and (
        request.last_frame.kind != "sketch")
    keyframes = {index: self._frame_path(frame, index, folder)
                 for index, frame in request.keyframes.items()}
    made = requests_lib.make_request(self.pipeline, prompt=request.prompt, first_frame=first,
                                     last_frame=last, last_frame_edges=edges,
                                     keyframes=keyframes, **request.settings)
    record = made.record
    describe = lambda frame, path: (f"held-out clip {frame.heldout}" if frame.kind == "heldout"
                                    else f"{'drawn sketch' if frame.kind == 'sketch' else 'upload'}"
                                    f": {path}")
    for name, frame in (("first_frame", request.first_frame), ("last_frame", request.last_frame)):
      if frame is not None:
        record[name] = describe(frame, f"inputs/{name}.png")
    if request.keyframes:
      record["keyframes"] = {str(index): describe(frame, f"inputs/keyframe_{index}.png")
                             for index, frame in request.keyframes.items()}
    if request.last_frame is not None and request.last_frame.kind == "sketch":
      record["mode"] = record["mode"].replace("magic", "sketch")
    return made

  def _run(self, request: DemoRequest, queued: float) -> dict[str, Any]:
    """On the worker thread: sample `request` into a hidden folder, then rename it NNNN."""
    start = time.perf_counter()
    compiles = sum(program.trace_counts.values())
    folder, name = tempfile.mkdtemp(prefix=".request-", dir=self.output_dir), None
    try:
      os.chmod(folder, 0o755)  # mkdtemp's 0o700 would outlive the rename.
      made = self._make_request(request, folder)  # A ValueError here is the request's.
      try:
        (_, result), = requests_lib.run_requests(self.pipeline, [made], batch_size=1,
                                                 log=False)
        name = _claim_name(self.output_dir)
        record = {**made.record, "checkpoint_step": self.pipeline.step,
                  "weights": self.pipeline.weights,
                  "run": os.path.basename(os.path.normpath(self.pipeline.workdir)), "name": name}
        written = outputs.write_folder(result.video[0], folder, self.pipeline.config.data.fps,
                                       self.upscale, record)
        os.rename(folder, os.path.join(self.output_dir, name))  # Replaces the empty claim.
      except Exception as error:  # pylint: disable=broad-except
        raise GenerationFailed(f"generating the request failed: {type(error).__name__}: "
                               f"{error}") from error
    except BaseException:
      shutil.rmtree(folder, ignore_errors=True)
      if name is not None and os.path.isdir(os.path.join(self.output_dir, name)) and not (
          os.listdir(os.path.join(self.output_dir, name))):
        os.rmdir(os.path.join(self.output_dir, name))  # The claim, still empty.
      raise
    prune_outputs(self.output_dir, self.max_outputs)
    self.generated += 1
    seconds = time.perf_counter() - start
    compiled = sum(program.trace_counts.values()) > compiles
    logging.info("%s: %s, %d steps, %s in %.1f s%s", name, record["mode"], record["steps"],
                 record["sampler"], seconds, " (compiled the program)" if compiled else "")
    files = dict(zip(("mp4", "gif", "contact_sheet", "record"),
                     (os.path.relpath(path, folder) for path in written)))
    files["first_frame"] = "inputs/first_frame.png"
    if request.last_frame is not None:
      files["last_frame"] = "inputs/last_frame.png"
    for index in request.keyframes:
      files[f"keyframe_{index}"] = f"inputs/keyframe_{index}.png"
    return {"name": name, "files": files, "record": record, "compiled": compiled,
            "seconds": round(seconds, 3), "queued_seconds": round(start - queued, 3)}
