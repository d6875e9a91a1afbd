"""KL autoencoder: float32 parity with diffusers' AutoencoderKL, conversion errors, video API."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL

from pixeldance_jax.models import autoencoder, autoencoder_kl
from pixeldance_jax.convert import layouts

TOLERANCE = 1e-4
SPEC = autoencoder_kl.AutoencoderKLSpec(block_out_channels=(32, 64), layers_per_block=1,
                                        norm_num_groups=8, latent_channels=4,
                                        decode_chunk_frames=2)


def _random_torch_vae() -> TorchAutoencoderKL:
  torch.manual_seed(0)
  vae = TorchAutoencoderKL(
      block_out_channels=SPEC.block_out_channels, layers_per_block=SPEC.layers_per_block,
      norm_num_groups=SPEC.norm_num_groups, latent_channels=SPEC.latent_channels,
      down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
      sample_size=32)
  # Noise on every tensor: zero biases and unit norm scales would hide swapped or
  # untransposed parameters.
  with torch.no_grad():
    for parameter in vae.parameters():
      parameter.add_(0.1 * torch.randn_like(parameter))
  return vae.eval()


@pytest.fixture(scope="module")
def torch_vae() -> TorchAutoencoderKL:
  return _random_torch_vae()


@pytest.fixture(scope="module")
def state_dict(torch_vae, tmp_path_factory) -> dict[str, np.ndarray]:
  folder = tmp_path_factory.mktemp("model") / "vae"
  torch_vae.save_pretrained(folder, safe_serialization=True)
  return layouts.load_safetensors_folder(folder)


@pytest.fixture(scope="module")
def kl(state_dict) -> autoencoder_kl.KLAutoencoder:
  params = layouts.vae_params_from_torch_state_dict(state_dict, SPEC)
  return autoencoder_kl.make_kl_autoencoder(SPEC, params)


def _max_error(jax_nhwc: jax.Array, torch_nchw: torch.Tensor) -> float:
  return float(np.abs(np.asarray(jax_nhwc) - torch_nchw.permute(0, 2, 3, 1).numpy()).max())


def test_encode_decode_match_diffusers(torch_vae, kl):
  pixels = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  latents = np.random.default_rng(1).normal(size=(2, 8, 8, 4)).astype(np.float32)
  with torch.no_grad():
    posterior = torch_vae.encode(torch.from_numpy(pixels).permute(0, 3, 1, 2)).latent_dist
    torch_pixels = torch_vae.decode(torch.from_numpy(latents).permute(0, 3, 1, 2)).sample
  apply = lambda method, x: kl.module.apply({"params": kl.params}, x, method=method)
  mean, logvar = apply(autoencoder_kl.AutoencoderKL.encode, pixels)
  decoded = apply(autoencoder_kl.AutoencoderKL.decode, latents)
  errors = {"mean": _max_error(mean, posterior.mean),
            "logvar": _max_error(logvar, posterior.logvar),
            "decode": _max_error(decoded, torch_pixels)}
  references = {"mean": posterior.mean, "logvar": posterior.logvar, "decode": torch_pixels}
  scales = {name: float(value.abs().max()) for name, value in references.items()}
  print(f"max abs error {errors}; max abs reference {scales}")
  assert all(scale > 0.1 for scale in scales.values())  # The comparison is not of near-zeros.
  assert all(error <= TOLERANCE for error in errors.values()), errors


def test_wrapper_scales_and_samples(kl):
  pixels = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3), minval=-1, maxval=1)
  mean, logvar = kl.module.apply({"params": kl.params}, pixels,
                                 method=autoencoder_kl.AutoencoderKL.encode)
  np.testing.assert_allclose(kl.encode(pixels), mean * SPEC.scaling_factor, atol=1e-6)
  sample = kl.encode(pixels, rng=jax.random.key(1))
  assert float(jnp.abs(sample - kl.encode(pixels)).max()) > 1e-3
  decoded = kl.module.apply({"params": kl.params}, mean,
                            method=autoencoder_kl.AutoencoderKL.decode)
  np.testing.assert_allclose(kl.decode(mean * SPEC.scaling_factor), decoded, atol=1e-5)


@pytest.mark.slow
def test_video_is_encoded_frame_by_frame(kl):
  video = jax.random.uniform(jax.random.key(0), (2, 3, 16, 16, 3), minval=-1, maxval=1)
  latents = kl.encode(video)
  assert latents.shape == (2, 3, 8, 8, 4)  # Two levels downsample by 2 ** (2 - 1).
  for frame in range(3):
    np.testing.assert_allclose(latents[:, frame], kl.encode(video[:, frame]), atol=1e-5)


@pytest.mark.slow
def test_chunked_decode_equals_unchunked(kl):
  latents = jax.random.normal(jax.random.key(0), (1, 5, 4, 4, 4))
  unchunked = kl.replace(decode_chunk_frames=0).decode(latents)
  chunked = kl.decode(latents)  # Chunks of 2: 5 frames exercise the padding of the last chunk.
  assert chunked.shape == (1, 5, 8, 8, 3)
  np.testing.assert_allclose(chunked, unchunked, atol=1e-5)
  jitted = jax.jit(lambda ae, x: ae.decode(x))(kl, latents)  # The wrapper is a pytree.
  np.testing.assert_allclose(jitted, unchunked, atol=1e-5)


def test_conversion_lists_every_mismatch(state_dict):
  broken = dict(state_dict)
  broken["encoder.conv_in.weights"] = broken.pop("encoder.conv_in.weight")
  del broken["decoder.mid_block.attentions.0.to_q.bias"]
  broken["quant_conv.weight"] = broken["quant_conv.weight"][:4]
  with pytest.raises(ValueError) as error:
    layouts.vae_params_from_torch_state_dict(broken, SPEC)
  message = str(error.value)
  for expected in ("missing: encoder/conv_in/kernel",
                   "missing: decoder/mid_block/attentions_0/to_q/bias",
                   "unexpected: encoder.conv_in.weights",
                   "misshapen: quant_conv.weight"):
    assert expected in message, message


def test_old_attention_names_convert(state_dict, kl):
  old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  renamed = {}
  for name, value in state_dict.items():
    for new, old in old_names.items():
      name = name.replace(f".{new}.", f".{old}.")
    # The oldest exports stored these linears as 1x1 convs.
    renamed[name] = value[..., None, None] if ".query.weight" in name else value
  params = layouts.vae_params_from_torch_state_dict(renamed, SPEC)
  jax.tree.map(np.testing.assert_array_equal, params, kl.params)


def _kl_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.autoencoder = ae = ml_collections.ConfigDict()
  ae.kind = "kl"
  ae.patch_size = 2
  ae.block_out_channels = SPEC.block_out_channels
  ae.layers_per_block = SPEC.layers_per_block
  ae.norm_num_groups = SPEC.norm_num_groups
  ae.latent_channels = SPEC.latent_channels
  ae.scaling_factor = SPEC.scaling_factor
  ae.decode_chunk_frames = SPEC.decode_chunk_frames
  return config


def test_registry_builds_kl_only_with_params(kl):
  config = _kl_config()
  with pytest.raises(ValueError, match="converted|convert"):
    autoencoder.make_autoencoder(config)
  built = autoencoder.make_autoencoder(config, params=kl.params)
  assert built.module.spec == SPEC and built.scaling_factor == SPEC.scaling_factor
  config.autoencoder.patch_size = 8
  with pytest.raises(ValueError, match="patch_size"):
    autoencoder.make_autoencoder(config, params=kl.params)
