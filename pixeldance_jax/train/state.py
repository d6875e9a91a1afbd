"""Train state, optimiser and sharded initialisation."""

import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

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


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  warmup = optax.linear_schedule(0.0, config.learning_rate, max(config.warmup_steps, 1))
  if config.lr_schedule == "constant":
    after = optax.constant_schedule(config.learning_rate)
  elif config.lr_schedule == "cosine":
    after = optax.cosine_decay_schedule(
        config.learning_rate, max(config.num_train_steps - config.warmup_steps, 1))
  else:
    raise ValueError(f"config.lr_schedule={config.lr_schedule!r} is not 'constant' or 'cosine'")
  return optax.join_schedules([warmup, after], [config.warmup_steps])


def trainable_labels(params: Params, config: ml_collections.ConfigDict) -> Params:
  """'train' or 'frozen' per parameter subtree (the text encoder is frozen unless asked)."""
  frozen = () if config.text_encoder.trainable else ("text_encoder",)
  return {name: jax.tree.map(lambda _: "frozen" if name in frozen else "train", subtree)
          for name, subtree in params.items()}


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  adamw = optax.chain(
      optax.clip_by_global_norm(config.grad_clip_norm),
      optax.adamw(learning_rate_schedule(config), b1=config.adam_b1, b2=config.adam_b2,
                  weight_decay=config.weight_decay))
  return optax.multi_transform(
      {"train": adamw, "frozen": optax.set_to_zero()},
      functools.partial(trainable_labels, config=config))


def ema_decay(config: ml_collections.ConfigDict, step: Array) -> Array:
  """EMA decay at `step`, warmed up as min(decay, (1 + t) / (10 + t)) when configured."""
  if not config.ema_warmup:
    return jnp.asarray(config.ema_decay, jnp.float32)
  step = step.astype(jnp.float32)
  return jnp.minimum(config.ema_decay, (1.0 + step) / (10.0 + step))


def _init_state(rng: Array, config: ml_collections.ConfigDict) -> TrainState:
  """Boxed (logically partitioned) state: the shapes and axis names of everything."""
  params, frozen = pixeldance.init_boxed_weights(rng, config)
  opt_state = make_optimizer(config).init(params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                    opt_state=opt_state, frozen=frozen)


def abstract_state(config: ml_collections.ConfigDict, mesh: Mesh) -> tuple[TrainState, Any]:
  """(ShapeDtypeStruct state with shardings, the shardings tree), nothing materialised. The
  weights are those of `pixeldance.abstract_weights`; the optimiser's moments are sharded like
  the params they track."""
  boxed = jax.eval_shape(functools.partial(_init_state, config=config), jax.random.key(0))
  abstract = sharding.abstract_tree(boxed, mesh, sharding.logical_rules(config))
  return abstract, jax.tree.map(lambda x: x.sharding, abstract)


def create_train_state(config: ml_collections.ConfigDict, mesh: Mesh, rng: Array
                       ) -> TrainState:
  """Initialises each parameter directly into its shard (never on one device first)."""
  _, shardings = abstract_state(config, mesh)
  init = jax.jit(lambda r: nn.meta.unbox(_init_state(r, config)), out_shardings=shardings)
  return init(rng)


def count_params(params: Params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
