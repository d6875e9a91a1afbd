"""Conversion of PyTorch (diffusers / transformers) checkpoints to Flax parameter trees.

Generic helpers come first; each model's converter is a self-contained group of functions with
its own prefix (`vae_` for the KL autoencoder, `clip_` for the CLIP text encoder, `clip_model_`
for the full CLIP of the CLIPSIM metric (with `load_clip`), `unet_` for the 3D U-Net).
"""

import dataclasses
import json
import math
import os
import pathlib
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from flax import traverse_util
from flax.core import meta as flax_meta
from safetensors import numpy as safetensors_numpy

from pixeldance_jax.models import autoencoder_kl
from pixeldance_jax.evaluate.networks import clip
from pixeldance_jax.models import text_encoder
from pixeldance_jax.models import unet3d
from pixeldance_jax.io import mismatch

PathTuple = tuple[str, ...]

_SHARD_SUFFIX = re.compile(r"-\d+-of-\d+$")


def _safetensors_variant(filename: str) -> str | None:
  """'diffusion_pytorch_model.fp16.safetensors' -> 'fp16'; no variant -> None."""
  stem = _SHARD_SUFFIX.sub("", filename.removesuffix(".safetensors"))
  parts = stem.split(".")
  return parts[-1] if len(parts) > 1 else None


def load_safetensors_folder(path: str | os.PathLike, variant: str | None = None
                            ) -> dict[str, np.ndarray]:
  """Reads every `*.safetensors` of one variant in a folder (e.g. a diffusers `vae/`).

  diffusers folders often hold the same weights twice (`model.safetensors` and
  `model.fp16.safetensors`); only files of `variant` (None: files without one) are read.
  Shards are merged; a tensor name present in two files is an error.
  """
  folder = pathlib.Path(path)
  files = sorted(f for f in folder.glob("*.safetensors")
                 if _safetensors_variant(f.name) == variant)
  if not files:
    found = sorted(f.name for f in folder.glob("*.safetensors"))
    raise FileNotFoundError(f"No *.safetensors with variant={variant!r} in {folder}; "
                            f"found {found}.")
  tensors: dict[str, np.ndarray] = {}
  for file in files:
    shard = safetensors_numpy.load_file(str(file))
    duplicated = sorted(tensors.keys() & shard.keys())
    if duplicated:
      raise ValueError(f"{file.name} repeats tensors already read: {duplicated[:10]}")
    tensors.update(shard)
  return tensors


def torch_to_flax_leaf(torch_name: str, value: np.ndarray, expected_ndim: int) -> np.ndarray:
  """Lays out a torch tensor as Flax expects: conv OIHW -> HWIO, Conv3d OITHW -> THWIO,
  linear (out, in) -> (in, out).

  A 1x1 conv standing in for a linear layer (old checkpoints) is squeezed first.
  """
  if not torch_name.endswith(".weight"):
    return value
  if value.ndim == 5:
    return value.transpose(2, 3, 4, 1, 0)
  if value.ndim == 4 and expected_ndim == 2:
    if value.shape[2:] != (1, 1):
      return value  # Left as is so the shape check reports it.
    value = value[:, :, 0, 0]
  if value.ndim == 4:
    return value.transpose(2, 3, 1, 0)
  if value.ndim == 2:
    return value.T
  return value


def flax_path_from_torch_name(torch_name: str, weight_ndim: int) -> PathTuple:
  """'a.blocks.0.conv.weight' -> ('a', 'blocks_0', 'conv', 'kernel').

  Torch's `weight` is Flax's `scale` for norms (`weight_ndim` 1) and `kernel` otherwise.
  """
  parts: list[str] = []
  for part in torch_name.split("."):
    if part.isdigit() and parts:
      parts[-1] = f"{parts[-1]}_{part}"
    else:
      parts.append(part)
  if parts[-1] == "weight":
    parts[-1] = "scale" if weight_ndim == 1 else "kernel"
  return tuple(parts)


