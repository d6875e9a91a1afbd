"""Tests for the moving-shapes generator, its TFDS builder, the grain loader, the tokenizer,
the pixel scaling and the condition noise."""

import logging
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import tiny
from pixeldance_jax.data import conditioning
from pixeldance_jax.data import moving_shapes
from pixeldance_jax.data import loaders
from pixeldance_jax.data.builders.moving_shapes import MovingShapes
from pixeldance_jax.data import tokenizer
from pixeldance_jax.diffusion import schedules
from pixeldance_jax.models import autoencoder as autoencoder_lib

_SPEC = moving_shapes.MovingShapesSpec(
    frames=4, image_size=16, second_object_prob=0.5, background_color_prob=0.5, seed=3)


def _tiny_config() -> ml_collections.ConfigDict:
  config = tiny.get_config()
  config.data.frames = 4
  config.data.image_size = 16
  config.data.num_train_clips = 40
  config.data.num_test_clips = 8
  config.data.second_object_prob = 0.5
  config.data.background_color_prob = 0.5
  config.data.generator_seed = 3
  config.batch_size = 8
  return config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
  path = str(tmp_path_factory.mktemp("tfds"))
  loaders.build_dataset(_tiny_config().data, path)
  return path


def _clips(split: str = "train", count: int = 200) -> list[dict]:
  return [moving_shapes.generate_clip(_SPEC, split, index) for index in range(count)]


def _object_mask(clip: dict) -> np.ndarray:
  """Boolean `[frames, H, W]`: pixels of the main object's colour."""
  return np.all(clip["video"] == clip["color"], axis=-1)


# --- Generator -------------------------------------------------------------


def test_generator_is_deterministic_per_seed_split_index():
  clip = moving_shapes.generate_clip(_SPEC, "train", 5)
  again = moving_shapes.generate_clip(_SPEC, "train", 5)
  np.testing.assert_array_equal(clip["video"], again["video"])
  assert clip["caption"] == again["caption"]
  others = [moving_shapes.generate_clip(_SPEC, "train", 6),
            moving_shapes.generate_clip(_SPEC, "test", 5),
            moving_shapes.generate_clip(moving_shapes.MovingShapesSpec(4, 16, seed=4), "train", 5)]
  for other in others:
    assert not np.array_equal(clip["video"], other["video"])


def test_generator_outputs_have_documented_types():
  clip = moving_shapes.generate_clip(_SPEC, "test", 0)
  assert clip["video"].shape == (4, 16, 16, 3) and clip["video"].dtype == np.uint8
  assert clip["centroids"].shape == (4, 2) and clip["centroids"].dtype == np.float32
  assert clip["velocity"].shape == (2,) and clip["velocity"].dtype == np.float32
  assert clip["color"].dtype == clip["background"].dtype == np.uint8
  with pytest.raises(ValueError, match="validation"):
    moving_shapes.generate_clip(_SPEC, "validation", 0)


def test_object_stays_inside_frame_and_centroids_match_pixels():
  for clip in _clips():
    shape = clip["caption"].split()[2]
    expected_pixels = moving_shapes.shape_mask(
        shape, moving_shapes.object_size(_SPEC.image_size)).sum()
    mask = _object_mask(clip)
    # A clipped object would lose pixels at the border.
    np.testing.assert_array_equal(mask.sum(axis=(1, 2)), expected_pixels)
    for frame_mask, centroid in zip(mask, clip["centroids"]):
      np.testing.assert_allclose(np.argwhere(frame_mask).mean(axis=0), centroid, atol=1e-5)


def test_caption_direction_and_speed_agree_with_motion():
  seen = set()
  for clip in _clips():
    direction, speed = clip["direction"], clip["speed"]
    seen.add((direction, speed))
    assert clip["caption"].endswith(
        f"{moving_shapes.SPEED_ADVERBS[speed]} {moving_shapes.DIRECTION_PHRASES[direction]}")
    displacement = clip["centroids"][-1] - clip["centroids"][0]
    np.testing.assert_array_equal(np.sign(displacement), moving_shapes.DIRECTIONS[direction])
    travel = moving_shapes.SPEEDS[speed] * _SPEC.image_size
    np.testing.assert_allclose(np.abs(displacement[displacement != 0]), travel, atol=1.0)
    np.testing.assert_allclose(clip["velocity"] * (_SPEC.frames - 1), displacement, atol=1.0)
  assert len(seen) == len(moving_shapes.DIRECTIONS) * len(moving_shapes.SPEEDS)


