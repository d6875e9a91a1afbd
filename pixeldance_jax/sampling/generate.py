"""Sampling clips from a `Pipeline`: one per example (`generate`), or long videos of chained
clips (`generate_long`). Host side only: tokenising, per-example settings, padding the batch
to the data-parallel devices; the program itself is `program.make_generate_fn`'s."""

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from pixeldance_jax.data import conditioning, tokenizer
from pixeldance_jax.diffusion import samplers, schedules
from pixeldance_jax.parallel import mesh as mesh_lib
from pixeldance_jax.sampling import settings as settings_lib
from pixeldance_jax.sampling.pipeline import Pipeline


def _tokenize(config: ml_collections.ConfigDict, prompts: Sequence[str]) -> np.ndarray:
  """Token ids `[b, length]`; a prompt longer than the text encoder reads is named and cut."""
  text = config.text_encoder
  for prompt in prompts:
    ids, truncated = tokenizer.encode(prompt, text.max_length)
    if truncated:
      logging.warning("Prompt %r is %d tokens, more than the text encoder's %d: it is truncated.",
                      prompt, len(tokenizer.bpe_ids(prompt)) + 2, text.max_length)
  return tokenizer.tokenize(prompts, text.max_length, text.pad_token_id)


def _per_item(value: Any, batch: int, dtype) -> np.ndarray:
  """A scalar or a length-`batch` sequence as an array `[batch]`."""
  try:
    values = np.asarray(value, dtype)
  except OverflowError as error:  # A seed past int32 (seed + index of a batch, say).
    raise ValueError(f"{value!r:.60} does not fit {np.dtype(dtype).name}") from error
  if values.ndim == 0:
    return np.full((batch,), values, dtype)
  if values.shape != (batch,):
    raise ValueError(f"expected one value or {batch} values, got shape {values.shape}")
  return values


def _pad_batch(arrays: dict[str, np.ndarray], multiple: int) -> dict[str, np.ndarray]:
  """Repeats the last example so the batch divides the data-parallel devices."""
  extra = -len(next(iter(arrays.values()))) % multiple
  if not extra:
    return arrays
  return {name: np.concatenate([x, np.repeat(x[-1:], extra, axis=0)])
          for name, x in arrays.items()}


def _check_frame_shapes(config: ml_collections.ConfigDict, batch: int,
                        **frames: np.ndarray | None) -> None:
  size = config.data.image_size
  for name, value in frames.items():
    if value is not None and np.shape(value) != (batch, size, size, 3):
      raise ValueError(f"{name} is {np.shape(value)}; this model needs [{batch} prompts, "
                       f"{size}, {size}, 3] (data.media.read_image resizes images)")


def _check_values(per_example: dict[str, np.ndarray], steps: int,
                  num_train_timesteps: int) -> None:
  """Refuses values the program would turn into a blank or NaN video without a word."""
  settings_lib.check_settings({"steps": steps}, num_train_timesteps)
  for name in ("guidance_scale", "guidance_rescale", "eta"):
    for value in per_example[name].tolist():
      settings_lib.check_settings({name: value})


Keyframes = Mapping[int, np.ndarray]  # {frame index: uint8 [H, W, 3]} of one example.


def _check_keyframes(keyframes: Sequence[Keyframes], batch: int, frames: int, size: int) -> None:
  if len(keyframes) != batch:
    raise ValueError(f"{len(keyframes)} keyframe sets for {batch} prompts; give one per prompt")
  for example in keyframes:
    for index, image in example.items():
      if not 1 <= index <= frames - 2:
        raise ValueError(f"keyframe index {index} is outside the middle frames 1..{frames - 2} "
                         f"of this model's {frames}-frame clips (frame 0 is the first frame, "
                         f"{frames - 1} the last: give those as first and last frame)")
      if np.shape(image) != (size, size, 3):
        raise ValueError(f"keyframe {index} is {np.shape(image)}; this model needs [{size}, "
                         f"{size}, 3] (data.media.read_image resizes images)")


