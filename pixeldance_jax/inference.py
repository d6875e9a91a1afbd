"""Sampling PixelDance videos from a checkpoint: the library behind sample.py and the evaluators.

`load_pipeline` restores a trained (or converted) model. `generate` samples one clip per
example with the whole denoising loop as one jitted program, compiled once per batch shape and
sampler: tau, the guidance scale and rescale, eta, the seeds and the step schedule (even the
number of steps) are traced. `generate_long` chains clips into a long video; `run_requests`
samples a list of `Request`s (the CLI's flags or the lines of a prompts file) in batches.

Modes, set by the inputs: basic (text + first frame), magic (text + first + last frame),
sketch (an edge map of an image as the last frame), and long video (N clips, each starting
from the previous clip's last generated frame).
"""

import collections
import dataclasses
import functools
import json
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from pixeldance_jax import video_io
from pixeldance_jax.data import conditioning
from pixeldance_jax.diffusion import samplers, schedules
from pixeldance_jax.models import autoencoder as autoencoder_lib
from pixeldance_jax import tokenizer
from pixeldance_jax.models import pixeldance
from pixeldance_jax.parallel import mesh as mesh_lib
from pixeldance_jax.parallel import sharding
from pixeldance_jax import checkpoints
from pixeldance_jax.train import state as state_lib

Array = jax.Array

# Sampling fields newer than some checkpoints' saved configs, with the behaviour they had then.
SAMPLE_DEFAULTS = {"sampler": "ddim", "guidance_rescale": 0.0}
# How often the generate program was traced, per sampler: tests check that changing a traced
# setting (tau, guidance, steps, ...) does not trace (and compile) it again.
trace_counts: collections.Counter = collections.Counter()


@dataclasses.dataclass(frozen=True)
class Pipeline:
  """A restored model, ready to sample."""
  config: ml_collections.ConfigDict
  params: Any
  frozen: Any  # Frozen pretrained weights, e.g. {"autoencoder": ...}; {} for space_to_depth.
  step: int
  generate_fn: Any  # The jitted program, see `make_generate_fn`.
  mesh: jax.sharding.Mesh
  weights: str = "ema"  # "ema", "raw", "converted" (or "random", see `random_pipeline`).
  workdir: str = ""


def _noisy_condition(rngs: Array, latent: Array, alpha_bar: Array, timestep: int) -> Array:
  """Forward-process noise of `timestep` on condition latents `[b, h, w, c]`, one key each."""
  if timestep <= 0:
    return latent
  noise = jax.vmap(lambda rng: jax.random.normal(rng, latent.shape[1:], latent.dtype))(rngs)
  return schedules.add_noise(alpha_bar, latent, noise,
                             jnp.full((latent.shape[0],), timestep, jnp.int32))


