"""Sharding, mixed precision and attention implementations.

The 8-device checks run in a subprocess (tests/multi_device_checks.py): XLA fixes the device
count at the first jax import, and the rest of the suite runs on one device.
"""

import functools
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
import mesh_steps
from configs import unit_test
from pixeldance_jax.models import layers, pixeldance, unet3d
from pixeldance_jax.parallel import mesh as mesh_lib
from pixeldance_jax.train import state as state_lib
from pixeldance_jax.train import step as step_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory) -> dict:
  """The subprocess's findings, then the one-device reference steps here (after it: by then
  the first worker's cache warm-up has compiled their program)."""
  trained_path = tmp_path_factory.mktemp("eight_devices") / "trained_2x2x2.npz"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  child = subprocess.Popen([sys.executable, str(REPO / "tests" / "multi_device_checks.py"),
                            str(trained_path)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
  try:
    stdout, stderr = child.communicate(timeout=900)
  finally:  # A failure here leaves the child running.
    if child.poll() is None:
      child.kill()
  if child.returncode:
    raise AssertionError(f"multi_device_checks.py failed:\n{stderr[-5000:]}")
  losses, grad_norm, reference = mesh_steps.train((1, 1, 1))
  found = json.loads(stdout.strip().splitlines()[-1])
  found["step"]["1x1x1"] = {"losses": losses, "grad_norm": grad_norm}
  found["step"]["2x2x2"].update(mesh_steps.max_differences(
      dict(np.load(trained_path)), mesh_steps.flat(reference)))
  return found


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["1x8x1", "2x2x2"])
def test_no_large_state_leaf_is_replicated_at_paper_size(eight_devices, mesh):
  offenders = eight_devices["replicated"][mesh]
  assert not offenders, (f"{len(offenders)} state leaves over 1 MiB are fully replicated on "
                         f"mesh data x fsdp x tensor = {mesh}:\n" + "\n".join(offenders))


@pytest.mark.slow
def test_replication_check_sees_replicated_convolutions(eight_devices):
  """The control maps conv_in to None: every conv kernel must then be reported."""
  offenders = eight_devices["replicated"]["control"]
  assert any("['conv1']['kernel']" in leaf for leaf in offenders), offenders[:5]


@pytest.mark.slow
def test_feature_statistics_sharded_over_8_devices_equal_one_device(eight_devices):
  """The evaluation's feature pass (evaluate.features.ShardedExtractor) on meshes 8x1x1 and
  2x2x2, a padded last batch included."""
  assert eight_devices["feature_statistics_relative_error"] < 1e-6


@pytest.mark.parametrize("name,spec,shard_shape", [
    ("conv", [None, None, "fsdp", "tensor"], [3, 3, 8, 8]),
    ("attention", ["fsdp", "tensor"], [8, 8]),
    ("token_embedding", ["tensor", "fsdp"], [24704, 16]),
    ("adam_mu_conv", [None, None, "fsdp", "tensor"], [3, 3, 8, 8]),
])
@pytest.mark.slow
def test_train_state_shards_on_a_2x2x2_mesh(eight_devices, name, spec, shard_shape):
  placement = eight_devices["step"]["placements"][name]
  assert placement["spec"] == spec, placement
  assert placement["shard_shape"] == shard_shape, placement


# Every axis at once (data parallelism alone is a special case: a mesh per case would be one
# more step compile each in a slow subprocess).
MESHES = ["2x2x2"]


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES)
def test_losses_do_not_depend_on_the_mesh(eight_devices, mesh):
  """Three steps from the same state on each mesh (data x fsdp x tensor) against one device."""
  one_device, sharded = eight_devices["step"]["1x1x1"], eight_devices["step"][mesh]
  assert sharded["step"] == 3 and np.all(np.isfinite(sharded["losses"]))
  np.testing.assert_allclose(sharded["losses"], one_device["losses"], rtol=0, atol=1e-5)
  np.testing.assert_allclose(sharded["grad_norm"], one_device["grad_norm"], rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES)
