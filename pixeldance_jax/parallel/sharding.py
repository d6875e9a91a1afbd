"""Logical axis names -> mesh shardings, in one place.

Model code annotates parameters with logical names (`embed`, `heads`, `conv_out`, ...);
`config.logical_axis_rules` maps them to mesh axes. A dimension that a mesh axis does not
divide stays replicated rather than failing, and the decision is made per array.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import ml_collections
from jax.sharding import Mesh, NamedSharding, PartitionSpec

LogicalRules = tuple[tuple[str, str | tuple[str, ...] | None], ...]


def logical_rules(config: ml_collections.ConfigDict) -> LogicalRules:
  """`config.logical_axis_rules` as hashable tuples (a JSON round trip turns them to lists)."""
  def mesh_axes(axes):
    return tuple(axes) if isinstance(axes, (list, tuple)) else axes
  return tuple((str(name), mesh_axes(axes)) for name, axes in config.logical_axis_rules)


def divisible_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
  """Drops mesh axes from dimensions they do not divide evenly, or that an earlier one uses."""
  entries, used = [], set()
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    kept, size = [], 1
    for name in names:
      if name not in used and dim % (size * mesh.shape[name]) == 0:
        kept.append(name)
        used.add(name)
        size *= mesh.shape[name]
    entries.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
  return PartitionSpec(*entries)


def tree_shardings(abstract_tree, mesh: Mesh, rules: LogicalRules):
  """NamedShardings for a tree of (possibly logically boxed) abstract arrays.

  Boxed leaves (`nn.LogicallyPartitioned`) are sharded by their logical names; plain leaves
  (step counters, scalars) are replicated. A box around an empty node (optax's `MaskedNode`,
  the optimiser state of a frozen subtree) has no array to shard and is passed through. The
  result mirrors the unboxed tree.
  """
  def one(leaf):
    if isinstance(leaf, nn.LogicallyPartitioned):
      if not jax.tree.leaves(leaf.value):
        return leaf.value
      spec = nn.logical_to_mesh_axes(leaf.names, rules)
      return NamedSharding(mesh, divisible_spec(spec, leaf.value.shape, mesh))
    return NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(one, abstract_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def abstract_tree(boxed_tree, mesh: Mesh, rules: LogicalRules):
  """A logically boxed abstract tree (`jax.eval_shape` of an init) -> unboxed
  ShapeDtypeStructs carrying their shardings on `mesh`: what to restore or initialise onto."""
  shardings = tree_shardings(boxed_tree, mesh, rules)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      nn.meta.unbox(boxed_tree), shardings)
