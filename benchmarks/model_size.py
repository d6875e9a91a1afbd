"""Parameter counts and per-device training memory of the paper config, nothing materialised.

  python benchmarks/model_size.py [--config=configs/pixeldance.py] [--config.batch_size=192]
      [--config.unet.block_out_channels=(320,640,1280,1280)] (any field of the config)

Parameters and state: `state.abstract_state` on 8 and 64 fake CPU devices (mesh fsdp = all
chips), summing each leaf's per-shard bytes under its real NamedSharding.

Activations: the residuals `jax.vjp` keeps for the backward pass of the U-Net (shapes from
`jax.eval_shape`, at the compute dtype), measured at batch 1 and 2 so that their difference is
the per-example cost (the rest are weights cast for the backward, which do not grow with the
batch). "Per-layer remat" wraps every ResNet, temporal conv, spatial and temporal transformer in
`nn.remat` (here only, by patching `layers`): what remains saved are the layer inputs, plus, at
the backward of one layer, that layer's own residuals (the largest one is added). XLA fusion and
scheduling move the real figures by tens of percent; this is an estimate of the order.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags

from pixeldance_jax import console
from pixeldance_jax.models import layers, pixeldance
from pixeldance_jax.parallel import mesh as mesh_lib
from pixeldance_jax.train import state as state_lib

import common

_CONFIG = config_flags.DEFINE_config_file("config", "configs/pixeldance.py")
CHIP_COUNTS = (8, 64)  # Fake CPU devices: max(CHIP_COUNTS).
COLUMNS = tuple((title, 11, ".2f") for title in (
    "chips", "batch/dev", "params", "grads", "adam", "ema", "frozen", "state", "act", "total",
    "act remat", "total remat"))
# Layers that per-layer remat wraps, with the index (self = 0) of their static bool argument.
REMAT_LAYERS = {"ResnetBlock": (3,), "TemporalConvBlock": (2,), "SpatialTransformer": (),
                "TemporalTransformer": ()}


def shard_bytes(tree) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs carrying NamedShardings."""
  return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
             for leaf in jax.tree.leaves(tree))


def fsdp_config(config: ml_collections.ConfigDict, chips: int) -> ml_collections.ConfigDict:
  config = config.copy_and_resolve_references()
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, chips, 1
  return config


def state_bytes_per_device(config: ml_collections.ConfigDict, chips: int) -> dict[str, float]:
  """GiB per device of each part of the train state, and of the gradients."""
  config = fsdp_config(config, chips)
  abstract, _ = state_lib.abstract_state(
      config, mesh_lib.make_mesh(config.mesh, jax.devices()[:chips]))
  frozen = getattr(abstract, "frozen", {})
  trainable = {name: subtree for name, subtree in abstract.params.items()
               if name != "text_encoder" or config.text_encoder.trainable}
  return {"params": shard_bytes(abstract.params) / common.GiB,
          "grads": shard_bytes(trainable) / common.GiB,
          "adam": shard_bytes(abstract.opt_state) / common.GiB,
          "ema": shard_bytes(abstract.ema_params) / common.GiB,
          "frozen": shard_bytes(frozen) / common.GiB}


def param_counts(config: ml_collections.ConfigDict) -> dict[str, int]:
  config = fsdp_config(config, 1)
  abstract, _ = state_lib.abstract_state(config, mesh_lib.make_mesh(config.mesh, jax.devices()[:1]))
  counts = {name: state_lib.count_params(tree) for name, tree in abstract.params.items()}
  for name, tree in getattr(abstract, "frozen", {}).items():
    counts[f"{name} (frozen)"] = state_lib.count_params(tree)
  return counts


def residual_bytes(config: ml_collections.ConfigDict, batch: int) -> int:
  """Bytes of what `jax.vjp` saves for the U-Net's parameter gradients at `batch`."""
  model = pixeldance.make_model(config)
  params = jax.eval_shape(lambda: nn.meta.unbox(
      model.init(jax.random.key(0), *pixeldance.dummy_inputs(config))["params"]))
  model_input, timesteps, _ = pixeldance.dummy_inputs(config, batch)
  context = jnp.zeros((batch, config.text_encoder.max_length, config.text_encoder.hidden_size))

  def residuals(params):
    denoise = lambda p: model.apply({"params": p}, model_input, timesteps, context,
                                    method=pixeldance.PixelDance.denoise)
    return jax.vjp(denoise, params)[1]

  return sum(leaf.size * leaf.dtype.itemsize
             for leaf in jax.tree.leaves(jax.eval_shape(residuals, params)))


