"""The jitted sampler on a randomly initialised model: tau semantics and determinism."""

import jax
import numpy as np
import pytest

from configs import unit_test
from pixeldance_jax import inference
from pixeldance_jax.data import moving_shapes
from pixeldance_jax.parallel import mesh as mesh_lib
from pixeldance_jax.train import state as state_lib


@pytest.fixture(scope="module")
def pipeline():
  config = unit_test.get_config()
  # Random weights, with the zero-initialised temporal outputs perturbed so that every frame
  # (the last-frame slot included) influences every other.
  mesh = mesh_lib.make_mesh(config.mesh)
  state = state_lib.create_train_state(config, mesh, jax.random.key(0))
  params = state.params
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape)
                                        for x, k in zip(leaves, keys)])
  return inference.Pipeline(config=config, params=params, frozen=state.frozen, step=0,
                            generate_fn=inference._make_generate_fn(config, mesh))


def _frames(config, count, split="test"):
  spec = moving_shapes.MovingShapesSpec.from_config(config.data)
  clips = [moving_shapes.generate_clip(spec, split, i) for i in range(count)]
  return ([c["caption"] for c in clips], np.stack([c["video"][0] for c in clips]),
          np.stack([c["video"][-1] for c in clips]))


def test_tau_zero_ignores_the_last_frame_bitwise(pipeline):
  prompts, first, last = _frames(pipeline.config, 2)
  a = inference.generate(pipeline, prompts, first, last, tau=0, seed=3)
  b = inference.generate(pipeline, prompts, first, 255 - last, tau=0, seed=3)
  c = inference.generate(pipeline, prompts, first, None, seed=3)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(a, c)


def test_tau_all_steps_depends_on_the_last_frame(pipeline):
  prompts, first, last = _frames(pipeline.config, 2)
  steps = pipeline.config.sample.num_steps
  a = inference.generate(pipeline, prompts, first, last, tau=steps, seed=3)
  b = inference.generate(pipeline, prompts, first, 255 - last, tau=steps, seed=3)
  assert a.shape == (2, pipeline.config.data.frames) + first.shape[1:] and a.dtype == np.uint8
  assert np.abs(a.astype(int) - b.astype(int)).max() > 0


def test_same_seed_same_video_and_other_seed_differs(pipeline):
  prompts, first, last = _frames(pipeline.config, 1)
  a = inference.generate(pipeline, prompts, first, last, seed=5)
  b = inference.generate(pipeline, prompts, first, last, seed=5)
  c = inference.generate(pipeline, prompts, first, last, seed=6)
  np.testing.assert_array_equal(a, b)
  assert np.abs(a.astype(int) - c.astype(int)).max() > 0


def test_negative_tau_is_refused(pipeline):
  prompts, first, last = _frames(pipeline.config, 1)
  with pytest.raises(ValueError, match="tau"):
    inference.generate(pipeline, prompts, first, last, tau=-1)
