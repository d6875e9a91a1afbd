"""3D U-Net against diffusers: UNet3DConditionModel parity, zero-extended conv_in, 2D inflation.

The torch references are small random models with every parameter perturbed by seeded noise, so
zero-initialised layers (temporal convs' last conv) cannot hide a wrong mapping. They go through
`save_pretrained` and safetensors, as a Hub checkpoint would.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from configs import unit_test
from pixeldance_jax.convert import layouts
from pixeldance_jax.models import unet3d

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TOLERANCE = 1e-4  # float32 max abs error.
LATENT_CHANNELS = 4
CROSS_DIM = 16
# The diffusers models below, in our terms. UNet3DConditionModel's `attention_head_dim` is the
# head width; UNet2DConditionModel's is the number of heads (hence num_attention_heads=8 there).
SPEC_3D = unet3d.UNetSpec(out_channels=LATENT_CHANNELS, block_out_channels=(32, 64),
                          attention_levels=(True, False), layers_per_block=1,
                          attention_head_dim=8, transformer_in_heads=8,
                          cross_attention_dim=CROSS_DIM, norm_num_groups=8)
SPEC_2D = dataclasses.replace(SPEC_3D, num_attention_heads=8)
_COMMON = dict(sample_size=8, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
               block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
               cross_attention_dim=CROSS_DIM, attention_head_dim=8)


def _perturbed(model, seed: int):
  """Every parameter plus seeded N(0, 0.1^2) noise; eval mode (no dropout)."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for param in model.parameters():
      param.add_(0.1 * torch.randn(param.shape, generator=generator))
  return model.eval()


def _saved_state_dict(model, folder) -> dict[str, np.ndarray]:
  model.save_pretrained(folder, safe_serialization=True)
  return layouts.load_safetensors_folder(folder)


@pytest.fixture(scope="module")
def inputs():
  """Video `[b, c, f, h, w]` (torch layout), timesteps `[b]`, text `[b, length, CROSS_DIM]`."""
  rng = np.random.default_rng(0)
  video = rng.normal(size=(2, LATENT_CHANNELS, 3, 8, 8)).astype(np.float32)
  timesteps = np.asarray([10, 900], np.int64)
  context = rng.normal(size=(2, 5, CROSS_DIM)).astype(np.float32)
  return video, timesteps, context


@pytest.fixture(scope="module")
def torch_3d(tmp_path_factory):
  """(state dict read back from safetensors, the model) of a random UNet3DConditionModel."""
  torch.manual_seed(0)
  model = diffusers.UNet3DConditionModel(
      down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
      up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), **_COMMON)
  model = _perturbed(model, seed=1)
  return _saved_state_dict(model, tmp_path_factory.mktemp("unet3d")), model


@pytest.fixture(scope="module")
def torch_3d_output(torch_3d, inputs):
  """diffusers' output in our layout `[b, f, h, w, c]`."""
  video, timesteps, context = inputs
  with torch.no_grad():
    out = torch_3d[1](torch.from_numpy(video), torch.from_numpy(timesteps),
                      torch.from_numpy(context)).sample
  return out.numpy().transpose(0, 2, 3, 4, 1)


def _ours(spec: unet3d.UNetSpec, params, video: np.ndarray, timesteps: np.ndarray,
          context: np.ndarray) -> np.ndarray:
  """Our U-Net on a channels-last video `[b, f, h, w, c]`."""
  out = jax.jit(unet3d.UNet3D(spec).apply)({"params": params}, jnp.asarray(video),
                                           jnp.asarray(timesteps, jnp.int32), jnp.asarray(context))
  return np.asarray(out)


def _max_error(ours: np.ndarray, reference: np.ndarray, what: str) -> float:
  error = float(np.abs(ours - reference).max())
  print(f"{what}: max abs error {error:.3g} (output max abs {np.abs(reference).max():.3g})")
  return error


def test_unet3d_matches_diffusers(torch_3d, torch_3d_output, inputs):
  video, timesteps, context = inputs
  params = layouts.unet_params_from_torch_state_dict(torch_3d[0], SPEC_3D,
                                                     in_channels=LATENT_CHANNELS)
  ours = _ours(SPEC_3D, params, video.transpose(0, 2, 3, 4, 1), timesteps, context)
  assert _max_error(ours, torch_3d_output, "UNet3DConditionModel") <= TOLERANCE


@pytest.mark.slow
def test_zero_extended_conv_in_ignores_c_image_at_first(torch_3d, torch_3d_output, inputs):
  """A C-channel checkpoint in the 2C-input PixelDance model equals the original, any c_image."""
  video, timesteps, context = inputs
  params = layouts.unet_params_from_torch_state_dict(torch_3d[0], SPEC_3D)
  assert params["conv_in"]["kernel"].shape[2] == 2 * LATENT_CHANNELS
  np.testing.assert_array_equal(params["conv_in"]["kernel"][:, :, LATENT_CHANNELS:], 0.0)
  noisy = video.transpose(0, 2, 3, 4, 1)
  c_image = 3.0 * np.random.default_rng(1).normal(size=noisy.shape).astype(np.float32)
  ours = _ours(SPEC_3D, params, np.concatenate([noisy, c_image], -1), timesteps, context)
  assert _max_error(ours, torch_3d_output, "zero-extended conv_in") <= TOLERANCE