def make_generate_fn(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
  """The jitted sampling program; per-example inputs are placed with the batch over data x fsdp."""
  model = pixeldance.make_model(config)
  alpha_bar = jnp.asarray(schedules.alphas_cumprod(config.diffusion))
  frames = config.data.frames
  noise_timestep = config.conditioning.noise_timestep if config.sample.condition_noise else 0
  rules = sharding.logical_rules(config)

  def image_conditions(autoencoder, rngs, first_frame, last_frame):
    """uint8 `[b, H, W, 3]` x 2 -> c_image `[b, F, h, w, c]` with and without the last frame."""
    first_rngs, last_rngs = jnp.moveaxis(jax.vmap(jax.random.split)(rngs), 1, 0)
    first = autoencoder.encode(first_frame.astype(jnp.float32) / 127.5 - 1.0)
    last = autoencoder.encode(last_frame.astype(jnp.float32) / 127.5 - 1.0)
    first = _noisy_condition(first_rngs, first, alpha_bar, noise_timestep)
    last = _noisy_condition(last_rngs, last, alpha_bar, noise_timestep)
    if not config.conditioning.use_first_frame:  # The text-to-video baseline never saw one.
      first = jnp.zeros_like(first)
    return (conditioning.image_condition(first, last, frames),
            conditioning.image_condition(first, jnp.zeros_like(last), frames))

  @functools.partial(jax.jit, static_argnames=("sampler",))
  def generate(params, frozen, seeds, clip_index, first_frame, last_frame, token_ids,
               null_token_ids, schedule, tau, guidance_scale, guidance_rescale, eta, *, sampler):
    """uint8 first/last `[b, H, W, 3]`, ids `[b, length]`, seeds `[b]` -> `[b, F, H, W, 3]`."""
    trace_counts[sampler] += 1
    variables = {"params": params}
    autoencoder = autoencoder_lib.make_autoencoder(config, frozen.get("autoencoder"))
    rngs = jax.vmap(lambda seed: jax.random.fold_in(jax.random.key(seed), clip_index))(seeds)
    noise_rngs, condition_rngs = jnp.moveaxis(jax.vmap(jax.random.split)(rngs), 1, 0)
    with_last, without_last = image_conditions(autoencoder, condition_rngs, first_frame,
                                               last_frame)
    encode = functools.partial(model.apply, variables, method=pixeldance.PixelDance.encode_text)
    denoise = functools.partial(model.apply, variables, method=pixeldance.PixelDance.denoise)
    latents = samplers.sample(
        denoise, noise_rngs, image_condition=with_last, image_condition_without_last=without_last,
        context=encode(token_ids), null_context=encode(null_token_ids), schedule=schedule,
        tau=tau, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, eta=eta,
        sampler=sampler, prediction_type=config.diffusion.prediction_type,
        clip_denoised=config.sample.clip_denoised)
    pixels = autoencoder.decode(latents)
    return jnp.clip(jnp.round((pixels + 1.0) * 127.5), 0, 255).astype(jnp.uint8)

  per_example = mesh_lib.batch_sharding(mesh)
  replicated = NamedSharding(mesh, PartitionSpec())

  def run(params, frozen, batch: dict[str, np.ndarray], shared: dict[str, Any], sampler: str):
    batch = jax.device_put(batch, per_example)
    shared = jax.device_put(shared, replicated)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return generate(params, frozen, **batch, **shared, sampler=sampler)

  def lower(params, frozen, batch: dict[str, Any], shared: dict[str, Any], sampler: str):
    """The program for (possibly abstract) inputs, e.g. to time its compilation."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return generate.lower(params, frozen, **batch, **shared, sampler=sampler)

  run.lower = lower
  return run


def random_params(config: ml_collections.ConfigDict, seed: int = 0) -> Any:
  """Random weights of the model's shapes, for tests and benchmarks; nothing is zero, so the
  zero-initialised temporal outputs (and through them every frame) act. Filled in numpy from
  `jax.eval_shape`: no initialisation program to compile."""
  model = pixeldance.make_model(config)
  shapes = nn.meta.unbox(jax.eval_shape(
      lambda: model.init(jax.random.key(0), *pixeldance.dummy_inputs(config))["params"]))
  rng = np.random.default_rng(seed)
  def init(path, leaf):
    noise = rng.standard_normal(leaf.shape, np.float32)
    if path[-1].key == "scale":  # Norms.
      return 1.0 + 0.05 * noise
    fan_in = np.prod(leaf.shape[:-1]) if leaf.ndim > 1 else 20.0
    return noise / np.sqrt(fan_in, dtype=np.float32)
  return jax.tree_util.tree_map_with_path(init, shapes)


def random_pipeline(config: ml_collections.ConfigDict, seed: int = 0) -> Pipeline:
  """A pipeline with `random_params` (a space-to-depth autoencoder: no frozen weights)."""
  if config.autoencoder.kind != "space_to_depth":
    raise ValueError("random_pipeline needs autoencoder.kind='space_to_depth' (no frozen "
                     "weights to draw).")
  mesh = mesh_lib.make_mesh(config.mesh)
  _, shardings = state_lib.abstract_state(config, mesh)
  params = jax.device_put(random_params(config, seed), shardings.params)
  return Pipeline(config=config, params=params, frozen={}, step=0,
                  generate_fn=make_generate_fn(config, mesh), mesh=mesh, weights="random")


def _with_sample_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  missing = {key: value for key, value in SAMPLE_DEFAULTS.items() if key not in config.sample}
  if missing:
    logging.info("The checkpoint's config predates config.sample fields %s; using %s.",
                 sorted(missing), missing)
    config = config.copy_and_resolve_references()
    config.sample.update(missing)
  return config


def _shape_mismatches(item_dir: str, expected: dict[str, Any]) -> list[str]:
  """The leaves of `expected` (ShapeDtypeStructs) that an Orbax item lacks or stores otherwise."""
  try:
    metadata = ocp.StandardCheckpointer().metadata(item_dir).item_metadata
  except (OSError, ValueError) as error:
    raise ValueError(f"Cannot read the metadata of checkpoint item {item_dir}: {error}") from error
  stored = {jax.tree_util.keystr(path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_leaves_with_path(metadata)}
  problems = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(expected):
    key = jax.tree_util.keystr(path)
    if stored.get(key) != tuple(leaf.shape):
      problems.append(f"{key}: stored {stored.get(key, 'nothing')}, the model has {leaf.shape}")
  return problems


def _check_fits(workdir: str, step: int, item: str, expected: dict[str, Any]) -> None:
  """Refuses, listing what differs, a checkpoint whose arrays do not fit the model: cheaper and
  clearer than Orbax failing mid-restore."""
  problems = _shape_mismatches(os.path.join(checkpoints.checkpoint_dir(workdir), str(step),
                                            item), expected)
  if problems:
    shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8
                                       else "")
    raise ValueError(f"Checkpoint {step} in {checkpoints.checkpoint_dir(workdir)} does not fit "
                     f"the model its own config describes ({len(problems)} arrays): {shown}")


def _restore_weights(manager, workdir: str, step: int, config: ml_collections.ConfigDict,
                     mesh: jax.sharding.Mesh, use_ema: bool) -> tuple[Any, Any, str]:
  """(params, frozen, "ema" | "raw" | "converted") onto `mesh`."""
  try:
    abstract, _ = state_lib.abstract_state(config, mesh)
  except (AttributeError, KeyError, TypeError, ValueError) as error:
    raise ValueError(f"The config saved with checkpoint {step} in "
                     f"{checkpoints.checkpoint_dir(workdir)} does not build a model with this "
                     f"code ({type(error).__name__}: {error}).") from error
  if checkpoints.is_pretrained(manager, step):  # Converted: one set of weights, no EMA.
    if not use_ema:
      logging.info("A converted checkpoint has one set of weights; --raw_weights changes nothing.")
    _check_fits(workdir, step, "pretrained",
                {"params": abstract.params, "frozen": abstract.frozen})
    params, frozen = checkpoints.restore_pretrained(workdir, abstract.params, abstract.frozen)
    return params, frozen, "converted"
  _check_fits(workdir, step, "state", {"ema_params" if use_ema else "params": abstract.params,
                                       "frozen": abstract.frozen})
  state = checkpoints.restore(manager, step, abstract)
  weights = "ema" if use_ema else "raw"
  return (state.ema_params if use_ema else state.params), state.frozen, weights


def load_pipeline(workdir: str, step: int | None = None, use_ema: bool = True) -> Pipeline:
  """Restores the latest (or the given) checkpoint of `workdir` with its own config.

  `workdir` is a training workdir or a converted checkpoint (python -m pixeldance_jax.convert).
  use_ema: the EMA weights (what training evaluates) or the raw ones.
  """
  if not os.path.isdir(checkpoints.checkpoint_dir(workdir)):
    raise FileNotFoundError(f"No checkpoint in {checkpoints.checkpoint_dir(workdir)}: train "
                            f"first, or point --workdir at a directory that train.py or "
                            f"pixeldance_jax.convert wrote.")
  manager = checkpoints.make_manager(workdir, read_only=True)
  try:
    step = checkpoints.latest_step(manager, workdir) if step is None else step
    if step not in manager.all_steps():
      raise FileNotFoundError(f"No checkpoint for step {step} in "
                              f"{checkpoints.checkpoint_dir(workdir)}; there are "
                              f"{sorted(manager.all_steps())}.")
    config = _with_sample_defaults(checkpoints.restore_config(manager, step))
    mesh = mesh_lib.make_mesh(config.mesh)
    params, frozen, weights = _restore_weights(manager, workdir, step, config, mesh, use_ema)
  finally:
    # Orbax's I/O threads otherwise race the interpreter's exit after a failed restore
    # ("RuntimeError: Event loop is closed" printed after the real error).
    manager.close()
  logging.info("Restored the %s weights of step %d from %s.", weights, step,
               checkpoints.checkpoint_dir(workdir))
  return Pipeline(config=config, params=params, frozen=frozen, step=step,
                  generate_fn=make_generate_fn(config, mesh), mesh=mesh, weights=weights,
                  workdir=os.path.abspath(workdir))


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
  values = np.asarray(value, dtype)
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


def _batch_devices(mesh: jax.sharding.Mesh) -> int:
  return int(np.prod([mesh.shape[axis] for axis in mesh_lib.BATCH_AXES]))


def _check_frame_shapes(config: ml_collections.ConfigDict, batch: int,
                        **frames: np.ndarray | None) -> None:
  size = config.data.image_size
  for name, value in frames.items():
    if value is not None and np.shape(value) != (batch, size, size, 3):
      raise ValueError(f"{name} is {np.shape(value)}; this model needs [{batch} prompts, "
                       f"{size}, {size}, 3] (video_io.read_image resizes images)")


def generate(pipeline: Pipeline, prompts: Sequence[str], first_frames: np.ndarray,
             last_frames: np.ndarray | None = None, *, tau: Any = None,
             guidance_scale: Any = None, guidance_rescale: Any = None, steps: int | None = None,
             seed: Any = 0, eta: Any = None, sampler: str | None = None,
             timestep_spacing: str | None = None, clip_index: int = 0) -> np.ndarray:
  """Samples one clip per prompt.

  Args:
    first_frames: uint8 `[b, H, W, 3]`.
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
  _check_frame_shapes(config, batch, first_frames=first_frames, last_frames=last_frames)
  steps = steps or sample_config.num_steps
  tau = _per_item(sample_config.tau if tau is None else tau, batch, np.int32)
  if (tau < 0).any():
    raise ValueError(f"tau={tau.tolist()} must be >= 0 (sampler steps that see the last frame)")
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
      "token_ids": _tokenize(config, prompts),
      "null_token_ids": _tokenize(config, [""] * batch),
      "tau": np.minimum(tau, steps),
      "guidance_scale": _per_item(default(guidance_scale, "guidance_scale"), batch, np.float32),
      "guidance_rescale": _per_item(default(guidance_rescale, "guidance_rescale"), batch,
                                    np.float32),
      "eta": _per_item(default(eta, "eta"), batch, np.float32),
  }
  shared = {"clip_index": np.int32(clip_index), "schedule": samplers.make_schedule(
      schedules.alphas_cumprod(config.diffusion), steps,
      default(timestep_spacing, "timestep_spacing"))}
  padded = _pad_batch(per_example, _batch_devices(pipeline.mesh))
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