def test_backgrounds_and_distractors_appear_and_stay_distinct():
  clips = _clips()
  coloured = [c for c in clips if c["background"].any()]
  assert 0.3 < len(coloured) / len(clips) < 0.7
  for clip in coloured:
    assert clip["background"].max() <= moving_shapes.BACKGROUND_CHANNEL_RANGE[1]
    assert np.abs(clip["color"].astype(int) - clip["background"]).max() > 150
  colours_per_clip = [len(np.unique(c["video"][0].reshape(-1, 3), axis=0)) for c in clips]
  with_distractor = sum(count == 3 for count in colours_per_clip)
  assert 0.3 < with_distractor / len(clips) < 0.7


# --- TFDS builder ----------------------------------------------------------


def test_builder_writes_array_record_that_matches_generator(data_dir: str):
  config = _tiny_config()
  files = list(pathlib.Path(data_dir).rglob("*.array_record-*"))
  assert {f.name.split(".")[0] for f in files} == {"moving_shapes-train", "moving_shapes-test"}
  builder = loaders.build_dataset(config.data, data_dir)
  spec = moving_shapes.MovingShapesSpec.from_config(config.data)
  for split, count in (("train", 40), ("test", 8)):
    source = builder.as_data_source(split)
    assert len(source) == count
    for index in (0, 7, count - 1):
      record, clip = source[index], moving_shapes.generate_clip(spec, split, index)
      np.testing.assert_array_equal(record["video"], clip["video"])
      np.testing.assert_array_equal(record["centroids"], clip["centroids"])
      assert record["caption"].decode() == clip["caption"]


def test_second_build_is_a_no_op(data_dir: str, monkeypatch: pytest.MonkeyPatch):
  def fail(*args, **kwargs):
    raise AssertionError("Regenerated an already prepared dataset.")
  monkeypatch.setattr(MovingShapes, "_generate_examples", fail)
  loaders.build_dataset(_tiny_config().data, data_dir)


def test_settings_get_their_own_directory():
  config = _tiny_config()
  name = loaders.get_builder(config.data, "/unused").builder_config.name
  config.data.image_size = 32
  assert loaders.get_builder(config.data, "/unused").builder_config.name != name


def test_unknown_dataset_name_lists_known_names():
  config = _tiny_config()
  config.data.name = "moving_shape"
  with pytest.raises(ValueError, match="moving_shapes"):
    loaders.get_builder(config.data, "/unused")


def test_load_test_clips_returns_held_out_clips_in_order(data_dir: str):
  config = _tiny_config()
  clips = loaders.load_test_clips(config, data_dir, 3)
  spec = moving_shapes.MovingShapesSpec.from_config(config.data)
  for index, clip in enumerate(clips):
    expected = moving_shapes.generate_clip(spec, "test", index)
    assert clip["caption"] == expected["caption"]
    np.testing.assert_array_equal(clip["video"], expected["video"])
    np.testing.assert_array_equal(clip["velocity"], expected["velocity"])
  with pytest.raises(ValueError, match="test split has 8"):
    loaders.load_test_clips(config, data_dir, 9)


# --- grain loader ----------------------------------------------------------


def _video_keys(videos: np.ndarray) -> list[bytes]:
  return [video.tobytes() for video in videos]


def test_loader_yields_typed_batches(data_dir: str):
  config = _tiny_config()
  batch = next(iter(loaders.make_train_loader(config, data_dir)))
  assert set(batch) == {"video", "tokens"}
  assert batch["video"].shape == (8, 4, 16, 16, 3) and batch["video"].dtype == np.uint8
  assert batch["tokens"].shape == (8, config.text_encoder.max_length)
  assert batch["tokens"].dtype == np.int32
  np.testing.assert_array_equal(batch["tokens"][:, 0], tokenizer.START_OF_TEXT)


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shards_of_one_epoch_are_disjoint_and_complete(data_dir: str,
                                                               process_count: int):
  config = _tiny_config()
  all_videos = loaders.build_dataset(config.data, data_dir).as_data_source("train")
  everything = set(_video_keys(np.stack([r["video"] for r in all_videos])))
  assert len(everything) == 40
  shards = []
  per_process = 40 // process_count
  batches_per_epoch = per_process // (config.batch_size // process_count)
  for process_index in range(process_count):
    iterator = iter(loaders.make_train_loader(config, data_dir, process_index, process_count))
    shard = sum((_video_keys(next(iterator)["video"]) for _ in range(batches_per_epoch)), [])
    assert len(set(shard)) == len(shard) == per_process  # One epoch: no repeats.
    shards.append(set(shard))
  assert set().union(*shards) == everything
  assert sum(len(shard) for shard in shards) == len(everything)  # Hence pairwise disjoint.


def test_batch_size_must_divide_over_processes(data_dir: str):
  with pytest.raises(ValueError, match="divisible"):
    loaders.make_train_loader(_tiny_config(), data_dir, 0, 3)