def per_example_bytes(config: ml_collections.ConfigDict) -> int:
  return residual_bytes(config, 2) - residual_bytes(config, 1)


class _Remat:
  """Within the `with`, the U-Net's layers are rematerialised (patched in `layers`)."""

  def __enter__(self):
    self.originals = {name: getattr(layers, name) for name in REMAT_LAYERS}
    for name, static in REMAT_LAYERS.items():
      setattr(layers, name, nn.remat(self.originals[name], static_argnums=static))

  def __exit__(self, *exc):
    for name, original in self.originals.items():
      setattr(layers, name, original)


def largest_layer_bytes(config: ml_collections.ConfigDict) -> int:
  """Per-example residuals of the largest layer (at full latent resolution, widest input)."""
  unet, frames = config.unet, config.data.frames
  size = config.data.image_size // config.autoencoder.patch_size
  width = unet.block_out_channels[0]
  dtype = jnp.dtype(unet.dtype)
  images = jnp.zeros((frames, size, size, width), dtype)
  context = jnp.zeros((frames, config.text_encoder.max_length, unet.cross_attention_dim), dtype)
  heads, groups = width // unet.attention_head_dim, unet.norm_num_groups
  candidates = [
      (layers.ResnetBlock(out_channels=width, groups=groups, dtype=dtype),
       (jnp.zeros((frames, size, size, 2 * width), dtype), jnp.zeros((frames, 4 * width), dtype))),
      (layers.SpatialTransformer(heads=heads, head_dim=unet.attention_head_dim, groups=groups,
                                 dtype=dtype), (images, context)),
      (layers.TemporalTransformer(heads=heads, head_dim=unet.attention_head_dim, groups=groups,
                                  dtype=dtype), (images[None],)),
      (layers.TemporalConvBlock(groups=groups, dtype=dtype), (images[None],)),
  ]
  return max(_layer_residual_bytes(module, args) for module, args in candidates)


def _layer_residual_bytes(module: nn.Module, args) -> int:
  params = jax.eval_shape(lambda: nn.meta.unbox(module.init(jax.random.key(0), *args)))
  residuals = lambda p: jax.vjp(lambda q: module.apply(q, *args), p)[1]
  return sum(leaf.size * leaf.dtype.itemsize
             for leaf in jax.tree.leaves(jax.eval_shape(residuals, params)))


def activation_gib(config: ml_collections.ConfigDict) -> dict[str, float]:
  """GiB of activations per example: without remat, and with per-layer remat."""
  config = config.copy_and_resolve_references()
  config.unet.dtype = "bfloat16"
  plain = per_example_bytes(config)
  with _Remat():
    boundaries = per_example_bytes(config)
  return {"none": plain / common.GiB, "boundaries": boundaries / common.GiB,
          "layer": largest_layer_bytes(config) / common.GiB}


def main(argv) -> None:
  del argv
  common.start_jax(cpu_devices=max(CHIP_COUNTS), platform="cpu")  # Shapes only: nothing runs.
  config = _CONFIG.value
  counts = param_counts(config)
  for name, count in counts.items():
    print(f"{name:>24}: {count / 1e6:8.1f} M parameters")
  print(f"{'trainable total':>24}: {(counts['unet'] + counts['text_encoder']) / 1e6:8.1f} M")

  acts = activation_gib(config)
  size = config.data.image_size // config.autoencoder.patch_size
  print(f"\nActivations (bf16, {config.data.frames}x{size}x{size} latents) per example: "
        f"{acts['none']:.2f} GiB without remat; {acts['boundaries']:.2f} GiB layer inputs + "
        f"{acts['layer']:.2f} GiB largest layer with per-layer remat.")
  print(f"\nPer-device training memory, GiB, global batch {config.batch_size}, fsdp over all chips")
  print(common.header_line(COLUMNS))
  for chips in CHIP_COUNTS:
    state = state_bytes_per_device(config, chips)
    per_device = config.batch_size / chips
    total_state = sum(state.values())
    act = acts["none"] * per_device
    act_remat = acts["boundaries"] * per_device + acts["layer"] * per_device
    row = (chips, per_device, *state.values(), total_state, act, total_state + act, act_remat,
           total_state + act_remat)
    print(common.row_line(COLUMNS, row))


if __name__ == "__main__":
  console.run(main)
