"""The ablation runner (train every variant, evaluate alike, one table) and the steering check."""

import copy
import dataclasses
import json
import os
import shutil
import time

import numpy as np
import pytest

import helpers
from configs import unit_test
from pixeldance_jax.io import checkpoints, tensorboard_files
from pixeldance_jax.data import moving_shapes
from pixeldance_jax.data import loaders
from pixeldance_jax.evaluate import ablation, features, metrics, steering, suite
from pixeldance_jax.parallel import mesh as mesh_lib
from pixeldance_jax.sampling import generate as generate_lib
from pixeldance_jax.train import state as state_lib
from pixeldance_jax.train import step as step_lib
from pixeldance_jax.train import trainer


def _config():
  """The unit-test config with the one-level U-Net, whose programs the suite compiles first."""
  config = unit_test.get_config()
  config.update_from_flattened_dict(helpers.ONE_LEVEL_UNET)
  return config


def _toy_networks(mesh):
  extractor = features.ShardedExtractor(helpers.toy_extractor(), mesh, 2)
  return suite.Networks(extractors={"fvd": extractor}, encode_captions=None, conditioning=True,
                        notes=[])


@pytest.fixture(scope="module")
def ablated(tmp_path_factory):
  """Every variant of the unit-test config, 2 steps each, evaluated on 2 held-out clips."""
  base = _config()
  workdir = str(tmp_path_factory.mktemp("ablation"))
  networks = _toy_networks(mesh_lib.make_mesh(base.mesh))
  settings = dict(steps=2, num_videos=2, global_batch=2, sampler_steps=2,
                  cache_dir=os.path.join(workdir, "cache"), networks=networks)
  results = ablation.run(base, workdir, **settings)
  return base, workdir, results, settings


@pytest.mark.slow
def test_each_variant_trains_with_exactly_its_overrides(ablated):
  base, workdir, _, _ = ablated
  expected_common = {"data.data_dir": os.path.join(workdir, "data"), "num_train_steps": 2}
  for name in ablation.PAPER_VARIANTS:
    variant = ablation.VARIANTS[name]
    with open(os.path.join(workdir, name, "config.json")) as f:
      trained = json.load(f)
    differences = {key: new for key, _, new
                   in checkpoints.config_differences(base.to_dict(), trained)}
    assert differences == dict(variant.overrides, **expected_common), name


@pytest.mark.slow
def test_table_and_json_have_every_metric_for_every_variant(ablated):
  _, workdir, results, _ = ablated
  with open(os.path.join(workdir, "ablation.json")) as f:
    written = json.load(f)
  assert list(written["variants"]) == list(ablation.PAPER_VARIANTS)
  for name, variant in written["variants"].items():
    assert list(variant["rows"]) == list(ablation.VARIANTS[name].modes)
    assert variant["step"] == 2
    assert variant["train_minutes"] is not None  # From the step rates the run logged.
    for row in variant["rows"].values():
      assert row["videos"] == 2
      for key, _ in ablation.COLUMNS:
        assert key in row, (name, key)
      assert np.isfinite(row["fvd"]) and row["first_frame_centroid_px"] is not None
  assert written["floor"]["fvd"] >= 0
  with open(os.path.join(workdir, "ablation.md")) as f:
    table = f.read()
  rows = [line for line in table.splitlines() if line.startswith("| ")][1:]
  assert len(rows) == sum(len(ablation.VARIANTS[v].modes) for v in ablation.PAPER_VARIANTS) + 1
  assert "242.82" in table and "450.58" in table  # The paper's figures beside ours.
  assert os.path.getsize(os.path.join(workdir, "ablation.png")) > 0