def test_mismatched_checkpoint_lists_every_problem(torch_3d):
  state_dict = dict(torch_3d[0])
  del state_dict["mid_block.temp_attentions.0.proj_out.bias"]
  state_dict["down_blocks.0.bogus.weight"] = np.zeros((3,), np.float32)
  state_dict["conv_out.weight"] = np.zeros((5, 32, 3, 3), np.float32)
  with pytest.raises(ValueError) as error:
    layouts.unet_params_from_torch_state_dict(state_dict, SPEC_3D)
  message = str(error.value)
  assert "mid_block/temp_attentions_0/proj_out/bias" in message
  assert "down_blocks.0.bogus.weight" in message
  assert "conv_out.weight: got (3, 3, 32, 5)" in message


@pytest.mark.slow
def test_inflated_2d_unet_equals_diffusers_2d_per_frame(tmp_path, inputs):
  torch.manual_seed(0)
  model = diffusers.UNet2DConditionModel(
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), **_COMMON)
  model = _perturbed(model, seed=2)
  state_dict = _saved_state_dict(model, tmp_path)
  params = layouts.unet_params_from_2d_torch_state_dict(state_dict, SPEC_2D, jax.random.key(0))
  np.testing.assert_array_equal(params["transformer_in"]["proj_out"]["kernel"], 0.0)
  np.testing.assert_array_equal(params["down_blocks_0"]["temp_convs_0"]["conv4"]["kernel"], 0.0)

  video, timesteps, context = inputs
  batch, channels, frames, height, width = video.shape
  frames_as_images = video.transpose(0, 2, 1, 3, 4).reshape(batch * frames, channels, height,
                                                            width)
  with torch.no_grad():
    reference = model(torch.from_numpy(frames_as_images),
                      torch.from_numpy(np.repeat(timesteps, frames)),
                      torch.from_numpy(np.repeat(context, frames, axis=0))).sample.numpy()
  reference = reference.reshape(batch, frames, *reference.shape[1:]).transpose(0, 1, 3, 4, 2)
  noisy = video.transpose(0, 2, 3, 4, 1)
  c_image = np.random.default_rng(2).normal(size=noisy.shape).astype(np.float32)
  ours = _ours(SPEC_2D, params, np.concatenate([noisy, c_image], -1), timesteps, context)
  assert _max_error(ours, reference, "inflated UNet2DConditionModel") <= TOLERANCE


def test_2d_checkpoint_with_temporal_tensors_is_rejected(torch_3d):
  with pytest.raises(ValueError, match=r"unexpected: transformer_in\."):
    layouts.unet_params_from_2d_torch_state_dict(torch_3d[0], SPEC_3D, jax.random.key(0))


_REMAT_FRAMES = 2


class _OneLayer(nn.Module):
  """One U-Net layer as the model builds it (`unet3d._layer`: ResNet, temporal conv, spatial and
  temporal transformers, each wrapped by `_remat`), dropout on."""
  spec: unet3d.UNetSpec

  @nn.compact
  def __call__(self, h, temb, context):
    inputs = unet3d._Inputs(temb=temb, context=context, frames=_REMAT_FRAMES,  # pylint: disable=protected-access
                            use_temporal=True, deterministic=False)
    return unet3d._layer(self.spec, 0, h.shape[-1], True, h, inputs)  # pylint: disable=protected-access


def test_remat_keeps_gradients():
  """One policy, on one layer of every wrapped kind: the layers are wrapped alike for every
  policy, which only tells `jax.checkpoint` what to save (each policy's activations:
  tests/test_model_size.py), and the recomputation must replay the same dropout masks."""
  config = unit_test.get_config()
  spec = dataclasses.replace(unet3d.UNetSpec.from_config(config), dropout=0.3,
                             temporal_conv_dropout=0.3)
  rng = np.random.default_rng(0)
  channels, frames = 16, _REMAT_FRAMES
  h = jnp.asarray(rng.normal(size=(2 * frames, 4, 4, channels)), jnp.float32)
  temb = jnp.asarray(rng.normal(size=(2 * frames, 4 * spec.block_out_channels[0])), jnp.float32)
  context = jnp.asarray(rng.normal(size=(2 * frames, 3, spec.cross_attention_dim)), jnp.float32)
  params = helpers.random_module_params(_OneLayer(spec), h, temb, context, rng=rng, scale=0.2)

  def gradients(policy: str):
    model = _OneLayer(dataclasses.replace(spec, remat_policy=policy))
    loss = lambda p: jnp.mean(model.apply({"params": p}, h, temb, context,
                                          rngs={"dropout": jax.random.key(1)}) ** 2)
    return jax.make_jaxpr(loss)(params), jax.jit(jax.grad(loss))(params)

  plain_jaxpr, expected = gradients("none")
  remat_jaxpr, found = gradients("dots_saveable")
  assert "remat" in str(remat_jaxpr) and "remat" not in str(plain_jaxpr)
  assert jax.tree.structure(found) == jax.tree.structure(expected)
  for got, want in zip(jax.tree.leaves(found), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_unknown_remat_policy_is_an_error():
  config = unit_test.get_config()
  config.unet.remat_policy = "dots"
  with pytest.raises(ValueError, match="remat_policy"):
    unet3d.UNetSpec.from_config(config)
