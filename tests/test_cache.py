"""Latent and text-embedding cache: cached batches give the live loss; stale caches are refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from configs import unit_test
from pixeldance_jax.io import checkpoints
from pixeldance_jax.data import loaders
from pixeldance_jax.models import autoencoder as autoencoder_lib
from pixeldance_jax.parallel import mesh as mesh_lib
from pixeldance_jax.train import latent_cache
from pixeldance_jax.train import state as state_lib
from pixeldance_jax.train import step as step_lib
from pixeldance_jax.train import trainer

# Multi-process, end-to-end or browser: the full suite's tier (README, Developing).
pytestmark = pytest.mark.slow


def _kl_config():
  """unit_test with a small random KL autoencoder (2x down) and a frozen text encoder; the
  one-level U-Net, which compiles fastest (the cache does not depend on its depth)."""
  config = unit_test.get_config()
  config.update_from_flattened_dict(helpers.ONE_LEVEL_UNET)
  ae = config.autoencoder
  ae.kind, ae.block_out_channels, ae.layers_per_block, ae.norm_num_groups = "kl", (8, 16), 1, 4
  ae.patch_size, ae.latent_channels, ae.scaling_factor = 2, 4, 0.18215
  config.text_encoder.trainable = False
  config.conditioning.text_drop_prob = 0.5  # Both branches of the text drop in one batch.
  config.conditioning.last_frame_drop_prob = 0.5
  config.diffusion.prediction_type = "epsilon"  # A target of unit scale whatever the weights.
  return config


def _weights(config):
  """Random (params, frozen) of the config's shapes, drawn in numpy: nothing to compile."""
  abstract, _ = state_lib.abstract_state(config, mesh_lib.make_mesh(config.mesh))
  rng = np.random.default_rng(0)
  draw = lambda x: jnp.asarray(0.05 * rng.standard_normal(x.shape), x.dtype)
  return jax.tree.map(draw, abstract.params), jax.tree.map(draw, abstract.frozen)


@pytest.fixture(scope="module")
def kl_cache(tmp_path_factory):
  """(config, data_dir, params, frozen) with the cache of those weights built."""
  config = _kl_config()
  data_dir = str(tmp_path_factory.mktemp("data"))
  params, frozen = _weights(config)
  with pytest.raises(FileNotFoundError, match="python -m pixeldance_jax.train.latent_cache"):
    latent_cache.make_cached_loader(config, data_dir, params, frozen)
  latent_cache.build_cache(config, data_dir, params, frozen)
  return config, data_dir, params, frozen


def test_cached_batch_gives_the_live_loss(kl_cache):
  config, data_dir, params, frozen = kl_cache
  live = next(iter(loaders.make_train_loader(config, data_dir)))
  cached = next(iter(latent_cache.make_cached_loader(config, data_dir, params, frozen)))
  assert set(cached) == {"latent_mean", "latent_logvar", "text_embedding"}
  assert cached["latent_mean"].shape == (4, 4, 8, 8, 4)
  assert cached["text_embedding"].shape == (4, 16, 32)

  rng = jax.random.key(3)
  live_loss, live_metrics = jax.jit(
      lambda b: step_lib.loss_fn(params, frozen, b, rng, config))(live)
  cached_loss_fn = jax.jit(
      lambda b, r: latent_cache.cached_loss_fn(params, frozen, b, r, config))
  cached_loss, cached_metrics = cached_loss_fn(cached, rng)
  np.testing.assert_allclose(float(cached_loss), float(live_loss), rtol=1e-5)
  assert set(cached_metrics) == set(live_metrics)  # A drop-in loss for step.loss_and_grads.
  # The comparison can fail: another draw gives another loss.
  other = float(cached_loss_fn(cached, jax.random.key(4))[0])
  assert abs(other - float(live_loss)) > 1e-4 * float(live_loss)  # 10x the tolerance above.


def test_train_from_init_from_and_the_cache_steps_the_unet_and_keeps_the_kl_frozen(tmp_path):
  """train_and_evaluate from a converted-style checkpoint (`init_from`) with a KL autoencoder
  and `data.cache_latents`: it starts from those weights, caches the clips' latents with that
  VAE, trains the U-Net on them and leaves the frozen VAE as it was. (The live loss, which
  encodes in the step, is the cached one: test_cached_batch_gives_the_live_loss.)"""
  config = _kl_config()
  config.data.cache_latents = True
  config.num_train_steps, config.warmup_steps = 1, 0  # A step with a learning rate.
  params, frozen = _weights(config)
  pretrained = str(tmp_path / "pretrained")
  checkpoints.save_pretrained(pretrained, params, frozen, config)
  config.init_from = pretrained
  state = trainer.train_and_evaluate(config, str(tmp_path / "run"))
  assert int(state.step) == 1
  jax.tree.map(np.testing.assert_array_equal, state.frozen, frozen)
  moved = [float(np.abs(np.asarray(a) - np.asarray(b)).max())
           for a, b in zip(jax.tree.leaves(state.params["unet"]),
                           jax.tree.leaves(params["unet"]))]
  assert max(moved) > 0 and np.isfinite(moved).all()


def test_cache_of_other_weights_is_refused(kl_cache):
  config, data_dir, params, frozen = kl_cache
  changed = jax.tree.map(lambda x: x * 1.01, frozen)
  with pytest.raises(FileNotFoundError, match="No latent cache"):
    latent_cache.make_cached_loader(config, data_dir, params, changed)


def test_space_to_depth_cache_holds_the_live_latents_and_tokens(tmp_path):
  config = unit_test.get_config()  # Trainable text encoder: tokens, not embeddings.
  data_dir = str(tmp_path / "data")
  params, frozen = {}, {}  # Neither a parameter-free autoencoder nor tokens need weights.
  latent_cache.build_cache(config, data_dir, params, frozen)
  live = next(iter(loaders.make_train_loader(config, data_dir)))
  cached = next(iter(latent_cache.make_cached_loader(config, data_dir, params, frozen)))
  assert set(cached) == {"latent_mean", "tokens"}
  np.testing.assert_array_equal(cached["tokens"], live["tokens"])
  autoencoder = autoencoder_lib.make_autoencoder(config)
  expected = autoencoder.encode(autoencoder_lib.to_pixels(jnp.asarray(live["video"])))
  latents = latent_cache.sample_latents(jnp.asarray(cached["latent_mean"]), None,
                                        jax.random.key(0), config.autoencoder.scaling_factor)
  # Jitted and eager pixel scaling may round differently in the last bit.
  np.testing.assert_allclose(np.asarray(latents), np.asarray(expected), rtol=0, atol=1e-6)
