"""The evaluation: I3D's weights and FVD's sensitivity, the sampled variants, the real-data
cache, folders with bad videos, and results that never overwrite earlier ones.

FVD's own network runs in the first tests only (I3D at 224x224 is the costly part on CPU); the
machinery around it is tested with a small stand-in feature network.
"""

import json
import os
import pickle

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import helpers
from configs import unit_test
from pixeldance_jax.io import video_files
from pixeldance_jax.data import moving_shapes
from pixeldance_jax.data import loaders
from pixeldance_jax.evaluate import denoising, features, frames, frechet, suite, videos
from pixeldance_jax.evaluate.networks import i3d
from pixeldance_jax.parallel import mesh as mesh_lib
from pixeldance_jax.sampling import pipeline as sampling_pipeline

# The four variants the evaluation CLI offers by default (the other two only change inputs).
_EVALUATED = ("magic", "basic", "no_text", "text_only")


def _mesh():
  return mesh_lib.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1}))


def _moving_shapes(count, frames=8, size=32, seed=0):
  spec = moving_shapes.MovingShapesSpec(frames=frames, image_size=size, seed=seed)
  return np.stack([moving_shapes.generate_clip(spec, "test", i)["video"] for i in range(count)])


@pytest.fixture(scope="module")
def i3d_fvd():
  """FVD of 2 moving-shape clips (8 frames of 32x32) against altered copies of themselves: one
  I3D call on the 4 sets together (I3D at 224x224 is the costly part on the CPU)."""
  clips = _moving_shapes(2)
  rng = np.random.default_rng(0)
  noisy = [np.clip(clips + rng.normal(0, sigma, clips.shape), 0, 255).astype(np.uint8)
           for sigma in (16, 64)]
  shuffled = clips[:, rng.permutation(clips.shape[1])]
  sets = [clips, *noisy, shuffled]
  extractor = features.ShardedExtractor(features.i3d_extractor(), _mesh(), 2 * len(sets))
  logits = extractor(np.concatenate(sets))[:, 0]
  stats = [frechet.RunningStats(i3d.FEATURE_DIM).update(logits[2 * k:2 * k + 2])
           for k in range(len(sets))]
  fvd = lambda k: frechet.frechet_distance_of(stats[0], stats[k])
  return {"features": logits, "self": fvd(0), "noise": [fvd(1), fvd(2)], "shuffled": fvd(3)}


@pytest.mark.slow
def test_i3d_weights_load_and_give_finite_logits(i3d_fvd):
  assert i3d_fvd["features"].shape == (8, 400)
  assert np.isfinite(i3d_fvd["features"]).all()
  assert i3d_fvd["features"].std() > 0.1  # Not a dead network.


@pytest.mark.slow
def test_fvd_is_zero_for_a_set_with_itself_and_grows_with_noise_and_frame_shuffling(i3d_fvd):
  assert abs(i3d_fvd["self"]) < 1e-3
  noise = i3d_fvd["noise"]
  assert 0 < noise[0] < noise[1], noise
  assert i3d_fvd["shuffled"] > 1.0, i3d_fvd["shuffled"]  # Same frames, another order.


def test_mismatched_i3d_weights_list_what_does_not_match(tmp_path):
  with open(i3d.weights_path(), "rb") as f:
    stored = pickle.load(f)
  del stored["params"]["Mixed_3b"]["Branch_0/Conv3d_0a_1x1"]
  stored["params"]["Conv3d_1a_7x7"]["Conv_0"]["kernel"] = np.zeros((3, 3, 3, 3, 64))
  path = tmp_path / "broken.ckpt"
  with open(path, "wb") as f:
    pickle.dump(stored, f)
  with pytest.raises(ValueError, match=r"(?s)2 missing, 1 misshapen.*missing: .*Branch_0/Conv3d_0a_1x1"
                                       r".*misshapen: .*Conv3d_1a_7x7"):
    i3d.load_variables(str(path))


def test_frames_resample_to_the_clip_length_of_i3d():
  clips = jnp.arange(8)[None, :]
  assert features.resample_frames(clips, 16).tolist() == [[0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5,
                                                           6, 6, 7, 7]]
  assert features.resample_frames(jnp.arange(20)[None], 16).tolist() == [list(range(16))]


# --- The machinery, with a stand-in feature network --------------------------------------------

class _Counting(features.ShardedExtractor):
  """Records the size of every batch it is called with."""

  def __init__(self, calls):
    super().__init__(helpers.toy_extractor(), _mesh(), 2)
    self.calls = [] if calls is None else calls

  def __call__(self, batch):
    self.calls.append(len(batch))
    return super().__call__(batch)


