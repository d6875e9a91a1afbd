"""Sampling PixelDance videos from a checkpoint: the library behind sample.py and the evaluators.

`load_pipeline` restores a trained model; `generate` runs the whole DDIM loop as one jitted
program in which `tau` and the guidance scale are traced (changing them does not recompile).
"""

import dataclasses
import functools
import json
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from pixeldance_jax import video_io
from pixeldance_jax.data import conditioning
from pixeldance_jax.diffusion import samplers, schedules
from pixeldance_jax.models import autoencoder as autoencoder_lib
from pixeldance_jax.models import pixeldance, tokenizer
from pixeldance_jax.parallel import mesh as mesh_lib
from pixeldance_jax.parallel import sharding
from pixeldance_jax.train import checkpointing
from pixeldance_jax.train import state as state_lib

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Pipeline:
  """A restored model, ready to sample."""
  config: ml_collections.ConfigDict
  params: Any
  frozen: Any  # Frozen pretrained weights, e.g. {"autoencoder": ...}; {} for space_to_depth.
  step: int
  generate_fn: Any  # The jitted program, see `_make_generate_fn`.


def _make_generate_fn(config: ml_collections.ConfigDict, mesh):
  model = pixeldance.make_model(config)
  alpha_bar = jnp.asarray(schedules.alphas_cumprod(config.diffusion))
  frames, noise_timestep = config.data.frames, config.conditioning.noise_timestep
  if not config.sample.condition_noise:
    noise_timestep = 0
  rules = sharding.logical_rules(config)

  def generate(params, frozen, rng, first_frame, last_frame, token_ids, null_token_ids,
               timesteps, tau, guidance_scale, eta):
    """uint8 first/last `[b, H, W, 3]`, ids `[b, length]` -> uint8 video `[b, F, H, W, 3]`."""
    variables = {"params": params}
    autoencoder = autoencoder_lib.make_autoencoder(config, frozen.get("autoencoder"))
    noise_rng, first_rng, last_rng = jax.random.split(rng, 3)
    first = autoencoder.encode(first_frame.astype(jnp.float32) / 127.5 - 1.0)
    last = autoencoder.encode(last_frame.astype(jnp.float32) / 127.5 - 1.0)
    first = conditioning.noise_condition(first_rng, first, alpha_bar, noise_timestep)
    last = conditioning.noise_condition(last_rng, last, alpha_bar, noise_timestep)
    with_last = conditioning.image_condition(first, last, frames)
    without_last = conditioning.image_condition(first, jnp.zeros_like(last), frames)
    encode = functools.partial(model.apply, variables, method=pixeldance.PixelDance.encode_text)
    denoise = functools.partial(model.apply, variables, method=pixeldance.PixelDance.denoise)
    latents = samplers.ddim_sample(
        denoise, noise_rng, image_condition=with_last, image_condition_without_last=without_last,
        context=encode(token_ids), null_context=encode(null_token_ids), alpha_bar=alpha_bar,
        timesteps=timesteps, tau=tau, guidance_scale=guidance_scale, eta=eta,
        prediction_type=config.diffusion.prediction_type,
        clip_denoised=config.sample.clip_denoised)
    pixels = autoencoder.decode(latents)
    return jnp.clip(jnp.round((pixels + 1.0) * 127.5), 0, 255).astype(jnp.uint8)

  jitted = jax.jit(generate)

  def run(*args):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return jitted(*args)

  return run


def load_pipeline(workdir: str, step: int | None = None, use_ema: bool = True) -> Pipeline:
  """Restores the latest (or the given) checkpoint of `workdir` with its own config."""
  manager = checkpointing.make_manager(workdir, read_only=True)
  step = checkpointing.latest_step(manager, workdir) if step is None else step
  if step not in manager.all_steps():
    raise FileNotFoundError(f"No checkpoint for step {step} in "
                            f"{checkpointing.checkpoint_dir(workdir)}; there are "
                            f"{sorted(manager.all_steps())}.")
  config = checkpointing.restore_config(manager, step)
  mesh = mesh_lib.make_mesh(config.mesh)
  abstract, _ = state_lib.abstract_state(config, mesh)
  if checkpointing.is_pretrained(manager, step):  # Converted: one set of weights, no EMA.
    params, frozen = checkpointing.restore_pretrained(workdir, abstract.params, abstract.frozen)
  else:
    state = checkpointing.restore(manager, step, abstract)
    params, frozen = (state.ema_params if use_ema else state.params), state.frozen
  logging.info("restored the %s weights of step %d from %s", "EMA" if use_ema else "raw", step,
               checkpointing.checkpoint_dir(workdir))
  return Pipeline(config=config, params=params, frozen=frozen, step=step,
                  generate_fn=_make_generate_fn(config, mesh))


