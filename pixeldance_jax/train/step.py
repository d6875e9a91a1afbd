"""The jitted PixelDance train step."""

import functools
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from pixeldance_jax.runtime import programs
from pixeldance_jax.data import tokenizer
from pixeldance_jax.data import conditioning
from pixeldance_jax.diffusion import losses, schedules
from pixeldance_jax.models import autoencoder as autoencoder_lib
from pixeldance_jax.models import pixeldance
from pixeldance_jax.parallel import mesh as mesh_lib
from pixeldance_jax.parallel import sharding
from pixeldance_jax.train import state as state_lib

Array = jax.Array
Batch = dict[str, Array]
# (params, frozen, batch, rng, config, use_temporal, condition_rates) -> (loss, metrics).
LossFn = Callable[..., tuple[Array, dict[str, Array]]]


def null_token_ids(config: ml_collections.ConfigDict) -> Array:
  """Token ids of the empty prompt, the unconditional branch of classifier-free guidance."""
  text = config.text_encoder
  return jnp.asarray(tokenizer.empty_prompt_tokens(text.max_length, text.pad_token_id))


def loss_fn(params, frozen, batch: Batch, rng: Array, config: ml_collections.ConfigDict,
            use_temporal: bool = True, condition_rates: dict[str, Array] | None = None
            ) -> tuple[Array, dict[str, Array]]:
  """Denoising loss of one batch; conditions and noise are drawn from `rng`.

  `frozen` holds the pretrained weights that are not trained (the KL autoencoder's).
  `condition_rates`: `conditioning.rates(config)`, possibly traced (the default).
  `train.latent_cache.cached_loss_fn` is the same loss on pre-encoded batches.
  """
  model = pixeldance.make_model(config)
  autoencoder = autoencoder_lib.make_autoencoder(config, frozen.get("autoencoder"))
  alpha_bar = jnp.asarray(schedules.alphas_cumprod(config.diffusion))
  cond_rng, time_rng, noise_rng, dropout_rng, encode_rng = jax.random.split(rng, 5)

  latents = autoencoder.encode(autoencoder_lib.to_pixels(batch["video"]), encode_rng)
  image_condition, token_ids = conditioning.training_conditions(
      cond_rng, latents, batch["tokens"], null_token_ids(config), alpha_bar, config,
      condition_rates)
  context = model.apply({"params": params}, token_ids, method=pixeldance.PixelDance.encode_text)
  if not config.text_encoder.trainable:
    context = jax.lax.stop_gradient(context)
  return denoising_loss(params, model, latents, image_condition, context,
                        (time_rng, noise_rng, dropout_rng), alpha_bar, config, use_temporal)


def denoising_loss(params, model, latents: Array, image_condition: Array, context: Array,
                   rngs: tuple[Array, Array, Array], alpha_bar: Array,
                   config: ml_collections.ConfigDict, use_temporal: bool
                   ) -> tuple[Array, dict[str, Array]]:
  """The epsilon / v / z_0 regression from clean latents, c_image and the text context.

  rngs: the (timestep, noise, dropout) keys. Metrics: the loss and its timestep buckets.
  """
  time_rng, noise_rng, dropout_rng = rngs
  timesteps = jax.random.randint(time_rng, (latents.shape[0],), 0,
                                 config.diffusion.num_train_timesteps)
  noise = jax.random.normal(noise_rng, latents.shape, latents.dtype)
  noisy = schedules.add_noise(alpha_bar, latents, noise, timesteps)
  prediction = model.apply({"params": params}, jnp.concatenate([noisy, image_condition], -1),
                           timesteps, context, use_temporal, False,
                           method=pixeldance.PixelDance.denoise, rngs={"dropout": dropout_rng})
  per_example = losses.per_example_loss(config.diffusion.prediction_type, prediction, alpha_bar,
                                        latents, noise, timesteps,
                                        config.diffusion.min_snr_gamma)
  return per_example.mean(), {"loss": per_example.mean(),
                              **timestep_buckets(per_example, timesteps, config)}


TIMESTEP_BUCKETS = 4


def timestep_buckets(per_example: Array, timesteps: Array, config: ml_collections.ConfigDict
                     ) -> dict[str, Array]:
  """Sum and count of the loss in each quarter of [0, num_train_timesteps), for the logs."""
  bucket = timesteps * TIMESTEP_BUCKETS // config.diffusion.num_train_timesteps
  one_hot = jax.nn.one_hot(bucket, TIMESTEP_BUCKETS, dtype=jnp.float32)
  return {"bucket_loss_sum": one_hot.T @ per_example, "bucket_count": one_hot.sum(axis=0)}


