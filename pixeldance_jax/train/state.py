"""Train state, optimiser and sharded initialisation."""

import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from pixeldance_jax.runtime import programs
from pixeldance_jax.data import conditioning
from pixeldance_jax.models import pixeldance
from pixeldance_jax.parallel import sharding

Array = jax.Array
Params = Any


@flax.struct.dataclass
class TrainState:
  step: Array  # int32 scalar: optimiser steps taken.
  params: Params
  ema_params: Params
  opt_state: optax.OptState
  # Pretrained weights that are never trained (outside the optimiser and the EMA):
  # {"autoencoder": KL VAE params} when config.autoencoder.kind == "kl", else {}.
  frozen: Params


# The optimiser's numbers, passed to the jitted step as traced scalars rather than baked into
# the program: a run resumed with more steps, or another learning rate, reuses the compiled step
# (and the persistent compilation cache). Only `lr_schedule` and `ema_warmup` shape the program.
HYPERPARAMETERS = ("learning_rate", "warmup_steps", "num_train_steps", "weight_decay", "adam_b1",
                   "adam_b2", "grad_clip_norm", "ema_decay")
Hyperparameters = dict[str, Array]


def hyperparameters(config: ml_collections.ConfigDict) -> Hyperparameters:
  """The config's optimiser numbers and the conditioning's rates (`conditioning.rates`) as
  float32 scalars (the train step's last argument)."""
  values = {name: np.float32(config[name]) for name in HYPERPARAMETERS}
  values.update({name: np.float32(value) for name, value in conditioning.rates(config).items()})
  return values


def _check_schedule(config: ml_collections.ConfigDict) -> None:
  if config.lr_schedule not in ("constant", "cosine"):
    raise ValueError(f"config.lr_schedule={config.lr_schedule!r} is not 'constant' or 'cosine'")


def learning_rate_schedule(config: ml_collections.ConfigDict,
                           values: Hyperparameters | None = None) -> optax.Schedule:
  """Linear warmup from 0 over `warmup_steps`, then constant or cosine decay to 0 at
  `num_train_steps` (optax's `join_schedules` of a linear and a cosine schedule, written with
  array arithmetic so that its numbers may be traced). `values`: `hyperparameters(config)`,
  possibly traced; by default the config's own."""
  _check_schedule(config)
  values = hyperparameters(config) if values is None else values
  peak, warmup = values["learning_rate"], values["warmup_steps"]
  cosine = config.lr_schedule == "cosine"

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warming = peak * jnp.minimum(step, jnp.maximum(warmup, 1.0)) / jnp.maximum(warmup, 1.0)
    if not cosine:
      return jnp.where(step < warmup, warming, peak)
    decay_steps = jnp.maximum(values["num_train_steps"] - warmup, 1.0)
    progress = jnp.minimum(jnp.maximum(step - warmup, 0.0), decay_steps) / decay_steps
    return jnp.where(step < warmup, warming, peak * 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))
  return schedule


def trainable_labels(params: Params, config: ml_collections.ConfigDict) -> Params:
  """'train' or 'frozen' per parameter subtree (the text encoder is frozen unless asked)."""
  frozen = () if config.text_encoder.trainable else ("text_encoder",)
  return {name: jax.tree.map(lambda _: "frozen" if name in frozen else "train", subtree)
          for name, subtree in params.items()}


def make_optimizer(config: ml_collections.ConfigDict, values: Hyperparameters | None = None
                   ) -> optax.GradientTransformation:
  """Clipped AdamW on the trainable weights; `values` as in `learning_rate_schedule`."""
  values = hyperparameters(config) if values is None else values
  adamw = optax.chain(
      optax.clip_by_global_norm(values["grad_clip_norm"]),
      optax.adamw(learning_rate_schedule(config, values), b1=values["adam_b1"],
                  b2=values["adam_b2"], weight_decay=values["weight_decay"]))
  return optax.multi_transform(
      {"train": adamw, "frozen": optax.set_to_zero()},
      functools.partial(trainable_labels, config=config))


def ema_decay(config: ml_collections.ConfigDict, step: Array,
              values: Hyperparameters | None = None) -> Array:
  """EMA decay at `step`, warmed up as min(decay, (1 + t) / (10 + t)) when configured."""
  decay = jnp.asarray((hyperparameters(config) if values is None else values)["ema_decay"],
                      jnp.float32)
  if not config.ema_warmup:
    return decay
  step = step.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def _init_state(rng: Array, config: ml_collections.ConfigDict) -> TrainState:
  """Boxed (logically partitioned) state: the shapes and axis names of everything."""
  params, frozen = pixeldance.init_boxed_weights(rng, config)
  opt_state = make_optimizer(config).init(params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                    opt_state=opt_state, frozen=frozen)


_BOXED_STATES = programs.ProgramCache()
_INITIALISERS = programs.ProgramCache()


def boxed_state(config: ml_collections.ConfigDict) -> TrainState:
  """The state's shapes with the logical axis names of every leaf (`nn.LogicallyPartitioned`),
  before any mesh or rules apply; nothing materialised."""
  key = programs.config_key(ml_collections.ConfigDict(
      {k: v for k, v in config.items() if k not in ("mesh", "logical_axis_rules")}))
  return _BOXED_STATES.get(key, lambda: jax.eval_shape(
      functools.partial(_init_state, config=config), jax.random.key(0)))


def abstract_state(config: ml_collections.ConfigDict, mesh: Mesh) -> tuple[TrainState, Any]:
  """(ShapeDtypeStruct state with shardings, the shardings tree), nothing materialised. The
  weights are those of `pixeldance.abstract_weights`; the optimiser's moments are sharded like
  the params they track."""
  abstract = sharding.abstract_tree(boxed_state(config), mesh, sharding.logical_rules(config))
  return abstract, jax.tree.map(lambda x: x.sharding, abstract)


def create_train_state(config: ml_collections.ConfigDict, mesh: Mesh, rng: Array
                       ) -> TrainState:
  """Initialises each parameter directly into its shard (never on one device first)."""
  def build():
    _, shardings = abstract_state(config, mesh)
    frozen_config = config.copy_and_resolve_references()
    return jax.jit(lambda r: nn.meta.unbox(_init_state(r, frozen_config)),
                   out_shardings=shardings)
  return _INITIALISERS.get((initialiser_key(config), mesh), build)(rng)


def initialiser_key(config: ml_collections.ConfigDict) -> Any:
  """What the model's initialiser depends on: all but the conditioning section, of which the
  model reads only the keyframe mask (its conv_in's inputs). Variants that differ only in the
  rest (the paper ablation's) share the initialiser."""
  model_config = ml_collections.ConfigDict(
      {k: v for k, v in config.items() if k != "conditioning"})
  model_config.keyframe_mask = config.conditioning.keyframe_mask
  return programs.config_key(model_config)


def state_from_weights(config: ml_collections.ConfigDict, mesh: Mesh, params: Params,
                       frozen: Params) -> TrainState:
  """A fresh train state around given weights (already on their shardings, e.g. a converted
  checkpoint's): the model's initialiser is never compiled, only the optimiser's zeros."""
  _, shardings = abstract_state(config, mesh)
  init = jax.jit(lambda p: make_optimizer(config).init(p), out_shardings=shardings.opt_state)
  # The EMA gets its own buffers: the train step donates both trees.
  return TrainState(step=jax.device_put(np.int32(0), shardings.step), params=params,
                    ema_params=jax.tree.map(jnp.copy, params), opt_state=init(params),
                    frozen=frozen)


def count_params(params: Params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