def generate(pipeline: Pipeline, prompts: Sequence[str], first_frames: np.ndarray,
             last_frames: np.ndarray | None = None, *, tau: int | None = None,
             guidance_scale: float | None = None, steps: int | None = None, seed: int = 0,
             eta: float | None = None) -> np.ndarray:
  """Samples one video per prompt.

  Args:
    first_frames: uint8 `[b, H, W, 3]`.
    last_frames: uint8 `[b, H, W, 3]`, or None for the basic mode (text + first frame).
    tau: leading sampler steps that see the last frame (default config.sample.tau, clipped to
      `steps`); ignored without last frames.
  Returns:
    uint8 `[b, frames, H, W, 3]`.
  """
  config = pipeline.config
  sample = config.sample
  steps = steps or sample.num_steps
  tau = min(sample.tau if tau is None else tau, steps)
  if tau < 0:
    raise ValueError(f"tau={tau} must be >= 0 (sampler steps that see the last frame)")
  if last_frames is None:
    last_frames, tau = np.zeros_like(first_frames), 0
  text = config.text_encoder
  token_ids = tokenizer.tokenize(prompts, text.max_length, text.pad_token_id)
  null_ids = np.broadcast_to(tokenizer.empty_prompt_tokens(text.max_length, text.pad_token_id),
                             token_ids.shape)
  timesteps = samplers.sampling_timesteps(config.diffusion.num_train_timesteps, steps,
                                          sample.timestep_spacing)
  video = pipeline.generate_fn(
      pipeline.params, pipeline.frozen, jax.random.key(seed), jnp.asarray(first_frames),
      jnp.asarray(last_frames), jnp.asarray(token_ids), jnp.asarray(null_ids),
      jnp.asarray(timesteps), jnp.int32(tau),
      jnp.float32(sample.guidance_scale if guidance_scale is None else guidance_scale),
      jnp.float32(sample.eta if eta is None else eta))
  return np.asarray(video)


def write_outputs(video: np.ndarray, output: str, fps: int, upscale: int,
                  record: dict[str, Any]) -> list[str]:
  """Writes OUTPUT.mp4, .gif, _frames.png and .json (the settings); returns the paths."""
  stem, suffix = os.path.splitext(output)
  if suffix.lower() not in (".mp4", ".gif"):
    raise ValueError(f"--output={output!r} must end in .mp4 or .gif")
  paths = [stem + ".mp4", stem + ".gif", stem + "_frames.png", stem + ".json"]
  video_io.write_video(video, paths[0], fps=fps, upscale=upscale)
  video_io.write_video(video, paths[1], fps=fps, upscale=upscale)
  video_io.write_contact_sheet(video, paths[2], upscale=upscale)
  with open(paths[3], "w") as f:
    json.dump(record, f, indent=2)
  return paths


def _heldout_clip(config: ml_collections.ConfigDict, workdir: str, index: int) -> dict[str, Any]:
  from pixeldance_jax.data import pipeline as data_pipeline  # pylint: disable=g-import-not-at-top
  from pixeldance_jax.train import trainer  # pylint: disable=g-import-not-at-top
  return data_pipeline.load_test_clips(config, trainer.data_dir(config, workdir), index + 1)[index]


def _resolve_inputs(pipeline: Pipeline, workdir: str, prompt: str | None,
                    first_frame: str | None, last_frame: str | None, heldout_index: int,
                    resize: bool) -> tuple[str, np.ndarray, np.ndarray | None, dict[str, Any]]:
  """Prompt, first and last frame from the user's files or a held-out clip; and a record."""
  size = pipeline.config.data.image_size
  record = {"prompt": prompt, "first_frame": first_frame, "last_frame": last_frame}
  clip = None
  if first_frame is None or last_frame == "heldout":
    clip = _heldout_clip(pipeline.config, workdir, heldout_index)
    record["heldout_index"], record["heldout_caption"] = heldout_index, clip["caption"]
  if first_frame is None:
    logging.warning("No --first_frame: using the first frame of held-out clip %d (%r).",
                    heldout_index, clip["caption"])
    first = clip["video"][0]
    if prompt is None:
      prompt = clip["caption"]
      logging.warning("No --prompt: using that clip's caption.")
  else:
    if prompt is None:
      raise ValueError("--prompt is required with --first_frame.")
    first = video_io.read_image(first_frame, size, resize=resize)
  if last_frame == "heldout":
    last = clip["video"][-1]
  elif last_frame is not None:
    last = video_io.read_image(last_frame, size, resize=resize)
  else:
    last = None
  record["prompt"] = prompt
  return prompt, first, last, record


def sample(workdir: str, *, output: str, prompt: str | None = None,
           first_frame: str | None = None, last_frame: str | None = None,
           tau: int | None = None, guidance_scale: float | None = None,
           steps: int | None = None, eta: float | None = None, seed: int = 0,
           checkpoint_step: int | None = None, use_ema: bool = True, heldout_index: int = 0,
           resize: bool = True, upscale: int = 4) -> list[str]:
  """Samples one video from the checkpoint in `workdir` and writes it; returns the paths."""
  pipeline = load_pipeline(workdir, checkpoint_step, use_ema)
  prompt, first, last, record = _resolve_inputs(pipeline, workdir, prompt, first_frame,
                                                last_frame, heldout_index, resize)
  sample_config = pipeline.config.sample
  steps = steps or sample_config.num_steps
  tau = min(sample_config.tau if tau is None else tau, steps) if last is not None else 0
  video = generate(pipeline, [prompt], first[None], None if last is None else last[None],
                   tau=tau, guidance_scale=guidance_scale, steps=steps, seed=seed, eta=eta)[0]
  record.update(workdir=os.path.abspath(workdir), checkpoint_step=pipeline.step,
                weights="ema" if use_ema else "raw", tau=tau, steps=steps, seed=seed,
                guidance_scale=sample_config.guidance_scale if guidance_scale is None
                else guidance_scale, eta=sample_config.eta if eta is None else eta)
  return write_outputs(video, output, pipeline.config.data.fps, upscale, record)