def _keyframe_inputs(config: ml_collections.ConfigDict, first_frames: np.ndarray,
                     last_frames: np.ndarray, use_first_frame: np.ndarray,
                     use_last_frame: np.ndarray, keyframes: Sequence[Keyframes],
                     held_frames: np.ndarray) -> dict[str, np.ndarray]:
  """The program's keyframe inputs: every frame `[b, F, H, W, 3]`, which are given, and which
  are held (seen at every step rather than the first tau)."""
  batch, frames = len(first_frames), config.data.frames
  video = np.zeros((batch, frames) + first_frames.shape[1:], np.uint8)
  given = np.zeros((batch, frames), bool)
  video[:, 0], given[:, 0] = first_frames, use_first_frame > 0
  video[:, -1], given[:, -1] = last_frames, use_last_frame
  for row, example in enumerate(keyframes):
    for index, image in example.items():
      video[row, index], given[row, index] = image, True
  held = np.arange(frames)[None, :] < held_frames[:, None]
  return {"keyframes": video, "given": given, "held": held}


def generate(pipeline: Pipeline, prompts: Sequence[str], first_frames: np.ndarray | None,
             last_frames: np.ndarray | None = None, *, keyframes: Sequence[Keyframes] | None = None,
             held_frames: Any = 1, tau: Any = None, guidance_scale: Any = None,
             guidance_rescale: Any = None, steps: int | None = None, seed: Any = 0,
             eta: Any = None, sampler: str | None = None, timestep_spacing: str | None = None,
             clip_index: int = 0) -> np.ndarray:
  """Samples one clip per prompt (every prompt empty for a model trained without text).

  Args:
    first_frames: uint8 `[b, H, W, 3]`, or None for text only (the first-frame condition
      zeroed, as the text-to-video baseline is trained; also without last frames).
    last_frames: uint8 `[b, H, W, 3]` (or a list with None for the examples without one), or
      None for the basic mode (text + first frame).
    keyframes: per example, {frame index in 1..F-2: uint8 `[H, W, 3]`}: frames given at those
      positions of c_image, as the first and last are (a model trained with keyframes,
      config.conditioning.keyframe_prob, follows them).
    held_frames: one value or one per example: frames 0..held_frames-1 (the first frame and
      the keyframes among them, as a continuation's carried frames) are seen at every step.
    tau: leading sampler steps that see the last frame and the other keyframes (clipped to
      `steps`); one value or one per example. Ignored without them. Default config.sample.tau.
    guidance_scale, guidance_rescale, eta: one value or one per example (default config.sample).
    seed: one per example, or an int s for seeds s, s + 1, ...: example i's video depends on
      its own seed and inputs only, not on the batch it is sampled in.
    steps, sampler, timestep_spacing: shared by the batch (default config.sample).
    clip_index: folded into every seed, so the clips of a long video differ.
  Returns:
    uint8 `[b, frames, H, W, 3]`.
  """
  config, sample_config = pipeline.config, pipeline.config.sample
  batch, frames = len(prompts), config.data.frames
  if not config.conditioning.use_text:
    prompts = [""] * batch  # Trained on the empty prompt only ("without text").
  has_last_frame = np.full(batch, last_frames is not None)
  if isinstance(last_frames, (list, tuple)):
    has_last_frame = np.array([frame is not None for frame in last_frames])
    shapes = [np.shape(frame) for frame in last_frames if frame is not None]
    last_frames = np.stack([np.zeros(shapes[0], np.uint8) if frame is None else frame
                            for frame in last_frames]) if shapes else None
  _check_frame_shapes(config, batch, first_frames=first_frames, last_frames=last_frames)
  keyframes = [dict(example) for example in keyframes] if keyframes else [{}] * batch
  _check_keyframes(keyframes, batch, frames, config.data.image_size)
  held_frames = _per_item(held_frames, batch, np.int32)
  if ((held_frames < 1) | (held_frames > frames - 1)).any():
    raise ValueError(f"held_frames={held_frames.tolist()} must be in 1..{frames - 1}")
  steps = steps or sample_config.num_steps
  tau = _per_item(sample_config.tau if tau is None else tau, batch, np.int32)
  if (tau < 0).any():
    raise ValueError(f"tau={tau.tolist()} must be >= 0 (sampler steps that see the last frame)")
  use_first_frame = np.full(batch, first_frames is not None and
                            config.conditioning.use_first_frame, np.float32)
  if first_frames is None:
    size = config.data.image_size
    first_frames, last_frames = np.zeros((batch, size, size, 3), np.uint8), None
  use_last_frame = has_last_frame & (last_frames is not None) & config.conditioning.use_last_frame
  if last_frames is not None and not config.conditioning.use_last_frame:
    logging.warning("This model was trained without last frames; ignoring them (tau = 0).")
  if last_frames is None or not config.conditioning.use_last_frame:
    last_frames = np.zeros_like(first_frames)
  # tau acts on the frames seen for the first tau steps only: the last and unheld keyframes.
  unheld = [any(index >= held for index in example) for example, held
            in zip(keyframes, held_frames)]
  tau = np.where(use_last_frame | np.asarray(unheld, bool), tau, 0)
  frame_inputs = {"first_frame": np.asarray(first_frames, np.uint8),
                  "last_frame": np.asarray(last_frames, np.uint8),
                  "use_first_frame": use_first_frame}
  if any(keyframes) or (held_frames > 1).any() or conditioning.mask_channels(config):
    frame_inputs = _keyframe_inputs(config, frame_inputs["first_frame"],
                                    frame_inputs["last_frame"], use_first_frame,
                                    use_last_frame, keyframes, held_frames)
  seeds = (seed + np.arange(batch)) if np.ndim(seed) == 0 else seed
  default = lambda value, name: getattr(sample_config, name) if value is None else value
  per_example = {
      "seeds": _per_item(seeds, batch, np.int32),
      **frame_inputs,
      "token_ids": _tokenize(config, prompts),
      "null_token_ids": _tokenize(config, [""] * batch),
      "tau": np.minimum(tau, steps),
      "guidance_scale": _per_item(default(guidance_scale, "guidance_scale"), batch, np.float32),
      "guidance_rescale": _per_item(default(guidance_rescale, "guidance_rescale"), batch,
                                    np.float32),
      "eta": _per_item(default(eta, "eta"), batch, np.float32),
  }
  _check_values(per_example, steps, config.diffusion.num_train_timesteps)
  shared = {"clip_index": np.int32(clip_index), "schedule": samplers.make_schedule(
      schedules.alphas_cumprod(config.diffusion), steps,
      default(timestep_spacing, "timestep_spacing"))}
  padded = _pad_batch(per_example, mesh_lib.batch_devices(pipeline.mesh))
  video = pipeline.generate_fn(pipeline.params, pipeline.frozen, padded, shared,
                               default(sampler, "sampler"))
  return np.asarray(video)[:batch]


