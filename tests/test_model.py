"""U-Net and text encoder: shapes, image batches, zero-initialised temporal layers."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import helpers
from configs import unit_test
from pixeldance_jax.models import autoencoder, layers, pixeldance, text_encoder, unet3d


@pytest.fixture(scope="module")
def setup():
  """(config, jitted denoise(params, sample, timesteps, context, use_temporal), params) of the
  unit-test model at one level (every kind of layer, in the mid block; faster to compile)."""
  config = unit_test.get_config()
  config.update_from_flattened_dict(helpers.ONE_LEVEL_UNET)
  model = pixeldance.make_model(config)
  params = jax.jit(model.init)(jax.random.key(0), *pixeldance.dummy_inputs(config))
  denoise = jax.jit(lambda p, x, t, c, temporal: model.apply(p, x, t, c, temporal,
                                                             method=model.denoise),
                    static_argnums=4)
  return config, denoise, params


def _inputs(config, batch=2, frames=None):
  frames = frames or config.data.frames
  size = config.data.image_size // config.autoencoder.patch_size
  channels = 2 * config.autoencoder.latent_channels
  rng = np.random.default_rng(0)
  sample = jnp.asarray(rng.normal(size=(batch, frames, size, size, channels)), jnp.float32)
  timesteps = jnp.asarray([3, 700][:batch], jnp.int32)
  context = jnp.asarray(rng.normal(size=(batch, config.text_encoder.max_length,
                                         config.text_encoder.hidden_size)), jnp.float32)
  return sample, timesteps, context


def test_video_and_image_batch_shapes(setup):
  config, denoise, params = setup
  sample, timesteps, context = _inputs(config)
  video_out = denoise(params, sample, timesteps, context, True)
  assert video_out.shape == sample.shape[:-1] + (config.autoencoder.latent_channels,)
  image_out = denoise(params, sample[:, :1], timesteps, context, False)
  assert image_out.shape == (2, 1) + video_out.shape[2:]
  assert np.isfinite(np.asarray(video_out)).all()


def test_temporal_layers_start_as_identity(setup):
  """Zero-initialised temporal outputs: at init the video net equals the per-frame image net."""
  config, denoise, params = setup
  sample, timesteps, context = _inputs(config)
  video = denoise(params, sample, timesteps, context, True)
  images = denoise(params, sample, timesteps, context, False)
  np.testing.assert_allclose(video, images, atol=1e-5)


def test_temporal_layers_mix_frames_once_trained(setup):
  config, denoise, params = setup
  perturbed = jax.tree_util.tree_map_with_path(
      lambda path, x: x + 0.1 if "temp_" in jax.tree_util.keystr(path) else x, params)
  sample, timesteps, context = _inputs(config)
  changed = sample.at[:, 0].add(1.0)
  out = lambda p, x: np.asarray(denoise(p, x, timesteps, context, True))
  # Without temporal layers frame 1 ignores frame 0; with trained ones it does not.
  np.testing.assert_allclose(out(params, sample)[:, 1], out(params, changed)[:, 1], atol=1e-5)
  assert np.abs(out(perturbed, sample)[:, 1] - out(perturbed, changed)[:, 1]).max() > 1e-3


def test_input_skip_starts_at_zero_and_adds_each_input_times_its_gain(setup):
  """`unet.input_skip="all"`: one more layer, a gain per input channel from the time embedding,
  zero at init; with the noisy latent's gains at one and c_image's at two, the output gains
  z_t + 2 c_image."""
  config, denoise, params = setup
  config = config.copy_and_resolve_references()
  config.unet.input_skip = "all"
  model = pixeldance.make_model(config)
  skip = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), *pixeldance.dummy_inputs(config)
                                           )["params"]["unet"]["input_skip"])
  channels = config.autoencoder.latent_channels
  assert skip["kernel"].shape[-1] == 2 * channels
  assert not np.any(skip["kernel"]) and not np.any(skip["bias"])
  sample, timesteps, context = _inputs(config)
  without = np.asarray(denoise(params, sample, timesteps, context, True))

  @jax.jit
  def apply(bias):
    unet = dict(params["params"]["unet"], input_skip=dict(skip, bias=bias))
    variables = {"params": dict(params["params"], unet=unet)}
    return model.apply(variables, sample, timesteps, context, True, method=model.denoise)
  np.testing.assert_allclose(apply(skip["bias"]), without, atol=1e-5)
  gains = jnp.concatenate([jnp.ones(channels), 2 * jnp.ones(channels)])
  np.testing.assert_allclose(
      apply(gains), without + sample[..., :channels] + 2 * sample[..., channels:], atol=1e-5)


def test_refiner_starts_at_zero_and_reads_the_raw_inputs(setup):
  """`unet.refiner_channels`: a head beside conv_out whose last conv starts at zero, so the
  model begins as the one without it; once trained it reads z_t and c_image directly."""
  config, _, _ = setup
  config = config.copy_and_resolve_references()
  config.unet.refiner_channels = 16
  model = pixeldance.make_model(config)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0),
                                             *pixeldance.dummy_inputs(config)))
  unet = params["params"]["unet"]
  latent = config.autoencoder.latent_channels
  assert unet["refiner_conv1"]["kernel"].shape == (
      3, 3, config.unet.block_out_channels[0] + 2 * latent, 16)
  assert unet["refiner_conv2"]["kernel"].shape == (3, 3, 16, latent)
  assert not np.any(unet["refiner_conv2"]["kernel"])
  config.unet.refiner_channels = -1
  with pytest.raises(ValueError, match="refiner_channels=-1"):
    unet3d.UNetSpec.from_config(config)
  config.unet.refiner_channels = 0
  without = pixeldance.make_model(config)
  sample, timesteps, context = _inputs(config)

  @functools.partial(jax.jit, static_argnums=0)
  def denoise(m, p, x):
    return m.apply(p, x, timesteps, context, True, method=m.denoise)
  np.testing.assert_allclose(denoise(model, params, sample), denoise(without, params, sample),
                             atol=1e-5)
  kernel = jnp.full_like(unet["refiner_conv2"]["kernel"], 0.01)
  trained = {"params": dict(params["params"], unet=dict(
      unet, refiner_conv2=dict(unet["refiner_conv2"], kernel=kernel)))}
  changed = sample.at[:, :, 0, 0, 0].add(1.0)  # One raw input value at one corner.
  out, out_changed = denoise(model, trained, sample), denoise(model, trained, changed)
  assert np.abs(out - denoise(without, trained, sample)).max() > 1e-4
  assert np.abs(out_changed - out)[:, :, :2, :2].max() > 1e-4


def test_conditions_skip_gains_c_image_alone():
  """`unet.input_skip="conditions"` (the layer the test above places in the U-Net): gains for
  c_image's channels only, so z_t's noise never reaches the output through it."""
  spec = dataclasses.replace(unet3d.UNetSpec.from_config(unit_test.get_config()),
                             input_skip="conditions")
  channels = spec.out_channels

  class Skip(nn.Module):
    @nn.compact
    def __call__(self, sample, temb):
      return unet3d._input_skip(spec, sample, temb)  # pylint: disable=protected-access

  rng = np.random.default_rng(0)
  sample = jnp.asarray(rng.normal(size=(2, 3, 4, 4, 2 * channels)), jnp.float32)
  temb = jnp.asarray(rng.normal(size=(2, 8)), jnp.float32)
  params = nn.meta.unbox(Skip().init(jax.random.key(0), sample, temb)["params"])
  assert params["input_skip"]["kernel"].shape == (8, channels)
  assert not np.any(Skip().apply({"params": params}, sample, temb))
  gains = {"input_skip": {"kernel": jnp.zeros((8, channels)), "bias": 2 * jnp.ones(channels)}}
  np.testing.assert_allclose(Skip().apply({"params": gains}, sample, temb),
                             2 * sample[..., channels:], atol=1e-6)


@pytest.mark.parametrize("value, mode", [(False, "none"), (True, "all"), ("conditions",
                                                                          "conditions")])
def test_input_skip_of_older_configs_reads_as_a_mode(value, mode):
  """Configs saved when the field was a bool keep their model (one saved before the field
  existed gets "none" from `checkpoints.ADDED_KEYS`)."""
  def spec(**unet):
    saved = unit_test.get_config().to_dict()
    saved["unet"].update(unet)
    return unet3d.UNetSpec.from_config(ml_collections.ConfigDict(saved))
  assert spec(input_skip=value).input_skip == mode
  with pytest.raises(ValueError, match="input_skip='copy'"):
    spec(input_skip="copy")


def test_image_batches_create_no_temporal_parameters():
  config = unit_test.get_config()
  spec = unet3d.UNetSpec.from_config(config)
  sample, timesteps, context = _inputs(config, frames=1)
  params = jax.eval_shape(functools.partial(unet3d.UNet3D(spec).init, use_temporal=False),
                          jax.random.key(0), sample, timesteps, context)
  names = jax.tree_util.keystr(params)
  assert "temp_convs" not in names and "temp_attentions" not in names
  assert "transformer_in" not in names


def test_every_parameter_has_logical_axis_names(setup):
  _, _, params = setup
  leaves = jax.tree.leaves(params, is_leaf=lambda x: hasattr(x, "names"))
  assert leaves and all(len(leaf.names) == leaf.value.ndim for leaf in leaves)


def test_text_encoder_is_causal():
  config = unit_test.get_config()
  encoder = text_encoder.TextEncoder(text_encoder.TextEncoderSpec.from_config(config))
  ids = jnp.arange(16, dtype=jnp.int32)[None] + 100
  params = jax.jit(encoder.init)(jax.random.key(0), ids)
  changed = ids.at[0, 10].set(7)
  apply = jax.jit(encoder.apply)
  a, b = apply(params, ids), apply(params, changed)
  np.testing.assert_allclose(a[:, :10], b[:, :10], atol=1e-6)
  assert np.abs(a[:, 10:] - b[:, 10:]).max() > 1e-4


def test_space_to_depth_round_trip():
  ae = autoencoder.SpaceToDepth(patch_size=4)
  pixels = jax.random.uniform(jax.random.key(0), (2, 3, 16, 16, 3), minval=-1, maxval=1)
  latents = ae.encode(pixels)
  assert latents.shape == (2, 3, 4, 4, 48)
  np.testing.assert_array_equal(ae.decode(latents), pixels)


def test_config_mismatch_is_explained():
  config = unit_test.get_config()
  config.unet.cross_attention_dim = 48
  with pytest.raises(ValueError, match="cross_attention_dim"):
    text_encoder.TextEncoderSpec.from_config(config)


@pytest.mark.parametrize("shape,silu,dtype", [((3, 4, 5, 16), False, jnp.float32),
                                              ((2, 3, 4, 4, 24), True, jnp.float32),
                                              ((2, 4, 4, 16), True, jnp.bfloat16)])
def test_group_norm_matches_flax_and_its_gradient(shape, silu, dtype):
  """layers.group_norm_fn (hand-written gradient, SiLU fused) against flax's GroupNorm under
  autodiff: values, and gradients for the input, scale and bias."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  from pixeldance_jax.models import layers  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(shape) * 2 + 0.5, dtype)
  scale, bias = (jnp.asarray(rng.standard_normal(shape[-1]), jnp.float32) for _ in range(2))
  cotangent = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  reference = nn.GroupNorm(num_groups=4, epsilon=1e-5, dtype=jnp.float32)

  def flax_norm(x, scale, bias):
    y = reference.apply({"params": {"scale": scale, "bias": bias}}, x)
    return nn.silu(y) if silu else y

  y_ref, vjp_ref = jax.vjp(flax_norm, x, scale, bias)
  for norm in (layers.group_norm_fn, layers.portable_group_norm):  # CPU kernels', portable.
    y, vjp = jax.vjp(lambda x, scale, bias: norm(x, scale, bias, 4, 1e-5, silu), x, scale, bias)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, y_ref, atol=2e-5)
    for ours_grad, ref_grad in zip(vjp(cotangent), vjp_ref(cotangent)):
      assert ours_grad.dtype == ref_grad.dtype
      tolerance = 2e-2 if ours_grad.dtype == jnp.bfloat16 else 1e-5
      np.testing.assert_allclose(
          np.asarray(ours_grad, np.float32), np.asarray(ref_grad, np.float32),
          atol=tolerance * float(jnp.abs(ref_grad.astype(jnp.float32)).max()))