def _toy_networks(calls=None, conditioning=True):
  extractor = _Counting(calls)
  return suite.Networks(extractors={"fvd": extractor}, encode_captions=None,
                        conditioning=conditioning, notes=[])


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
  """`evaluate_pipeline` of a random-weight unit-test model, every variant."""
  config = unit_test.get_config()
  pipeline = helpers.random_pipeline(config, seed=1)
  root = tmp_path_factory.mktemp("eval")
  data_dir = loaders.data_dir(config, str(root))
  calls = []
  networks = _toy_networks(calls)
  results = suite.evaluate_pipeline(
      pipeline, data_dir, metric_names=("fvd", "conditioning"), num_videos=2,
      variants=_EVALUATED, global_batch=2, steps=2, networks=networks,
      cache_dir=str(root / "cache"))
  calls_first = len(calls)
  again = suite.evaluate_pipeline(
      pipeline, data_dir, metric_names=("fvd",), num_videos=2, variants=("basic",),
      global_batch=2, steps=2, networks=_toy_networks(calls, conditioning=False),
      cache_dir=str(root / "cache"))
  return results, again, calls_first, len(calls) - calls_first, root


@pytest.mark.slow
def test_every_variant_is_sampled_and_compared_with_the_real_clips(evaluated):
  results = evaluated[0]
  assert list(results["variants"]) == list(_EVALUATED)
  for name, values in results["variants"].items():
    assert values["videos"] == 2, name
    assert np.isfinite(values["fvd"]) and values["fvd"] > 0, (name, values)
    for field in ("last_frame_centroid_px", "first_frame_centroid_px", "failed_fraction",
                  "psnr_db", "shape_iou", "colour_error", "first_frame_psnr_db"):
      assert field in values, (name, values)
    assert 0 <= values["shape_iou"] <= 1 and values["psnr_db"] > 0, (name, values)
  assert results["real"]["videos"] == 2
  assert np.isfinite(results["floor"]["fvd"])  # Held-out clips 0-1 against clips 2-3.
  assert json.loads(json.dumps(results)) == results
  table = suite.markdown_table(results)
  assert "| text + first + last frame (tau = steps) | 2 |" in table, table
  assert "the floor" in table and "| psnr_db | shape_iou |" in table, table


@pytest.mark.slow
def test_keyframe_and_continuation_variants_measure_their_own_fields(tmp_path):
  """The middle keyframe variant measures the distance to the given keyframe (and, on clips
  whose middle their ends do not decide, the middle frame); a long video only its seam."""
  config = unit_test.get_config()  # The sampling programs of tests/test_sample.py.
  config.data.path_change_prob = 1.0
  pipeline = helpers.random_pipeline(config, seed=1)
  results = suite.evaluate_pipeline(
      pipeline, loaders.data_dir(config, str(tmp_path)), metric_names=("conditioning",),
      num_videos=2, variants=("keyframe", "continued_overlap"), global_batch=2, steps=2,
      networks=suite.Networks({}, None, True, []), floor=False, cache_dir=None)
  keyframe, continued = (results["variants"][name] for name in ("keyframe",
                                                                "continued_overlap"))
  assert keyframe["videos"] == continued["videos"] == 2
  assert keyframe["keyframe_centroid_px"] is not None or keyframe["failed_fraction"] > 0
  assert "velocity_seam_px" in continued and continued["psnr_db"] is None
  assert "velocity_change_px" in continued
  assert keyframe["velocity_seam_px"] is None and keyframe["velocity_change_px"] is None


@pytest.mark.slow
def test_real_statistics_are_cached_and_reused(evaluated):
  _, again, calls_first, calls_again, root = evaluated
  # First run: real and floor sets (1 batch each) + 4 variants; then only the variant.
  assert calls_first >= 6 and calls_again == 1, (calls_first, calls_again)
  assert len(os.listdir(root / "cache")) == 2
  assert again["variants"]["basic"]["fvd"] > 0


@pytest.mark.slow
def test_results_never_overwrite_earlier_ones(evaluated, tmp_path):
  results = evaluated[0]
  first = suite.write_results(results, str(tmp_path / "eval" / "3.json"))
  second = suite.write_results(results, str(tmp_path / "eval" / "3.json"))
  assert [os.path.basename(p) for p in first + second] == ["3.json", "3.md", "3-2.json",
                                                           "3-2.md"]
  assert suite.scalars(results)["eval/magic/fvd"] == results["variants"]["magic"]["fvd"]


