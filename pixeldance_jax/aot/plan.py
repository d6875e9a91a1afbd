"""The programs train.py and sample.py run, compiled for a mesh without running them: their
memory plan, FLOPs, bytes and collectives, and whether the sharding is what the rules ask.

Everything is abstract (`jax.ShapeDtypeStruct`s with shardings): no weight is materialised, so
a 1.4B-parameter model compiles for a 64-chip slice on a laptop. The programs are the same
objects the trainer and the sampler build (`step.jit_train_step`,
`sampling.program.make_generate_fn`), with their shardings, donation, remat and attention.
"""

import dataclasses
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pixeldance_jax.aot import hlo
from pixeldance_jax.diffusion import samplers, schedules
from pixeldance_jax.models import pixeldance
from pixeldance_jax.parallel import mesh as mesh_lib
from pixeldance_jax.parallel import sharding
from pixeldance_jax.sampling import program as sampling_program
from pixeldance_jax.train import latent_cache
from pixeldance_jax.train import state as state_lib
from pixeldance_jax.train import step as step_lib

GiB = 2**30


@dataclasses.dataclass
class Plan:
  """What the compiler made of one program, per device."""
  program: str  # "train_step", "image_step", "update" or "sample".
  batch: int  # Global examples (clips, images or sampled videos); 0 for the update.
  compile_seconds: float
  argument_bytes: int
  output_bytes: int
  alias_bytes: int  # Donated arguments that the outputs reuse.
  temp_bytes: int
  code_bytes: int
  flops: float
  bytes_accessed: float
  collectives: dict[str, dict[str, int]]
  custom_calls: dict[str, int]  # Kernels XLA did not generate, by target (Mosaic's, cuDNN's).
  capacity_bytes: int  # The device's memory.

  @property
  def total_bytes(self) -> int:
    """What the program holds at its peak: arguments, outputs not aliased to them, temporaries
    and its code."""
    return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
            + self.code_bytes)

  @property
  def fits(self) -> bool:
    return self.total_bytes <= self.capacity_bytes

  def as_dict(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), "total_bytes": self.total_bytes, "fits": self.fits,
            "headroom_bytes": self.capacity_bytes - self.total_bytes}


def _sharded(shape: tuple[int, ...], dtype, sharding_: jax.sharding.Sharding
             ) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding_)


def train_batch(config: ml_collections.ConfigDict, mesh: Mesh, image_step: bool = False
                ) -> dict[str, jax.ShapeDtypeStruct]:
  """A global batch in the trainer's format: the loader's uint8 video (one frame for image
  steps) and token ids, or the latent cache's moments and text embeddings."""
  batch_sharding = mesh_lib.batch_sharding(mesh)
  text, size = config.text_encoder, config.data.image_size
  if image_step:
    count = config.data.image_batch_size or config.batch_size * config.data.frames
    frames = 1
  else:
    count, frames = config.batch_size, config.data.frames
  if config.data.cache_latents and not image_step:
    latent = size // config.autoencoder.patch_size
    moments = (count, frames, latent, latent, config.autoencoder.latent_channels)
    batch = {"latent_mean": _sharded(moments, jnp.float32, batch_sharding)}
    if config.autoencoder.kind == "kl":
      batch["latent_logvar"] = _sharded(moments, jnp.float32, batch_sharding)
    if latent_cache.caches_text(config):
      batch["text_embedding"] = _sharded((count, text.max_length, text.hidden_size),
                                         jnp.float32, batch_sharding)
    else:
      batch["tokens"] = _sharded((count, text.max_length), jnp.int32, batch_sharding)
    return batch
  return {"video": _sharded((count, frames, size, size, 3), jnp.uint8, batch_sharding),
          "tokens": _sharded((count, text.max_length), jnp.int32, batch_sharding)}


def _plan(program: str, batch: int, compiled, seconds: float, capacity: int) -> Plan:
  memory, text = compiled.memory_analysis(), compiled.as_text()
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  return Plan(program=program, batch=batch, compile_seconds=seconds,
              argument_bytes=int(memory.argument_size_in_bytes),
              output_bytes=int(memory.output_size_in_bytes),
              alias_bytes=int(memory.alias_size_in_bytes),
              temp_bytes=int(memory.temp_size_in_bytes),
              code_bytes=int(memory.generated_code_size_in_bytes),
              flops=float(cost.get("flops", 0.0)),
              bytes_accessed=float(cost.get("bytes accessed", 0.0)),
              collectives=hlo.summary(hlo.collectives(text)),
              custom_calls=hlo.custom_calls(text), capacity_bytes=capacity)