def test_trained_state_does_not_depend_on_the_mesh(eight_devices, mesh):
  """Params, EMA and Adam moments after three steps, as max |difference| from one device.

  The params' tolerance is 3% of the 3 x 1e-3 that three Adam steps can move a weight: a
  gradient that is zero in exact arithmetic (the text encoder's key bias, which softmax
  ignores) is float32 noise whose Adam update m / (sqrt(v) + eps) is not small. A sharding
  bug moves weights by O(lr) (XLA's 2x2x2 conv gradients once did; see layers.Conv).
  """
  found = eight_devices["step"][mesh]
  for part, atol in (("params", 1e-4), ("ema_params", 1e-4), ("opt_state", 1e-6)):
    difference, where = found[part]
    assert difference <= atol, f"{part} on mesh {mesh} differ by {difference:.2e} at {where}"


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_master_weights():
  """`unet.dtype=bfloat16`: the train step's new state is float32 (its shapes, traced: the
  precision is a property of the program, not of running it), and the loss, computed in
  bfloat16, is the float32 loss to bfloat16's precision."""
  config = unit_test.get_config()
  config.update_from_flattened_dict(helpers.ONE_LEVEL_UNET)
  mesh = mesh_lib.make_mesh(config.mesh)
  abstract, _ = state_lib.abstract_state(config, mesh)
  batch = mesh_lib.global_batch(helpers.synthetic_batch(config), mesh)
  low = config.copy_and_resolve_references()
  low.unet.dtype = "bfloat16"
  state, metrics = jax.eval_shape(functools.partial(step_lib.train_step, config=low), abstract,
                                  batch, jax.random.key(1), state_lib.hyperparameters(low))
  trained = (state.params, state.ema_params, state.opt_state)
  dtypes = {str(leaf.dtype) for leaf in jax.tree.leaves(trained) if leaf.ndim}
  assert dtypes == {"float32"}, dtypes
  assert metrics["loss"].dtype == jnp.float32

  params = helpers.random_params(config)
  def loss(changed):
    return float(jax.jit(lambda p: step_lib.loss_fn(p, {}, batch, jax.random.key(1),
                                                    changed)[0])(params))
  low_loss, reference_loss = loss(low), loss(config)
  assert low_loss != reference_loss, "unet.dtype=bfloat16 changed nothing: is it ignored?"
  np.testing.assert_allclose(low_loss, reference_loss, rtol=0.03)


# Implementations compared with "xla" on the unit-test U-Net: the backend each runs on and the
# custom call that shows it ran (a comparison of XLA with XLA under another name cannot fail).
# Not here: None (JAX's choice: XLA on CPU and in float32) and "splash", which leaves the unit-test
# sequences, shorter than a block, to XLA; it is compared on its own below.
ATTENTION_IMPLS = {"cudnn": ("gpu", "__cudnn$fmha")}


def _missing_backend(impl: str) -> str | None:
  """Why `impl` cannot run here, or None."""
  backend, _ = ATTENTION_IMPLS[impl]
  device = jax.devices()[0]
  if device.platform != backend:
    return f"attention_impl={impl!r} runs on a {backend} backend; this one is {device.platform}"
  capability = getattr(device, "compute_capability", "")
  if impl == "cudnn" and not (capability and float(capability) >= 8.0):
    return f"cuDNN fused attention needs CUDA compute capability >= 8.0, got {capability!r}"
  return None


@pytest.fixture(scope="module")
def unet_inputs():
  """Unit-test U-Net parameters with the zero-initialised temporal outputs perturbed.

  Zero temporal outputs would hide the temporal attention from the comparison.
  """
  config = unit_test.get_config()
  model = pixeldance.make_model(config)
  params = jax.jit(model.init)(jax.random.key(0), *pixeldance.dummy_inputs(config))
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x + 0.1 if "temp_" in jax.tree_util.keystr(path) else x, params)
  rng = np.random.default_rng(0)
  sample, timesteps, token_ids = pixeldance.dummy_inputs(config, batch=2)
  sample = jnp.asarray(rng.normal(size=sample.shape), jnp.float32)
  token_ids = jnp.asarray(rng.integers(0, 1000, token_ids.shape), jnp.int32)
  return config, params, (sample, jnp.asarray([3, 700], jnp.int32), token_ids)


def _unet_output(config, params, inputs, impl: str, dtype: str) -> tuple[np.ndarray, str]:
  """(U-Net output, its lowered program as text)."""
  config = config.copy_and_resolve_references()
  config.unet.attention_impl, config.unet.dtype = impl, dtype
  lowered = jax.jit(pixeldance.make_model(config).apply).lower(params, *inputs)
  return np.asarray(lowered.compile()(params, *inputs)), lowered.as_text()