def test_folders_with_unreadable_and_short_videos_are_counted_and_skipped(tmp_path):
  clips = _moving_shapes(5, frames=6, size=16)
  real, fake = tmp_path / "real", tmp_path / "fake"
  for index, clip in enumerate(clips[:3]):
    video_files.write_video(clip, str(real / f"{index}.mp4"), fps=4)
  video_files.write_video(clips[3][:3], str(real / "short.mp4"), fps=4)
  (real / "broken.mp4").write_bytes(b"not a video")
  for index, clip in enumerate(clips[3:]):
    video_files.write_video(clip, str(fake / f"{index}.mp4"), fps=4)
  mesh = _mesh()
  assert videos.VideoFolder(str(real), frames=6, size=None).size == 16  # The first video's.
  results = suite.compare_folders(str(real), str(fake), metric_names=["fvd"], frames=6,
                                  size=None, mesh=mesh, global_batch=2, cache_dir=None,
                                  networks=_toy_networks())
  assert results["real"] == {"videos": 3, "skipped": {"unreadable": 1, "too_short": 1}}
  assert results["fake"]["videos"] == 2 and results["fake"]["fvd"] > 0
  assert "| fake folder vs real folder | 2 |" in suite.markdown_table(results)
  with pytest.raises(FileNotFoundError, match="video folder not found"):
    videos.VideoFolder(str(tmp_path / "absent"), frames=6, size=16)
  with pytest.raises(ValueError, match="unknown metrics"):
    suite.load_networks(["fvd", "ssim"], mesh, 2)
  networks = suite.load_networks(["fid", "clipsim"], mesh, 2)
  assert [note.split(":")[0] for note in networks.notes] == ["FID skipped", "CLIPSIM skipped"]
  with pytest.raises(FileNotFoundError):
    suite.load_networks(["fid"], mesh, 2, fid_weights=str(tmp_path / "absent.pth"))


def test_each_process_gets_an_equal_number_of_shares():
  shares = [list(map(list, videos.shares(7, 4, p, 2))) for p in range(2)]
  assert shares == [[[0, 1], [4, 5]], [[2, 3], [6]]]
  assert [list(r) for r in videos.shares(3, 4, 1, 2)] == [[2]]
  assert [list(r) for r in videos.shares(1, 4, 1, 2)] == [[]]


