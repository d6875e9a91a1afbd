"""Conversion of PyTorch (diffusers / transformers) checkpoints to Flax parameter trees.

Generic helpers come first; each model's converter is a self-contained group of functions with
its own prefix (`vae_` for the KL autoencoder, `clip_` for the CLIP text encoder).
"""

import dataclasses
import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util
from safetensors import numpy as safetensors_numpy

from pixeldance_jax.models import autoencoder_kl
from pixeldance_jax.models import text_encoder

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
  """Lays out a torch tensor as Flax expects: conv OIHW -> HWIO, linear (out, in) -> (in, out).

  A 1x1 conv standing in for a linear layer (old checkpoints) is squeezed first.
  """
  if not torch_name.endswith(".weight"):
    return value
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


def check_and_build(converted: Mapping[PathTuple, np.ndarray],
                    expected: Mapping[PathTuple, Any], sources: Mapping[PathTuple, str],
                    what: str, problems: tuple[str, ...] = ()) -> dict[str, Any]:
  """Unflattens `converted` if its names and shapes are exactly `expected`'s.

  Otherwise raises one ValueError listing every missing, unexpected and mis-shaped tensor, so a
  bad checkpoint is diagnosed in one run. `sources` names each path's torch tensor; `problems`
  are further lines found by the caller.
  """
  missing = sorted("/".join(p) for p in expected.keys() - converted.keys())
  unexpected = sorted(sources[p] for p in converted.keys() - expected.keys())
  mis_shaped = sorted(
      f"{sources[p]}: got {tuple(converted[p].shape)} after transposing, expected "
      f"{tuple(expected[p].shape)} at {'/'.join(p)}"
      for p in converted.keys() & expected.keys()
      if tuple(converted[p].shape) != tuple(expected[p].shape))
  if missing or unexpected or mis_shaped or problems:
    lines = [f"{what}: the checkpoint does not match the model."]
    lines += [f"  {problem}" for problem in problems]
    lines += [f"  missing (Flax path): {name}" for name in missing]
    lines += [f"  unexpected (torch name): {name}" for name in unexpected]
    lines += [f"  shape mismatch: {line}" for line in mis_shaped]
    raise ValueError("\n".join(lines))
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
  # Rank of each module's weight (kernel or scale), which decides its Flax name and layout.
  weight_ndim = {path[:-1]: len(shape.shape) for path, shape in expected.items()
                 if path[-1] in ("kernel", "scale")}
  converted: dict[PathTuple, np.ndarray] = {}
  sources: dict[PathTuple, str] = {}
  duplicates: list[str] = []
  for torch_name, value in state_dict.items():
    name, value = vae_canonical_name(torch_name), np.asarray(value)
    module = flax_path_from_torch_name(name, 0)[:-1]
    ndim = weight_ndim.get(module, value.ndim)  # Unknown modules are reported as unexpected.
    path = flax_path_from_torch_name(name, ndim)
    if path in converted:  # E.g. both the old `query` and the new `to_q`.
      duplicates.append(f"duplicate: {torch_name} and {sources[path]} both map to "
                        f"{'/'.join(path)}")
      continue
    array = torch_to_flax_leaf(name, value, ndim)
    converted[path] = array if dtype is None else array.astype(dtype)
    sources[path] = torch_name
  return check_and_build(converted, expected, sources, "AutoencoderKL", tuple(duplicates))


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


def clip_flax_path(torch_name: str) -> PathTuple | None:
  """'[text_model.]encoder.layers.3.self_attn.q_proj.weight' -> ('layers_3', 'q_proj', 'kernel').

  None for a name outside transformers' CLIPTextModel layout.
  """
  name = torch_name.removeprefix(_CLIP_PREFIX)
  if name in _CLIP_EMBEDDINGS:
    return _CLIP_EMBEDDINGS[name]
  if match := _CLIP_FINAL_NORM.fullmatch(name):
    return ("final_layer_norm", "scale" if match[1] == "weight" else "bias")
  if match := _CLIP_LAYER.fullmatch(name):
    index, module, leaf = match[1], match[2].split(".")[-1], match[3]
    if leaf == "weight":
      leaf = "scale" if module.startswith("layer_norm") else "kernel"
    return (f"layers_{index}", module, leaf)
  return None


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