@pytest.mark.parametrize("impl", list(ATTENTION_IMPLS))
def test_attention_implementations_agree(request, impl):
  reason = _missing_backend(impl)
  if reason:
    pytest.skip(reason)
  config, params, inputs = request.getfixturevalue("unet_inputs")  # Only where it runs.
  _, kernel = ATTENTION_IMPLS[impl]
  # cuDNN's fused attention takes only 16-bit inputs: compare in bfloat16 at its precision.
  dtype, atol = ("bfloat16", 3e-2) if impl == "cudnn" else ("float32", 1e-5)
  expected, xla_program = _unet_output(config, params, inputs, "xla", dtype)
  found, program = _unet_output(config, params, inputs, impl, dtype)
  assert kernel in program and kernel not in xla_program, f"{impl!r} did not run {kernel}"
  np.testing.assert_allclose(found, expected, atol=atol, rtol=0)


def _attention_and_grads(impl: str, x: jax.Array, context: jax.Array | None):
  module = layers.Attention(heads=2, head_dim=16, impl=impl)
  params = module.init(jax.random.key(0), x, context)
  loss = lambda params, x: jnp.sum(jnp.sin(module.apply(params, x, context)))
  return module.apply(params, x, context), jax.grad(loss, argnums=(0, 1))(params, x)


@pytest.mark.parametrize("context_length", [None, 77])
def test_splash_attention_agrees_with_xla(context_length):
  """Pallas splash attention (interpreted off TPU): self-attention over 200 positions, padded
  to two blocks, and cross-attention to 77 tokens, padded and masked; outputs and gradients."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 200, 24)), jnp.float32)
  context = None if context_length is None else jnp.asarray(
      rng.normal(size=(2, context_length, 24)), jnp.float32)
  expected = _attention_and_grads("xla", x, context)
  found = _attention_and_grads("splash", x, context)
  for name, a, b in zip(("output", "param grads", "input grads"), jax.tree.leaves(found[0]) +
                        [found[1][0], found[1][1]], jax.tree.leaves(expected[0]) +
                        [expected[1][0], expected[1][1]]):
    for leaf_a, leaf_b in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_allclose(leaf_a, leaf_b, atol=2e-5, rtol=1e-5, err_msg=name)


@pytest.mark.slow
def test_splash_attention_shards_over_the_mesh(eight_devices):
  """On a 2x2x2 mesh splash attention runs per shard (shard_map) and still agrees with XLA."""
  assert eight_devices["splash_2x2x2_relative_error"] < 1e-5


def test_unknown_attention_implementation_is_a_config_error():
  config = unit_test.get_config()
  config.unet.attention_impl = "flash"
  with pytest.raises(ValueError, match="attention_impl"):
    unet3d.UNetSpec.from_config(config)


def _entry_ops(compiled) -> str:
  """The optimised program's entry computation (fused computations left out)."""
  text = compiled.as_text()
  entry = text[text.index("\nENTRY"):]
  return entry[:entry.index("\n}")]


@pytest.mark.slow
def test_the_cpu_train_step_gives_convolutions_to_eigen_and_keeps_matmuls_on_ynnpack():
  mesh = mesh_lib.make_mesh(unit_test.get_config().mesh, jax.devices()[:1])
  options = mesh_lib.train_compiler_options(mesh)
  assert options is not None  # The suite runs on CPU.

  def conv_then_matmul(x, kernel, matrix):
    y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y, jnp.tanh(y).reshape(-1, y.shape[-1]) @ matrix

  rng = np.random.default_rng(0)
  args = (rng.standard_normal((4, 8, 8, 32), np.float32),  # YNNPACK takes >= 32 channels.
          rng.standard_normal((3, 3, 32, 32), np.float32),
          rng.standard_normal((32, 16), np.float32))
  default = jax.jit(conv_then_matmul).lower(*args).compile()
  tuned = jax.jit(conv_then_matmul, compiler_options=options).lower(*args).compile()
  assert " convolution(" not in _entry_ops(default)  # XLA's default: inside a YNNPACK fusion.
  assert " convolution(" in _entry_ops(tuned)  # Eigen's, on all of XLA's threads.
  assert "__ynn_fusion" in _entry_ops(tuned)  # The matmul.
  for got, want in zip(tuned(*args), default(*args)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)  # Sums of 288 products ~ 17.
