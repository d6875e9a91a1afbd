"""Feature networks of the video metrics, jitted and sharded over the mesh's batch axes.

An `Extractor` maps a batch of uint8 videos `[B, T, H, W, 3]` to features `[B, K, D]`: one row
per clip for FVD (I3D logits, K = 1), one per frame for FID (Inception pool features) and
CLIPSIM (CLIP image embeddings), K = T. Preprocessing runs inside the jitted function, so only
uint8 pixels cross the host-device boundary. `ShardedExtractor` runs it with a fixed global batch
split over the data x fsdp devices (weights replicated); each process feeds and gets back its
own rows, so statistics accumulate per process and are reduced across hosts once, at the end.

The preprocessing follows the reference implementations (see docs/evaluation.md):
  I3D: clips of 16 frames (shorter clips repeat frames by nearest-neighbour resampling in time,
    longer clips keep their first 16), each frame resized to 224x224 bilinearly without
    antialiasing (torch's `F.interpolate(align_corners=False)`, as StyleGAN-V's FVD does), values
    scaled to [-1, 1]; the features are the 400 Kinetics logits.
  Inception (FID): pytorch-fid's resize to 299x299 and scaling, inside the network module.
  CLIP: CLIP's resize, centre crop and normalisation (`clip.preprocess_frames`).
"""

import dataclasses
import hashlib
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pixeldance_jax.data import tokenizer
from pixeldance_jax.evaluate.networks import clip, i3d, inception_fid
from pixeldance_jax.convert import layouts
from pixeldance_jax.parallel import mesh as mesh_lib

Array = jax.Array
# Bump when the preprocessing of an extractor changes: cached real-data statistics are keyed by it.
PREPROCESSING_VERSION = 1


