"""Measurements that need 8 devices, run by tests/test_parallel.py in a subprocess.

XLA fixes the device count when jax is first imported and the rest of the suite runs on one
device, so this script sets the fake-device flag itself and prints one JSON line of findings
for the test to assert on (the assertions live in the test, with readable failure messages).
"""

import os
import pathlib
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import json  # pylint: disable=g-import-not-at-top,wrong-import-position

import jax
import ml_collections
import numpy as np

import helpers
import mesh_steps
from configs import pixeldance
from pixeldance_jax.evaluate import features, frechet, videos
from pixeldance_jax.models import layers
from pixeldance_jax.parallel import mesh as mesh_lib
from pixeldance_jax.train import state as state_lib

REPLICATION_LIMIT_BYTES = 2**20
# Parameters whose placement the test pins down: [*window, conv_in, conv_out] convolutions,
# [embed, heads] attention projections and the [vocab, embed] token table.
PINNED_PARAMS = {
    "conv": ("unet", "down_blocks_0", "resnets_0", "conv1", "kernel"),
    "attention": ("unet", "mid_block", "attentions_0", "transformer_blocks_0", "attn1", "to_q",
                  "kernel"),
    "token_embedding": ("text_encoder", "token_embedding", "embedding"),
}


def _with_mesh(config: ml_collections.ConfigDict, shape: tuple[int, int, int]
               ) -> ml_collections.ConfigDict:
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = shape
  return config


def replicated_leaves(config: ml_collections.ConfigDict) -> list[str]:
  """Every state leaf (params, EMA, optimiser moments) over the limit that no mesh axis splits."""
  abstract, _ = state_lib.abstract_state(config, mesh_lib.make_mesh(config.mesh))
  nbytes = lambda leaf: leaf.size * leaf.dtype.itemsize
  return [f"{jax.tree_util.keystr(path)} {leaf.shape} {nbytes(leaf) / 2**20:.1f} MiB"
          for path, leaf in jax.tree_util.tree_leaves_with_path(abstract)
          if nbytes(leaf) > REPLICATION_LIMIT_BYTES and leaf.sharding.is_fully_replicated]


def paper_replication() -> dict[str, list[str]]:
  """Offenders of the paper config per mesh, plus a control whose rules replicate conv kernels.

  The control shows the check sees replication: a check that finds nothing anywhere proves
  nothing.
  """
  found = {}
  for shape in ((1, 8, 1), (2, 2, 2)):
    found["x".join(map(str, shape))] = replicated_leaves(_with_mesh(pixeldance.get_config(), shape))
  control = _with_mesh(pixeldance.get_config(), (1, 8, 1))
  control.logical_axis_rules = tuple((name, None if name == "conv_in" else axes)
                                     for name, axes in control.logical_axis_rules)
  found["control"] = replicated_leaves(control)
  return found


def _placement(leaf: jax.Array) -> dict[str, list]:
  return {"spec": [list(a) if isinstance(a, tuple) else a for a in leaf.sharding.spec],
          "shard_shape": list(leaf.addressable_shards[0].data.shape),
          "shape": list(leaf.shape)}


def placements(state: state_lib.TrainState) -> dict[str, dict[str, list]]:
  """Where the pinned parameters, and the Adam moment of the conv kernel, live."""
  found = {}
  for name, path in PINNED_PARAMS.items():
    param = state.params
    for key in path:
      param = param[key]
    found[name] = _placement(param)
  conv_key = "".join(f"['{key}']" for key in PINNED_PARAMS["conv"])
  found["adam_mu_conv"] = next(
      _placement(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(state.opt_state)
      if ".mu" in jax.tree_util.keystr(path) and jax.tree_util.keystr(path).endswith(conv_key))
  return found


def sharded_steps(trained_path: str) -> dict:
  """The state's placement on a 2x2x2 mesh, and `mesh_steps.STEPS` steps on it: losses and
  first gradient norm here, the trained trees to `trained_path` (the test compares them with
  one device's, run in its own process)."""
  state = mesh_steps.initial_state((2, 2, 2))
  found = {"placements": placements(state)}
  losses, grad_norm, trained = mesh_steps.train((2, 2, 2), state)
  np.savez(trained_path, **mesh_steps.flat(trained))
  found["2x2x2"] = {"losses": losses, "grad_norm": grad_norm, "step": int(trained.step)}
  return found


def splash_error() -> float:
  """Max over the outputs and gradients of an attention layer on a 2x2x2 mesh of
  |splash - xla| / max |xla| (gradients of the test's sum-of-sines loss reach ~1e2)."""
  mesh = mesh_lib.make_mesh(mesh_steps.config_on((2, 2, 2)).mesh)
  rng = np.random.default_rng(0)
  x = jax.numpy.asarray(rng.normal(size=(8, 128, 32)), np.float32)
  results = []
  for impl in ("xla", "splash"):
    module = layers.Attention(heads=2, head_dim=16, impl=impl)
    params = module.init(jax.random.key(0), x)
    loss = lambda params, x, m=module: jax.numpy.sum(jax.numpy.sin(m.apply(params, x)))
    with jax.set_mesh(mesh):
      x_sharded = jax.device_put(x, mesh_lib.batch_sharding(mesh))
      results.append(jax.jit(lambda p, x, m=module: (m.apply(p, x), jax.grad(loss, (0, 1))(p, x)))(
          params, x_sharded))
  return max(float(np.max(np.abs(np.asarray(b) - np.asarray(a))) / np.max(np.abs(np.asarray(a))))
             for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])))


def feature_statistics_error() -> float:
  """FVD-style statistics of 13 clips through a stand-in feature network with a global batch
  of 8 (the last one padded), on meshes 8x1x1 and 2x2x2 against one device: the largest
  relative difference of the means and covariances."""
  network = helpers.toy_extractor()
  clips = np.random.default_rng(1).integers(0, 256, (13, 4, 8, 8, 3), np.uint8)
  results = []
  for shape, devices in (((1, 1, 1), jax.devices()[:1]), ((8, 1, 1), jax.devices()),
                         ((2, 2, 2), jax.devices())):
    mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(zip(mesh_lib.MESH_AXES, shape))),
                              devices)
    extractor = features.ShardedExtractor(network, mesh, 8)
    stats = frechet.RunningStats(5)
    for indices in videos.shares(len(clips), 8, 0, 1):
      stats.update(extractor(clips[list(indices)]).reshape(-1, 5))
    assert stats.count == 13 * 4, stats.count
    results.append(stats.mean_and_covariance())
  return max(float(np.max(np.abs(b - a)) / np.max(np.abs(a)))
             for other in results[1:] for a, b in zip(results[0], other))


def main(trained_path: str) -> None:
  assert jax.device_count() == 8, jax.devices()
  results = {"replicated": paper_replication(),
             "step": sharded_steps(trained_path),
             "splash_2x2x2_relative_error": splash_error(),
             "feature_statistics_relative_error": feature_statistics_error()}
  print(json.dumps(results))


if __name__ == "__main__":
  main(sys.argv[1])