@dataclasses.dataclass(frozen=True)
class LongVideo:
  """N clips sampled one after another, each continuing from the end of the previous one."""
  video: np.ndarray  # uint8 [b, k + N * (F - k) - (N - 1) * r, H, W, 3]: clip 1 less its last
  # r (redrawn) frames, then clips 2..N less their first k (overlap) frames, which repeat the
  # previous clip's frames, and, but for the final clip, their last r.
  clips: np.ndarray  # uint8 [b, N, F, H, W, 3]
  first_frames: np.ndarray  # uint8 [b, N, H, W, 3]: the first frame each clip was conditioned on.
  overlap_frames: int = 1
  redraw_frames: int = 0


def generate_long(pipeline: Pipeline, prompts: Sequence[Sequence[str]], first_frames: np.ndarray,
                  last_frames: np.ndarray | None = None, *, tau: Any = None,
                  keyframes: Sequence[Keyframes] | None = None, overlap_frames: int = 1,
                  redraw_frames: int = 0, **settings: Any) -> LongVideo:
  """Long videos by autoregression: clip k + 1 starts from clip k's last generated frames.

  Args:
    prompts: per example, one prompt per clip (all examples have the same number of clips).
    last_frames: uint8 `[b, H, W, 3]` guiding the final clip only (with `tau`), or None.
    keyframes: per example, middle keyframes of the final clip (see `generate`); in a long
      video, at positions the carried frames leave free (>= overlap_frames).
    overlap_frames: how many of a clip's last frames the next clip is conditioned on, at its
      frames 0..overlap_frames-1, seen at every step: 1 (the paper's way) carries where the
      shape is; 2 or more carry how it moves too (a model trained with
      config.conditioning.leading_frames_prob follows them).
    redraw_frames: how many of a clip's last frames the next clip draws again instead of
      keeping them: it is conditioned on the overlap_frames before them. Sampled without a
      last frame, a clip's final frames are its least certain (the farthest from the given
      frames, the last with neighbours on one side only); 0 keeps them (the paper's way).
    **settings: the other keyword arguments of `generate` (seed, guidance_scale, steps, ...).
  """
  num_clips = len(prompts[0])
  if any(len(clip_prompts) != num_clips for clip_prompts in prompts):
    raise ValueError("every video of a batch needs the same number of clips")
  frames = pipeline.config.data.frames
  if not 1 <= overlap_frames <= frames - 2:
    raise ValueError(f"overlap_frames={overlap_frames} must be in 1..{frames - 2} for clips of "
                     f"{frames} frames")
  if not 0 <= redraw_frames <= frames - 2 - overlap_frames:
    raise ValueError(f"redraw_frames={redraw_frames} must be in 0..{frames - 2 - overlap_frames}"
                     f" with overlap_frames={overlap_frames} for clips of {frames} frames")
  keyframes = [dict(example) for example in keyframes] if keyframes else [{}] * len(prompts)
  if num_clips > 1 and any(index < overlap_frames for example in keyframes for index in example):
    raise ValueError(f"a long video's final clip holds the carried frames at 0.."
                     f"{overlap_frames - 1}: its keyframes go at {overlap_frames} or later")
  clips, conditions, first = [], [], np.asarray(first_frames, np.uint8)
  carried = [{}] * len(first)  # Frames 1..overlap-1 of the next clip: the previous clip's.
  for index in range(num_clips):
    final = index == num_clips - 1
    start = time.perf_counter()
    given = [{**carry, **example} for carry, example in zip(carried, keyframes)] if final else (
        carried)
    clip = generate(pipeline, [p[index] for p in prompts], first,
                    last_frames if final else None, tau=tau if final else 0,
                    keyframes=given, held_frames=overlap_frames if index else 1,
                    clip_index=index, **settings)
    if num_clips > 1:
      logging.info("clip %d/%d sampled in %.1f s", index + 1, num_clips,
                   time.perf_counter() - start)
    clips.append(clip)
    conditions.append(first)
    kept = frames - redraw_frames  # The next clip draws frames kept.. again.
    tail = clip[:, kept - overlap_frames:kept]
    first = tail[:, 0]
    carried = [{position: tail[row, position] for position in range(1, overlap_frames)}
               for row in range(len(clip))]
  # A later clip's first overlap_frames frames repeat the previous clip's (held): drop them, and
  # a clip's last redraw_frames, which the next clip draws again.
  parts = [clip[:, (overlap_frames if index else 0):
                (frames if index == num_clips - 1 else frames - redraw_frames)]
           for index, clip in enumerate(clips)]
  return LongVideo(video=np.concatenate(parts, axis=1), clips=np.stack(clips, axis=1),
                   first_frames=np.stack(conditions, axis=1), overlap_frames=overlap_frames,
                   redraw_frames=redraw_frames)