def test_iterator_state_round_trip_gives_same_next_batch(data_dir: str):
  loader = loaders.make_train_loader(_tiny_config(), data_dir)
  iterator = iter(loader)
  for _ in range(7):  # Past the first epoch (5 batches), so the epoch is in the state too.
    next(iterator)
  state = iterator.get_state()
  expected = next(iterator)
  restored = iter(loader)
  restored.set_state(state)
  actual = next(restored)
  np.testing.assert_array_equal(actual["video"], expected["video"])
  np.testing.assert_array_equal(actual["tokens"], expected["tokens"])


# --- Tokenizer -------------------------------------------------------------


def test_tokenize_adds_bos_eos_and_padding():
  tokens = tokenizer.tokenize(["a red square moves slowly up", ""], 16, pad_token_id=0)
  assert tokens.shape == (2, 16) and tokens.dtype == np.int32
  length = int(np.argmax(tokens[0] == tokenizer.END_OF_TEXT)) + 1
  assert tokens[0, 0] == tokenizer.START_OF_TEXT and 4 < length < 16
  np.testing.assert_array_equal(tokens[0, length:], 0)
  np.testing.assert_array_equal(tokens[1, :3], [tokenizer.START_OF_TEXT, tokenizer.END_OF_TEXT, 0])


def test_tokenize_normalises_case_and_whitespace_and_tells_captions_apart():
  tokens = tokenizer.tokenize(
      ["a red square moves slowly up", "  A RED\tsquare moves slowly   up ",
       "a red square moves quickly up", "a blue square moves slowly up"], 16)
  np.testing.assert_array_equal(tokens[0], tokens[1])
  assert not np.array_equal(tokens[0], tokens[2])
  assert not np.array_equal(tokens[0], tokens[3])


def test_tokenize_truncates_keeping_eos_and_warns(caplog: pytest.LogCaptureFixture):
  long_text = "a red square moves slowly to the upper left " * 4
  with caplog.at_level(logging.WARNING):
    tokens = tokenizer.tokenize([long_text, "short"], 8)
  assert "Truncated 1 of 2" in caplog.text
  assert tokens[0, 0] == tokenizer.START_OF_TEXT and tokens[0, -1] == tokenizer.END_OF_TEXT
  assert tokenizer.END_OF_TEXT not in tokens[0, :-1]


def test_empty_prompt_tokens():
  tokens = tokenizer.empty_prompt_tokens(5, pad_token_id=7)
  np.testing.assert_array_equal(
      tokens, [tokenizer.START_OF_TEXT, tokenizer.END_OF_TEXT, 7, 7, 7])


def test_every_caption_fits_the_tiny_text_encoder():
  max_length = tiny.get_config().text_encoder.max_length
  captions = [moving_shapes.caption(color, shape, direction, speed)
              for color in moving_shapes.COLORS for shape in moving_shapes.SHAPES
              for direction in moving_shapes.DIRECTIONS for speed in moving_shapes.SPEEDS]
  assert not any(tokenizer.encode(text, max_length)[1] for text in captions)


# --- Pixel scaling and condition noise -------------------------------------


def test_pixel_scaling_round_trips_every_uint8_value():
  values = np.arange(256, dtype=np.uint8)
  pixels = autoencoder_lib.to_pixels(values)
  assert pixels.dtype == jnp.float32
  assert float(pixels[0]) == -1.0 and float(pixels[-1]) == 1.0
  np.testing.assert_array_equal(autoencoder_lib.to_uint8(pixels), values)
  # Decoder outputs overshoot [-1, 1]: clipped, and rounded to the nearest level.
  np.testing.assert_array_equal(
      autoencoder_lib.to_uint8(jnp.array([-1.5, 1.5, -1.0 + 0.6 / 127.5])), [0, 255, 1])


def test_condition_noise_is_per_example():
  """An example's noise depends on its own key only: alone or in a batch, it is the same."""
  alpha_bar = jnp.asarray(schedules.alphas_cumprod(tiny.get_config().diffusion))
  latents = jax.random.normal(jax.random.key(0), (3, 4, 4, 2))
  keys = jax.random.split(jax.random.key(1), 3)
  batch = conditioning.noise_condition(keys, latents, alpha_bar, 100)
  alone = conditioning.noise_condition(keys[1:2], latents[1:2], alpha_bar, 100)
  np.testing.assert_allclose(batch[1:2], alone, rtol=1e-6, atol=1e-6)
  assert not np.allclose(batch, latents)
  np.testing.assert_array_equal(conditioning.noise_condition(keys, latents, alpha_bar, 0),
                                latents)