@pytest.mark.slow
def test_clipsim_of_a_captioned_folder_is_the_mean_frame_caption_cosine(tmp_path):
  """CLIPSIM through the whole path (folder, captions, jitted CLIP, averaging) against the CLIP
  module applied directly; a tiny random transformers CLIPModel with CLIP's vocabulary."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from pixeldance_jax.data import tokenizer  # pylint: disable=import-outside-toplevel
  from pixeldance_jax.evaluate.networks import clip  # pylint: disable=import-outside-toplevel
  from pixeldance_jax.convert import layouts
  torch.manual_seed(0)
  config = transformers.CLIPConfig(
      text_config=dict(vocab_size=49408, hidden_size=16, intermediate_size=32,
                       num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                       bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
      vision_config=dict(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2),
      projection_dim=8)
  transformers.CLIPModel(config).save_pretrained(tmp_path / "clip")
  clips = _moving_shapes(3, frames=4, size=16)
  captions = ["a red square moves left", "a blue circle", "a green triangle moves up"]
  folder = tmp_path / "videos"
  for index, clip_frames in enumerate(clips):
    video_files.write_video(clip_frames, str(folder / f"{index}.mp4"), fps=4)
    (folder / f"{index}.txt").write_text(captions[index])
  results = suite.compare_folders(str(folder), str(folder), metric_names=["clipsim"], frames=4,
                                  size=None, mesh=_mesh(), global_batch=2, cache_dir=None,
                                  clip_model=str(tmp_path / "clip"))
  spec, params = layouts.load_clip(tmp_path / "clip")
  model = clip.CLIPModel(spec)
  decoded = np.stack([videos.VideoFolder(str(folder), 4, 16).load(i)[0] for i in range(3)])
  pixels = clip.preprocess_frames(decoded.astype(np.float32) / 255, spec.vision.image_size)
  image = model.apply({"params": params}, pixels.reshape((-1,) + pixels.shape[2:]),
                      method="encode_image").reshape(3, 4, -1)
  text = model.apply({"params": params}, tokenizer.tokenize(captions, spec.text.max_length),
                     method="encode_text")
  expected = float(np.mean(clip.video_clipsim(image, text)))
  assert results["real"]["clipsim"] == pytest.approx(expected, abs=1e-5)
  assert results["fake"]["clipsim"] == pytest.approx(expected, abs=1e-5)


def test_one_step_reconstructions_per_timestep(tmp_path):
  """An epsilon-prediction model's clean estimate at t = 0 is the noisy clip itself but for
  sqrt(1 - alpha_bar_0) = 1% of its output, whatever its weights: the real clip again (the
  fidelity metrics' known answer); at t = 999 the random model's estimate is not the clip."""
  config = unit_test.get_config()
  config.update_from_flattened_dict(helpers.ONE_LEVEL_UNET)
  config.diffusion.prediction_type = "epsilon"
  pipeline = helpers.random_pipeline(config, seed=1)
  results = denoising.measure(pipeline, loaders.data_dir(config, str(tmp_path)), num_videos=3,
                              timesteps=(0, 999), batch_size=2)
  rows = results["timesteps"]
  assert list(rows) == ["0", "999"] and results["num_videos"] == 3
  assert rows["0"]["noise_std"] == pytest.approx(0.01, rel=1e-3) and rows["999"]["noise_std"] > 0.99
  assert rows["0"]["shape_iou"] > 0.95 and rows["0"]["psnr_db"] > 30, rows["0"]
  assert rows["999"]["psnr_db"] < rows["0"]["psnr_db"] - 10, rows
  assert all(row["loss"] > 0 for row in rows.values())
  assert "| 999 |" in denoising.markdown(results)
  with pytest.raises(ValueError, match="outside"):
    denoising.measure(pipeline, loaders.data_dir(config, str(tmp_path)), num_videos=1,
                      timesteps=(1000,))


def test_fidelity_frame_by_frame_sets_the_given_frames_apart(tmp_path, monkeypatch):
  """A stand-in sampler returns the real clips with the shape erased from frame 1 and shifted
  one pixel right in frame 2: frame 0 scores perfectly, frame 1 has no shape (no colour, no
  centroid), frame 2 is one pixel off, and the middle and whole-clip rows average them."""
  config = unit_test.get_config()
  data_dir = loaders.data_dir(config, str(tmp_path))
  clips = videos.HeldOutClips(config, data_dir, count=3)
  records = [clips.record(i) for i in range(3)]
  calls = []

  def fake_generate(pipeline, prompts, first, last, **settings):
    calls.append(settings)
    matched = [next(r for r in records if np.array_equal(r["video"][0], f)) for f in first]
    out = np.stack([r["video"] for r in matched])
    out[:, 1] = np.stack([r["background"] for r in matched])[:, None, None]
    out[:, 2] = np.roll(out[:, 2], 1, axis=2)  # These clips' shapes are clear of the right edge.
    return out

  monkeypatch.setattr(frames.generate_lib, "generate", fake_generate)
  pipeline = sampling_pipeline.make_pipeline(config, {}, {}, _mesh(), weights="stand-in",
                                             generate_fn=fake_generate)
  results = frames.measure(pipeline, data_dir, num_videos=3, batch_size=2, eta=1.0)
  assert len(calls) == 2 and calls[0]["eta"] == 1.0 and calls[0]["tau"] == calls[0]["steps"]
  assert results["sampler"]["eta"] == 1.0 and results["num_videos"] == 3
  rows = results["frames"]
  assert rows["0"]["shape_iou"] == 1.0 and rows["0"]["centroid_px"] == 0.0
  assert rows["0"]["colour_error"] == 0.0 and rows["0"]["shape_frames"] == 1.0
  assert rows["1"]["shape_iou"] == 0.0 and rows["1"]["shape_frames"] == 0.0
  assert rows["1"]["colour_error"] is None and rows["1"]["centroid_px"] is None
  assert rows["2"]["centroid_px"] == pytest.approx(1.0) and 0 < rows["2"]["shape_iou"] < 1
  assert rows["2"]["shape_pixels"] == rows["2"]["real_shape_pixels"]
  frame_count = config.data.frames
  assert rows["middle"]["shape_frames"] == pytest.approx((frame_count - 3) / (frame_count - 2))
  assert rows["all"]["shape_iou"] == pytest.approx(np.mean(
      [rows[str(f)]["shape_iou"] for f in range(frame_count)]))
  assert "| between the given ones |" in frames.markdown(results)
