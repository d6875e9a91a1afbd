"""The sampling program: text encoding, the whole denoising loop and decoding, jitted as one.

It is compiled once per batch shape and sampler: tau, the guidance scale and rescale, eta, the
seeds and the step schedule (even the number of steps) are traced inputs, so changing them
reuses the compiled program.
"""

import collections
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from pixeldance_jax.runtime import programs
from pixeldance_jax.data import conditioning
from pixeldance_jax.diffusion import samplers, schedules
from pixeldance_jax.models import autoencoder as autoencoder_lib
from pixeldance_jax.models import pixeldance
from pixeldance_jax.parallel import mesh as mesh_lib
from pixeldance_jax.parallel import sharding

# How often the generate program was traced, per sampler: tests check that changing a traced
# setting (tau, guidance, steps, ...) does not trace (and compile) it again.
trace_counts: collections.Counter = collections.Counter()


# What the sampling program may read of the config (anything else fails loudly when traced):
# pipelines whose configs agree here (an ablation's variants, say) share one program.
PROGRAM_FIELDS = ("autoencoder", "diffusion", "text_encoder", "unet", "logical_axis_rules",
                  "data.frames", "conditioning.noise_timestep", "conditioning.keyframe_mask",
                  "sample.condition_noise", "sample.clip_denoised")
_PROGRAMS = programs.ProgramCache()


