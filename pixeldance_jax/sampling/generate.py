"""Sampling clips from a `Pipeline`: one per example (`generate`), or long videos of chained
clips (`generate_long`). Host side only: tokenising, per-example settings, padding the batch
to the data-parallel devices; the program itself is `program.make_generate_fn`'s."""

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from pixeldance_jax.data import tokenizer
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


def generate(pipeline: Pipeline, prompts: Sequence[str], first_frames: np.ndarray | None,
             last_frames: np.ndarray | None = None, *, tau: Any = None,
             guidance_scale: Any = None, guidance_rescale: Any = None, steps: int | None = None,
             seed: Any = 0, eta: Any = None, sampler: str | None = None,
             timestep_spacing: str | None = None, clip_index: int = 0) -> np.ndarray:
  """Samples one clip per prompt (every prompt empty for a model trained without text).

  Args:
    first_frames: uint8 `[b, H, W, 3]`, or None for text only (the first-frame condition
      zeroed, as the text-to-video baseline is trained; also without last frames).
    last_frames: uint8 `[b, H, W, 3]`, or None for the basic mode (text + first frame).
    tau: leading sampler steps that see the last frame (clipped to `steps`); one value or one
      per example. Ignored without last frames. Default config.sample.tau.
    guidance_scale, guidance_rescale, eta: one value or one per example (default config.sample).
    seed: one per example, or an int s for seeds s, s + 1, ...: example i's video depends on
      its own seed and inputs only, not on the batch it is sampled in.
    steps, sampler, timestep_spacing: shared by the batch (default config.sample).
    clip_index: folded into every seed, so the clips of a long video differ.
  Returns:
    uint8 `[b, frames, H, W, 3]`.
  """
  config, sample_config = pipeline.config, pipeline.config.sample
  batch = len(prompts)
  if not config.conditioning.use_text:
    prompts = [""] * batch  # Trained on the empty prompt only ("without text").
  _check_frame_shapes(config, batch, first_frames=first_frames, last_frames=last_frames)
  steps = steps or sample_config.num_steps
  tau = _per_item(sample_config.tau if tau is None else tau, batch, np.int32)
  if (tau < 0).any():
    raise ValueError(f"tau={tau.tolist()} must be >= 0 (sampler steps that see the last frame)")
  use_first_frame = np.full(batch, first_frames is not None and
                            config.conditioning.use_first_frame, np.float32)
  if first_frames is None:
    size = config.data.image_size
    first_frames, last_frames = np.zeros((batch, size, size, 3), np.uint8), None
  if last_frames is None or not config.conditioning.use_last_frame:
    if last_frames is not None:
      logging.warning("This model was trained without last frames; ignoring them (tau = 0).")
    last_frames, tau = np.zeros_like(first_frames), np.zeros_like(tau)
  seeds = (seed + np.arange(batch)) if np.ndim(seed) == 0 else seed
  default = lambda value, name: getattr(sample_config, name) if value is None else value
  per_example = {
      "seeds": _per_item(seeds, batch, np.int32),
      "first_frame": np.asarray(first_frames, np.uint8),
      "last_frame": np.asarray(last_frames, np.uint8),
      "use_first_frame": use_first_frame,
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
  """N clips sampled one after another, each from the previous clip's last frame."""
  video: np.ndarray  # uint8 [b, 1 + N * (F - 1), H, W, 3]: clip 1, then clips 2..N less frame 0.
  clips: np.ndarray  # uint8 [b, N, F, H, W, 3]
  first_frames: np.ndarray  # uint8 [b, N, H, W, 3]: the first frame each clip was conditioned on.


def generate_long(pipeline: Pipeline, prompts: Sequence[Sequence[str]], first_frames: np.ndarray,
                  last_frames: np.ndarray | None = None, *, tau: Any = None,
                  **settings: Any) -> LongVideo:
  """Long videos by autoregression: clip k + 1 starts from clip k's last generated frame.

  Args:
    prompts: per example, one prompt per clip (all examples have the same number of clips).
    last_frames: uint8 `[b, H, W, 3]` guiding the final clip only (with `tau`), or None.
    **settings: the other keyword arguments of `generate` (seed, guidance_scale, steps, ...).
  """
  num_clips = len(prompts[0])
  if any(len(clip_prompts) != num_clips for clip_prompts in prompts):
    raise ValueError("every video of a batch needs the same number of clips")
  clips, conditions, first = [], [], np.asarray(first_frames, np.uint8)
  for index in range(num_clips):
    final = index == num_clips - 1
    start = time.perf_counter()
    clip = generate(pipeline, [p[index] for p in prompts], first,
                    last_frames if final else None, tau=tau if final else 0,
                    clip_index=index, **settings)
    if num_clips > 1:
      logging.info("clip %d/%d sampled in %.1f s", index + 1, num_clips,
                   time.perf_counter() - start)
    clips.append(clip)
    conditions.append(first)
    first = clip[:, -1]
  # Frame 0 of a later clip re-draws the previous clip's last frame: drop the repeat.
  video = np.concatenate([clips[0]] + [clip[:, 1:] for clip in clips[1:]], axis=1)
  return LongVideo(video=video, clips=np.stack(clips, axis=1),
                   first_frames=np.stack(conditions, axis=1))
