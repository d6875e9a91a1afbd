"""`python -m pixeldance_jax.convert` as a command, then sampling's loader, against torch.

A diffusers UNet3DConditionModel and a transformers CLIPTextModel with random weights are saved
with `save_pretrained`; the command converts the folder; `sampling.pipeline.load_pipeline`
restores the checkpoint, and the restored U-Net reproduces the torch U-Net's output.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixeldance_jax.models import unet3d
from pixeldance_jax.sampling import pipeline as pipeline_lib
from test_cli import _run

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-4  # float32 max abs error, as tests/test_unet_parity.py.
LATENT_CHANNELS, CROSS_DIM = 4, 16
# configs/unit_test.py resized to the torch models below, as command-line overrides. The model
# is tests/test_convert.py's, whose in-process conversion puts the command's initialisation
# program into the session's compilation cache.
OVERRIDES = {
    "autoencoder.kind": "kl", "autoencoder.patch_size": 2,
    "autoencoder.latent_channels": LATENT_CHANNELS, "autoencoder.scaling_factor": 0.18215,
    "autoencoder.block_out_channels": (32, 64), "autoencoder.layers_per_block": 1,
    "autoencoder.norm_num_groups": 8, "autoencoder.decode_chunk_frames": 3,
    "text_encoder.hidden_size": CROSS_DIM, "text_encoder.intermediate_size": 37,
    "text_encoder.num_layers": 2, "text_encoder.num_heads": 2,
    "unet.block_out_channels": (32, 64), "unet.attention_levels": (True, False),
    "unet.attention_head_dim": 8, "unet.transformer_in_heads": 8, "unet.norm_num_groups": 8,
    "unet.cross_attention_dim": CROSS_DIM, "unet.pooled_text_embedding": False,
    "conditioning.noise_timestep": 0,
}


def _perturbed(model, seed: int):
  """Every parameter plus seeded noise, so zero-initialised layers cannot hide a wrong mapping."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for param in model.parameters():
      param.add_(0.05 * torch.randn(param.shape, generator=generator))
  return model.eval()


@pytest.fixture(scope="module")
def torch_unet(tmp_path_factory):
  """(model folder with unet/ and text_encoder/, the torch U-Net)."""
  folder = tmp_path_factory.mktemp("model")
  torch.manual_seed(0)
  unet = diffusers.UNet3DConditionModel(
      sample_size=8, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
      block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
      cross_attention_dim=CROSS_DIM, attention_head_dim=8,
      down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
      up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"))
  clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=49408, hidden_size=CROSS_DIM, intermediate_size=37, num_hidden_layers=2,
      num_attention_heads=2, max_position_embeddings=16))
  _perturbed(unet, seed=0).save_pretrained(folder / "unet")
  _perturbed(clip, seed=1).save_pretrained(folder / "text_encoder")
  return folder, unet


@pytest.fixture(scope="module")
def converted(torch_unet, tmp_path_factory):
  output = tmp_path_factory.mktemp("converted")
  overrides = [f"--config.{key}={value}" for key, value in OVERRIDES.items()]
  result = _run("-m", "pixeldance_jax.convert", "--config=configs/unit_test.py", *overrides,
                f"--model_dir={torch_unet[0]}", f"--output={output}")
  assert "converted unet, text_encoder" in result.stdout, result.stdout
  return output


def test_converted_unet_reproduces_torch(torch_unet, converted):
  pipeline = pipeline_lib.load_pipeline(str(converted))
  assert pipeline.weights == "converted"
  rng = np.random.default_rng(0)
  noisy = rng.normal(size=(2, 3, 8, 8, LATENT_CHANNELS)).astype(np.float32)  # [b, f, h, w, c]
  # c_image: the converted conv_in's new input channels start at zero, so any c_image is ignored.
  c_image = 3.0 * rng.normal(size=noisy.shape).astype(np.float32)
  timesteps = np.asarray([10, 900], np.int64)
  context = rng.normal(size=(2, 5, CROSS_DIM)).astype(np.float32)
  with torch.no_grad():
    expected = torch_unet[1](torch.from_numpy(noisy.transpose(0, 4, 1, 2, 3)),
                             torch.from_numpy(timesteps), torch.from_numpy(context)).sample
  expected = expected.numpy().transpose(0, 2, 3, 4, 1)
  model = unet3d.UNet3D(unet3d.UNetSpec.from_config(pipeline.config))
  found = jax.jit(model.apply)({"params": pipeline.params["unet"]},
                              jnp.asarray(np.concatenate([noisy, c_image], -1)),
                              jnp.asarray(timesteps, jnp.int32), jnp.asarray(context))
  error = float(np.abs(np.asarray(found) - expected).max())
  print(f"converted U-Net vs torch: max abs error {error:.3g}")
  assert error <= TOLERANCE, f"max abs error {error:.2e} (output max {np.abs(expected).max():.2f})"
