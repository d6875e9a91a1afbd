"""Sampling settings: their names, types, defaults (config.sample) and allowed ranges, checked
in one place for the command line, prompts files and `generate`."""

import math
from collections.abc import Mapping
from typing import Any

import ml_collections

from pixeldance_jax.diffusion import samplers

# Settings a request may give; the rest come from the CLI flags, then config.sample.
SETTINGS = ("tau", "guidance_scale", "guidance_rescale", "steps", "eta", "sampler",
            "timestep_spacing", "seed", "num_clips", "overlap_frames", "redraw_frames")

# The type of each setting: values from JSON or flags are converted, and must convert.
SETTING_TYPES = {"tau": int, "guidance_scale": float, "guidance_rescale": float, "steps": int,
                 "eta": float, "sampler": str, "timestep_spacing": str, "seed": int,
                 "num_clips": int, "overlap_frames": int, "redraw_frames": int}


def default_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  sample_config = config.sample
  return {"tau": sample_config.tau, "guidance_scale": sample_config.guidance_scale,
          "guidance_rescale": sample_config.guidance_rescale, "steps": sample_config.num_steps,
          "eta": sample_config.eta, "sampler": sample_config.sampler,
          "timestep_spacing": sample_config.timestep_spacing, "seed": 0, "num_clips": 1,
          "overlap_frames": 1, "redraw_frames": 0}


def convert_setting(name: str, value: Any) -> Any:
  if name not in SETTING_TYPES:
    raise ValueError(f"unknown setting {name!r}; known: {list(SETTINGS)}")
  kind = SETTING_TYPES[name]
  if kind is int and isinstance(value, float) and not value.is_integer():
    raise ValueError(f"{name}={value!r} is not an integer")
  try:
    return kind(value)
  except (TypeError, ValueError, OverflowError) as error:  # int(inf) overflows.
    raise ValueError(f"{name}={value!r} is not a {kind.__name__}") from error


def _finite(value: float) -> bool:
  return math.isfinite(value)


_INT32_MAX = 2**31 - 1  # Seeds and tau are int32 inputs of the sampling program.

# setting -> (whether a value is allowed, what is allowed); steps' upper bound is the config's.
_RANGES = {
    "guidance_scale": (_finite, "a finite number"),
    "guidance_rescale": (lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),  # NaN fails too.
    "eta": (lambda v: _finite(v) and v >= 0.0, "a finite number >= 0 (0 = deterministic DDIM)"),
    "tau": (lambda v: 0 <= v <= _INT32_MAX,
            ">= 0 and < 2**31 (sampler steps that see the last frame)"),
    "seed": (lambda v: -_INT32_MAX - 1 <= v <= _INT32_MAX, "a 32-bit integer (|seed| < 2**31)"),
    "steps": (lambda v: v >= 1, ">= 1"),
    "num_clips": (lambda v: v >= 1, ">= 1"),
    "overlap_frames": (lambda v: v >= 1, ">= 1 (a long video's frames carried into the next clip)"),
    "redraw_frames": (lambda v: v >= 0, ">= 0 (a clip's last frames the next clip draws again)"),
    "sampler": (lambda v: v in samplers.SAMPLERS, f"one of {sorted(samplers.SAMPLERS)}"),
    "timestep_spacing": (lambda v: v in samplers.TIMESTEP_SPACINGS,
                         f"one of {list(samplers.TIMESTEP_SPACINGS)}"),
}


def check_settings(settings: Mapping[str, Any], num_train_timesteps: int | None = None) -> None:
  """Raises a one-line ValueError for a setting out of range: a non-finite guidance scale or
  eta, a rescale outside [0, 1], eta or tau < 0, a seed or tau beyond int32, steps < 1 or
  > num_train_timesteps, an unknown sampler or spacing, num_clips or overlap_frames < 1,
  redraw_frames < 0.

  Settings that are absent or None are not checked, nor the upper bound of steps without
  `num_train_timesteps`: the CLI checks its flags this way before reading a checkpoint.
  """
  for name, value in settings.items():
    if value is None or name not in _RANGES:
      continue
    allowed, description = _RANGES[name]
    value = convert_setting(name, value)
    if name == "steps" and num_train_timesteps is not None:
      allowed = lambda v: 1 <= v <= num_train_timesteps
      description = f"in [1, {num_train_timesteps}] (the model's training timesteps)"
    if not allowed(value):
      raise ValueError(f"{name}={value!r} must be {description}")