# --- Requests: one video each, from CLI flags or a line of a prompts file ---------------------

# Settings a request may give; the rest come from the CLI flags, then config.sample.
SETTINGS = ("tau", "guidance_scale", "guidance_rescale", "steps", "eta", "sampler",
            "timestep_spacing", "seed", "num_clips")
# What a line of a prompts file may hold besides SETTINGS.
INPUTS = ("prompt", "first_frame", "last_frame", "last_frame_edges", "heldout_index", "name")


@dataclasses.dataclass(frozen=True)
class Request:
  """One video to sample and the record of how."""
  prompts: tuple[str, ...]  # One per clip.
  first_frame: np.ndarray  # uint8 [H, W, 3]
  last_frame: np.ndarray | None  # uint8 [H, W, 3], guides the final clip.
  settings: dict[str, Any]  # Every key of SETTINGS, resolved.
  record: dict[str, Any]  # Inputs as given, mode, and the settings: the JSON written beside it.
  name: str = ""

  def batch_key(self) -> tuple[Any, ...]:
    """Requests batch together when they share the schedule, the sampler and the clip count."""
    s = self.settings
    return s["steps"], s["sampler"], s["timestep_spacing"], s["num_clips"]


# The type of each setting: values from JSON or flags are converted, and must convert.
_SETTING_TYPES = {"tau": int, "guidance_scale": float, "guidance_rescale": float, "steps": int,
                  "eta": float, "sampler": str, "timestep_spacing": str, "seed": int,
                  "num_clips": int}