def _primitives(jaxpr) -> set[str]:
  """Names of the primitives in a jaxpr and the jaxprs nested in it."""
  names = set()
  for eqn in jaxpr.eqns:
    names.add(str(eqn.primitive))
    for param in eqn.params.values():
      inner = getattr(param, "jaxpr", param)
      if hasattr(inner, "eqns"):
        names |= _primitives(inner)
  return names


class _CpuKernelLayers(nn.Module):
  """Every layer with an XLA:CPU formulation of its own, in a row: the temporal conv, GroupNorm
  with SiLU, the 1x1 conv, Dense over `[n, length, features]`, GELU."""

  @nn.compact
  def __call__(self, video):
    b, frames, height, width, channels = video.shape
    x = layers.FrameConv(channels, jnp.float32, name="frame_conv")(video)
    x = layers.group_norm(4, "norm", silu=True)(x.reshape(b * frames, height, width, channels))
    x = layers.conv(channels, (1, 1), jnp.float32, "pointwise")(x)
    x = layers.dense(2 * channels, ("embed", "mlp"), jnp.float32, "dense")(
        x.reshape(b * frames, height * width, channels))
    return layers.gelu(x)


def test_portable_and_cpu_kernels_are_one_function():
  """config.unet.kernels: the portable formulations (what GPUs and TPUs compile) and XLA:CPU's
  own share the parameters and give the same layers, values and gradients (inputs' and
  parameters'); only the CPU ones have custom gradients."""
  rng = np.random.default_rng(0)
  video = jnp.asarray(rng.normal(size=(2, 3, 4, 4, 8)), jnp.float32)
  cotangent = jnp.asarray(rng.normal(size=(6, 16, 16)), jnp.float32)
  params = helpers.random_module_params(_CpuKernelLayers(), video, rng=rng, scale=1 / 3)

  def loss(params, video):
    out = _CpuKernelLayers().apply({"params": params}, video)
    return jnp.sum(out * cotangent), out

  results = {}
  for kernels in ("portable", "cpu"):
    with layers.kernels(kernels):
      forward = jax.make_jaxpr(lambda p, v: loss(p, v)[0])(params, video).jaxpr
      assert ("custom_vjp_call" in _primitives(forward)) == (kernels == "cpu")
      results[kernels] = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(params, video)
  (_, portable_out), portable_grads = results["portable"]
  (_, cpu_out), cpu_grads = results["cpu"]
  np.testing.assert_allclose(cpu_out, portable_out, atol=2e-5)
  assert jax.tree.structure(cpu_grads) == jax.tree.structure(portable_grads)
  for cpu_grad, portable_grad in zip(jax.tree.leaves(cpu_grads), jax.tree.leaves(portable_grads)):
    scale = float(jnp.abs(portable_grad).max()) + 1e-6
    np.testing.assert_allclose(cpu_grad, portable_grad, atol=2e-4 * scale)


@pytest.mark.slow
def test_the_unet_takes_the_kernels_its_config_names():
  """`unet.kernels` reaches every layer of the U-Net (custom gradients only with "cpu"), and
  the two give the same U-Net."""
  config = unit_test.get_config()
  config.update_from_flattened_dict(helpers.ONE_LEVEL_UNET)
  sample, timesteps, context = _inputs(config)
  params = {"params": helpers.random_params(config)}  # Nothing zero: every layer acts.
  outputs = {}
  for kernels in ("portable", "cpu"):
    config.unet.kernels = kernels
    model = pixeldance.make_model(config)
    denoise = lambda params, model=model: model.apply(params, sample, timesteps, context,
                                                      method=model.denoise)
    jaxpr = jax.make_jaxpr(denoise)(params).jaxpr
    assert ("custom_vjp_call" in _primitives(jaxpr)) == (kernels == "cpu")
    outputs[kernels] = jax.jit(denoise)(params)
  np.testing.assert_allclose(outputs["cpu"], outputs["portable"], atol=2e-5)
