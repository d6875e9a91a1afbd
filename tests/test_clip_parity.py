"""Full CLIP (both towers and projections) against transformers' CLIPModel, for CLIPSIM.

A tiny random CLIPModel is saved with `save_pretrained` and read back by `layouts.load_clip`
(safetensors' numpy reader, no torch); image and text embeddings, logits and cosine similarities
must agree within float32 round-off. Text pooling follows the config's `eos_token_id` as
transformers does: the EOS id here lies below other ids, so pooling at the first EOS and
transformers' legacy rule (the largest id, for `eos_token_id` 2) pick different tokens.
"""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors import numpy as safetensors_numpy

from pixeldance_jax.evaluate.networks import clip
from pixeldance_jax.convert import layouts
from pixeldance_jax.models import text_encoder

TOLERANCE = 1e-4  # float32 max abs error.
VOCAB, LENGTH, BOS, EOS = 1000, 16, 499, 500
IMAGE_SIZE, PATCH_SIZE, PROJECTION_DIM = 32, 8, 16


@pytest.fixture(scope="module")
def torch_clip(tmp_path_factory):
  """(CLIPModel, the folder `save_pretrained` wrote it to)."""
  torch.set_num_threads(1)
  torch.manual_seed(0)
  config = transformers.CLIPConfig(
      text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=37,
                       num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=LENGTH,
                       hidden_act="quick_gelu", bos_token_id=BOS, eos_token_id=EOS,
                       pad_token_id=EOS),
      # Other widths and activation than the text tower's, so swapped weights cannot fit.
      vision_config=dict(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, hidden_size=24,
                         intermediate_size=41, num_hidden_layers=2, num_attention_heads=2,
                         hidden_act="gelu"),
      projection_dim=PROJECTION_DIM, attn_implementation="eager")
  model = transformers.CLIPModel(config).eval()
  with torch.no_grad():  # LayerNorms start at (1, 0); random ones test the scale/bias mapping.
    for name, value in model.named_parameters():
      if "norm" in name:
        value.add_(0.1 * torch.randn_like(value))
    model.logit_scale.add_(0.3)
  folder = tmp_path_factory.mktemp("clip_model")
  model.save_pretrained(folder)
  return model, folder


@pytest.fixture(scope="module")
def loaded(torch_clip):
  return layouts.load_clip(torch_clip[1])


def _token_ids() -> np.ndarray:
  """int `[3, LENGTH]`: BOS, random ids (some above EOS), EOS, then EOS padding."""
  ids = np.random.default_rng(0).integers(0, VOCAB - 1, (3, LENGTH))
  ids[ids >= EOS] += 1  # No stray EOS.
  ids[:, 0] = BOS
  for row, eos_at in enumerate((5, 11, LENGTH - 1)):
    ids[row, eos_at:] = EOS
  return ids