@pytest.mark.slow
def test_a_second_run_trains_and_samples_nothing(ablated, monkeypatch):
  base, workdir, results, settings = ablated
  records = [os.path.join(workdir, name, ablation.Settings(2, 2, 2, 0).file_name(2) + ".json")
             for name in ablation.PAPER_VARIANTS]
  before = [os.path.getmtime(path) for path in records]

  def refuse(*args, **kwargs):
    raise AssertionError("a finished ablation trained or sampled again")
  monkeypatch.setattr(trainer, "train_and_evaluate", refuse)
  monkeypatch.setattr(generate_lib, "generate", refuse)
  again = ablation.run(base, workdir, **settings)
  assert [os.path.getmtime(path) for path in records] == before
  assert again["variants"] == results["variants"]


@pytest.mark.slow
def test_training_minutes_add_up_every_run_that_trained_a_variant(ablated, tmp_path):
  """A run killed outright (nothing saved on the way out) still logged its step rates; the
  minutes add up what each run logged, less what the resumed run trained again."""
  base, workdir, _, _ = ablated
  variant_dir = tmp_path / "full"
  shutil.copytree(os.path.join(workdir, "full"), variant_dir)
  folder = str(variant_dir / "tensorboard")
  # After the fixture's run, one killed after step 2 and resumed from the step-1 checkpoint:
  # steps 1 and 2 at 0.5 steps/s, then step 2 again at 0.25 steps/s, replacing the first's.
  later = time.time() + 1000
  for rates, start in (({1: 0.5, 2: 0.5}, later), ({2: 0.25}, later + 1000)):
    writer = tensorboard_files.SummaryWriter(folder, filename_suffix=f".{start:.0f}")
    for i, (step, rate) in enumerate(rates.items()):
      writer.add_scalar("train/steps_per_sec", rate, step, walltime=start + i)
    writer.close()
  config = ablation.variant_config(base, "full", os.path.join(workdir, "data"), 2)
  assert ablation.train_variant(config, str(variant_dir)) == {
      "step": 2, "train_minutes": round((1 / 0.5 + 1 / 0.25) / 60, 2)}


@pytest.mark.slow
def test_a_workdir_trained_with_other_overrides_is_refused(ablated, tmp_path):
  base, workdir, _, settings = ablated
  other = tmp_path / "other"
  os.makedirs(other)
  os.symlink(os.path.join(workdir, "full"), other / "no_text")  # Trained with text.
  with pytest.raises(ValueError, match="conditioning.use_text"):
    ablation.run(base, str(other), variants=["no_text"], **settings)


@pytest.mark.slow
def test_a_preempted_variant_stops_the_ablation(ablated, tmp_path, monkeypatch):
  base, workdir, _, settings = ablated
  base = copy.deepcopy(base)
  base.data.data_dir = os.path.join(workdir, "data")
  train = trainer.train_and_evaluate

  def preempted_after_one_step(config, variant_dir):  # As SIGTERM does: save, then return.
    config = copy.deepcopy(config)
    config.num_train_steps = 1
    return train(config, variant_dir)
  monkeypatch.setattr(trainer, "train_and_evaluate", preempted_after_one_step)
  with pytest.raises(ablation.Preempted, match="step 1 of 2"):
    ablation.run(base, str(tmp_path), variants=["full", "no_text"], **settings)
  assert not os.path.exists(tmp_path / "no_text")  # Not started, and nothing evaluated.
  assert not os.path.exists(tmp_path / "ablation.json")


def test_unknown_variant_is_named(tmp_path):
  with pytest.raises(ValueError, match="unknown ablation variants.*'no_frames'"):
    ablation.run(_config(), str(tmp_path), variants=["full", "no_frames"])


def test_the_table_leaves_out_columns_no_variant_measured():
  row = {key: None for key, _ in ablation.COLUMNS}
  results = {"variants": {"full": {"rows": {"magic": dict(row, fvd=512.0, shape_iou=0.7)}}},
             "floor": {"fvd": 60.0}}
  header, _, full, floor = ablation.table(results).splitlines()
  assert header.endswith("| FVD | shape IoU |") and full.endswith("| 512.0 | 0.700 |")
  assert floor.endswith("| 60.0 | |")


