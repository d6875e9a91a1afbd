"""A diffusers / Hugging Face model folder converted into a PixelDance Orbax checkpoint
(`convert`, the library behind `python -m pixeldance_jax.convert`).

The folder may hold `unet/` (a UNet3DConditionModel, or a UNet2DConditionModel that is inflated
with fresh temporal layers), `vae/` (AutoencoderKL), `text_encoder/` (CLIPTextModel) and
`tokenizer/`, each with safetensors weights. Every tensor name and shape must match the config;
anything missing or left over is an error listing all of it. What the folder lacks keeps its
random initialisation (and is reported). The output serves as `train.py --config.init_from=...`
and as `sample.py --workdir=...`.
"""

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from pixeldance_jax.io import checkpoints
from pixeldance_jax.models import autoencoder_kl
from pixeldance_jax.convert import layouts
from pixeldance_jax.models import pixeldance, text_encoder, unet3d
from pixeldance_jax.parallel import mesh as mesh_lib


def _class_name(folder: str) -> str | None:
  path = os.path.join(folder, "config.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f).get("_class_name")


def _convert_unet(folder: str, config: ml_collections.ConfigDict, seed: int) -> Any:
  spec = unet3d.UNetSpec.from_config(config)
  state_dict = layouts.load_safetensors_folder(folder)
  if _class_name(folder) == "UNet2DConditionModel":
    logging.info("inflating the 2D U-Net in %s to 3D (fresh temporal layers)", folder)
    return layouts.unet_params_from_2d_torch_state_dict(state_dict, spec,
                                                            jax.random.key(seed))
  return layouts.unet_params_from_torch_state_dict(state_dict, spec)


def _convert_text_encoder(folder: str, config: ml_collections.ConfigDict) -> Any:
  spec = text_encoder.TextEncoderSpec.from_config(config)
  return layouts.clip_params_from_torch_state_dict(
      layouts.load_safetensors_folder(folder), spec)


def _convert_vae(folder: str, config: ml_collections.ConfigDict) -> Any:
  spec = autoencoder_kl.AutoencoderKLSpec.from_config(config)
  return layouts.vae_params_from_torch_state_dict(
      layouts.load_safetensors_folder(folder), spec)


def _check_tokenizer(folder: str, config: ml_collections.ConfigDict) -> None:
  """Our tokenizer is CLIP's BPE; a tokenizer folder must agree on the vocabulary size."""
  vocab_path = os.path.join(folder, "vocab.json")
  if not os.path.exists(vocab_path):
    return
  with open(vocab_path) as f:
    size = len(json.load(f))
  if size != config.text_encoder.vocab_size:
    raise ValueError(f"{vocab_path} has {size} tokens; config.text_encoder.vocab_size is "
                     f"{config.text_encoder.vocab_size} (the CLIP BPE has 49408).")


def _place(tree: Any, abstract: Any) -> Any:
  """Host numpy arrays -> device arrays on the abstract tree's shardings (shapes checked)."""
  def one(value, target):
    if value.shape != target.shape:
      raise ValueError(f"converted shape {value.shape} != expected {target.shape}")
    return jax.device_put(np.asarray(value, target.dtype), target.sharding)
  return jax.tree.map(one, tree, abstract)


def convert(config: ml_collections.ConfigDict, model_dir: str, output: str, seed: int = 0
            ) -> list[str]:
  """Writes the converted checkpoint to `output`; returns the parts that were converted."""
  if not os.path.isdir(model_dir):
    raise FileNotFoundError(f"--model_dir={model_dir} is not a directory.")
  mesh = mesh_lib.make_mesh(config.mesh)
  abstract_params, abstract_frozen = pixeldance.abstract_weights(config, mesh)
  converters = {"unet": lambda d: _convert_unet(d, config, seed),
                "text_encoder": lambda d: _convert_text_encoder(d, config)}
  if config.autoencoder.kind == "kl":
    converters["vae"] = lambda d: _convert_vae(d, config)
  # Convert (and check against the config) first; initialise only what the folder lacks.
  params, frozen, converted = {}, {}, []
  for part, converter in converters.items():
    folder = os.path.join(model_dir, part)
    if not os.path.isdir(folder):
      logging.warning("%s has no %s/: it keeps its random initialisation.", model_dir, part)
      continue
    if part == "vae":
      frozen["autoencoder"] = _place(converter(folder), abstract_frozen["autoencoder"])
    else:
      params[part] = _place(converter(folder), abstract_params[part])
    converted.append(part)
  if set(params) != set(abstract_params) or set(frozen) != set(abstract_frozen):
    random_params, random_frozen = pixeldance.init_weights(config, mesh, jax.random.key(seed))
    params, frozen = {**random_params, **params}, {**random_frozen, **frozen}
  if os.path.isdir(os.path.join(model_dir, "tokenizer")):
    _check_tokenizer(os.path.join(model_dir, "tokenizer"), config)
  checkpoints.save_pretrained(output, params, frozen, config)
  return converted
