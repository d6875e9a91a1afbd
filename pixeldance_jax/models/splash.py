"""Pallas splash attention (TPU), the `attention_impl="splash"` option of the U-Net.

`jax.nn.dot_product_attention` offers XLA and cuDNN; on TPU the fast path is the Pallas splash
kernel. It works on blocks of 128 positions, so sequences are padded to a multiple of 128 and the
padded keys are masked with segment ids. In a program for TPU devices (`mesh_lib.target_platform`,
so also one compiled ahead of time on a CPU host) it is a Mosaic kernel; elsewhere the same kernel
runs in Pallas' interpreter: slow, but it lets CPU tests check the TPU code path against XLA.

Under a mesh the kernel runs per shard (`shard_map`): batch over the data-parallel axes, heads
over `tensor`, each where it divides evenly. A Pallas call is opaque to the SPMD partitioner,
which would otherwise gather the whole batch onto every device.
"""

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernels
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
from jax.sharding import PartitionSpec

from pixeldance_jax.parallel import mesh as mesh_lib
from pixeldance_jax.parallel import sharding

Array = jax.Array

BLOCK = 128


def _round_up(length: int, multiple: int) -> int:
  return -(-length // multiple) * multiple


def _per_shard(q: Array, k: Array, v: Array, kv_length: int) -> Array:
  """Splash attention of `[n, heads, padded_length, head_dim]` arrays on one shard."""
  heads, q_length, k_length = q.shape[1], q.shape[2], k.shape[2]
  mask = masks.MultiHeadMask([masks.FullMask((q_length, k_length))] * heads)
  block = kernels.BlockSizes(
      block_q=BLOCK, block_kv=BLOCK, block_kv_compute=BLOCK, block_q_dkv=BLOCK,
      block_kv_dkv=BLOCK, block_kv_dkv_compute=BLOCK, block_q_dq=BLOCK, block_kv_dq=BLOCK)
  kernel = kernels.make_splash_mha(mask, block_sizes=block, head_shards=1, q_seq_shards=1,
                                   interpret=mesh_lib.target_platform() != "tpu")
  # Keys past `kv_length` are padding: a segment of their own that no query belongs to.
  segment_ids = kernels.SegmentIds(
      q=jnp.zeros((q_length,), jnp.int32),
      kv=(jnp.arange(k_length) >= kv_length).astype(jnp.int32))
  return jax.vmap(kernel, in_axes=(0, 0, 0, None))(q, k, v, segment_ids)


def splash_attention(q: Array, k: Array, v: Array) -> Array:
  """Softmax attention, `[n, q_length, heads, head_dim]` x `[n, kv_length, ...]` -> like q.

  Same contract as `jax.nn.dot_product_attention` without masks or bias.
  """
  q_length, kv_length, head_dim = q.shape[1], k.shape[1], q.shape[-1]
  to_kernel = lambda x, length: jnp.pad(
      x, ((0, 0), (0, _round_up(length, BLOCK) - length), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
  q = to_kernel(q * jnp.asarray(head_dim ** -0.5, q.dtype), q_length)
  k, v = to_kernel(k, kv_length), to_kernel(v, kv_length)
  attend = lambda q, k, v: _per_shard(q, k, v, kv_length)
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:
    # Batch over data x fsdp and heads over tensor, as far as the mesh divides them.
    spec = sharding.divisible_spec(PartitionSpec(mesh_lib.BATCH_AXES, "tensor"), q.shape, mesh)
    attend = jax.shard_map(attend, in_specs=(spec, spec, spec), out_specs=spec,
                           check_vma=False)
  return attend(q, k, v).transpose(0, 2, 1, 3)[:, :q_length]