def convert_tensors(state_dict: Mapping[str, np.ndarray], expected: Mapping[PathTuple, Any],
                    canonical_name: Callable[[str], str], dtype: Any
                    ) -> tuple[dict[PathTuple, np.ndarray], dict[PathTuple, str], list[str]]:
  """Renames and lays out every tensor: (Flax path -> array, Flax path -> torch name, problems).

  `expected` (flat Flax path -> shape) gives each module's weight rank, which decides its Flax
  name and layout; `canonical_name` maps legacy torch names to current ones first.
  """
  weight_ndim = {path[:-1]: len(shape.shape) for path, shape in expected.items()
                 if path[-1] in ("kernel", "scale")}
  converted: dict[PathTuple, np.ndarray] = {}
  sources: dict[PathTuple, str] = {}
  problems: list[str] = []
  for torch_name, value in state_dict.items():
    name, value = canonical_name(torch_name), np.asarray(value)
    module = flax_path_from_torch_name(name, 0)[:-1]
    ndim = weight_ndim.get(module, value.ndim)  # Unknown modules are reported as unexpected.
    path = flax_path_from_torch_name(name, ndim)
    if path in converted:  # E.g. both an old name (`query`) and its new one (`to_q`).
      problems.append(f"duplicate: {torch_name} and {sources[path]} both map to "
                      f"{'/'.join(path)}")
      continue
    array = torch_to_flax_leaf(name, value, ndim)
    converted[path] = array if dtype is None else array.astype(dtype)
    sources[path] = torch_name
  return converted, sources, problems


def check_and_build(converted: Mapping[PathTuple, np.ndarray],
                    expected: Mapping[PathTuple, Any], sources: Mapping[PathTuple, str],
                    what: str, problems: tuple[str, ...] = (), limit: int | None = None
                    ) -> dict[str, Any]:
  """Unflattens `converted` if its names and shapes are exactly `expected`'s, else raises
  `mismatch.check`'s ValueError: missing tensors by Flax path, unexpected ones by torch name,
  misshapen ones by both. `sources` names each path's torch tensor; `problems` are further
  lines found by the caller. `limit`: entries listed per kind (default all)."""
  missing = sorted("/".join(p) for p in expected.keys() - converted.keys())
  unexpected = sorted(sources[p] for p in converted.keys() - expected.keys())
  misshapen = sorted(
      f"{sources[p]}: got {tuple(converted[p].shape)} after transposing, expected "
      f"{tuple(expected[p].shape)} at {'/'.join(p)}"
      for p in converted.keys() & expected.keys()
      if tuple(converted[p].shape) != tuple(expected[p].shape))
  mismatch.check(f"{what}: the checkpoint does not match the model", missing, unexpected,
                 misshapen, other=[("problem", problems)], shown=limit)
  return traverse_util.unflatten_dict(dict(converted))


# ---------------------------------------------------------------------------------------------
# KL autoencoder (diffusers AutoencoderKL).

# diffusers < 0.14 stored the VAE attention as query/key/value/proj_attn (Linear, or 1x1 convs in
# older exports); today's names are to_q/to_k/to_v/to_out.0.
_VAE_ATTENTION_ALIASES = {"query": "to_q", "key": "to_k", "value": "to_v",
                          "proj_attn": "to_out.0"}


def vae_canonical_name(torch_name: str) -> str:
  """Maps the old attention names of `encoder/decoder.mid_block.attentions.0` to today's."""
  parts = torch_name.split(".")
  if "attentions" in parts and len(parts) >= 2 and parts[-2] in _VAE_ATTENTION_ALIASES:
    parts[-2] = _VAE_ATTENTION_ALIASES[parts[-2]]
  return ".".join(parts)


def vae_params_from_torch_state_dict(state_dict: Mapping[str, np.ndarray],
                                     spec: autoencoder_kl.AutoencoderKLSpec,
                                     dtype: Any = np.float32) -> dict[str, Any]:
  """diffusers AutoencoderKL state dict -> params of `autoencoder_kl.AutoencoderKL(spec)`.

  Args:
    state_dict: torch tensor name -> array (e.g. from `load_safetensors_folder(".../vae")`).
    spec: the architecture; the expected names and shapes come from it.
    dtype: cast every tensor to this (None keeps the checkpoint's dtype).

  Raises:
    ValueError: listing every missing, unexpected or mis-shaped tensor.
  """
  expected = traverse_util.flatten_dict(autoencoder_kl.param_shapes(spec))
  converted, sources, problems = convert_tensors(state_dict, expected, vae_canonical_name, dtype)
  return check_and_build(converted, expected, sources, "AutoencoderKL", tuple(problems))


