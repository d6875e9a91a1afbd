"""Local video and image collections: decoding, TFDS builders, bad inputs, grain loaders,
joint image batches, and training on a folder of mp4 files (videos written here by imageio)."""

import csv
import json
import logging
import os
import pathlib
import pickle

from absl import flags
import imageio
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import crash_inputs
import helpers
from configs import unit_test
from pixeldance_jax.data import conditioning, local_sources, media, loaders
from pixeldance_jax.io import video_files
from pixeldance_jax.data.builders import build_report
from pixeldance_jax.data.builders.local_videos import LocalVideos
from pixeldance_jax.parallel import mesh as mesh_lib
from pixeldance_jax.train import state as state_lib
from pixeldance_jax.train import step as step_lib

SOURCE_FPS = 30
SOURCE_FRAMES = 40
GREY_STEP = 6  # Frame k of a test video is grey level 6 * k: its index survives lossy coding.
GOOD_CLIPS = 6


def _index_video(num_frames: int = SOURCE_FRAMES) -> np.ndarray:
  """`[frames, 24, 32, 3]`: frame k grey 6 * k, with a 2-pixel black border left and right
  that the centre crop to a square removes."""
  video = np.stack([np.full((24, 32, 3), GREY_STEP * k, np.uint8) for k in range(num_frames)])
  video[:, :, :2] = video[:, :, -2:] = 0
  return video


def _write_mp4(path: pathlib.Path, video: np.ndarray, faststart: bool = False) -> None:
  params = ["-crf", "0"]  # Lossless H.264: grey levels come back within the colour conversion.
  params += ["-movflags", "+faststart"] if faststart else []
  imageio.mimwrite(path, video, fps=SOURCE_FPS, macro_block_size=1, output_params=params)