def test_the_table_names_the_empty_prompt_for_the_variant_without_text():
  row = {key: None for key, _ in ablation.COLUMNS}
  results = {"variants": {name: {"rows": {mode: dict(row, fvd=1.0)
                                          for mode in ablation.VARIANTS[name].modes}}
                          for name in ("full", "no_text")}}
  _, _, _, full_magic, no_text = ablation.table(results).splitlines()
  assert "| text + first + last frame (tau = steps) |" in full_magic
  assert "| first + last frame, empty prompt (tau = steps) |" in no_text


@pytest.mark.slow
def test_a_model_trained_without_text_samples_the_empty_prompt():
  config = _config()
  pipeline = helpers.random_pipeline(config, seed=3)
  first = np.zeros((2, config.data.image_size, config.data.image_size, 3), np.uint8)
  prompts = ["a red square moves up", "a blue circle moves quickly down"]
  with_text = generate_lib.generate(pipeline, prompts, first, steps=2, seed=[5, 5])
  assert not np.array_equal(with_text[0], with_text[1])  # The text steers this model...
  without_text = copy.deepcopy(config)
  without_text.conditioning.use_text = False
  pipeline = dataclasses.replace(pipeline, config=without_text)
  without = generate_lib.generate(pipeline, prompts, first, steps=2, seed=[5, 5])
  empty = generate_lib.generate(pipeline, ["", ""], first, steps=2, seed=[5, 5])
  np.testing.assert_array_equal(without, empty)  # ... and not one trained without it.


# --- Steering: every direction and speed prompt from one first frame -----------------------------

def test_displacement_and_cosine_of_a_known_motion():
  spec = moving_shapes.MovingShapesSpec(frames=8, image_size=32)
  clip = moving_shapes.generate_clip(spec, "test", 3)
  shift = metrics.displacement(clip["video"], clip["background"])
  np.testing.assert_allclose(shift, clip["velocity"] * 7, atol=0.6)
  direction = moving_shapes.DIRECTIONS[clip["direction"]]
  assert metrics.direction_cosine(shift, direction) == pytest.approx(1, abs=0.02)
  assert metrics.direction_cosine(-shift, direction) == pytest.approx(-1, abs=0.02)
  assert np.isnan(metrics.direction_cosine(np.zeros(2), direction))


def test_prompts_keep_the_subject_and_name_each_motion():
  grid = steering.prompts_for("a red square moves slowly to the upper left", ("up", "lower right"),
                              ("slow", "fast"))
  assert [prompt for _, _, prompt in grid] == [
      "a red square moves slowly up", "a red square moves quickly up",
      "a red square moves slowly to the lower right",
      "a red square moves quickly to the lower right"]


@pytest.mark.slow
def test_steering_measures_every_prompt(tmp_path):
  config = _config()
  pipeline = helpers.random_pipeline(config, seed=1)
  data_dir = loaders.data_dir(config, str(tmp_path))
  results, figure = steering.measure(pipeline, data_dir, num_videos=1, directions=("up", "down"),
                                     speeds=("slow", "fast"), steps=2, progress=False)
  assert results["prompts_per_video"] == 5 and results["num_videos"] == 1
  assert set(results["displacement_px"]) == {"slow", "fast"}
  assert figure.ndim == 3 and figure.shape[0] > 6 * config.data.image_size  # 6 rows of frames.
  paths = steering.write(results, figure, str(tmp_path))
  assert [os.path.basename(p) for p in paths] == ["steering-0.json", "steering-0.md",
                                                  "steering-0.png"]


@pytest.mark.slow
def test_the_papers_variants_share_one_compiled_train_step():
  """Their overrides are traced numbers of the step, not parts of its program (ours with
  keyframes draws more and reads a mask channel: a program of its own)."""
  base = _config()
  mesh = mesh_lib.make_mesh(base.mesh)
  _, shardings = state_lib.abstract_state(base, mesh)
  steps = [step_lib.jit_train_step(ablation.variant_config(base, name, "data"), mesh, shardings)
           for name in ablation.PAPER_VARIANTS]
  assert all(step._programs == steps[0]._programs for step in steps)