def make_generate_fn(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
  """The jitted sampling program; per-example inputs are placed with the batch over data x fsdp.

  Returns `run(params, frozen, batch, shared, sampler) -> uint8 [b, F, H, W, 3]` where `batch`
  holds the per-example arrays (see `generate.generate`) and `shared` the clip index and the
  step schedule; `run.lower(...)` lowers it for (possibly abstract) inputs. Configs with equal
  `PROGRAM_FIELDS` on one mesh get the same program (traced and compiled once per process).
  """
  config = programs.program_config(config, PROGRAM_FIELDS)
  return _PROGRAMS.get((programs.config_key(config), mesh),
                       lambda: _build_generate_fn(config, mesh))


def _build_generate_fn(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
  model = pixeldance.make_model(config)
  alpha_bar = jnp.asarray(schedules.alphas_cumprod(config.diffusion))
  frames = config.data.frames
  noise_timestep = config.conditioning.noise_timestep if config.sample.condition_noise else 0
  rules = sharding.logical_rules(config)
  mask_channels = conditioning.mask_channels(config)

  def image_conditions(autoencoder, rngs, first_frame, last_frame, use_first_frame):
    """uint8 `[b, H, W, 3]` x 2 -> c_image `[b, F, h, w, c]` with and without the last frame.
    `use_first_frame` `[b]` 0 gives that example no first frame (text only, as T2V)."""
    first_rngs, last_rngs = jnp.moveaxis(jax.vmap(jax.random.split)(rngs), 1, 0)
    first = autoencoder.encode(autoencoder_lib.to_pixels(first_frame))
    last = autoencoder.encode(autoencoder_lib.to_pixels(last_frame))
    # The noise training puts on its conditions, one key per example as there.
    first = conditioning.noise_condition(first_rngs, first, alpha_bar, noise_timestep)
    last = conditioning.noise_condition(last_rngs, last, alpha_bar, noise_timestep)
    first = first * use_first_frame.astype(first.dtype)[:, None, None, None]
    return (conditioning.image_condition(first, last, frames),
            conditioning.image_condition(first, jnp.zeros_like(last), frames))

  def keyframe_conditions(autoencoder, rngs, keyframes, given, held):
    """uint8 frames `[b, F, H, W, 3]`, bool `given`, `held` `[b, F]` -> c_image with every
    given frame (the first `tau` steps) and with the held ones alone (the rest), each with
    the mask channel where the model has one. Frame 0 and F-1 are the first and last frame."""
    batch = keyframes.shape[0]
    pixels = autoencoder_lib.to_pixels(keyframes.reshape((-1,) + keyframes.shape[2:]))
    latents = autoencoder.encode(pixels)
    keys = jax.vmap(lambda rng: jax.random.split(jax.random.fold_in(rng, 1), frames))(rngs)
    latents = conditioning.noise_condition(keys.reshape(-1), latents, alpha_bar, noise_timestep)
    latents = latents.reshape((batch, frames) + latents.shape[1:])
    conditions = []
    for shown in (given, given & held):
      condition = conditioning.keyframe_condition(latents, shown)
      if mask_channels:
        condition = conditioning.with_mask(condition, shown)
      conditions.append(condition)
    return tuple(conditions)

  def generate_batch(params, frozen, seeds, clip_index, token_ids, null_token_ids, schedule,
                     tau, guidance_scale, guidance_rescale, eta, *, sampler, **frames_in):
    """ids `[b, length]`, seeds `[b]` and the frames -> `[b, F, H, W, 3]`. The frames: uint8
    first/last `[b, H, W, 3]` with `use_first_frame` (the paper's modes), or uint8 `keyframes`
    `[b, F, H, W, 3]` with bool `given` and `held` `[b, F]` (see `keyframe_conditions`)."""
    variables = {"params": params}
    autoencoder = autoencoder_lib.make_autoencoder(config, frozen.get("autoencoder"))
    rngs = jax.vmap(lambda seed: jax.random.fold_in(jax.random.key(seed), clip_index))(seeds)
    noise_rngs, condition_rngs = jnp.moveaxis(jax.vmap(jax.random.split)(rngs), 1, 0)
    if "keyframes" in frames_in:
      with_last, without_last = keyframe_conditions(autoencoder, condition_rngs, **frames_in)
    else:
      with_last, without_last = image_conditions(autoencoder, condition_rngs, **frames_in)
    encode = functools.partial(model.apply, variables, method=pixeldance.PixelDance.encode_text)
    denoise = functools.partial(model.apply, variables, method=pixeldance.PixelDance.denoise)
    latents = samplers.sample(
        denoise, noise_rngs, image_condition=with_last, image_condition_without_last=without_last,
        context=encode(token_ids), null_context=encode(null_token_ids), schedule=schedule,
        tau=tau, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, eta=eta,
        sampler=sampler, prediction_type=config.diffusion.prediction_type,
        clip_denoised=config.sample.clip_denoised,
        latent_channels=config.autoencoder.latent_channels)
    return autoencoder_lib.to_uint8(autoencoder.decode(latents))

  # On CPU, each device samples its examples one at a time: XLA:CPU's kernels (YNNPACK's and
  # Eigen's convolutions, matrix products and reductions) pick their tiling by problem size, and
  # on some CPUs (AMD EPYC with AVX2) a row's sums then depend on how many rows are
  # in the batch. One example per device per iteration keeps every kernel's sizes the same
  # whatever the batch or the device count, so a seed gives the same video, bitwise, in any
  # batch. GPUs and TPUs run the batch at once.
  shards = mesh_lib.batch_devices(mesh)
  one_at_a_time = mesh.devices.flat[0].platform == "cpu"

  @functools.partial(jax.jit, static_argnames=("sampler",))
  def generate(params, frozen, seeds, clip_index, schedule, *, sampler, **batch):
    """`generate_batch`, per device one example at a time on CPU."""
    trace_counts[sampler] += 1
    run_batch = lambda examples, seeds: generate_batch(
        params, frozen, seeds, clip_index, schedule=schedule, sampler=sampler, **examples)
    if not one_at_a_time:
      return run_batch(batch, seeds)
    # [b, ...] -> [b / shards, shards, ...]: iteration j takes example j of every device's block.
    split = lambda x: jnp.swapaxes(x.reshape((shards, -1) + x.shape[1:]), 0, 1)
    videos = jax.lax.map(lambda xs: run_batch(*xs), jax.tree.map(split, (batch, seeds)))
    return jnp.swapaxes(videos, 0, 1).reshape((-1,) + videos.shape[2:])

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
