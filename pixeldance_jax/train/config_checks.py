"""Training configs checked before any work: `check(config)` raises `ConfigError`.

A misspelled choice (`lr_schedule="cosin"`) would otherwise surface after the dataset is built
and the state initialised, or at the first trace, minutes in. Each check reads the registry
the code itself dispatches on, so the list of valid values has one home; the structural checks
call the same spec constructors the model uses.
"""

from collections.abc import Callable, Collection
from typing import Any

import ml_collections

from pixeldance_jax.runtime.errors import ConfigError, closest
from pixeldance_jax.data import conditioning, loaders
from pixeldance_jax.diffusion import losses, samplers, schedules
from pixeldance_jax.evaluate import suite
from pixeldance_jax.models import autoencoder, text_encoder, unet3d
from pixeldance_jax.train import state as state_lib


def _choices() -> dict[str, Collection[Any]]:
  """Dotted config key -> the values the code accepts."""
  return {
      "data.name": loaders.DATASETS,
      "autoencoder.kind": autoencoder.AUTOENCODERS,
      "text_encoder.hidden_act": text_encoder.ACTIVATIONS,
      "unet.remat_policy": unet3d.REMAT_POLICIES,
      # "" means the default (XLA), like None.
      "unet.attention_impl": [impl or "" for impl in unet3d.ATTENTION_IMPLS],
      "diffusion.beta_schedule": schedules.BETA_SCHEDULES,
      "diffusion.prediction_type": losses.PREDICTION_TYPES,
      "sample.sampler": samplers.SAMPLERS,
      "sample.timestep_spacing": samplers.TIMESTEP_SPACINGS,
  }


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
  for part in key.split("."):
    config = config[part]
  return config


def _choice_error(key: str, value: Any, allowed: Collection[Any]) -> str | None:
  if value in allowed or (value is None and "" in allowed):
    return None
  names = sorted(str(a) for a in allowed)
  close = closest(str(value), names)
  hint = f"; did you mean {close[0]!r}?" if close else ""
  return f"config.{key}={value!r} is not one of {names}{hint}"


# Constructors that validate a part of the config and raise ValueError naming the key.
_VALIDATORS: tuple[Callable[[ml_collections.ConfigDict], Any], ...] = (
    state_lib.learning_rate_schedule,  # lr_schedule
    unet3d.UNetSpec.from_config,  # attention_levels per level, attention_impl with dtype
    text_encoder.TextEncoderSpec.from_config,  # cross_attention_dim == hidden_size
    conditioning.rates,  # Dropout probabilities in [0, 1].
)


def _numbers(config: ml_collections.ConfigDict) -> list[str]:
  """Batch arithmetic that would fail at the first step, and numbers out of their range."""
  errors = []
  if config.batch_size % config.grad_accum_steps:
    errors.append(f"config.batch_size={config.batch_size} is not divisible by "
                  f"config.grad_accum_steps={config.grad_accum_steps}.")
  for key in ("num_train_steps", "log_every_steps", "checkpoint_every_steps"):
    if _get(config, key) < 1:
      errors.append(f"config.{key}={_get(config, key)} must be at least 1.")
  if config.diffusion.min_snr_gamma < 0:
    errors.append(f"config.diffusion.min_snr_gamma={config.diffusion.min_snr_gamma} must be "
                  ">= 0 (0: no Min-SNR weighting).")
  return errors


def _evaluation(config: ml_collections.ConfigDict) -> list[str]:
  """The periodic evaluation's settings, checked before training rather than at its first run."""
  if not config.get("eval_every_steps"):
    return []
  settings = config.eval
  try:
    suite.check_names(suite.names(settings.metrics), suite.names(settings.variants))
  except ValueError as error:
    return [f"config.eval: {error}."]
  if settings.batch_size < 1 or settings.num_videos < 2:
    return [f"config.eval.batch_size={settings.batch_size} must be >= 1 and "
            f"config.eval.num_videos={settings.num_videos} >= 2 (a covariance needs 2)."]
  return []


def check(config: ml_collections.ConfigDict, fresh_start: bool = True) -> None:
  """Raises `ConfigError`, one line per problem, for a config that cannot train.

  `fresh_start`: the workdir has no checkpoint yet, so the weights are initialised here (a KL
  autoencoder then needs `init_from`).
  """
  errors = [error for key, allowed in _choices().items()
            if (error := _choice_error(key, _get(config, key), allowed))]
  if config.data.image_every_k_steps:
    errors += _call(loaders.image_data_config, config)
  if not errors:  # The validators would repeat a bad choice in their own words.
    for validate in _VALIDATORS:
      errors += _call(validate, config)
  errors += _numbers(config)
  errors += _evaluation(config)
  if fresh_start and config.autoencoder.kind == "kl" and not config.init_from:
    errors.append("config.autoencoder.kind='kl' needs pretrained VAE weights: convert a "
                  "diffusers checkpoint with `python -m pixeldance_jax.convert` and pass "
                  "--config.init_from=<its output directory>.")
  if errors:
    raise ConfigError("\n".join(errors))


def _call(validate: Callable[[ml_collections.ConfigDict], Any],
          config: ml_collections.ConfigDict) -> list[str]:
  try:
    validate(config)
  except (ValueError, TypeError, KeyError) as error:
    return [" ".join(str(error).split())]
  return []