# ---------------------------------------------------------------------------------------------
# CLIP text encoder (transformers CLIPTextModel).

# transformers < 5 (and so the Hub's SD and CLIP checkpoints) nests CLIPTextModel's modules under
# `text_model.`; transformers 5 saves them at the top level. Both are read.
_CLIP_PREFIX = "text_model."
# A buffer that transformers < 4.31 saved; both models recompute it.
_CLIP_IGNORED = frozenset({"embeddings.position_ids"})
_CLIP_EMBEDDINGS = {
    "embeddings.token_embedding.weight": ("token_embedding", "embedding"),
    "embeddings.position_embedding.weight": ("position_embedding",),
}
_CLIP_LAYER = re.compile(
    r"encoder\.layers\.(\d+)\.(self_attn\.(?:q|k|v|out)_proj|layer_norm[12]|mlp\.fc[12])"
    r"\.(weight|bias)")
_CLIP_FINAL_NORM = re.compile(r"final_layer_norm\.(weight|bias)")


def clip_layer_flax_path(name: str) -> PathTuple | None:
  """'encoder.layers.3.self_attn.q_proj.weight' -> ('layers_3', 'q_proj', 'kernel').

  transformers' `CLIPEncoder` names, shared by the text and vision towers; None for others.
  """
  if match := _CLIP_LAYER.fullmatch(name):
    index, module, leaf = match[1], match[2].split(".")[-1], match[3]
    if leaf == "weight":
      leaf = "scale" if module.startswith("layer_norm") else "kernel"
    return (f"layers_{index}", module, leaf)
  return None


def clip_flax_path(torch_name: str) -> PathTuple | None:
  """'[text_model.]encoder.layers.3.self_attn.q_proj.weight' -> ('layers_3', 'q_proj', 'kernel').

  None for a name outside transformers' CLIPTextModel layout.
  """
  name = torch_name.removeprefix(_CLIP_PREFIX)
  if name in _CLIP_EMBEDDINGS:
    return _CLIP_EMBEDDINGS[name]
  if match := _CLIP_FINAL_NORM.fullmatch(name):
    return ("final_layer_norm", "scale" if match[1] == "weight" else "bias")
  return clip_layer_flax_path(name)


def clip_params_from_torch_state_dict(state_dict: Mapping[str, np.ndarray],
                                      spec: text_encoder.TextEncoderSpec,
                                      dtype: Any = np.float32) -> dict[str, Any]:
  """transformers CLIPTextModel state dict -> params of `text_encoder.TextEncoder(spec)`.

  Names may carry the `text_model.` prefix (Hub checkpoints, transformers < 5) or not
  (transformers 5's `save_pretrained`). Linear weights `[out, in]` become kernels `[in, out]`;
  LayerNorm weights become scales. With `spec.use_penultimate_layer` the checkpoint must still
  hold all `spec.num_layers` layers; the last one, which that model never runs, is dropped.

  Args:
    state_dict: torch tensor name -> array (e.g. `load_safetensors_folder(".../text_encoder")`).
    spec: the architecture; the expected names and shapes come from it.
    dtype: cast every tensor to this (None keeps the checkpoint's dtype).

  Returns:
    The TextEncoder's parameter tree (what goes under `{"params": ...}`).

  Raises:
    ValueError: listing every missing, unexpected or mis-shaped tensor.
  """
  full_depth = dataclasses.replace(spec, use_penultimate_layer=False)
  expected = traverse_util.flatten_dict(text_encoder.param_shapes(full_depth))
  converted: dict[PathTuple, np.ndarray] = {}
  sources: dict[PathTuple, str] = {}
  duplicates: list[str] = []
  for torch_name, value in state_dict.items():
    if torch_name.removeprefix(_CLIP_PREFIX) in _CLIP_IGNORED:
      continue
    path = clip_flax_path(torch_name) or ("<not CLIPTextModel>", torch_name)
    if path in converted:  # The same tensor with and without `text_model.`.
      duplicates.append(f"duplicate: {torch_name} and {sources[path]} both map to "
                        f"{'/'.join(path)}")
      continue
    value = np.asarray(value)
    value = value.T if path[-1] == "kernel" else value
    converted[path] = value if dtype is None else value.astype(dtype)
    sources[path] = torch_name
  params = check_and_build(converted, expected, sources, "CLIPTextModel", tuple(duplicates))
  if spec.use_penultimate_layer:
    del params[f"layers_{spec.num_layers - 1}"]
  return params


