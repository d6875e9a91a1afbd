"""Random weights for tests and benchmarks (not part of the library: nothing trains or samples
with them). Tests import this as `helpers` (pytest puts tests/ on sys.path); scripts outside
tests/ put the repository root on sys.path and import `tests.helpers`."""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pixeldance_jax.runtime import threefry_cpu
from pixeldance_jax.data import media
from pixeldance_jax.evaluate import features
from pixeldance_jax.models import pixeldance
from pixeldance_jax.parallel import mesh as mesh_lib
from pixeldance_jax.sampling import pipeline as sampling_pipeline

threefry_cpu.register()  # As the entry points do (console.run), for every test process.


# A U-Net of one level (no down/upsampling; spatial, temporal and text attention in its mid
# block), for tests of the machinery around the model (processes, resume, data, the CLI): its
# train step compiles much faster than the unit-test U-Net's.
ONE_LEVEL_UNET = {"unet.block_out_channels": (16,), "unet.attention_levels": (False,)}


def one_level_flags() -> list[str]:
  """`ONE_LEVEL_UNET` as command-line overrides."""
  return [f"--config.{key}={value}" for key, value in ONE_LEVEL_UNET.items()]


def synthetic_batch(config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """A fixed global batch in the loader's format (no dataset to generate)."""
  rng = np.random.default_rng(0)
  size, frames, text = config.data.image_size, config.data.frames, config.text_encoder
  return {"video": rng.integers(0, 256, (config.batch_size, frames, size, size, 3), np.uint8),
          "tokens": rng.integers(0, text.vocab_size, (config.batch_size, text.max_length),
                                 dtype=np.int32)}


def random_params(config: ml_collections.ConfigDict, seed: int = 0) -> Any:
  """Random weights of the model's shapes; nothing is zero, so the zero-initialised temporal
  outputs (and through them every frame) act. Filled in numpy from `jax.eval_shape`: no
  initialisation program to compile."""
  shapes = nn.meta.unbox(jax.eval_shape(
      functools.partial(pixeldance.init_boxed_params, config=config), jax.random.key(0)))
  rng = np.random.default_rng(seed)
  def init(path, leaf):
    noise = rng.standard_normal(leaf.shape, np.float32)
    if path[-1].key == "scale":  # Norms.
      return 1.0 + 0.05 * noise
    fan_in = np.prod(leaf.shape[:-1]) if leaf.ndim > 1 else 20.0
    return noise / np.sqrt(fan_in, dtype=np.float32)
  return jax.tree_util.tree_map_with_path(init, shapes)


def random_module_params(module: nn.Module, *inputs: Any, rng: np.random.Generator,
                         scale: float) -> Any:
  """Parameters of `module` on `inputs`, each entry `scale` x a standard normal from `rng`
  (in tree order): nothing zero, so every sublayer acts; no initialiser to compile."""
  shapes = nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), *inputs)["params"])
  return jax.tree.map(lambda x: jnp.asarray(scale * rng.normal(size=x.shape), jnp.float32),
                      shapes)


def random_pipeline(config: ml_collections.ConfigDict, seed: int = 0
                    ) -> sampling_pipeline.Pipeline:
  """A pipeline with `random_params` (a space-to-depth autoencoder: no frozen weights)."""
  if config.autoencoder.kind != "space_to_depth":
    raise ValueError("random_pipeline needs autoencoder.kind='space_to_depth' (no frozen "
                     "weights to draw).")
  mesh = mesh_lib.make_mesh(config.mesh)
  abstract_params, _ = pixeldance.abstract_weights(config, mesh)
  shardings = jax.tree.map(lambda x: x.sharding, abstract_params)
  params = jax.device_put(random_params(config, seed), shardings)
  return sampling_pipeline.make_pipeline(config, params, {}, mesh, weights="random")


def toy_extractor() -> features.Extractor:
  """A stand-in for the metrics' feature networks, for tests of the machinery around them: the
  mean colour of each frame through a fixed projection, `[B, T, 5]`."""
  weights = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)

  def apply(variables, videos):
    return jnp.einsum("btc,cd->btd", videos.astype(jnp.float32).mean((2, 3)) / 255, variables)
  return features.Extractor(name="toy", dim=5, apply=apply, variables=weights,
                            description="toy v1")


class ClipsInMemory:
  """A video set (as `evaluate.videos`' sets) of uint8 clips `[N, T, H, W, 3]`, where the clips
  at `unreadable` indices fail to load."""
  description = "clips in memory"

  def __init__(self, clips: np.ndarray, unreadable: tuple[int, ...] = ()):
    self.clips, self.unreadable = clips, unreadable
    self.clip_shape = clips.shape[1:]

  def __len__(self) -> int:
    return len(self.clips)

  def load(self, index: int) -> tuple[np.ndarray, None]:
    if index in self.unreadable:
      raise media.SkippedInput("unreadable", f"clip {index}")
    return self.clips[index], None