def _microbatches(batch: Batch, count: int) -> Batch:
  """`[batch, ...]` -> `[count, batch // count, ...]`, microbatch i holding examples i, i +
  count, ...: each microbatch stays spread over every data-parallel device."""
  def split(x):
    if x.shape[0] % count:
      raise ValueError(f"config.grad_accum_steps={count} does not divide the batch of "
                       f"{x.shape[0]}.")
    return jnp.swapaxes(x.reshape((x.shape[0] // count, count) + x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def loss_and_grads(params, frozen, batch: Batch, rng: Array, config: ml_collections.ConfigDict,
                   use_temporal: bool = True, loss: LossFn = loss_fn,
                   condition_rates: dict[str, Array] | None = None):
  """Mean loss, metrics and gradients, over `config.grad_accum_steps` microbatches.

  Microbatch i draws its conditions and noise from `fold_in(rng, i)`; with one microbatch the
  step's own rng is used. Gradients are averaged in float32 inside a `lax.scan`, so only one
  microbatch's activations are alive at a time.
  """
  grad_fn = jax.value_and_grad(loss, has_aux=True)
  count = config.grad_accum_steps
  if count == 1:
    (_, metrics), grads = grad_fn(params, frozen, batch, rng, config, use_temporal,
                                  condition_rates)
    return metrics, grads

  def accumulate(grads_sum, inputs):
    index, microbatch = inputs
    microbatch = jax.tree.map(
        lambda x: nn.with_logical_constraint(x, ("batch",) + (None,) * (x.ndim - 1)),
        microbatch)
    (_, metrics), grads = grad_fn(params, frozen, microbatch, jax.random.fold_in(rng, index),
                                  config, use_temporal, condition_rates)
    return jax.tree.map(jnp.add, grads_sum, grads), metrics

  zeros = jax.tree.map(jnp.zeros_like, params)
  grads_sum, metrics = jax.lax.scan(accumulate, zeros,
                                    (jnp.arange(count), _microbatches(batch, count)))
  metrics = {"loss": metrics["loss"].mean(), "bucket_loss_sum": metrics["bucket_loss_sum"].sum(0),
             "bucket_count": metrics["bucket_count"].sum(0)}
  return metrics, jax.tree.map(lambda g: g / count, grads_sum)


def _update(state: state_lib.TrainState, grads, config: ml_collections.ConfigDict,
            hyperparameters: state_lib.Hyperparameters) -> state_lib.TrainState:
  tx = state_lib.make_optimizer(config, hyperparameters)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay = state_lib.ema_decay(config, state.step, hyperparameters)
  ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
  return state.replace(step=state.step + 1, params=params, ema_params=ema_params,
                       opt_state=opt_state)


def gradients(state: state_lib.TrainState, batch: Batch, base_rng: Array,
              hyperparameters: state_lib.Hyperparameters, config: ml_collections.ConfigDict,
              use_temporal: bool = True, loss: LossFn = loss_fn) -> tuple[Any, dict[str, Array]]:
  """(gradients, metrics) of one step: the first half of `train_step`.

  The step's randomness is `fold_in(base_rng, step)`, so a resumed run replays it exactly.
  `metrics["finite"]` says whether the loss and the gradients are finite.
  """
  rng = jax.random.fold_in(base_rng, state.step)
  condition_rates = conditioning.rates_at_step(
      {name: hyperparameters[name] for name in conditioning.RATES}, state.step)
  metrics, grads = loss_and_grads(state.params, state.frozen, batch, rng, config, use_temporal,
                                  loss, condition_rates)
  grad_norm = optax.tree.norm(grads)
  metrics.update(grad_norm=grad_norm,
                 finite=jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm),
                 learning_rate=state_lib.learning_rate_schedule(config, hyperparameters)(state.step))
  return grads, metrics


def apply_gradients(state: state_lib.TrainState, grads, finite: Array,
                    hyperparameters: state_lib.Hyperparameters,
                    config: ml_collections.ConfigDict) -> state_lib.TrainState:
  """The optimiser's update and the EMA: the second half of `train_step`. A non-finite step
  (`finite` False) leaves the state unchanged."""
  # A branch, not a select between the new state and the old: with both alive at the end, XLA
  # copies every donated array before updating it.
  return jax.lax.cond(finite, lambda s, g: _update(s, g, config, hyperparameters),
                      lambda s, g: s, state, grads)


def train_step(state: state_lib.TrainState, batch: Batch, base_rng: Array,
               hyperparameters: state_lib.Hyperparameters, config: ml_collections.ConfigDict,
               use_temporal: bool = True, loss: LossFn = loss_fn
               ) -> tuple[state_lib.TrainState, dict[str, Array]]:
  """One optimiser step (`gradients`, then `apply_gradients`).

  `hyperparameters`: `state.hyperparameters(config)`, traced (learning rate, schedule length,
  Adam and EMA numbers, the conditioning's dropout rates and switches), so that changing them
  does not change the program.
  """
  grads, metrics = gradients(state, batch, base_rng, hyperparameters, config, use_temporal, loss)
  return apply_gradients(state, grads, metrics["finite"], hyperparameters, config), metrics


class _Program:
  """A jitted function over a mesh and, once compiled, its executable, compile time and FLOPs
  per device."""

  def __init__(self, jitted, mesh: Mesh):
    self.jitted, self.mesh = jitted, mesh
    self.compiled = None
    self.compile_seconds = 0.0
    self.flops_per_device = 0.0

  def lower(self, *args) -> jax.stages.Lowered:
    # The mesh context lets activation constraints (logical names) resolve while tracing.
    with jax.set_mesh(self.mesh):
      return self.jitted.lower(*args)

  def compile(self, lowered: jax.stages.Lowered, start: float) -> None:
    """Compiles `lowered` (lowering began at `start`, a `time.perf_counter()`)."""
    self.compiled = lowered.compile()
    self.compile_seconds = time.perf_counter() - start
    cost = self.compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    self.flops_per_device = float((cost or {}).get("flops", 0.0))

  def __call__(self, *args):
    if self.compiled is None:
      start = time.perf_counter()
      self.compile(self.lower(*args), start)
    with jax.set_mesh(self.mesh):
      return self.compiled(*args)


class CompiledStep:
  """A jitted step, called as `step(state, batch, rng)`, compiled ahead of time on first use.

  One program (`train_step`), or two with `config.separate_update`: "gradients" and "update"
  (`apply_gradients`, with the state donated). The step passes the config's
  optimiser hyperparameters itself (traced: see `train_step`). Compiling explicitly gives the
  compile time and XLA's FLOP count of the programs (per device, as partitioned), which the
  trainer turns into TFLOP/s and MFU.
  """

  def __init__(self, programs_: dict[str, _Program], param_shardings: Any,
               hyperparameters: state_lib.Hyperparameters):
    self._programs, self._param_shardings = programs_, param_shardings
    self._hyperparameters = hyperparameters

  @property
  def is_compiled(self) -> bool:
    return all(program.compiled is not None for program in self._programs.values())

  @property
  def compile_seconds(self) -> float:
    return sum(program.compile_seconds for program in self._programs.values())

  @property
  def flops_per_device(self) -> float:
    return sum(program.flops_per_device for program in self._programs.values())

  def _update_arguments(self, state) -> tuple[Any, jax.ShapeDtypeStruct]:
    """Abstract (gradients, finite) of the update program for this state."""
    grads = jax.tree.map(lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s),
                         state.params, self._param_shardings)
    return grads, jax.ShapeDtypeStruct((), jnp.bool_)

  @property
  def program_names(self) -> tuple[str, ...]:
    """("step",), or ("gradients", "update") with `config.separate_update`."""
    return tuple(self._programs)

  def lower(self, state, batch: Batch, rng: Array, names: tuple[str, ...] = ()
            ) -> dict[str, jax.stages.Lowered]:
    """The lowered programs by name (`names`, default all) for these (possibly abstract)
    arguments."""
    hyperparameters, lowered = self._hyperparameters, {}
    for name in names or self.program_names:
      if name == "update":
        grads, finite = self._update_arguments(state)
        lowered[name] = self._programs[name].lower(state, grads, finite, hyperparameters)
      else:
        lowered[name] = self._programs[name].lower(state, batch, rng, hyperparameters)
    return lowered

  def compile(self, lowered: dict[str, jax.stages.Lowered]) -> float:
    """Compiles the programs `lower` returned that are not compiled yet; the seconds it took."""
    start = time.perf_counter()
    for name, program in lowered.items():
      if self._programs[name].compiled is None:
        self._programs[name].compile(program, time.perf_counter())
    return time.perf_counter() - start

  @property
  def executables(self) -> dict[str, jax.stages.Compiled]:
    """The compiled programs by name (those compiled so far)."""
    return {name: program.compiled for name, program in self._programs.items()
            if program.compiled is not None}

  def __call__(self, state, batch: Batch, rng: Array):
    if "step" in self._programs:
      return self._programs["step"](state, batch, rng, self._hyperparameters)
    grads, metrics = self._programs["gradients"](state, batch, rng, self._hyperparameters)
    state = self._programs["update"](state, grads, metrics["finite"], self._hyperparameters)
    return state, metrics