# ---------------------------------------------------------------------------------------------
# Full CLIP (transformers CLIPModel: both towers and projections), for the CLIPSIM metric.

# Buffers that older transformers saved; the models recompute them.
_CLIP_MODEL_IGNORED = frozenset({"text_model.embeddings.position_ids",
                                 "vision_model.embeddings.position_ids"})
_CLIP_VISION_PREFIX = "vision_model."
_CLIP_VISION_NAMES = {
    "embeddings.class_embedding": ("class_embedding",),
    "embeddings.patch_embedding.weight": ("patch_embedding", "kernel"),
    "embeddings.position_embedding.weight": ("position_embedding",),
    "pre_layrnorm.weight": ("pre_layrnorm", "scale"),
    "pre_layrnorm.bias": ("pre_layrnorm", "bias"),
    "post_layernorm.weight": ("post_layernorm", "scale"),
    "post_layernorm.bias": ("post_layernorm", "bias"),
}
_CLIP_MODEL_NAMES = {
    "text_projection.weight": ("text_projection", "kernel"),
    "visual_projection.weight": ("visual_projection", "kernel"),
    "logit_scale": ("logit_scale",),
}
# transformers' CLIPTextConfig / CLIPVisionConfig / CLIPConfig defaults, for fields a config.json
# leaves out.
_CLIP_TEXT_DEFAULTS = {
    "vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
    "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5, "eos_token_id": 49407}
_CLIP_VISION_DEFAULTS = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 32,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
_CLIP_PROJECTION_DIM = 512


def clip_model_flax_path(torch_name: str) -> PathTuple | None:
  """'vision_model.encoder.layers.0.mlp.fc1.weight' -> ('vision_model', 'layers_0', 'fc1',
  'kernel'); 'text_model.*' as `clip_flax_path` under 'text_model'. None outside CLIPModel."""
  if torch_name in _CLIP_MODEL_NAMES:
    return _CLIP_MODEL_NAMES[torch_name]
  if torch_name.startswith(_CLIP_PREFIX):
    path = clip_flax_path(torch_name)
    return None if path is None else ("text_model", *path)
  if torch_name.startswith(_CLIP_VISION_PREFIX):
    name = torch_name.removeprefix(_CLIP_VISION_PREFIX)
    path = _CLIP_VISION_NAMES.get(name) or clip_layer_flax_path(name)
    return None if path is None else ("vision_model", *path)
  return None


def clip_model_params_from_torch_state_dict(state_dict: Mapping[str, np.ndarray],
                                            spec: clip.CLIPSpec,
                                            dtype: Any = np.float32) -> dict[str, Any]:
  """transformers CLIPModel state dict -> params of `clip.CLIPModel(spec)`.

  Linear weights `[out, in]` become kernels `[in, out]`, the patch conv's OIHW becomes HWIO,
  LayerNorm weights become scales; `*.position_ids` buffers are skipped.

  Raises:
    ValueError: counting the missing, unexpected and mis-shaped tensors and naming the first few.
  """
  expected = traverse_util.flatten_dict(clip.param_shapes(spec))
  converted: dict[PathTuple, np.ndarray] = {}
  sources: dict[PathTuple, str] = {}
  for torch_name, value in state_dict.items():
    if torch_name in _CLIP_MODEL_IGNORED:
      continue
    path = clip_model_flax_path(torch_name) or ("<not CLIPModel>", torch_name)
    value = np.asarray(value)
    if path[-1] == "kernel" and value.ndim == 2:
      value = value.T
    elif path[-1] == "kernel" and value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)
    converted[path] = value if dtype is None else value.astype(dtype)
    sources[path] = torch_name
  return check_and_build(converted, expected, sources, "CLIPModel", limit=5)


