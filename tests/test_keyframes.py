"""Keyframes beyond the first and last frame: the paper's conditioning unchanged at the fields'
defaults, training draws, the mask channel, the moving shapes' changed paths, and the
requests' keyframe inputs. (Sampling with keyframes: tests/test_sample.py.)"""

import hashlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from configs import pixeldance as pixeldance_config
from configs import unit_test
from pixeldance_jax.data import conditioning, moving_shapes
from pixeldance_jax.diffusion import schedules
from pixeldance_jax.evaluate import figures, suite
from pixeldance_jax.models import pixeldance
from pixeldance_jax.runtime import programs
from pixeldance_jax.sampling import requests as requests_lib
from pixeldance_jax.sampling import settings as settings_lib
from pixeldance_jax.train import state as state_lib
from pixeldance_jax.train import step as step_lib

# What the code before the keyframe fields drew for `_paper_conditions`'s inputs (commit
# 6b2380a, this suite's XLA flags): c_image's first and last slot at one position (channels 0
# and 1) per example, and the first text token (0: the empty prompt). An extra or reordered
# random draw changes them entirely; the tolerance only absorbs the compiler's rounding.
PAPER_FIRST = [[-0.105609, 0.164364], [0.227321, 1.433943], [1.105131, 0.528653],
               [-0.554073, -1.520262]]
PAPER_LAST = [[0.0, 0.0], [0.815336, -1.222182], [1.438495, -0.116495], [-0.844228, -0.498501]]
PAPER_TEXT = [896, 0, 969, 517]
# SHA-256 prefix of the clips `_straight_clips` generated there (numpy only: exact).
STRAIGHT_CLIPS_SHA = "673048b95f793d9f"


def _paper_conditions(config) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(0)
  latents = jnp.asarray(rng.normal(size=(4, 16, 4, 4, 4)), jnp.float32)
  tokens = jnp.asarray(rng.integers(1, 1000, (4, 77)), jnp.int32)
  alpha_bar = jnp.asarray(schedules.alphas_cumprod(config.diffusion))
  draw = jax.jit(lambda r, l, t: conditioning.training_conditions(
      r, l, t, jnp.zeros((77,), jnp.int32), alpha_bar, config))
  return tuple(np.asarray(x) for x in draw(jax.random.key(7), latents, tokens))


def _straight_clips() -> list[dict]:
  spec = moving_shapes.MovingShapesSpec(frames=16, image_size=32, second_object_prob=0.5,
                                        background_color_prob=0.5, seed=3)
  return [moving_shapes.generate_clip(spec, "train", i) for i in range(8)]