def default_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  sample_config = config.sample
  return {"tau": sample_config.tau, "guidance_scale": sample_config.guidance_scale,
          "guidance_rescale": sample_config.guidance_rescale, "steps": sample_config.num_steps,
          "eta": sample_config.eta, "sampler": sample_config.sampler,
          "timestep_spacing": sample_config.timestep_spacing, "seed": 0, "num_clips": 1}


def _convert_setting(name: str, value: Any) -> Any:
  if name not in _SETTING_TYPES:
    raise ValueError(f"unknown setting {name!r}; known: {list(SETTINGS)}")
  kind = _SETTING_TYPES[name]
  if kind is int and isinstance(value, float) and not value.is_integer():
    raise ValueError(f"{name}={value!r} is not an integer")
  try:
    return kind(value)
  except (TypeError, ValueError) as error:
    raise ValueError(f"{name}={value!r} is not a {kind.__name__}") from error


def _check_settings(settings: dict[str, Any], num_train_timesteps: int) -> None:
  if settings["sampler"] not in samplers.SAMPLERS:
    raise ValueError(f"sampler={settings['sampler']!r} is not one of {sorted(samplers.SAMPLERS)}")
  if settings["timestep_spacing"] not in samplers.TIMESTEP_SPACINGS:
    raise ValueError(f"timestep_spacing={settings['timestep_spacing']!r} is not one of "
                     f"{samplers.TIMESTEP_SPACINGS}")
  if not 1 <= settings["steps"] <= num_train_timesteps:
    raise ValueError(f"steps={settings['steps']} must be in [1, {num_train_timesteps}]")
  if settings["tau"] < 0:
    raise ValueError(f"tau={settings['tau']} must be >= 0 (sampler steps that see the last "
                     f"frame)")
  if not 0.0 <= settings["guidance_rescale"] <= 1.0:
    raise ValueError(f"guidance_rescale={settings['guidance_rescale']} must be in [0, 1]")
  if settings["num_clips"] < 1:
    raise ValueError(f"num_clips={settings['num_clips']} must be >= 1")