def _square(value: Any, field: str, where: str) -> int:
  """An image or patch size: an int, or [n, n] (CLIPVisionConfig allows both)."""
  if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
    value = value[0]
  if not isinstance(value, int):
    raise ValueError(f"{where}: vision_config.{field}={value!r}: only square sizes are supported.")
  return value


def clip_model_spec_from_transformers_config(config: Mapping[str, Any], where: str = "config"
                                             ) -> clip.CLIPSpec:
  """A transformers `CLIPConfig` (config.json's dict) -> `clip.CLIPSpec`.

  Fields a file leaves out take transformers' defaults; old files' `text_config_dict` /
  `vision_config_dict` override `text_config` / `vision_config` as in transformers.

  Raises:
    ValueError: (naming `where`) for a config that is not a CLIPModel's, or one using what the
      Flax model does not implement (LayerNorm eps other than 1e-5, other activations, non-RGB
      or non-square input, several EOS ids).
  """
  if config.get("model_type", "clip") != "clip" or "vision_config" not in config:
    raise ValueError(f"{where}: expected a transformers CLIPModel config (model_type 'clip' with "
                     f"text_config and vision_config), got model_type "
                     f"{config.get('model_type')!r} with keys {sorted(config)}.")
  text = {**_CLIP_TEXT_DEFAULTS, **(config.get("text_config") or {}),
          **(config.get("text_config_dict") or {})}
  vision = {**_CLIP_VISION_DEFAULTS, **(config.get("vision_config") or {}),
            **(config.get("vision_config_dict") or {})}
  for tower, fields in (("text_config", text), ("vision_config", vision)):
    if fields["hidden_act"] not in text_encoder.ACTIVATIONS:
      raise ValueError(f"{where}: {tower}.hidden_act={fields['hidden_act']!r} is not one of "
                       f"{sorted(text_encoder.ACTIVATIONS)}.")
    if not math.isclose(fields["layer_norm_eps"], 1e-5):
      raise ValueError(f"{where}: {tower}.layer_norm_eps={fields['layer_norm_eps']} is not "
                       "supported (the Flax LayerNorms use CLIP's 1e-5).")
    if fields["hidden_size"] % fields["num_attention_heads"]:
      raise ValueError(f"{where}: {tower}.hidden_size={fields['hidden_size']} is not a multiple "
                       f"of num_attention_heads={fields['num_attention_heads']}.")
  if vision["num_channels"] != 3:
    raise ValueError(f"{where}: vision_config.num_channels={vision['num_channels']}; CLIP reads "
                     "RGB (3).")
  if not isinstance(text["eos_token_id"], int):
    raise ValueError(f"{where}: text_config.eos_token_id={text['eos_token_id']!r}: one id "
                     "expected.")
  text_spec = text_encoder.TextEncoderSpec(
      vocab_size=text["vocab_size"], max_length=text["max_position_embeddings"],
      hidden_size=text["hidden_size"], intermediate_size=text["intermediate_size"],
      num_layers=text["num_hidden_layers"], num_heads=text["num_attention_heads"],
      hidden_act=text["hidden_act"])
  vision_spec = clip.VisionSpec(
      image_size=_square(vision["image_size"], "image_size", where),
      patch_size=_square(vision["patch_size"], "patch_size", where),
      hidden_size=vision["hidden_size"], intermediate_size=vision["intermediate_size"],
      num_layers=vision["num_hidden_layers"], num_heads=vision["num_attention_heads"],
      hidden_act=vision["hidden_act"])
  return clip.CLIPSpec(text=text_spec, vision=vision_spec,
                       projection_dim=config.get("projection_dim") or _CLIP_PROJECTION_DIM,
                       eos_token_id=text["eos_token_id"])