def _frame_indices(video: np.ndarray) -> list[int]:
  """The source index of each frame, read from the grey level of its centre."""
  height, width = video.shape[1:3]
  centre = video[:, height // 4:-height // 4, width // 4:-width // 4]
  return [round(float(frame.mean()) / GREY_STEP) for frame in centre]


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
  """6 good clips (captions in captions.csv or .txt files) and 4 bad inputs."""
  folder = tmp_path_factory.mktemp("videos")
  (folder / "more").mkdir()
  names = [f"clip{i}.mp4" for i in range(3)] + [f"more/clip{i}.mp4" for i in range(3, 6)]
  for name in names:
    _write_mp4(folder / name, _index_video())
  with open(folder / "captions.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["file", "caption"])
    writer.writerows([[name, f"clip {name}"] for name in names[:3]])
  for name in names[3:]:
    (folder / name).with_suffix(".txt").write_text(f"clip {name}\n")
  (folder / "corrupt.mp4").write_bytes(b"not a video" * 100)
  _write_mp4(folder / "whole.mp4", _index_video(), faststart=True)
  data = (folder / "whole.mp4").read_bytes()
  (folder / "whole.mp4").unlink()
  (folder / "truncated.mp4").write_bytes(data[:len(data) // 2])
  _write_mp4(folder / "short.mp4", _index_video(10))  # 2 frames at 4 fps; a clip needs 4.
  _write_mp4(folder / "uncaptioned.mp4", _index_video())
  for name in ("corrupt", "truncated", "short"):
    (folder / f"{name}.txt").write_text(f"{name} video")
  return folder


def _video_config(video_dir: pathlib.Path):
  config = unit_test.get_config()
  config.data.name = "video_folder"
  config.data.video_dir = str(video_dir)
  config.data.max_stored_frames = 6
  config.data.num_test_clips = 1
  return config


@pytest.fixture(scope="module")
def data_dir(video_dir: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> str:
  path = str(tmp_path_factory.mktemp("tfds"))
  loaders.build_dataset(_video_config(video_dir).data, path)
  return path


# --- Frame sampling and decoding ---------------------------------------------------------------


def test_sample_frame_indices_at_target_fps():
  np.testing.assert_array_equal(video_files.sample_frame_indices(40, 30 / 4, 16), [0, 8, 15, 23, 30, 38])
  np.testing.assert_array_equal(video_files.sample_frame_indices(100, 10 / 4, 5), [0, 3, 5, 8, 10])
  np.testing.assert_array_equal(video_files.sample_frame_indices(100, 2, 3), [0, 2, 4])
  np.testing.assert_array_equal(video_files.sample_frame_indices(3, 0.5, 6), [0, 1, 1, 2, 2])


def test_decode_video_keeps_the_frames_of_the_target_rate(video_dir: pathlib.Path):
  sampling = media.FrameSampling(fps=4, frame_stride=0, max_frames=16, min_frames=4, size=16)
  video, source_fps = media.decode_video(str(video_dir / "clip0.mp4"), sampling)
  assert source_fps == SOURCE_FPS and video.shape == (6, 16, 16, 3) and video.dtype == np.uint8
  assert _frame_indices(video) == [0, 8, 15, 23, 30, 38]
  assert video[1:, :, 0].min() > 0  # The black side borders were cropped away.

  sampling = media.FrameSampling(fps=4, frame_stride=5, max_frames=3, min_frames=2, size=8)
  video, _ = media.decode_video(str(video_dir / "clip0.mp4"), sampling)
  assert video.shape == (3, 8, 8, 3) and _frame_indices(video) == [0, 5, 10]


@pytest.mark.parametrize("name, reason", [
    ("corrupt.mp4", "unreadable"), ("truncated.mp4", "truncated"), ("short.mp4", "too_short"),
    ("absent.mp4", "missing_file")])
def test_decode_video_names_why_an_input_is_unusable(video_dir: pathlib.Path, name: str,
                                                     reason: str):
  sampling = media.FrameSampling(fps=4, frame_stride=0, max_frames=8, min_frames=4, size=16)
  with pytest.raises(media.SkippedInput, match=name) as error:
    media.decode_video(str(video_dir / name), sampling)
  assert error.value.reason == reason


def test_read_image_resizes_short_side_and_centre_crops(tmp_path: pathlib.Path):
  image = np.zeros((20, 40, 3), np.uint8)
  image[:, 10:30] = 200  # The central 20 columns: all that survives the square crop.
  Image.fromarray(image).save(tmp_path / "wide.png")
  out = media.read_image(str(tmp_path / "wide.png"), 10)
  assert out.shape == (10, 10, 3) and out.min() > 150  # Bicubic overshoot at the edge only.


# --- The image reader (builders, latent cache and sampling) ----------------------------------


def test_read_image_composites_rgba_onto_black(tmp_path, caplog):
  rgba = np.zeros((8, 8, 4), np.uint8)
  rgba[..., :3] = (200, 100, 50)
  rgba[:4, :, 3] = 255  # Top half opaque, bottom half transparent.
  path = str(tmp_path / "rgba.png")
  Image.fromarray(rgba, "RGBA").save(path)
  with caplog.at_level(logging.INFO):
    image = media.read_image(path, 8)
  assert image.dtype == np.uint8 and image.shape == (8, 8, 3)
  assert (image[:4] == (200, 100, 50)).all()
  assert (image[4:] == 0).all()
  assert "alpha" in caplog.text


@pytest.mark.parametrize("mode", ["L", "P"])
def test_read_image_converts_grey_and_palette(tmp_path, mode):
  grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
  path = str(tmp_path / f"{mode}.png")
  Image.fromarray(grey, "L").convert(mode).save(path)
  image = media.read_image(path, 8)
  assert image.shape == (8, 8, 3)
  np.testing.assert_array_equal(image, np.stack([grey] * 3, axis=-1))


def _banded_image(path: str) -> None:
  """Saves a 48x32 image: red centre square, blue/green side bands."""
  image = np.zeros((32, 48, 3), np.uint8)
  image[:, :8] = (0, 0, 255)
  image[:, 8:40] = (255, 0, 0)
  image[:, 40:] = (0, 255, 0)
  Image.fromarray(image).save(path)


def test_read_image_centre_crops_and_resizes(tmp_path, caplog):
  path = str(tmp_path / "wide.png")
  _banded_image(path)
  with caplog.at_level(logging.WARNING):
    image = media.read_image(path, 16)
  assert image.shape == (16, 16, 3)
  # The side bands are cropped away, so only red remains.
  assert (image == (255, 0, 0)).all()
  assert "48x32" in caplog.text and "16x16" in caplog.text


def test_read_image_refuses_wrong_size(tmp_path):
  path = str(tmp_path / "wide.png")
  _banded_image(path)
  with pytest.raises(ValueError, match="image is 48x32, the model needs 16x16"):
    media.read_image(path, 16, resize=False)


def test_read_image_missing_file(tmp_path):
  path = str(tmp_path / "missing.png")
  with pytest.raises(media.SkippedInput, match="missing.png") as error:
    media.read_image(path, 16)
  assert error.value.reason == "missing_file"


@pytest.mark.parametrize("content", ["garbage", "truncated"])
def test_read_image_corrupt_file(tmp_path, content):
  path = tmp_path / "bad.png"
  if content == "garbage":
    path.write_bytes(b"this is not an image")
  else:
    Image.fromarray(np.random.default_rng(0).integers(
        0, 255, (64, 64, 3), np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:200])
  with pytest.raises(ValueError, match="bad.png") as error:
    media.read_image(str(path), 64)
  assert isinstance(error.value, media.SkippedInput) and error.value.reason == "unreadable"


def test_read_image_applies_exif_orientation(tmp_path):
  image = np.zeros((4, 8, 3), np.uint8)
  image[:, :4] = 255  # Left half white as stored; EXIF 6 rotates it 90 degrees clockwise.
  exif = Image.Image.getexif(Image.new("RGB", (1, 1)))
  exif[0x0112] = 6
  path = str(tmp_path / "rotated.png")
  Image.fromarray(image).save(path, exif=exif)
  with pytest.raises(ValueError, match="image is 4x8, the model needs 8x8"):
    media.read_image(path, 8, resize=False)  # Upright, it is 4 wide and 8 tall.
  # Upright, the top half is white: the central square's top two rows (unrotated, its left
  # two columns would be).
  upright = media.read_image(path, 4)
  assert (upright[:2] == 255).all() and (upright[2:] == 0).all()


def test_read_image_scales_16_bit_grey(tmp_path):
  grey = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000
  path = str(tmp_path / "grey16.png")
  Image.fromarray(grey).save(path)
  image = media.read_image(path, 8)
  expected = np.round(grey / 257.0).astype(np.uint8)
  np.testing.assert_array_equal(image, np.stack([expected] * 3, axis=-1))


def test_skipped_input_survives_pickling():
  error = pickle.loads(pickle.dumps(media.SkippedInput("unreadable", "x.png: broken")))
  assert error.reason == "unreadable" and str(error) == "x.png: broken"


# --- Video folder builder ----------------------------------------------------------------------


def test_build_writes_good_videos_and_reports_bad_ones(video_dir: pathlib.Path, data_dir: str):
  builder = loaders.build_dataset(_video_config(video_dir).data, data_dir)
  report = json.loads((pathlib.Path(builder.data_dir) / "metadata.json").read_text())
  skipped = {}
  for counts in report["skipped"].values():
    for reason, count in counts.items():
      skipped[reason] = skipped.get(reason, 0) + count
  assert skipped == {"unreadable": 1, "truncated": 1, "too_short": 1, "missing_caption": 1}
  assert report["written"] == {"train": GOOD_CLIPS - 1, "test": 1}
  assert any("corrupt.mp4" in message for message in report["skipped_examples"]["unreadable"])
  assert loaders.report_metrics(loaders.build_report(builder)) == {
      "data/written": GOOD_CLIPS, "data/skipped/unreadable": 1, "data/skipped/truncated": 1,
      "data/skipped/too_short": 1, "data/skipped/missing_caption": 1}


def test_records_hold_captioned_frames_at_the_target_rate(video_dir: pathlib.Path,
                                                          data_dir: str):
  builder = loaders.build_dataset(_video_config(video_dir).data, data_dir)
  train, test = builder.as_data_source("train"), builder.as_data_source("test")
  keys = sorted([record["key"].decode() for record in train] +
                [record["key"].decode() for record in test])
  assert keys == ["clip0.mp4", "clip1.mp4", "clip2.mp4", "more/clip3.mp4", "more/clip4.mp4",
                  "more/clip5.mp4"]
  record = train[0]
  assert record["caption"].decode() == f"clip {record['key'].decode()}"
  assert record["num_frames"] == 6 and record["source_fps"] == SOURCE_FPS
  assert _frame_indices(media.decode_frames(record["frames"])) == [0, 8, 15, 23, 30, 38]
  clip = loaders.load_test_clips(_video_config(video_dir), data_dir, 1)[0]
  assert clip["video"].shape == (4, 16, 16, 3) and clip["caption"].startswith("clip ")


@pytest.mark.slow
def test_parallel_build_writes_the_same_records(video_dir: pathlib.Path, data_dir: str,
                                                tmp_path: pathlib.Path):
  config = _video_config(video_dir)
  config.data.build_workers = 2
  parallel = loaders.build_dataset(config.data, str(tmp_path)).as_data_source("train")
  serial = loaders.build_dataset(_video_config(video_dir).data, data_dir).as_data_source("train")
  assert len(parallel) == len(serial) == GOOD_CLIPS - 1
  for a, b in zip(parallel, serial):
    assert a["key"] == b["key"] and list(a["frames"]) == list(b["frames"])


def test_second_build_is_a_no_op(video_dir: pathlib.Path, data_dir: str,
                                  monkeypatch: pytest.MonkeyPatch):
  def fail(*args, **kwargs):
    raise AssertionError("Rebuilt an already prepared dataset.")
  monkeypatch.setattr(LocalVideos, "_generate_examples", fail)
  loaders.build_dataset(_video_config(video_dir).data, data_dir)


def test_webvid_csv_finds_videos_by_id_and_uses_listed_durations(video_dir: pathlib.Path,
                                                                tmp_path: pathlib.Path):
  csv_path = tmp_path / "results_2M_val.csv"
  with open(csv_path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["videoid", "contentUrl", "duration", "page_dir", "name"])
    writer.writerow(["clip0", "http://x", "PT00H00M01S", "d", "first clip"])
    writer.writerow(["clip4", "http://x", "1.3", "d", "fourth clip"])  # In more/.
    writer.writerow(["gone", "http://x", "PT00H00M09S", "d", "never downloaded"])
    writer.writerow(["clip1", "http://x", "PT00H00M00S", "d", "listed as too short"])
    writer.writerow(["clip0", "http://x", "PT00H00M01S", "d", "first clip again"])
  config = _video_config(video_dir)
  config.data.name, config.data.captions, config.data.num_test_clips = "webvid_csv", str(
      csv_path), 0
  builder = loaders.build_dataset(config.data, str(tmp_path / "tfds"))
  records = builder.as_data_source("train")
  assert [record["caption"].decode() for record in records] == ["first clip", "fourth clip"]
  assert loaders.build_report(builder)["skipped"] == {
      "listing": {"missing_file": 1, "too_short": 1, "duplicate": 1}}


def test_a_collection_without_usable_videos_is_a_clear_error(tmp_path: pathlib.Path):
  (tmp_path / "videos").mkdir()
  (tmp_path / "videos" / "broken.mp4").write_bytes(b"nothing")
  (tmp_path / "videos" / "broken.txt").write_text("a caption")
  config = _video_config(tmp_path / "videos")
  config.data.num_test_clips = 0
  with pytest.raises(ValueError, match="(?s)No usable video.*unreadable 1"):
    loaders.build_dataset(config.data, str(tmp_path / "tfds"))


# --- Loaders -----------------------------------------------------------------------------------


def test_loader_windows_are_consecutive_stored_frames_from_varying_starts(
    video_dir: pathlib.Path, data_dir: str):
  iterator = iter(loaders.make_train_loader(_video_config(video_dir), data_dir))
  stored = [0, 8, 15, 23, 30, 38]
  starts = set()
  for _ in range(10):
    batch = next(iterator)
    assert batch["video"].shape == (4, 4, 16, 16, 3) and batch["tokens"].shape == (4, 16)
    for video in batch["video"]:
      indices = _frame_indices(video)
      start = stored.index(indices[0])
      assert indices == stored[start:start + 4]
      starts.add(start)
  assert starts == {0, 1, 2}

  config = _video_config(video_dir)
  config.data.random_start = False
  batch = next(iter(loaders.make_train_loader(config, data_dir)))
  assert all(_frame_indices(video) == [0, 8, 15, 23] for video in batch["video"])


@pytest.mark.slow
def test_multi_worker_iterator_state_round_trip(video_dir: pathlib.Path, data_dir: str):
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags (app.run parses).
  config = _video_config(video_dir)
  config.data.worker_count = 2
  loader = loaders.make_train_loader(config, data_dir)
  iterator = iter(loader)
  for _ in range(3):  # Past the first epoch (1 batch of 4 of the 5 clips).
    next(iterator)
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(2)]
  restored = iter(loader)
  restored.set_state(state)
  for want in expected:
    got = next(restored)
    np.testing.assert_array_equal(got["video"], want["video"])
    np.testing.assert_array_equal(got["tokens"], want["tokens"])


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
  folder = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  for i in range(5):
    imageio.imwrite(folder / f"img{i}.png", rng.integers(0, 255, (20, 24, 3), np.uint8))
    (folder / f"img{i}.txt").write_text(f"random image {i}")
  (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
  (folder / "broken.txt").write_text("broken")
  imageio.imwrite(folder / "nocaption.png", np.zeros((8, 8, 3), np.uint8))
  return folder


def test_image_folder_loader_gives_one_frame_videos(video_dir: pathlib.Path,
                                                    image_dir: pathlib.Path, data_dir: str):
  config = _video_config(video_dir)
  config.data.image_dataset, config.data.image_dir = "image_folder", str(image_dir)
  config.data.image_batch_size = 4
  batch = next(iter(loaders.make_image_loader(config, data_dir)))
  assert batch["video"].shape == (4, 1, 16, 16, 3) and batch["tokens"].shape == (4, 16)
  image_config = loaders.image_data_config(config)
  report = loaders.build_report(loaders.build_dataset(image_config, data_dir))
  assert report["written"] == {"train": 5}
  assert report["skipped"] == {"listing": {"missing_caption": 1}, "train": {"unreadable": 1}}

  config.data.image_dataset = "video_frames"  # A random stored frame of each video.
  batch = next(iter(loaders.make_image_loader(config, data_dir)))
  assert batch["video"].shape == (4, 1, 16, 16, 3)
  assert all(index in (0, 8, 15, 23, 30, 38) for index in _frame_indices(batch["video"][:, 0]))


def test_image_steps_every_k():
  config = unit_test.get_config()
  config.data.image_every_k_steps = 8
  assert [step for step in range(1, 25) if loaders.is_image_step(config, step)] == [8, 16, 24]
  config.data.image_every_k_steps = 0
  assert not any(loaders.is_image_step(config, step) for step in range(1, 25))
  assert loaders.image_batch_size(config) == config.batch_size * config.data.frames


def test_one_frame_batches_get_no_image_condition_and_the_usual_text_drop():
  config = unit_test.get_config()
  config.conditioning.text_drop_prob = 0.5
  alpha_bar = jnp.linspace(0.99, 0.01, 1000)
  tokens = jnp.arange(8 * 3).reshape(8, 3) + 10
  null_tokens = jnp.zeros(3, jnp.int32)
  embeddings = jnp.broadcast_to(tokens[..., None], (8, 3, 5)).astype(jnp.float32)
  null_embedding = jnp.zeros((3, 5))
  for frames in (1, 4):
    latents = jnp.ones((8, frames, 2, 2, 3))
    c_image, dropped_tokens = conditioning.training_conditions(
        jax.random.key(0), latents, tokens, null_tokens, alpha_bar, config)
    _, dropped_embeddings = conditioning.training_conditions(
        jax.random.key(0), latents, embeddings, null_embedding, alpha_bar, config)
    assert c_image.shape == latents.shape
    assert (frames == 1) == (not c_image.any())
    # Token ids or (cached) embeddings: the same rows are dropped.
    dropped = np.asarray(dropped_tokens[:, 0] == 0)
    assert 0 < dropped.sum() < 8
    np.testing.assert_array_equal(np.asarray(dropped_embeddings[:, 0, 0] == 0), dropped)


@pytest.mark.slow
def test_image_batch_runs_the_unet_with_temporal_layers_off(video_dir: pathlib.Path,
                                                            image_dir: pathlib.Path,
                                                            data_dir: str):
  """The step's loss on an image batch with use_temporal=False (as the trainer runs image
  steps) is finite and does not depend on any temporal layer's weights."""
  config = _video_config(video_dir)
  config.data.image_dataset, config.data.image_dir = "image_folder", str(image_dir)
  config.data.image_batch_size = 4
  abstract, _ = state_lib.abstract_state(config, mesh_lib.make_mesh(config.mesh))
  rng = np.random.default_rng(0)  # Random weights drawn in numpy: no init program to compile.
  params = jax.tree.map(lambda x: jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype),
                        abstract.params)
  frozen = abstract.frozen  # Empty: the unit-test autoencoder has no weights.
  batch = next(iter(loaders.make_image_loader(config, data_dir)))
  loss = jax.jit(lambda p, b: step_lib.loss_fn(p, frozen, b, jax.random.key(1), config,
                                                use_temporal=False)[0])

  def perturbed(is_target):
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.5 if is_target(jax.tree_util.keystr(path)) else x, params)

  temporal = lambda name: any(part in name for part in ("temp_", "transformer_in"))
  base = float(loss(params, batch))
  assert np.isfinite(base) and base > 0
  assert float(loss(perturbed(temporal), batch)) == base
  assert float(loss(perturbed(lambda name: "conv_in" in name), batch)) != base


# --- End to end --------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_on_a_folder_of_mp4s(video_dir: pathlib.Path, tmp_path: pathlib.Path):
  """What README "Training on your own videos" runs, at the unit-test size: unit_test's 4
  steps, with the one-level U-Net of the other machinery tests."""
  from pixeldance_jax.train import trainer  # pylint: disable=g-import-not-at-top
  config = _video_config(video_dir)
  config.update_from_flattened_dict(helpers.ONE_LEVEL_UNET)  # The data path is tested here.
  state = trainer.train_and_evaluate(config, str(tmp_path / "run"))
  assert int(state.step) == config.num_train_steps == 4
  assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["2", "4"]
  heldout = loaders.load_test_clips(config, loaders.data_dir(config, str(tmp_path / "run")), 1)
  assert heldout[0]["video"].shape == (4, 16, 16, 3)


@pytest.mark.parametrize("workers", [1, 2])
def test_one_bad_input_costs_only_itself(workers):
  """An error no reader expects is counted against its file; with workers, a worker killed
  (as by the out-of-memory killer) costs only the file it was reading, and nothing hangs."""
  names = ["a.mp4", "b_error.mp4", "c.mp4", "d_killed.mp4", "e.mp4", "f.mp4", "g.mp4"]
  if workers == 1:  # In this process a kill would end the test run.
    names.remove("d_killed.mp4")
  results = list(build_report.map_inputs(crash_inputs.read, [(name,) for name in names],
                                         len(names), workers, "reading"))
  assert len(results) == len(names)
  for name, (result, skip) in zip(names, results):
    if "error" in name:
      assert result is None and skip == ("failed", f"{name}: RuntimeError: the codec gave up")
    elif "killed" in name:
      assert result is None and skip[0] == "crashed" and skip[1].startswith(name), skip
    else:
      assert result == f"{name} read" and skip is None


def test_a_task_given_to_a_pool_that_already_broke_fails_as_its_others():
  """A worker can die between two results; the next submit then finds the pool broken. That
  task fails like the ones in flight (and is run again with them), not the whole build."""
  executor = build_report._executor(1)  # pylint: disable=protected-access
  try:
    with pytest.raises(build_report.process.BrokenProcessPool):
      executor.submit(os._exit, 1).result()  # pylint: disable=protected-access
    task = (crash_inputs.read, ("a.mp4",))
    late = build_report._submit(executor, task)  # pylint: disable=protected-access
    with pytest.raises(build_report.process.BrokenProcessPool):
      late.result(timeout=10)
  finally:
    executor.shutdown(wait=True, cancel_futures=True)

# --- Listings of untidy collections -----------------------------------------------------------


def test_caption_csvs_with_a_byte_order_mark_read_and_bad_ones_name_the_line(tmp_path):
  folder = tmp_path / "videos"
  folder.mkdir()
  for name in ("a.mp4", "b.mp4"):
    (folder / name).write_bytes(b"")
  captions = folder / "captions.csv"
  captions.write_bytes("\ufefffile,caption\na.mp4,a red ball\nb.mp4,\"a ball, blue\"\n"
                       .encode("utf-8"))
  entries = local_sources.list_folder(str(folder), "", local_sources.VIDEO_EXTENSIONS)
  assert [(e.key, e.caption) for e in entries] == [("a.mp4", "a red ball"),
                                                   ("b.mp4", "a ball, blue")]
  for data, message in (("file,caption\na.mp4,rouge\nb.mp4,bl\xe9\n".encode("latin-1"),
                         r"captions\.csv:3: not UTF-8"),
                        (b"file,caption\na.mp4\n", r"captions\.csv:2: 1 fields, the header has 2"),
                        (b"file,caption\na.mp4,a ball, blue\n", r"captions\.csv:2: 3 fields")):
    captions.write_bytes(data)
    with pytest.raises(ValueError, match=message):
      local_sources.list_folder(str(folder), "", local_sources.VIDEO_EXTENSIONS)


def test_webvid_paths_stay_inside_the_folder_and_symlinked_folders_are_not_walked(tmp_path):
  folder, outside = tmp_path / "videos", tmp_path / "elsewhere"
  folder.mkdir()
  outside.mkdir()
  (folder / "in.mp4").write_bytes(b"")
  (outside / "out.mp4").write_bytes(b"")
  (folder / "linked").symlink_to(outside, target_is_directory=True)
  csv_path = tmp_path / "list.csv"
  csv_path.write_text(f"path,caption\nin.mp4,inside\n../elsewhere/out.mp4,up\n"
                      f"{outside / 'out.mp4'},absolute\n")
  entries = local_sources.list_webvid_csv(str(csv_path), str(folder))
  assert [(e.caption, e.path is not None) for e in entries] == [
      ("inside", True), ("up", False), ("absolute", False)]
  listed = local_sources.list_folder(str(folder), "", local_sources.VIDEO_EXTENSIONS)
  assert [e.key for e in listed] == ["in.mp4"]


def test_slivers_are_refused_not_cropped():
  assert video_files.center_square(np.zeros((8, 64, 3), np.uint8), 8).shape == (8, 8, 3)
  with pytest.raises(ValueError, match="more than 8:1"):
    video_files.center_square(np.zeros((4, 64, 3), np.uint8), 8)
  with pytest.raises(ValueError, match="more than 8:1"):
    video_files.center_square(np.zeros((0, 5, 3), np.uint8), 8)


def test_a_changed_folder_is_another_dataset_and_a_gone_one_finds_its_build(tmp_path):
  """The listing (names, sizes, times) and the captions are part of a dataset's identity."""
  folder = tmp_path / "videos"
  folder.mkdir()
  _write_mp4(folder / "a.mp4", _index_video())
  (folder / "a.txt").write_text("a clip")
  config = _video_config(folder)
  config.data.num_test_clips = 0
  data_dir = str(tmp_path / "tfds")
  built = loaders.build_dataset(config.data, data_dir).builder_config.name
  assert "_files" in built
  name = lambda: loaders.local_videos_builder(config.data, data_dir).builder_config.name
  assert name() == built  # Unchanged: the same dataset, reused.
  (folder / "a.txt").write_text("a clip, captioned again")
  recaptioned = name()
  _write_mp4(folder / "b.mp4", _index_video())
  added = name()
  assert len({built, recaptioned, added}) == 3
  # The folder gone (sampling elsewhere, say): the one dataset built from it is found.
  for path in folder.iterdir():
    path.unlink()
  folder.rmdir()
  assert name() == built
  other = pathlib.Path(data_dir) / "local_videos" / added
  other.mkdir()
  with pytest.raises(FileNotFoundError, match="2 datasets were built from it"):
    name()