def _resolve_settings(config: ml_collections.ConfigDict, prompt: str | Sequence[str] | None,
                      given: dict[str, Any]) -> dict[str, Any]:
  """Every setting: the given ones (None: not given), else config.sample's; checked."""
  given = {name: _convert_setting(name, value) for name, value in given.items()
           if value is not None}
  if prompt is not None and not isinstance(prompt, str):
    given.setdefault("num_clips", len(prompt))  # One prompt per clip.
  settings = {**default_settings(config), **given}
  _check_settings(settings, config.diffusion.num_train_timesteps)
  return settings


def _heldout_clip(config: ml_collections.ConfigDict, workdir: str, index: int) -> dict[str, Any]:
  from pixeldance_jax.data import pipeline as data_pipeline  # pylint: disable=g-import-not-at-top
  return data_pipeline.load_test_clips(config, data_pipeline.data_dir(config, workdir), index + 1)[index]


def _resolve_inputs(pipeline: Pipeline, prompt: str | Sequence[str] | None,
                    first_frame: str | None, last_frame: str | None, heldout_index: int,
                    read: Any, record: dict[str, Any]
                    ) -> tuple[str | Sequence[str], np.ndarray, np.ndarray | None]:
  """(prompt, first frame, last frame or None) from `read(path)` or a held-out clip."""
  clip = None
  if first_frame is None or last_frame == "heldout":
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
  if last_frame == "heldout":
    return prompt, first, clip["video"][-1]
  return prompt, first, None if last_frame is None else read(last_frame)


def _mode(last_frame: Any, edges: bool, num_clips: int) -> str:
  mode = "basic" if last_frame is None else ("sketch" if edges else "magic")
  return mode if num_clips == 1 else f"long video ({num_clips} clips, {mode} ending)"


def make_request(pipeline: Pipeline, *, prompt: str | Sequence[str] | None = None,
                 first_frame: str | None = None, last_frame: str | None = None,
                 last_frame_edges: bool = False, heldout_index: int = 0, resize: bool = True,
                 name: str = "", base_dir: str = "", **settings: Any) -> Request:
  """A request from image paths (relative ones under `base_dir`) or a held-out clip.

  Without `first_frame` the first frame (and, without a prompt, the caption) of held-out clip
  `heldout_index` is used; `last_frame="heldout"` takes that clip's last frame.
  `last_frame_edges` turns the last frame into an edge map (the sketch mode). A list of
  prompts gives one per clip; one prompt serves every clip. `settings`: see SETTINGS.
  """
  settings = _resolve_settings(pipeline.config, prompt, settings)
  size = pipeline.config.data.image_size
  read = lambda path: video_io.read_image(
      path if os.path.isabs(path) else os.path.join(base_dir, path), size, resize=resize)
  record = {"prompt": prompt, "first_frame": first_frame, "last_frame": last_frame}
  prompt, first, last = _resolve_inputs(pipeline, prompt, first_frame, last_frame,
                                        heldout_index, read, record)
  if last is not None and last_frame_edges:
    last = video_io.edge_map(last)
  prompts = (prompt,) * settings["num_clips"] if isinstance(prompt, str) else tuple(prompt)
  if len(prompts) != settings["num_clips"]:
    raise ValueError(f"{len(prompts)} prompts for num_clips={settings['num_clips']}")
  record.update(prompt=prompt, last_frame_edges=last_frame_edges,
                mode=_mode(last, last_frame_edges, settings["num_clips"]), **settings)
  # The tau that acts: none without a last frame; tau >= steps is "every step".
  record["tau"] = 0 if last is None else min(settings["tau"], settings["steps"])
  return Request(prompts=prompts, first_frame=first, last_frame=last, settings=settings,
                 record=record, name=name)