def compile_train_step(config: ml_collections.ConfigDict, mesh: Mesh, capacity: int,
                       image_step: bool = False, update: bool = False):
  """(Plan, compiled) of a program of the trainer's train step (or its image step) on `mesh`:
  the whole step, or with `config.separate_update` its gradients' program, or (`update`) the
  update program the steps share."""
  abstract, shardings = state_lib.abstract_state(config, mesh)
  cached = config.data.cache_latents and not image_step
  loss = latent_cache.cached_loss_fn if cached else step_lib.loss_fn
  step = step_lib.jit_train_step(config, mesh, shardings, use_temporal=not image_step,
                                 loss=loss)
  if update and "update" not in step.program_names:
    raise ValueError("The update is a program of its own only with config.separate_update.")
  name = "update" if update else step.program_names[0]
  batch = train_batch(config, mesh, image_step)
  start = time.perf_counter()
  compiled = step.lower(abstract, batch, jax.random.key(0), (name,))[name].compile()
  seconds = time.perf_counter() - start
  count = 0 if update else next(iter(batch.values())).shape[0]
  program = "update" if update else "image_step" if image_step else "train_step"
  return _plan(program, count, compiled, seconds, capacity), compiled


def sample_inputs(config: ml_collections.ConfigDict, mesh: Mesh, batch: int
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
  """Abstract (per-example, shared) inputs of the sampling program, as `generate.generate`
  passes them: `batch` videos of `config.sample.num_steps` steps."""
  per_example = mesh_lib.batch_sharding(mesh)
  replicated = NamedSharding(mesh, PartitionSpec())
  size, length = config.data.image_size, config.text_encoder.max_length
  frame = lambda: _sharded((batch, size, size, 3), jnp.uint8, per_example)
  vector = lambda dtype: _sharded((batch,), dtype, per_example)
  examples = {"seeds": vector(jnp.int32), "first_frame": frame(), "last_frame": frame(),
              "use_first_frame": vector(jnp.float32),
              "token_ids": _sharded((batch, length), jnp.int32, per_example),
              "null_token_ids": _sharded((batch, length), jnp.int32, per_example),
              "tau": vector(jnp.int32), "guidance_scale": vector(jnp.float32),
              "guidance_rescale": vector(jnp.float32), "eta": vector(jnp.float32)}
  schedule = samplers.make_schedule(schedules.alphas_cumprod(config.diffusion),
                                    config.sample.num_steps, config.sample.timestep_spacing)
  shared = {"clip_index": _sharded((), jnp.int32, replicated),
            "schedule": jax.tree.map(lambda x: _sharded(np.shape(x), x.dtype, replicated),
                                     schedule)}
  return examples, shared


def compile_sampler(config: ml_collections.ConfigDict, mesh: Mesh, capacity: int, batch: int):
  """(Plan, compiled) of sample.py's program (the whole denoising loop and decoding)."""
  params, frozen = pixeldance.abstract_weights(config, mesh)
  examples, shared = sample_inputs(config, mesh, batch)
  generate = sampling_program.make_generate_fn(config, mesh)
  start = time.perf_counter()
  compiled = generate.lower(params, frozen, examples, shared, config.sample.sampler).compile()
  return _plan("sample", batch, compiled, time.perf_counter() - start, capacity), compiled


# --- The sharding, read from the compiled program ---------------------------------------------


def _mesh_axes(spec) -> set[str]:
  """The mesh axes a PartitionSpec (or logical_to_mesh_axes' result) uses."""
  return {axis for entry in spec if entry
          for axis in ((entry,) if isinstance(entry, str) else entry)}


def sharding_findings(config: ml_collections.ConfigDict, mesh: Mesh, hlo_text: str
                      ) -> dict[str, Any]:
  """What a reader of the train step's optimized HLO checks about the sharding:

  - `replicated`: state leaves (params, EMA, Adam moments) whose logical names map to a mesh
    axis of size > 1 that their sharding lost (a dimension the axis does not divide);
  - `reduce_scatters`, and `all_reduced_gradients` (largest first, with their total bytes):
    all-reduces of an array the shape of a whole trainable parameter that is sharded over
    fsdp, i.e. a gradient reduced in full and sliced afterwards instead of reduce-scattered;
    `reduce_scatter_lowering` says whether the compiler does that to every reduce-scatter over
    fsdp on this mesh (then no program can do better), else only small arrays should be so;
  - `activation_gathers`: all-gathers of more bytes than the largest single weight (float32),
    which only activations can be (none is right; weights are gathered one at a time).
  """
  boxed = state_lib.boxed_state(config)
  rules = sharding.logical_rules(config)
  replicated = []
  flat = jax.tree_util.tree_leaves_with_path(
      boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  for path, leaf in flat:
    if not isinstance(leaf, nn.LogicallyPartitioned) or not jax.tree.leaves(leaf.value):
      continue
    wanted = nn.logical_to_mesh_axes(leaf.names, rules)
    asked = {axis for axis in _mesh_axes(wanted) if mesh.shape[axis] > 1}
    kept = _mesh_axes(sharding.divisible_spec(wanted, leaf.value.shape, mesh))
    if asked - kept:
      replicated.append(f"{jax.tree_util.keystr(path)} {tuple(leaf.value.shape)} lost "
                        f"{sorted(asked - kept)}")

  abstract, _ = state_lib.abstract_state(config, mesh)
  trainable = state_lib.trainable_labels(abstract.params, config)
  # Shapes of the trainable weights sharded over fsdp, less those a weight of another
  # sharding also has (an all-reduce of such a shape may be that weight's, legitimately).
  fsdp_shapes, other_shapes, largest_weight = set(), set(), 0
  for leaf, label in zip(jax.tree.leaves(abstract.params), jax.tree.leaves(trainable)):
    largest_weight = max(largest_weight, int(np.prod(leaf.shape)) * 4)
    if label == "train" and "fsdp" in _mesh_axes(leaf.sharding.spec) and mesh.shape["fsdp"] > 1:
      fsdp_shapes.add(tuple(leaf.shape))
    else:
      other_shapes.add(tuple(leaf.shape))
  fsdp_shapes -= other_shapes
  found = hlo.collectives(hlo_text)
  whole = [(size, f"{shape} ({collective_origin(collective)})")
           for collective in found if collective.kind == "all-reduce"
           for size, shape in collective.arrays if _dims(shape) in fsdp_shapes]
  all_reduced = [text for _, text in sorted(whole, reverse=True)]
  gathers = [f"{collective.shape} {collective.bytes / 2**20:.1f} MiB ({collective.op_name})"
             for collective in found
             if collective.kind == "all-gather" and collective.bytes > largest_weight]
  return {"replicated": replicated,
          "reduce_scatters": sum(c.kind == "reduce-scatter" for c in found),
          "all_reduced_gradients": all_reduced,
          "all_reduced_gradient_bytes": sum(size for size, _ in whole),
          "reduce_scatter_lowering": reduce_scatter_lowering(mesh),
          "largest_weight_bytes": largest_weight,
          "activation_gathers": gathers}


def reduce_scatter_lowering(mesh: Mesh, axis: str = "fsdp") -> str:
  """The collective the compiler makes of an explicit reduce-scatter over `axis` of `mesh` (a
  `shard_map`ped `psum_scatter`, nothing else in the program): "reduce-scatter", or
  "all-reduce" where every device reduces the whole array and keeps its slice (libtpu 0.0.42
  does so for groups that span hosts); "none" for an axis of size 1."""
  size = mesh.shape[axis]
  if size == 1:
    return "none"

  def scatter(partial):
    return jax.lax.psum_scatter(partial[0], axis, scatter_dimension=0, tiled=True)

  program = jax.jit(jax.shard_map(scatter, mesh=mesh, in_specs=PartitionSpec(axis),
                                  out_specs=PartitionSpec(axis)))
  partials = jax.ShapeDtypeStruct((size, size * 256, 256), jnp.bfloat16,
                                  sharding=NamedSharding(mesh, PartitionSpec(axis)))
  kinds = {collective.kind for collective in
           hlo.collectives(program.lower(partials).compile().as_text())}
  return "reduce-scatter" if "reduce-scatter" in kinds else ", ".join(sorted(kinds)) or "none"


def collective_origin(collective: hlo.Collective) -> str:
  """Where an all-reduced array came from: the op_name of a collective of one array; a
  combined one's metadata is that of one of its arrays, so it is named as a combination."""
  if len(collective.arrays) > 1:
    return f"one of {len(collective.arrays)} arrays in a combined all-reduce"
  return collective.op_name or "no op_name"


def _dims(shape: str) -> tuple[int, ...]:
  inside = shape[shape.index("[") + 1:shape.index("]")]
  return tuple(int(d) for d in inside.split(",") if d)