_PROGRAMS = programs.ProgramCache()
# What the step program may read of the config (anything else fails loudly when traced). The
# optimiser's numbers and the conditioning's rates are not here: they are the traced
# `hyperparameters` argument.
PROGRAM_FIELDS = ("autoencoder", "conditioning.last_frame_candidates",
                  "conditioning.noise_timestep", "conditioning.keyframe_prob",
                  "conditioning.keyframe_max_count", "conditioning.leading_frames_prob",
                  "conditioning.max_leading_frames", "conditioning.keyframe_mask",
                  "diffusion", "text_encoder", "unet",
                  "logical_axis_rules", "lr_schedule", "ema_warmup", "grad_accum_steps",
                  "data.frames", "data.image_size", "data.cache_latents", "separate_update")


def jit_train_step(config: ml_collections.ConfigDict, mesh: Mesh, state_shardings: Any,
                   use_temporal: bool = True, loss: LossFn = loss_fn) -> CompiledStep:
  """`train_step` jitted over the mesh with the state donated (one program, or the gradients'
  and the update's with `config.separate_update`; the update program is shared by the steps of
  a process that differ only in `use_temporal` and `loss`).

  `use_temporal=False` is the image step of joint training: the same weights, temporal layers
  skipped, batches of single frames. `loss` is `loss_fn`, or `latent_cache.cached_loss_fn` for
  pre-encoded batches. The programs see only the `PROGRAM_FIELDS` of the config, so that
  configs differing elsewhere (the optimiser's numbers, logging, data sizes) share them in a
  process.
  """
  program_config = programs.program_config(config, PROGRAM_FIELDS)
  leaves, treedef = jax.tree.flatten(state_shardings)
  key = (programs.config_key(program_config), mesh, tuple(leaves), treedef)
  rules = sharding.logical_rules(program_config)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  # (state, batch, rng, hyperparameters), the arguments of the whole step and of its gradients.
  step_in = (state_shardings, mesh_lib.batch_sharding(mesh), replicated, replicated)
  options = mesh_lib.train_compiler_options(mesh)

  def in_rules(function):
    def wrapped(*args):
      with nn.logical_axis_rules(rules):
        return function(*args)
    return wrapped

  def build_step() -> _Program:
    step = functools.partial(train_step, config=program_config, use_temporal=use_temporal,
                             loss=loss)
    return _Program(jax.jit(in_rules(step), donate_argnums=0,
                            in_shardings=step_in,
                            out_shardings=(state_shardings, replicated),
                            compiler_options=options), mesh)

  def build_gradients() -> _Program:
    step = functools.partial(gradients, config=program_config, use_temporal=use_temporal,
                             loss=loss)
    # The whole state stays an argument (the moments and EMA are on the device meanwhile), so
    # the program's memory plan counts them.
    return _Program(jax.jit(in_rules(step), keep_unused=True,
                            in_shardings=step_in,
                            out_shardings=(state_shardings.params, replicated),
                            compiler_options=options), mesh)

  def build_update() -> _Program:
    update = functools.partial(apply_gradients, config=program_config)
    return _Program(jax.jit(in_rules(update), donate_argnums=0,
                            in_shardings=(state_shardings, state_shardings.params, replicated,
                                          replicated),
                            out_shardings=state_shardings, compiler_options=options), mesh)

  if program_config.separate_update:
    programs_ = {"gradients": _PROGRAMS.get(key + ("gradients", use_temporal, loss),
                                            build_gradients),
                 "update": _PROGRAMS.get(key + ("update",), build_update)}
  else:
    programs_ = {"step": _PROGRAMS.get(key + ("step", use_temporal, loss), build_step)}
  return CompiledStep(programs_, state_shardings.params, state_lib.hyperparameters(config))