def test_the_paper_conditioning_is_unchanged_at_the_keyframe_defaults():
  config = pixeldance_config.get_config()
  assert not conditioning.Keyframes.from_config(config).drawn
  c_image, text = _paper_conditions(config)
  assert c_image.shape == (4, 16, 4, 4, 4)
  np.testing.assert_allclose(c_image[:, 0, 0, 0, :2], PAPER_FIRST, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(c_image[:, -1, 0, 0, :2], PAPER_LAST, rtol=1e-5, atol=1e-6)
  assert np.all(c_image[:, 1:-1] == 0.0) and text[:, 0].tolist() == PAPER_TEXT
  clips = _straight_clips()
  digest = hashlib.sha256(b"".join(c["video"].tobytes() + c["caption"].encode() for c in clips))
  assert digest.hexdigest()[:16] == STRAIGHT_CLIPS_SHA


def _keyframe_config(**fields):
  config = unit_test.get_config()
  config.data.frames = 8
  config.conditioning.noise_timestep = 0
  config.conditioning.last_frame_drop_prob = 0.0
  config.conditioning.last_frame_candidates = 1
  config.conditioning.update(fields)
  return config


def _conditions(config, batch=512):
  frames = config.data.frames
  # Latent of frame t: t + 1 everywhere, so a c_image slot tells which frame it holds.
  latents = jnp.broadcast_to(jnp.arange(1, frames + 1, dtype=jnp.float32)[None, :, None, None,
                                                                            None],
                             (batch, frames, 2, 2, 3))
  alpha_bar = jnp.asarray(schedules.alphas_cumprod(config.diffusion))
  c_image, _ = conditioning.training_conditions(jax.random.key(0), latents,
                                                jnp.ones((batch, 4), jnp.int32),
                                                jnp.zeros(4, jnp.int32), alpha_bar, config)
  return np.asarray(c_image)


def test_middle_keyframes_are_the_clips_own_frames_at_random_positions():
  config = _keyframe_config(keyframe_prob=0.5, keyframe_max_count=2)
  c_image = _conditions(config)
  slots = c_image[:, :, 0, 0, 0]
  frames = np.arange(1, 9)
  given = slots != 0
  assert np.all(slots[given] == np.broadcast_to(frames, slots.shape)[given])  # At their place.
  assert np.all(given[:, 0]) and np.all(given[:, -1])
  middle = given[:, 1:-1].sum(axis=1)
  assert set(np.unique(middle)) == {0, 1, 2}
  assert abs(np.mean(middle > 0) - 0.5) < 0.07
  assert np.all(given[:, 1:-1].sum(axis=0) > 20)  # Every middle position is drawn.
  assert c_image.shape[-1] == 3  # No mask channel unless configured.


def test_leading_frames_are_a_prefix_and_the_mask_marks_every_given_frame():
  config = _keyframe_config(leading_frames_prob=1.0, max_leading_frames=4, keyframe_mask=True,
                            last_frame_drop_prob=0.5)
  c_image = _conditions(config)
  assert c_image.shape[-1] == 4
  given = c_image[:, :, 0, 0, 0] != 0
  mask = c_image[:, :, 0, 0, 3]
  np.testing.assert_array_equal(mask, given.astype(np.float32))
  leading = given[:, :-1].sum(axis=1)
  assert set(np.unique(leading)) == {2, 3, 4}
  for row, count in zip(given, leading):
    assert row[:count].all() and not row[count:-1].any()
  assert 0.4 < np.mean(given[:, -1]) < 0.6  # The dropped last frame is marked absent.


def test_keyframe_fields_are_checked():
  for fields, message in (({"keyframe_prob": 1.5}, "keyframe_prob=1.5 is a probability"),
                          ({"keyframe_prob": 0.5, "keyframe_max_count": 7},
                           "keyframe_max_count=7: a clip of 8 frames has 1 to 6"),
                          ({"leading_frames_prob": 0.5, "max_leading_frames": 8},
                           "max_leading_frames=8: give 2 to 7")):
    with pytest.raises(ValueError, match=message):
      conditioning.Keyframes.from_config(_keyframe_config(**fields))


def test_the_mask_channel_widens_conv_in_and_the_input_skip_ignores_it():
  config = unit_test.get_config()
  config.update_from_flattened_dict(helpers.ONE_LEVEL_UNET)
  config.conditioning.keyframe_mask = True
  config.unet.input_skip = "all"
  params = jax.eval_shape(lambda rng: pixeldance.init_boxed_params(rng, config),
                          jax.random.key(0))
  latent = config.autoencoder.latent_channels
  assert params["unet"]["conv_in"]["kernel"].value.shape[2] == 2 * latent + 1
  model_input, timesteps, tokens = pixeldance.dummy_inputs(config, batch=2)
  out = jax.eval_shape(pixeldance.make_model(config).apply, {"params": nn.meta.unbox(params)},
                       model_input, timesteps, tokens)
  assert out.shape == model_input.shape[:-1] + (latent,)


def test_changed_paths_keep_the_ends_and_caption_and_leave_the_middle():
  straight = moving_shapes.MovingShapesSpec(frames=8, image_size=32)
  changed = moving_shapes.MovingShapesSpec(frames=8, image_size=32, path_change_prob=1.0)
  seen, offsets = set(), []
  for index in range(40):
    a = moving_shapes.generate_clip(straight, "train", index)
    b = moving_shapes.generate_clip(changed, "train", index)
    assert a["path"] == "straight" and b["path"] in moving_shapes.PATHS
    seen.add(b["path"])
    np.testing.assert_array_equal(a["video"][[0, -1]], b["video"][[0, -1]])
    assert a["caption"] == b["caption"]
    offsets.append(np.linalg.norm(a["centroids"] - b["centroids"], axis=1)[1:-1].max())
    assert b["video"].shape == a["video"].shape
  assert seen == set(moving_shapes.PATHS)
  assert np.mean(offsets) > 3.0  # Pixels off the straight path somewhere in the middle.


def test_keyframe_inputs_parse_and_are_refused_outside_the_middle():
  assert requests_lib.parse_keyframes(["3:mid.png", "1:heldout"]) == {1: "heldout",
                                                                     3: "mid.png"}
  assert requests_lib.parse_keyframes({"2": "a.png"}) == {2: "a.png"}
  for bad, message in ((["x:a.png"], "is not INDEX:IMAGE"), (["3"], "is not INDEX:IMAGE"),
                       (["2:a.png", "2:b.png"], "keyframe 2 is given twice"),
                       ("3:a.png", "must map frame indices")):
    with pytest.raises(ValueError, match=message):
      requests_lib.parse_keyframes(bad)
  config = unit_test.get_config()
  config.data.frames = 8
  settings = settings_lib.default_settings(config)
  requests_lib.check_keyframe_positions(config, {1: "a", 6: "b"}, settings)
  for positions, changes, message in (
      ({0: "a"}, {}, "keyframe 0 is outside 1..6: frame 0 is the first frame, 7 the last"),
      ({7: "a"}, {}, "keyframe 7 is outside 1..6"),
      ({2: "a"}, {"num_clips": 2, "overlap_frames": 3}, "0..2 carry the previous clip"),
      ({}, {"overlap_frames": 7}, "overlap_frames=7 must be at most 6"),
      ({}, {"overlap_frames": 3, "redraw_frames": 4},
       "overlap_frames=3 \\+ redraw_frames=4 must be at most 6")):
    with pytest.raises(ValueError, match=message):
      requests_lib.check_keyframe_positions(config, positions, {**settings, **changes})


def test_the_frames_each_variant_gives_are_outlined_in_its_row():
  assert suite.VARIANTS["magic"].given_frames(8) == [0, 7]
  assert suite.VARIANTS["keyframe"].given_frames(8) == [0, 4, 7]
  assert suite.VARIANTS["continued_overlap"].given_frames(8) == [0, 5, 6, 7]
  assert suite.VARIANTS["continued_overlap"].given_frames(4) == [0, 2, 3]
  assert suite.VARIANTS["continued_redraw"].given_frames(8) == [0, 3, 4, 5]
  assert suite.VARIANTS["continued_redraw"].given_frames(4) == [0, 2, 3]  # No room to redraw.
  video = np.full((3, 8, 8, 3), 255, np.uint8)
  plain = figures.frame_rows([("a", video)], upscale=1)
  marked = figures.frame_rows([("a", video)], upscale=1, marked=[[1]])
  differs = np.any(plain != marked, axis=-1)
  columns = np.nonzero(differs.any(axis=0))[0]
  assert differs.any() and columns.min() > plain.shape[1] - 3 * (8 + 4) - 4  # Frame 1 only.
  assert columns.max() - columns.min() < 8 + 4 + 2


def test_the_train_step_and_the_initialiser_see_the_keyframe_fields():
  """Their programs read a partial copy of the config: one without the keyframe fields would
  train the paper's conditioning (seen: an ablation variant trained without its keyframes)."""
  config = _keyframe_config(keyframe_prob=0.5, leading_frames_prob=0.25, keyframe_mask=True)
  program = programs.program_config(config, step_lib.PROGRAM_FIELDS)
  assert conditioning.Keyframes.from_config(program) == conditioning.Keyframes.from_config(config)
  paper = _keyframe_config()
  assert state_lib.initialiser_key(config) != state_lib.initialiser_key(paper)
  paper_rates = paper.copy_and_resolve_references()
  paper_rates.conditioning.text_drop_prob = 0.5  # A rate only: the same initialiser.
  assert state_lib.initialiser_key(paper_rates) == state_lib.initialiser_key(paper)
