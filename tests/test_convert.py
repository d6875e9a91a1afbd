"""`python -m pixeldance_jax.convert` round trip on a model folder saved by the torch references.

A diffusers-style folder (unet/, vae/, text_encoder/) of small random models is converted into
an Orbax checkpoint that sample.py's loader restores and train.py initialises from.
"""

import jax
import numpy as np
import pytest

from configs import unit_test
from pixeldance_jax import convert
from pixeldance_jax.sampling import generate, pipeline as sampling_pipeline
from pixeldance_jax.parallel import mesh as mesh_lib
from pixeldance_jax import checkpoints
from pixeldance_jax.train import trainer
from pixeldance_jax.train import state as state_lib

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


def _config():
  """The unit-test PixelDance with a KL VAE and sizes that the torch models below share."""
  config = unit_test.get_config()
  ae = config.autoencoder
  ae.kind, ae.patch_size, ae.latent_channels, ae.scaling_factor = "kl", 2, 4, 0.18215
  ae.block_out_channels, ae.layers_per_block, ae.norm_num_groups = (32, 64), 1, 8
  ae.decode_chunk_frames = 3
  text = config.text_encoder
  text.hidden_size, text.intermediate_size, text.num_layers, text.num_heads = 16, 37, 2, 2
  unet = config.unet
  unet.block_out_channels, unet.attention_levels = (32, 64), (True, False)
  unet.attention_head_dim, unet.transformer_in_heads, unet.norm_num_groups = 8, 8, 8
  unet.cross_attention_dim, unet.pooled_text_embedding = 16, False
  config.conditioning.noise_timestep = 0
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
  output = tmp_path_factory.mktemp("converted")
  parts = convert.convert(_config(), str(model_dir[0]), str(output))
  assert sorted(parts) == ["text_encoder", "unet", "vae"]
  return output


def test_converted_checkpoint_holds_the_torch_weights(model_dir, converted):
  pipeline = sampling_pipeline.load_pipeline(str(converted))
  kernel = np.asarray(pipeline.params["unet"]["conv_in"]["kernel"])  # [3, 3, 2C, out]
  torch_kernel = model_dir[1].conv_in.weight.detach().numpy().transpose(2, 3, 1, 0)
  np.testing.assert_array_equal(kernel[:, :, :4], torch_kernel)
  assert not kernel[:, :, 4:].any()  # The new c_image channels start at zero.
  assert "autoencoder" in pipeline.frozen


def test_sample_from_the_converted_checkpoint(converted):
  pipeline = sampling_pipeline.load_pipeline(str(converted))
  frames = np.zeros((1, 16, 16, 3), np.uint8)
  video = generate.generate(pipeline, ["a red square moves up"], frames, frames, tau=2, seed=0)
  assert video.shape == (1, 4, 16, 16, 3) and video.dtype == np.uint8


def test_train_initialises_from_the_converted_checkpoint(converted, tmp_path):
  config = _config()
  config.init_from = str(converted)
  mesh = mesh_lib.make_mesh(config.mesh)
  abstract, _ = state_lib.abstract_state(config, mesh)
  fresh = state_lib.create_train_state(config, mesh, jax.random.key(0))
  state = trainer._initialise_from(fresh, abstract, config)  # pylint: disable=protected-access
  params, frozen = checkpoints.restore_pretrained(str(converted), abstract.params,
                                                    abstract.frozen)
  jax.tree.map(np.testing.assert_array_equal, (state.params, state.ema_params, state.frozen),
               (params, params, frozen))
  config.num_train_steps = 1
  state = trainer.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 1


def test_kl_without_init_from_is_explained(tmp_path):
  with pytest.raises(ValueError, match="init_from"):
    trainer.train_and_evaluate(_config(), str(tmp_path))


def test_mismatching_config_lists_the_tensors(model_dir, tmp_path):
  config = _config()
  config.unet.block_out_channels = (32, 48)
  with pytest.raises(ValueError, match="down_blocks"):
    convert.convert(config, str(model_dir[0]), str(tmp_path))