def _parse_line(line: str) -> dict[str, Any] | None:
  """A prompts-file line as a dict (None for blank lines and # comments); ValueError if bad."""
  if not line.strip() or line.lstrip().startswith("#"):
    return None
  try:
    item = json.loads(line)
  except json.JSONDecodeError as error:
    raise ValueError(f"not JSON ({error})") from error
  unknown = set(item) - set(INPUTS) - set(SETTINGS) if isinstance(item, dict) else None
  if unknown is None or unknown:
    raise ValueError(f"expected an object with keys from {sorted(INPUTS + SETTINGS)}; "
                     f"unknown: {sorted(unknown or [])}")
  return item


def read_prompts_file(pipeline: Pipeline, path: str, resize: bool = True,
                      **defaults: Any) -> list[Request]:
  """Requests from a JSONL file, one JSON object a line (blank lines and # comments skipped).

  Keys: INPUTS and SETTINGS (see `make_request`); `defaults` (e.g. the CLI flags) fill the
  settings a line leaves out; without a seed, request k (from 0) gets seed `defaults["seed"] +
  k`. Relative image paths are relative to the file; each request is named by its "name" or
  its index ("0000", "0001", ...). Errors name the line.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"prompts file not found: {path}")
  base_dir = os.path.dirname(os.path.abspath(path))
  requests = []
  with open(path) as f:
    for number, line in enumerate(f, 1):
      try:
        item = _parse_line(line)
        if item is not None:
          index = len(requests)
          requests.append(make_request(
              pipeline, resize=resize, base_dir=base_dir,
              **{**defaults, "seed": (defaults.get("seed") or 0) + index,
                 "name": f"{index:04d}", **item}))
      except (ValueError, FileNotFoundError) as error:
        raise ValueError(f"{path}:{number}: {error}") from error
  if not requests:
    raise ValueError(f"{path} holds no requests")
  return requests


def _batches(requests: Sequence[Request], batch_size: int) -> list[list[Request]]:
  """Groups requests that can share a program run, in file order, then cuts groups to size."""
  groups: dict[tuple, list[Request]] = {}
  for request in requests:
    groups.setdefault(request.batch_key(), []).append(request)
  return [group[start:start + batch_size] for group in groups.values()
          for start in range(0, len(group), batch_size)]


def run_requests(pipeline: Pipeline, requests: Sequence[Request], batch_size: int = 8
                 ) -> Iterator[tuple[Request, LongVideo]]:
  """Samples every request, `batch_size` at a time, yielding (request, one-example LongVideo)."""
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1")
  batches = _batches(requests, batch_size)
  for number, batch in enumerate(batches, 1):
    start = time.perf_counter()
    settings = batch[0].settings
    lasts = [r.last_frame for r in batch]
    size = batch[0].first_frame.shape
    result = generate_long(
        pipeline, [r.prompts for r in batch], np.stack([r.first_frame for r in batch]),
        None if all(last is None for last in lasts) else
        np.stack([np.zeros(size, np.uint8) if last is None else last for last in lasts]),
        tau=[0 if r.last_frame is None else r.settings["tau"] for r in batch],
        **{key: [r.settings[key] for r in batch]
           for key in ("seed", "guidance_scale", "guidance_rescale", "eta")},
        steps=settings["steps"], sampler=settings["sampler"],
        timestep_spacing=settings["timestep_spacing"])
    logging.info("batch %d/%d (videos: %d, %s, %d steps, clips: %d) sampled in %.1f s", number,
                 len(batches), len(batch), settings["sampler"], settings["steps"],
                 settings["num_clips"], time.perf_counter() - start)
    for index, request in enumerate(batch):
      yield request, LongVideo(*(x[index:index + 1] for x in dataclasses.astuple(result)))


def _checkpoint_record(pipeline: Pipeline) -> dict[str, Any]:
  config = pipeline.config
  return {"workdir": pipeline.workdir, "checkpoint_step": pipeline.step,
          "weights": pipeline.weights, "prediction_type": config.diffusion.prediction_type,
          "clip_denoised": config.sample.clip_denoised,
          "condition_noise_timestep": config.conditioning.noise_timestep
          if config.sample.condition_noise else 0}


def _write_media(video: np.ndarray, paths: dict[str, str], fps: int, upscale: int,
                 record: dict[str, Any]) -> list[str]:
  video_io.write_video(video, paths["mp4"], fps=fps, upscale=upscale)
  video_io.write_video(video, paths["gif"], fps=fps, upscale=upscale)
  video_io.write_contact_sheet(video, paths["sheet"], upscale=upscale)
  with open(paths["json"], "w") as f:
    json.dump(record, f, indent=2)
  return list(paths.values())


def write_outputs(video: np.ndarray, output: str, fps: int, upscale: int,
                  record: dict[str, Any]) -> list[str]:
  """Writes OUTPUT.mp4, .gif, _frames.png (a contact sheet) and .json; returns the paths."""
  stem, suffix = os.path.splitext(output)
  if suffix.lower() not in (".mp4", ".gif"):
    raise ValueError(f"--output={output!r} must end in .mp4 or .gif")
  paths = {"mp4": stem + ".mp4", "gif": stem + ".gif", "sheet": stem + "_frames.png",
           "json": stem + ".json"}
  return _write_media(video, paths, fps, upscale, record)


def write_folder(video: np.ndarray, folder: str, fps: int, upscale: int,
                 record: dict[str, Any]) -> list[str]:
  """FOLDER/video.mp4, video.gif, contact_sheet.png, record.json and frames/NNN.png."""
  paths = {"mp4": "video.mp4", "gif": "video.gif", "sheet": "contact_sheet.png",
           "json": "record.json"}
  written = _write_media(video, {key: os.path.join(folder, name) for key, name in paths.items()},
                         fps, upscale, record)
  for index, frame in enumerate(video):
    written.append(os.path.join(folder, "frames", f"{index:03d}.png"))
    video_io.save_image(frame, written[-1], upscale=upscale)
  return written


def sample(workdir: str, *, output: str, checkpoint_step: int | None = None,
           use_ema: bool = True, upscale: int = 4, **request_args: Any) -> list[str]:
  """Samples one video (`make_request`'s arguments) from `workdir` and writes it."""
  pipeline = load_pipeline(workdir, checkpoint_step, use_ema)
  request = make_request(pipeline, **request_args)
  logging.info("Sampling in %s mode.", request.record["mode"])
  (_, result), = run_requests(pipeline, [request], batch_size=1)
  record = {**request.record, **_checkpoint_record(pipeline)}
  return write_outputs(result.video[0], output, pipeline.config.data.fps, upscale, record)


def sample_prompts_file(workdir: str, *, prompts_file: str, output_dir: str,
                        checkpoint_step: int | None = None, use_ema: bool = True,
                        batch_size: int = 8, upscale: int = 4, resize: bool = True,
                        **defaults: Any) -> list[str]:
  """Samples every line of a JSONL prompts file into OUTPUT_DIR/NAME/; returns the folders."""
  pipeline = load_pipeline(workdir, checkpoint_step, use_ema)
  requests = read_prompts_file(pipeline, prompts_file, resize=resize, **defaults)
  names = [r.name for r in requests]
  duplicates = [name for name, count in collections.Counter(names).items() if count > 1]
  if duplicates:
    raise ValueError(f"{prompts_file}: duplicate names {duplicates}")
  logging.info("%d requests from %s, batches of up to %d over %d data-parallel device(s).",
               len(requests), prompts_file, batch_size, _batch_devices(pipeline.mesh))
  folders = []
  for request, result in run_requests(pipeline, requests, batch_size):
    folder = os.path.join(output_dir, request.name)
    record = {**request.record, **_checkpoint_record(pipeline), "name": request.name}
    write_folder(result.video[0], folder, pipeline.config.data.fps, upscale, record)
    folders.append(folder)
  return folders

