"""`python -m pixeldance_jax.convert` round trip on a model folder saved by the torch references.

A diffusers-style folder (unet/, vae/, text_encoder/) of small random models is converted, by the
command as a user runs it, into an Orbax checkpoint that sampling's loader restores (and whose
U-Net then computes the torch U-Net's output) and train.py initialises from.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import unit_test
from pixeldance_jax.convert import pretrained
from pixeldance_jax.sampling import generate, pipeline as sampling_pipeline
from pixeldance_jax.parallel import mesh as mesh_lib
from pixeldance_jax.io import checkpoints
from pixeldance_jax.train import trainer
from pixeldance_jax.train import state as state_lib
from pixeldance_jax.models import unet3d
from processes import run_python as _run

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


# configs/unit_test.py resized to the torch models below: a KL VAE, small U-Net and CLIP. Given
# as flattened keys so the command line (`--config.KEY=VALUE`) and the tests share them.
OVERRIDES = {
    "autoencoder.kind": "kl", "autoencoder.patch_size": 2, "autoencoder.latent_channels": 4,
    "autoencoder.scaling_factor": 0.18215, "autoencoder.block_out_channels": (32, 64),
    "autoencoder.layers_per_block": 1, "autoencoder.norm_num_groups": 8,
    "autoencoder.decode_chunk_frames": 3,
    "text_encoder.hidden_size": 16, "text_encoder.intermediate_size": 37,
    "text_encoder.num_layers": 2, "text_encoder.num_heads": 2,
    "unet.block_out_channels": (32, 64), "unet.attention_levels": (True, False),
    "unet.attention_head_dim": 8, "unet.transformer_in_heads": 8, "unet.norm_num_groups": 8,
    "unet.cross_attention_dim": 16, "unet.pooled_text_embedding": False,
    "conditioning.noise_timestep": 0,
}
TOLERANCE = 1e-4  # float32 max abs error, as tests/test_unet_parity.py.


def _config():
  """The unit-test PixelDance with a KL VAE and sizes that the torch models below share."""
  config = unit_test.get_config()
  config.update_from_flattened_dict(OVERRIDES)
  return config


def _perturbed(model, seed):
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for param in model.parameters():
      param.add_(0.05 * torch.randn(param.shape, generator=generator))
  return model.eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  folder = tmp_path_factory.mktemp("model")
  torch.manual_seed(0)
  unet = diffusers.UNet3DConditionModel(
      sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
      layers_per_block=1, norm_num_groups=8, cross_attention_dim=16, attention_head_dim=8,
      down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
      up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"))
  vae = diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
      down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
      norm_num_groups=8, latent_channels=4, sample_size=16)
  clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=49408, hidden_size=16, intermediate_size=37, num_hidden_layers=2,
      num_attention_heads=2, max_position_embeddings=16))
  for seed, (name, model) in enumerate([("unet", unet), ("vae", vae), ("text_encoder", clip)]):
    _perturbed(model, seed).save_pretrained(folder / name)
  return folder, unet


@pytest.fixture(scope="module")
def converted(model_dir, tmp_path_factory):
  """`python -m pixeldance_jax.convert` run as a user runs it, on the saved torch folder."""
  output = tmp_path_factory.mktemp("converted")
  overrides = [f"--config.{key}={value}" for key, value in OVERRIDES.items()]
  result = _run("-m", "pixeldance_jax.convert", "--config=configs/unit_test.py", *overrides,
                f"--model_dir={model_dir[0]}", f"--output={output}")
  assert all(part in result.stdout for part in ("text_encoder", "unet", "vae")), result.stdout
  return output


@pytest.mark.slow
def test_converted_checkpoint_holds_the_torch_weights(model_dir, converted):
  pipeline = sampling_pipeline.load_pipeline(str(converted))
  kernel = np.asarray(pipeline.params["unet"]["conv_in"]["kernel"])  # [3, 3, 2C, out]
  torch_kernel = model_dir[1].conv_in.weight.detach().numpy().transpose(2, 3, 1, 0)
  np.testing.assert_array_equal(kernel[:, :, :4], torch_kernel)
  assert not kernel[:, :, 4:].any()  # The new c_image channels start at zero.
  assert "autoencoder" in pipeline.frozen


@pytest.mark.slow
def test_sample_from_the_converted_checkpoint(converted):
  pipeline = sampling_pipeline.load_pipeline(str(converted))
  frames = np.zeros((1, 16, 16, 3), np.uint8)
  video = generate.generate(pipeline, ["a red square moves up"], frames, frames, tau=2, seed=0)
  assert video.shape == (1, 4, 16, 16, 3) and video.dtype == np.uint8


@pytest.mark.slow
def test_train_initialises_from_the_converted_checkpoint(converted):
  """The trainer's step 0 is the converted weights (EMA included) with fresh optimiser state,
  and no model initialiser is compiled for it. (train_and_evaluate from init_from, through a KL
  train step, is tests/test_cache.py's, at a size that compiles faster.)"""
  config = _config()
  config.init_from = str(converted)
  mesh = mesh_lib.make_mesh(config.mesh)
  abstract, _ = state_lib.abstract_state(config, mesh)
  state = trainer._initial_state(config, mesh, abstract, None)  # pylint: disable=protected-access
  params, frozen = checkpoints.restore_pretrained(str(converted), abstract.params,
                                                    abstract.frozen)
  jax.tree.map(np.testing.assert_array_equal, (state.params, state.ema_params, state.frozen),
               (params, params, frozen))
  jax.tree.map(lambda x, a: (x.shape, x.dtype, x.sharding) == (a.shape, a.dtype, a.sharding)
               or pytest.fail(f"{x.shape} {x.dtype} is not {a}"), state, abstract)
  assert int(state.step) == 0
  assert not any(np.asarray(leaf).any() for leaf in jax.tree.leaves(state.opt_state))


def test_kl_without_init_from_is_explained(tmp_path):
  with pytest.raises(ValueError, match="init_from"):
    trainer.train_and_evaluate(_config(), str(tmp_path))


@pytest.mark.slow
def test_mismatching_config_lists_the_tensors(model_dir, tmp_path):
  config = _config()
  config.unet.block_out_channels = (32, 48)
  with pytest.raises(ValueError, match="down_blocks"):
    pretrained.convert(config, str(model_dir[0]), str(tmp_path))


@pytest.mark.slow
def test_converted_unet_reproduces_torch(model_dir, converted):
  """The command's checkpoint, restored by sampling's loader, computes the torch U-Net."""
  pipeline = sampling_pipeline.load_pipeline(str(converted))
  assert pipeline.weights == "converted"
  rng = np.random.default_rng(0)
  noisy = rng.normal(size=(2, 3, 8, 8, 4)).astype(np.float32)  # [b, f, h, w, c]
  # c_image: the converted conv_in's new input channels start at zero, so any c_image is ignored.
  c_image = 3.0 * rng.normal(size=noisy.shape).astype(np.float32)
  timesteps = np.asarray([10, 900], np.int64)
  context = rng.normal(size=(2, 5, 16)).astype(np.float32)
  with torch.no_grad():
    expected = model_dir[1](torch.from_numpy(noisy.transpose(0, 4, 1, 2, 3)),
                            torch.from_numpy(timesteps), torch.from_numpy(context)).sample
  expected = expected.numpy().transpose(0, 2, 3, 4, 1)
  model = unet3d.UNet3D(unet3d.UNetSpec.from_config(pipeline.config))
  found = jax.jit(model.apply)({"params": pipeline.params["unet"]},
                              jnp.asarray(np.concatenate([noisy, c_image], -1)),
                              jnp.asarray(timesteps, jnp.int32), jnp.asarray(context))
  error = float(np.abs(np.asarray(found) - expected).max())
  assert error <= TOLERANCE, f"max abs error {error:.2e} (output max {np.abs(expected).max():.2f})"