def load_clip(folder: str | os.PathLike, dtype: Any = np.float32
              ) -> tuple[clip.CLIPSpec, dict[str, Any]]:
  """A transformers `CLIPModel` folder -> (its spec, params of `clip.CLIPModel(spec)`).

  Reads `config.json` and `model.safetensors` (or the shards that
  `model.safetensors.index.json` names) with safetensors' numpy reader: no torch.

  Raises:
    FileNotFoundError: naming the folder and what it lacks.
    ValueError: for an unsupported config, or weights that do not match it.
  """
  folder = pathlib.Path(folder)
  expectation = ("a transformers CLIPModel folder (config.json and model.safetensors, as "
                 "CLIPModel.save_pretrained writes)")
  if not folder.is_dir():
    raise FileNotFoundError(f"{folder} is not a directory; expected {expectation}.")
  config_path = folder / "config.json"
  if not config_path.is_file():
    raise FileNotFoundError(f"{folder} has no config.json; expected {expectation}.")
  spec = clip_model_spec_from_transformers_config(json.loads(config_path.read_text()),
                                                  str(config_path))
  index_path = folder / "model.safetensors.index.json"
  if index_path.is_file():
    shards = set(json.loads(index_path.read_text())["weight_map"].values())
    absent = sorted(shard for shard in shards if not (folder / shard).is_file())
    if absent:
      raise FileNotFoundError(f"{index_path} names shards that {folder} lacks: {absent}.")
  try:
    state_dict = load_safetensors_folder(folder)
  except FileNotFoundError as error:
    raise FileNotFoundError(f"{error} Expected {expectation}.") from error
  return spec, clip_model_params_from_torch_state_dict(state_dict, spec, dtype)


# ---------------------------------------------------------------------------------------------
# 3D U-Net (diffusers UNet3DConditionModel; UNet2DConditionModel for 2D -> 3D inflation).

# Torch submodules whose Flax module is named otherwise: indices into nn.Sequential/ModuleList
# wrappers that our modules do not have. TemporalConvLayer's convK is Sequential(GroupNorm, SiLU,
# [Dropout,] Conv3d).
_UNET_RENAMES = (
    (re.compile(r"\.to_out\.0\."), ".to_out."),
    (re.compile(r"\.ff\.net\.0\.proj\."), ".ff.proj."),
    (re.compile(r"\.ff\.net\.2\."), ".ff.out."),
    (re.compile(r"(temp_convs\.\d+\.conv\d)\.0\."), r"\1_norm."),
    (re.compile(r"(temp_convs\.\d+\.conv\d)\.[23]\."), r"\1."),
)
_UNET_TEMPORAL_MODULE = re.compile(r"transformer_in|temp_convs_\d+|temp_attentions_\d+")


def unet_canonical_name(torch_name: str) -> str:
  """'...temp_convs.0.conv2.3.weight' -> '...temp_convs.0.conv2.weight' (our module names)."""
  for pattern, replacement in _UNET_RENAMES:
    torch_name = pattern.sub(replacement, torch_name)
  return torch_name


def unet_is_temporal(path: PathTuple) -> bool:
  """Whether a Flax path lies in a temporal layer (absent from 2D checkpoints)."""
  return any(_UNET_TEMPORAL_MODULE.fullmatch(part) for part in path)


def unet_zero_extend_conv_in(converted: dict[PathTuple, np.ndarray],
                             expected: Mapping[PathTuple, Any], latent_channels: int) -> None:
  """Pads a conv_in kernel of `latent_channels` inputs (text-to-video) or twice that (PixelDance
  without the keyframe mask) with zeros up to the expected inputs.

  The model reads `concat([noisy, c_image, mask], -1)`: the checkpoint's kernel keeps its slots
  and the new ones start at zero, so the network computes exactly what the checkpoint did,
  whatever they hold, until training moves them. Any other mismatch is left for
  `check_and_build` to report.
  """
  path = ("conv_in", "kernel")
  kernel, want = converted.get(path), tuple(expected[path].shape)
  if kernel is None or kernel.shape[2] not in (latent_channels, 2 * latent_channels):
    return
  if want[2] <= kernel.shape[2] or kernel.shape[:2] + kernel.shape[3:] != want[:2] + want[3:]:
    return
  padding = ((0, 0), (0, 0), (0, want[2] - kernel.shape[2]), (0, 0))
  converted[path] = np.pad(kernel, padding)