def resample_frames(videos: Array, frames: int) -> Array:
  """`[B, T, ...]` -> `[B, frames, ...]`: the first `frames` of longer clips; shorter ones
  repeat frames, frame k being source frame floor(k * T / frames) (8 -> each twice)."""
  length = videos.shape[1]
  if length >= frames:
    return videos[:, :frames]
  return videos[:, (np.arange(frames) * length) // frames]


def i3d_preprocess(videos: Array) -> Array:
  """uint8 `[B, T, H, W, 3]` -> float32 `[B, 16, 224, 224, 3]` in [-1, 1]."""
  clips = resample_frames(videos, i3d.NUM_FRAMES).astype(jnp.float32)
  batch, frames, height, width, _ = clips.shape
  images = clips.reshape(batch * frames, height, width, 3)
  resized = inception_fid.resize_bilinear(images, i3d.IMAGE_SIZE, i3d.IMAGE_SIZE)
  return resized.reshape(batch, frames, i3d.IMAGE_SIZE, i3d.IMAGE_SIZE, 3) / 127.5 - 1.0


@dataclasses.dataclass(frozen=True)
class Extractor:
  """A feature network: `apply(variables, uint8 [B, T, H, W, 3]) -> [B, K, dim]`."""
  name: str
  dim: int
  apply: Callable[[Any, Array], Array]
  variables: Any
  description: str  # Identifies network and preprocessing in the real-data statistics' key.


def i3d_extractor() -> Extractor:
  def apply(variables: Any, videos: Array) -> Array:
    return i3d.logits(variables, i3d_preprocess(videos))[:, None]
  return Extractor(name="i3d", dim=i3d.FEATURE_DIM, apply=apply, variables=i3d.load_variables(),
                   description=f"i3d-kinetics-400 logits, 16 frames, 224 bilinear, "
                               f"v{PREPROCESSING_VERSION}")


def per_frame(function: Callable[[Any, Array], Array]) -> Callable[[Any, Array], Array]:
  """An image network `(variables, float [N, H, W, 3] in [0, 1]) -> [N, D]` applied to every
  frame of uint8 `[B, T, H, W, 3]`, giving `[B, T, D]`."""
  def apply(variables: Any, videos: Array) -> Array:
    batch, frames = videos.shape[:2]
    images = videos.reshape((batch * frames,) + videos.shape[2:]).astype(jnp.float32) / 255.0
    features = function(variables, images)
    return features.reshape(batch, frames, features.shape[-1])
  return apply


def _file_digest(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()[:16]


def inception_extractor(weights_path: str) -> Extractor:
  """FID's Inception-v3 pool features of every frame, from pytorch-fid's weights file."""
  variables = inception_fid.load_fid_weights(weights_path)
  return Extractor(name="inception", dim=inception_fid.FEATURE_DIM,
                   apply=per_frame(inception_fid.extract_features), variables=variables,
                   description=f"pytorch-fid inception-v3 pool3 {_file_digest(weights_path)}, "
                               f"299 bilinear, v{PREPROCESSING_VERSION}")


def clip_extractors(folder: str) -> tuple[Extractor, Callable[[list[str]], np.ndarray]]:
  """(CLIP image embeddings of every frame, captions -> unit text embeddings `[n, D]`) from a
  transformers CLIPModel folder. The text side runs on this process's first device."""
  spec, params = layouts.load_clip(folder)
  model = clip.CLIPModel(spec)

  def encode_images(params: Any, images: Array) -> Array:
    pixels = clip.preprocess_frames(images, spec.vision.image_size)
    return model.apply({"params": params}, pixels, method="encode_image")

  local_params = jax.device_put(params, jax.local_devices()[0])

  @jax.jit
  def encode_tokens(token_ids: Array) -> Array:
    embeddings = model.apply({"params": local_params}, token_ids, method="encode_text")
    return embeddings / jnp.linalg.norm(embeddings, axis=-1, keepdims=True)

  def encode_captions(captions: list[str]) -> np.ndarray:
    return np.asarray(encode_tokens(tokenizer.tokenize(captions, spec.text.max_length)))

  image = Extractor(name="clip", dim=spec.projection_dim, apply=per_frame(encode_images),
                    variables=params, description=f"clip {os.path.abspath(folder)}")
  return image, encode_captions


_OPTIMISED = {"xla_backend_optimization_level": 3, "xla_llvm_disable_expensive_passes": False}


def _replicated(tree: Any, mesh: Mesh) -> Any:
  """Host arrays (the same on every process) -> global arrays replicated over `mesh`."""
  sharding = NamedSharding(mesh, PartitionSpec())
  def put(leaf):
    leaf = np.asarray(leaf)
    return jax.make_array_from_callback(leaf.shape, sharding, lambda index: leaf[index])
  return jax.tree.map(put, tree)


class ShardedExtractor:
  """An extractor jitted over `mesh` for a fixed global batch of `global_batch` videos.

  Call it with this process's share of a global batch, at most `local_batch` videos (fewer are
  padded; every process must call it the same number of times). Returns float32 numpy
  `[n, K, dim]` for the n videos given.
  """

  def __init__(self, extractor: Extractor, mesh: Mesh, global_batch: int):
    batch_devices = mesh_lib.batch_devices(mesh)
    if global_batch % batch_devices or global_batch % jax.process_count():
      raise ValueError(f"the evaluation batch ({global_batch}) must be a multiple of the "
                       f"{batch_devices} data x fsdp devices and of the {jax.process_count()} "
                       "processes")
    self.extractor, self.mesh, self.global_batch = extractor, mesh, global_batch
    self.local_batch = global_batch // jax.process_count()
    self._sharding = mesh_lib.batch_sharding(mesh)
    self._variables = _replicated(extractor.variables, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    # Feature networks are large convolution stacks: always compiled optimised, even where a
    # process asks XLA for fast compiles (the test suite does), which would slow them down.
    self._apply = jax.jit(extractor.apply, in_shardings=(replicated, self._sharding),
                          out_shardings=self._sharding, compiler_options=_OPTIMISED)

  def __call__(self, videos: np.ndarray) -> np.ndarray:
    videos = np.asarray(videos, np.uint8)
    count = videos.shape[0]
    if count > self.local_batch:
      raise ValueError(f"{count} videos exceed this process's share ({self.local_batch})")
    padded = np.zeros((self.local_batch,) + videos.shape[1:], np.uint8)
    padded[:count] = videos
    batch = jax.make_array_from_process_local_data(self._sharding, padded)
    features = self._apply(self._variables, batch)
    if jax.process_count() > 1:
      features = multihost_utils.global_array_to_host_local_array(
          features, self.mesh, PartitionSpec(mesh_lib.BATCH_AXES))
    return np.asarray(features, np.float32)[:count]