def _pixel_values() -> np.ndarray:
  """float32 `[2, IMAGE_SIZE, IMAGE_SIZE, 3]`, channels last as the Flax model reads them."""
  return np.random.default_rng(1).normal(size=(2, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)


def _features(output) -> np.ndarray:
  """transformers 5's get_*_features return a model output whose pooler_output is projected."""
  tensor = output if isinstance(output, torch.Tensor) else output.pooler_output
  return tensor.numpy()


def _torch_embeddings(model, ids: np.ndarray, pixels: np.ndarray):
  with torch.no_grad():
    pixel_values = torch.as_tensor(pixels.transpose(0, 3, 1, 2))
    images = _features(model.get_image_features(pixel_values=pixel_values))
    texts = _features(model.get_text_features(input_ids=torch.as_tensor(ids)))
    logits = model(input_ids=torch.as_tensor(ids), pixel_values=pixel_values).logits_per_image
  return images, texts, logits.numpy()


def _apply(spec, params, *args, method=None):
  return np.asarray(clip.CLIPModel(spec).apply({"params": params}, *args, method=method))


def _max_error(ours, reference) -> float:
  return float(np.abs(np.asarray(ours) - reference).max())


def test_matches_clip_model(torch_clip, loaded):
  model, _ = torch_clip
  spec, params = loaded
  ids, pixels = _token_ids(), _pixel_values()
  images, texts, logits = _torch_embeddings(model, ids, pixels)
  ours_images = _apply(spec, params, jnp.asarray(pixels), method="encode_image")
  ours_texts = _apply(spec, params, jnp.asarray(ids), method="encode_text")
  ours_logits = _apply(spec, params, jnp.asarray(ids), jnp.asarray(pixels))
  assert ours_images.shape == (2, PROJECTION_DIM) and ours_texts.shape == (3, PROJECTION_DIM)
  cosine = torch.nn.functional.cosine_similarity(
      torch.as_tensor(images)[:, None], torch.as_tensor(texts)[None], dim=-1).numpy()
  ours_cosine = clip.clipsim(ours_images[:, None], ours_texts[None])
  # Two "videos" of 3 frames each, every frame scored against its video's caption.
  pick = lambda embeds: np.stack([embeds, embeds[::-1]])[:, [0, 1, 0]]
  video = torch.nn.functional.cosine_similarity(
      torch.as_tensor(pick(images)), torch.as_tensor(texts[:2])[:, None], dim=-1).mean(-1)
  errors = {
      "image": _max_error(ours_images, images), "text": _max_error(ours_texts, texts),
      "logits_per_image": _max_error(ours_logits, logits),
      "cosine": _max_error(ours_cosine, cosine),
      "video_clipsim": _max_error(clip.video_clipsim(pick(ours_images), ours_texts[:2]),
                                  video.numpy())}
  print(f"max abs error {errors}")
  assert max(errors.values()) <= TOLERANCE, errors


def test_legacy_eos_token_id_pools_at_the_largest_id(torch_clip, tmp_path):
  """transformers pools at the largest id when the text config says eos_token_id=2."""
  model, folder = torch_clip
  legacy = tmp_path / "legacy"
  shutil.copytree(folder, legacy)
  config = json.loads((legacy / "config.json").read_text())
  config["text_config"]["eos_token_id"] = 2
  (legacy / "config.json").write_text(json.dumps(config))
  spec, params = layouts.load_clip(legacy)
  assert spec.eos_token_id == 2
  ids = _token_ids()
  assert (ids.argmax(-1) != (ids == EOS).argmax(-1)).all()  # The two rules pick other tokens.
  model.text_model.eos_token_id = 2  # What CLIPTextModel.__init__ reads from such a config.
  try:
    with torch.no_grad():
      reference = _features(model.get_text_features(input_ids=torch.as_tensor(ids)))
  finally:
    model.text_model.eos_token_id = EOS
  ours = _apply(spec, params, jnp.asarray(ids), method="encode_text")
  error = _max_error(ours, reference)
  print(f"legacy pooling max abs error {error}")
  assert error <= TOLERANCE
  first_eos = _apply(layouts.load_clip(folder)[0], params, jnp.asarray(ids), method="encode_text")
  assert _max_error(first_eos, reference) > 100 * TOLERANCE


def _shapes(tree) -> dict:
  return {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_spec_and_parameter_tree(torch_clip, loaded):
  model, _ = torch_clip
  spec, params = loaded
  assert spec == clip.CLIPSpec(
      text=text_encoder.TextEncoderSpec(vocab_size=VOCAB, max_length=LENGTH, hidden_size=32,
                                        intermediate_size=37, num_layers=2, num_heads=2),
      vision=clip.VisionSpec(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, hidden_size=24,
                             intermediate_size=41, num_layers=2, num_heads=2, hidden_act="gelu"),
      projection_dim=PROJECTION_DIM, eos_token_id=EOS)
  assert _shapes(params) == _shapes(clip.param_shapes(spec))
  assert _shapes(params["text_model"]) == _shapes(text_encoder.param_shapes(spec.text))
  assert sorted(params) == ["logit_scale", "text_model", "text_projection", "vision_model",
                            "visual_projection"]
  vision = params["vision_model"]
  assert vision["patch_embedding"]["kernel"].shape == (PATCH_SIZE, PATCH_SIZE, 3, 24)
  assert vision["position_embedding"].shape == ((IMAGE_SIZE // PATCH_SIZE) ** 2 + 1, 24)
  assert params["visual_projection"]["kernel"].shape == (24, PROJECTION_DIM)
  assert float(params["logit_scale"]) == pytest.approx(model.logit_scale.item())
  assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(params))


def test_converter_names_every_mismatch(torch_clip, loaded, tmp_path):
  _, folder = torch_clip
  spec, _ = loaded
  state_dict = layouts.load_safetensors_folder(folder)
  broken = dict(state_dict)
  broken["vision_model.encoder.layers.0.self_attn.query.weight"] = broken.pop(
      "vision_model.encoder.layers.0.self_attn.q_proj.weight")
  del broken["visual_projection.weight"]
  broken["text_projection.weight"] = np.zeros((PROJECTION_DIM, 24), np.float32)
  (tmp_path / "config.json").write_text((folder / "config.json").read_text())
  safetensors_numpy.save_file(broken, str(tmp_path / "model.safetensors"))
  with pytest.raises(ValueError) as error:
    layouts.load_clip(tmp_path)
  message = str(error.value)
  for expected in ("2 missing, 1 unexpected, 1 misshapen", "vision_model/layers_0/q_proj/kernel",
                   "visual_projection/kernel",
                   "vision_model.encoder.layers.0.self_attn.query.weight",
                   "text_projection.weight: got (24, 16)"):
    assert expected in message, message
  # A CLIPTextModel's names (no `text_model.` prefix): counted, the first few listed.
  text_only = {k.removeprefix("text_model."): v for k, v in state_dict.items()
               if k.startswith("text_model.")}
  with pytest.raises(ValueError, match=r"\.\.\. and \d+ more missing") as error:
    layouts.clip_model_params_from_torch_state_dict(text_only, spec)
  assert "embeddings.token_embedding.weight" in str(error.value)


def test_folder_errors(torch_clip, tmp_path):
  _, folder = torch_clip
  with pytest.raises(FileNotFoundError, match="is not a directory"):
    layouts.load_clip(tmp_path / "absent")
  with pytest.raises(FileNotFoundError, match="no config.json"):
    layouts.load_clip(tmp_path)
  (tmp_path / "config.json").write_text((folder / "config.json").read_text())
  with pytest.raises(FileNotFoundError, match=r"No \*\.safetensors.*model\.safetensors"):
    layouts.load_clip(tmp_path)
  config = json.loads((folder / "config.json").read_text())
  with pytest.raises(ValueError, match="CLIPModel config"):
    layouts.clip_model_spec_from_transformers_config(config["text_config"])
  config["vision_config"]["layer_norm_eps"] = 1e-6
  with pytest.raises(ValueError, match="layer_norm_eps"):
    layouts.clip_model_spec_from_transformers_config(config)


def _smooth_frames(height: int, width: int) -> np.ndarray:
  """float32 `[2, height, width, 3]` in [0, 1]: gradients and low frequencies, on the uint8 grid."""
  y, x = np.mgrid[0:height, 0:width] / max(height, width)
  frame = np.stack([0.5 + 0.4 * np.sin(6 * x + 3 * y), 0.5 + 0.3 * np.cos(5 * y), x * y], -1)
  frames = np.stack([frame, frame[::-1]])
  return (np.round(frames * 255) / 255).astype(np.float32)


def test_preprocess_frames_follows_clip_preprocessing():
  mean, std = np.asarray(clip.CLIP_MEAN), np.asarray(clip.CLIP_STD)
  frames = _smooth_frames(32, 48)
  # At the model's size, only normalisation.
  np.testing.assert_allclose(clip.preprocess_frames(frames[:, :, :32], 32),
                             (frames[:, :, :32] - mean) / std, atol=1e-6)
  # [batch, time, ...] videos keep their leading axes; jitted with a static size.
  videos = np.stack([frames, frames])
  ours = jax.jit(clip.preprocess_frames, static_argnums=1)(videos, 64)
  assert ours.shape == (2, 2, 64, 64, 3)
  # PIL, as OpenAI's preprocess: shorter side to 64 (48 -> 96), centre crop, within ~1/255.
  pil = []
  for frame in frames:
    image = Image.fromarray(np.round(frame * 255).astype(np.uint8)).resize((96, 64),
                                                                           Image.BICUBIC)
    pil.append(np.asarray(image)[:, 16:80] / 255)
  error = _max_error(np.asarray(ours[0]) * std + mean, np.stack(pil))
  print(f"preprocess vs PIL max abs error {error * 255:.2f}/255")
  assert error <= 1.5 / 255