def unet_params_from_torch_state_dict(state_dict: Mapping[str, np.ndarray],
                                      spec: unet3d.UNetSpec, in_channels: int | None = None,
                                      dtype: Any = np.float32) -> dict[str, Any]:
  """diffusers UNet3DConditionModel state dict -> params of `unet3d.UNet3D(spec)`.

  Linear `[out, in]` -> `[in, out]`; Conv2d OIHW -> HWIO; the temporal convs' Conv3d
  `[out, in, 3, 1, 1]` -> `[3, 1, 1, in, out]`; 1x1-conv projections (old exports) are
  squeezed. A conv_in with `spec.out_channels` inputs (a text-to-video checkpoint) is zero-extended
  to `in_channels` (see `unet_zero_extend_conv_in`).

  Args:
    state_dict: torch tensor name -> array (e.g. `load_safetensors_folder(".../unet")`).
    spec: the architecture; the expected names and shapes come from it. Head counts do not show
      in shapes: `spec` must split heads as the checkpoint's model did.
    in_channels: the model's input channels; None: the noisy latent, c_image and the keyframe
      mask's channels (`spec.mask_channels`).
    dtype: cast every tensor to this (None keeps the checkpoint's dtype).

  Returns:
    The UNet3D parameter tree (what goes under `{"params": ...}`), without axis metadata.

  Raises:
    ValueError: listing every missing, unexpected or mis-shaped tensor (PixelDance's
      `text_embedding`, with `spec.pooled_text_embedding`, is missing from any diffusers file).
  """
  expected = traverse_util.flatten_dict(unet3d.param_shapes(spec, in_channels))
  converted, sources, problems = convert_tensors(state_dict, expected, unet_canonical_name, dtype)
  unet_zero_extend_conv_in(converted, expected, spec.out_channels)
  return check_and_build(converted, expected, sources, "UNet3DConditionModel", tuple(problems))


def unet_fresh_temporal_params(spec: unet3d.UNetSpec, rng: jax.Array,
                               in_channels: int | None = None) -> dict[PathTuple, np.ndarray]:
  """Our init of the temporal layers alone, flat; their output projections start at zero.

  Only the temporal leaves leave the jitted init, so XLA never builds the spatial weights.
  """
  def temporal_init(key):
    flat = traverse_util.flatten_dict(flax_meta.unbox(unet3d.init_params(spec, key, in_channels)))
    return {"/".join(path): value for path, value in flat.items() if unet_is_temporal(path)}
  fresh = jax.jit(temporal_init)(rng)
  return {tuple(name.split("/")): np.asarray(value) for name, value in fresh.items()}


def unet_params_from_2d_torch_state_dict(state_dict_2d: Mapping[str, np.ndarray],
                                         spec: unet3d.UNetSpec, rng: jax.Array,
                                         in_channels: int | None = None,
                                         dtype: Any = np.float32) -> dict[str, Any]:
  """Inflates a diffusers UNet2DConditionModel (Stable Diffusion) into `unet3d.UNet3D(spec)`.

  Spatial layers come from the 2D checkpoint (as `unet_params_from_torch_state_dict` converts
  them, conv_in zero-extended); transformer_in, temp_convs and temp_attentions are freshly
  initialised from `rng` with zero output projections, so at init the 3D network equals the 2D
  one on every frame. SD 1.x splits attention into 8 heads: use `spec.num_attention_heads=8`.

  Raises:
    ValueError: listing every missing, unexpected (temporal names included) or mis-shaped tensor.
  """
  full = traverse_util.flatten_dict(unet3d.param_shapes(spec, in_channels))
  spatial = {path: shape for path, shape in full.items() if not unet_is_temporal(path)}
  converted, sources, problems = convert_tensors(state_dict_2d, spatial, unet_canonical_name, dtype)
  unet_zero_extend_conv_in(converted, spatial, spec.out_channels)
  params = traverse_util.flatten_dict(
      check_and_build(converted, spatial, sources, "UNet2DConditionModel", tuple(problems)))
  fresh = unet_fresh_temporal_params(spec, rng, in_channels)
  params.update({path: value if dtype is None else value.astype(dtype)
                 for path, value in fresh.items()})
  return traverse_util.unflatten_dict(params)
