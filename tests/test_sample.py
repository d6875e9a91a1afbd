"""The jitted sampler on a randomly initialised model: tau, seeds, retracing, long videos, jobs;
weights-only restore; settings and destinations refused before any weights are read.

Every sampling test shares one pipeline and samples at batch 2 or 1, so the suite compiles the
sampling program twice.
"""

import json
import logging
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

import helpers
import processes
from configs import unit_test
from pixeldance_jax.io import checkpoints, video_files
from pixeldance_jax.data import moving_shapes
from pixeldance_jax.models import pixeldance
from pixeldance_jax.parallel import mesh as mesh_lib
from pixeldance_jax.sampling import generate as generate_lib
from pixeldance_jax.sampling import jobs, outputs, program
from pixeldance_jax.sampling import pipeline as pipeline_lib
from pixeldance_jax.sampling import requests as requests_lib
from pixeldance_jax.sampling import settings as settings_lib
from pixeldance_jax.train import state as state_lib


@pytest.fixture(scope="module")
def pipeline():
  # Random weights everywhere, the zero-initialised temporal outputs included, so that every
  # frame (the last-frame slot too) influences every other.
  return helpers.random_pipeline(unit_test.get_config(), seed=1)


def _frames(config, count, split="test"):
  spec = moving_shapes.MovingShapesSpec.from_config(config.data)
  clips = [moving_shapes.generate_clip(spec, split, i) for i in range(count)]
  return ([c["caption"] for c in clips], np.stack([c["video"][0] for c in clips]),
          np.stack([c["video"][-1] for c in clips]))


def _differ(a, b):
  return np.abs(a.astype(int) - b.astype(int)).max() > 0


def test_tau_zero_ignores_the_last_frame_bitwise(pipeline):
  prompts, first, last = _frames(pipeline.config, 2)
  a = generate_lib.generate(pipeline, prompts, first, last, tau=0, seed=3)
  b = generate_lib.generate(pipeline, prompts, first, 255 - last, tau=0, seed=3)
  c = generate_lib.generate(pipeline, prompts, first, None, seed=3)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(a, c)


@pytest.mark.slow
def test_tau_all_steps_is_always_conditioned(pipeline):
  """tau = steps uses the last frame at every step: a larger tau changes nothing."""
  prompts, first, last = _frames(pipeline.config, 2)
  steps = pipeline.config.sample.num_steps
  a = generate_lib.generate(pipeline, prompts, first, last, tau=steps, seed=3)
  b = generate_lib.generate(pipeline, prompts, first, 255 - last, tau=steps, seed=3)
  np.testing.assert_array_equal(a, generate_lib.generate(pipeline, prompts, first, last,
                                                         tau=10 * steps, seed=3))
  assert a.shape == (2, pipeline.config.data.frames) + first.shape[1:] and a.dtype == np.uint8
  assert _differ(a, b)
  # tau = 1 sees the last frame in the first step only: neither tau = 0 nor tau = steps.
  c = generate_lib.generate(pipeline, prompts, first, last, tau=1, seed=3)
  assert _differ(c, a) and _differ(c, generate_lib.generate(pipeline, prompts, first, last,
                                                            tau=0, seed=3))


@pytest.mark.slow
def test_same_seed_same_video_and_other_seed_differs(pipeline):
  prompts, first, last = _frames(pipeline.config, 1)
  twice = lambda seeds: generate_lib.generate(pipeline, prompts * 2, np.repeat(first, 2, 0),
                                              np.repeat(last, 2, 0), seed=seeds)
  same, other = twice([5, 5]), twice([5, 6])
  np.testing.assert_array_equal(same[0], same[1])
  np.testing.assert_array_equal(same[0], other[0])
  assert _differ(other[0], other[1])


@pytest.mark.slow
def test_a_seed_gives_the_same_video_in_any_batch(pipeline):
  prompts, first, last = _frames(pipeline.config, 2)
  batch = generate_lib.generate(pipeline, prompts, first, last, tau=[2, 1], guidance_scale=[3, 1.5],
                             seed=[11, 7])
  alone = generate_lib.generate(pipeline, prompts[1:], first[1:], last[1:], tau=1,
                             guidance_scale=1.5, seed=7)
  np.testing.assert_array_equal(batch[1], alone[0])


@pytest.mark.slow
def test_changing_traced_settings_does_not_retrace(pipeline):
  prompts, first, last = _frames(pipeline.config, 2)
  generate_lib.generate(pipeline, prompts, first, last, seed=0)
  traces = program.trace_counts["ddim"]
  for tau, guidance, rescale, eta, steps, spacing in [(0, 1.0, 0.0, 0.0, 3, "leading"),
                                                      (3, 7.5, 0.7, 1.0, 8, "linspace"),
                                                      (1, [2, 4], [0, 1], 0.5, 4, "trailing")]:
    generate_lib.generate(pipeline, prompts, first, last, tau=tau, guidance_scale=guidance,
                       guidance_rescale=rescale, eta=eta, steps=steps, timestep_spacing=spacing,
                       seed=tau)
  assert program.trace_counts["ddim"] == traces


def test_negative_tau_is_refused(pipeline):
  prompts, first, last = _frames(pipeline.config, 1)
  with pytest.raises(ValueError, match="tau"):
    generate_lib.generate(pipeline, prompts, first, last, tau=-1)


@pytest.mark.slow
def test_keyframes_are_seen_for_tau_steps_and_held_frames_at_every_step(pipeline):
  """A middle keyframe steers the sample for the first tau steps (tau = 0: ignored, bitwise);
  one within `held_frames` (a continuation's carried frame) at every step."""
  prompts, first, last = _frames(pipeline.config, 2)
  steps = pipeline.config.sample.num_steps
  keyframe = lambda image: [{1: image[0]}, {2: image[1]}]
  run = lambda image, tau, held=1: generate_lib.generate(
      pipeline, prompts, first, last, keyframes=keyframe(image), held_frames=held, tau=tau,
      seed=3)
  other = 255 - last
  np.testing.assert_array_equal(run(last, 0), run(other, 0))
  assert _differ(run(last, steps), run(other, steps))
  held = run(last, 0, held=[2, 3])  # Frame 1 of example 0, frame 2 of example 1: held.
  assert _differ(held[0], run(other, 0, held=[2, 3])[0])
  with pytest.raises(ValueError, match="keyframe index 3 is outside the middle frames 1..2"):
    generate_lib.generate(pipeline, prompts, first, last, keyframes=[{3: last[0]}, {}])


@pytest.mark.slow
def test_a_long_video_with_overlap_carries_the_last_frames_into_the_next_clip(pipeline):
  prompts, first, _ = _frames(pipeline.config, 2)
  frames = pipeline.config.data.frames
  clip_prompts = [[p, p] for p in prompts]
  result = generate_lib.generate_long(pipeline, clip_prompts, first, overlap_frames=2, seed=4)
  assert result.video.shape[1] == 2 + 2 * (frames - 2)
  np.testing.assert_array_equal(result.first_frames[:, 1], result.clips[:, 0, -2])
  np.testing.assert_array_equal(result.video[:, :frames], result.clips[:, 0])
  np.testing.assert_array_equal(result.video[:, frames:], result.clips[:, 1, 2:])
  # Clip 2 is clip 1's last two frames, held, continued.
  tail = result.clips[:, 0, -2:]
  np.testing.assert_array_equal(result.clips[:, 1], generate_lib.generate(
      pipeline, prompts, tail[:, 0], keyframes=[{1: frame} for frame in tail[:, 1]],
      held_frames=2, tau=0, seed=4, clip_index=1))
  with pytest.raises(ValueError, match="overlap_frames=3 must be in 1..2"):
    generate_lib.generate_long(pipeline, clip_prompts, first, overlap_frames=3)


@pytest.mark.slow
def test_a_long_video_can_draw_each_clips_last_frames_again(pipeline):
  """redraw_frames=1: clip 2 starts from the frame before clip 1's last, and its frames replace
  clip 1's last in the video."""
  prompts, first, _ = _frames(pipeline.config, 2)
  frames = pipeline.config.data.frames
  result = generate_lib.generate_long(pipeline, [[p, p] for p in prompts], first,
                                      redraw_frames=1, seed=4)
  assert result.video.shape[1] == 2 * frames - 2 and result.redraw_frames == 1
  np.testing.assert_array_equal(result.first_frames[:, 1], result.clips[:, 0, -2])
  np.testing.assert_array_equal(result.video[:, :frames - 1], result.clips[:, 0, :-1])
  np.testing.assert_array_equal(result.video[:, frames - 1:], result.clips[:, 1, 1:])
  with pytest.raises(ValueError, match="redraw_frames=2 must be in 0..1 with overlap_frames=1"):
    generate_lib.generate_long(pipeline, [[p, p] for p in prompts], first, redraw_frames=2)


@pytest.mark.slow
def test_long_video_continues_from_each_clips_last_frame(pipeline):
  prompts, first, last = _frames(pipeline.config, 1)
  clip_prompts = [["a red square moves up", "a red square moves down", prompts[0]]]
  result = generate_lib.generate_long(pipeline, clip_prompts, first, last, tau=2, seed=4)
  frames = pipeline.config.data.frames
  assert result.clips.shape == (1, 3, frames) + first.shape[1:]
  np.testing.assert_array_equal(result.first_frames[:, 0], first)
  for k in range(2):  # Clip k + 1 is conditioned on clip k's last generated frame.
    np.testing.assert_array_equal(result.first_frames[:, k + 1], result.clips[:, k, -1])
  # One continuous video: clip 1, then each later clip without its (repeated) frame 0.
  assert result.video.shape[1] == 1 + 3 * (frames - 1)
  np.testing.assert_array_equal(result.video[:, frames - 1], result.clips[:, 0, -1])
  np.testing.assert_array_equal(result.video[:, frames:2 * frames - 1], result.clips[:, 1, 1:])
  # The last frame guides the final clip only.
  other = generate_lib.generate_long(pipeline, clip_prompts, first, 255 - last, tau=2, seed=4)
  np.testing.assert_array_equal(other.clips[:, :2], result.clips[:, :2])
  assert _differ(other.clips[:, 2], result.clips[:, 2])


@pytest.mark.slow
def test_prompts_file_samples_each_line_into_its_folder(pipeline, tmp_path):
  prompts, first, last = _frames(pipeline.config, 1)
  Image.fromarray(first[0]).save(tmp_path / "first.png")
  Image.fromarray(last[0]).save(tmp_path / "last.png")
  lines = [{"prompt": prompts[0], "first_frame": "first.png", "last_frame": "last.png",
            "last_frame_edges": True, "tau": 3, "seed": 21, "guidance_scale": 2.0,
            "name": "sketch"},
           {"prompt": ["a red square moves up", "a red square moves left"],
            "first_frame": str(tmp_path / "first.png"), "sampler": "ddim", "steps": 3}]
  (tmp_path / "jobs.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
  requests = requests_lib.read_prompts_file(pipeline, str(tmp_path / "jobs.jsonl"), seed=100)
  assert [r.record["mode"] for r in requests] == [
      "sketch", "long video (2 clips, basic ending)"]
  assert [r.settings["seed"] for r in requests] == [21, 101]  # Line 1 has no seed: 100 + 1.
  results = dict((r.name, video) for r, video in requests_lib.run_requests(pipeline, requests, 2))
  frames = pipeline.config.data.frames
  assert results["0001"].video.shape[1] == 2 * frames - 1
  # The job samples exactly what `generate` does with the line's settings.
  direct = generate_lib.generate(pipeline, prompts, first, video_files.edge_map(last[0])[None],
                                 tau=3, seed=21, guidance_scale=2.0)
  np.testing.assert_array_equal(results["sketch"].video, direct)

  folder = tmp_path / "out" / "sketch"
  written = outputs.write_folder(results["sketch"].video[0], str(folder), fps=4, upscale=2,
                                 record=requests[0].record)
  names = sorted(pathlib.Path(path).relative_to(folder).as_posix() for path in written)
  assert names == sorted(["video.mp4", "video.gif", "contact_sheet.png", "record.json"] +
                         [f"frames/{i:03d}.png" for i in range(frames)])
  record = json.loads((folder / "record.json").read_text())
  assert record["tau"] == 3 and record["seed"] == 21 and record["steps"] == 4
  assert record["sampler"] == "ddim" and record["last_frame"] == "last.png"


@pytest.mark.parametrize("line,message", [('{"prompt": "x", "frist_frame": "a.png"}', "frist"),
                                          ('{"prompt": "x", "first_frame": "missing.png"}',
                                           "missing.png"),
                                          ('{"prompt": "x", "sampler": "euler"}', "euler"),
                                          ("not json", "not JSON"),
                                          ('{"prompt": "x", "name": "../escape"}', "escape"),
                                          ('{"prompt": "x", "name": "/tmp/x"}', "plain folder"),
                                          ('{"prompt": "x", "name": ".."}', "plain folder")])
def test_prompts_file_errors_name_the_line(pipeline, tmp_path, line, message):
  (tmp_path / "jobs.jsonl").write_text("# a comment\n\n" + line + "\n")
  with pytest.raises(ValueError, match=f"jobs.jsonl:3: .*{message}"):
    requests_lib.read_prompts_file(pipeline, str(tmp_path / "jobs.jsonl"))


def test_long_prompts_are_truncated_with_a_warning(pipeline, caplog):
  long_prompt = "a red square moves quickly to the lower right " * 10
  with caplog.at_level(logging.WARNING):
    ids = generate_lib._tokenize(pipeline.config, [long_prompt, "short"])
  assert ids.shape == (2, pipeline.config.text_encoder.max_length)
  assert any("truncated" in message and "red square" in message for message in caplog.messages)


@pytest.mark.slow
def test_batch_sharded_over_eight_devices_samples_the_same_videos():
  """data x fsdp = 4 x 2 fake devices, batch 3 padded to 8: the videos of one device, with XLA's
  default code generation (the suite's -O0 flags round a sharded batch otherwise).

  Each device samples its own examples (one at a time, both guidance branches on it), so only
  the weights sharded over fsdp can move a bit: XLA may split a small matrix product's sum
  between the two fsdp devices and add the halves, which rounds differently from one device's
  sum on some CPUs (an AMD EPYC with AVX2: 1 level in a few pixels; bitwise elsewhere, and on
  a data-only mesh). A wrong example order, padding or seed would change whole videos."""
  script = pathlib.Path(__file__).with_name("multi_device_sample_check.py")
  result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu",
                                                XLA_FLAGS=processes.FAST_COMPILE))
  if result.returncode != 0:
    raise AssertionError(f"multi_device_sample_check.py failed:\n{result.stderr[-5000:]}")
  findings = json.loads(result.stdout.strip().splitlines()[-1])
  assert findings["devices"] == 8 and findings["shape"] == [3, 4, 16, 16, 3]
  assert findings["max_abs_difference"] <= 1 and findings["fraction_differing"] < 1e-3, findings


# --- Settings and destinations: refused in one line, before any weights are read -------------


@pytest.mark.parametrize("settings,message", [
    ({"guidance_scale": float("nan")}, "guidance_scale=nan must be a finite number"),
    ({"guidance_scale": float("inf")}, "guidance_scale=inf must be a finite number"),
    ({"guidance_rescale": 1.5}, r"guidance_rescale=1.5 must be in \[0, 1\]"),
    ({"guidance_rescale": float("nan")}, "guidance_rescale=nan"),
    ({"eta": -0.1}, "eta=-0.1 must be a finite number >= 0"),
    ({"eta": float("inf")}, "eta=inf"),
    ({"tau": -1}, "tau=-1 must be >= 0"),
    ({"steps": 0}, "steps=0 must be >= 1"),
    ({"sampler": "euler"}, "sampler='euler'"),
    ({"num_clips": 0}, "num_clips=0")])
def test_check_settings_refuses_values_out_of_range(settings, message):
  with pytest.raises(ValueError, match=message):
    settings_lib.check_settings({"tau": None, "seed": 3, **settings})


def test_check_settings_bounds_steps_by_the_training_timesteps():
  settings_lib.check_settings({"steps": 5000, "guidance_scale": -2.0, "eta": 0.0})  # No bound.
  settings_lib.check_settings({"steps": 1000}, num_train_timesteps=1000)
  with pytest.raises(ValueError, match=r"steps=1001 must be in \[1, 1000\]"):
    settings_lib.check_settings({"steps": 1001}, num_train_timesteps=1000)


def test_generate_refuses_non_finite_guidance(pipeline):
  prompts, first, last = _frames(pipeline.config, 1)
  with pytest.raises(ValueError, match="guidance_scale"):
    generate_lib.generate(pipeline, prompts, first, last, guidance_scale=float("nan"))
  with pytest.raises(ValueError, match="steps"):
    generate_lib.generate(pipeline, prompts, first, last,
                          steps=pipeline.config.diffusion.num_train_timesteps + 1)


def test_check_writable_refuses_unwritable_destinations(tmp_path):
  (tmp_path / "a_file").write_text("x")
  (tmp_path / "clip.gif").mkdir()
  outputs.check_writable(str(tmp_path / "new" / "deeper" / "video.mp4"))  # Folders are made.
  outputs.check_writable(str(tmp_path / "new" / "out"), folder=True)
  for path, message in [(tmp_path / "a_file" / "video.mp4", "a_file is a file"),
                        (tmp_path / "video.avi", "must end in .mp4 or .gif"),
                        (tmp_path / "clip.mp4", "clip.gif is a directory")]:
    with pytest.raises(ValueError, match=message):
      outputs.check_writable(str(path))
  with pytest.raises(ValueError, match="a_file is a file"):
    outputs.check_writable(str(tmp_path / "a_file" / "out"), folder=True)
  with pytest.raises(ValueError, match="a_file is a file"):
    outputs.check_writable(str(tmp_path / "a_file"), folder=True)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_check_writable_refuses_a_folder_without_permission(tmp_path):
  (tmp_path / "locked").mkdir(mode=0o500)
  with pytest.raises(ValueError, match="no permission"):
    outputs.check_writable(str(tmp_path / "locked" / "video.mp4"))


# --- Weights-only restore ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def train_state():
  """A unit-test train state whose EMA and raw params differ (random weights drawn in numpy:
  no initialiser to compile)."""
  config = unit_test.get_config()
  mesh = mesh_lib.make_mesh(config.mesh)
  _, shardings = state_lib.abstract_state(config, mesh)
  params = jax.device_put(helpers.random_params(config), shardings.params)
  state = state_lib.state_from_weights(config, mesh, params, {})
  return config, state.replace(ema_params=jax.tree.map(lambda x: x + 1.0, state.params))


def _save(workdir, config, state, step, use_ocdbt=True):
  """`checkpoints.save`; without OCDBT every array is a folder of its own (one can be deleted)."""
  manager = checkpoints.make_manager(str(workdir), config) if use_ocdbt else ocp.CheckpointManager(
      checkpoints.checkpoint_dir(str(workdir)), item_handlers={
          "state": ocp.StandardCheckpointHandler(use_ocdbt=False),
          "config": ocp.JsonCheckpointHandler()})
  checkpoints.save(manager, step, state, config)
  manager.wait_until_finished()
  manager.close()


@pytest.fixture(scope="module")
def trained_workdir(train_state, tmp_path_factory):
  config, state = train_state
  workdir = tmp_path_factory.mktemp("trained")
  _save(workdir, config, state, 3)
  return workdir


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.mark.slow
def test_load_pipeline_restores_the_ema_or_the_raw_weights(train_state, trained_workdir):
  _, state = train_state
  ema = pipeline_lib.load_pipeline(str(trained_workdir))
  raw = pipeline_lib.load_pipeline(str(trained_workdir), step=3, use_ema=False)
  assert (ema.weights, raw.weights, ema.step) == ("ema", "raw", 3)
  _assert_trees_equal(ema.params, state.ema_params)
  _assert_trees_equal(raw.params, state.params)
  assert ema.frozen == {} and raw.frozen == {}
  leaf = jax.tree.leaves(ema.params)[0]
  assert isinstance(leaf, jax.Array) and leaf.sharding.mesh.shape == ema.mesh.shape


@pytest.mark.slow
def test_restore_weights_never_reads_the_optimizer_state(train_state, tmp_path):
  """Every data chunk of the optimiser state is overwritten with garbage: a full restore fails
  on it, the weights-only restore gives exact arrays (it never opens those chunks)."""
  config, state = train_state
  _save(tmp_path, config, state, 5, use_ocdbt=False)
  item = pathlib.Path(checkpoints.checkpoint_dir(str(tmp_path))) / "5" / "state"
  chunks = [path for path in item.glob("opt_state.*/*") if path.name != ".zarray"]
  assert chunks and list(item.glob("ema_params.*/*"))
  for path in chunks:
    path.write_bytes(b"not a zstd frame")
  mesh = mesh_lib.make_mesh(config.mesh)
  abstract_params, abstract_frozen = pixeldance.abstract_weights(config, mesh)
  for use_ema, expected in [(True, state.ema_params), (False, state.params)]:
    params, frozen, kind = checkpoints.restore_weights(str(tmp_path), 5, abstract_params,
                                                       abstract_frozen, use_ema=use_ema)
    assert kind == ("ema" if use_ema else "raw") and frozen == {}
    _assert_trees_equal(params, expected)
  manager = checkpoints.make_manager(str(tmp_path), read_only=True)
  # The garbage is what a full restore reads (Orbax raises a plain Exception for it).
  with pytest.raises(Exception, match="while reading array"):
    checkpoints.restore(manager, 5, state_lib.abstract_state(config, mesh)[0])
  manager.close()


@pytest.mark.slow
def test_restore_weights_lists_mismatched_shapes_first(trained_workdir):
  config = unit_test.get_config()
  config.unet.block_out_channels = (16, 48)
  mesh = mesh_lib.make_mesh(config.mesh)
  abstract_params, abstract_frozen = pixeldance.abstract_weights(config, mesh)
  with pytest.raises(ValueError, match=r"(?s)does not fit .*misshapen: .*\['unet'\]"):
    checkpoints.restore_weights(str(trained_workdir), 3, abstract_params, abstract_frozen)


@pytest.mark.slow
def test_missing_checkpoints_are_named(trained_workdir, tmp_path):
  with pytest.raises(FileNotFoundError, match="No checkpoint in"):
    pipeline_lib.load_pipeline(str(tmp_path))
  with pytest.raises(FileNotFoundError, match=r"No checkpoint for step 7 .*\[3\]"):
    pipeline_lib.load_pipeline(str(trained_workdir), step=7)


@pytest.mark.slow
def test_sample_job_checks_everything_before_reading_weights(trained_workdir, tmp_path,
                                                             monkeypatch):
  def no_weights(*args, **kwargs):
    raise AssertionError("weights were read")
  monkeypatch.setattr(checkpoints, "restore_weights", no_weights)
  output = str(tmp_path / "video.mp4")
  # Before the checkpoint is even looked for (this workdir has none).
  with pytest.raises(ValueError, match="guidance_scale=nan"):
    jobs.sample(str(tmp_path / "nothing"), output=output, guidance_scale=float("nan"))
  (tmp_path / "a_file").write_text("x")
  with pytest.raises(ValueError, match="a_file is a file"):
    jobs.sample(str(trained_workdir), output=str(tmp_path / "a_file" / "video.mp4"))
  # After reading the checkpoint's config: its number of training timesteps.
  with pytest.raises(ValueError, match=r"steps=1001 must be in \[1, 1000\]"):
    jobs.sample(str(trained_workdir), output=output, steps=1001)
  (tmp_path / "jobs.jsonl").write_text('{"prompt": "x"}\n{"prompt": "y", "eta": -1}\n')
  with pytest.raises(ValueError, match="jobs.jsonl:2: eta=-1.0"):
    jobs.sample_prompts_file(str(trained_workdir), prompts_file=str(tmp_path / "jobs.jsonl"),
                             output_dir=str(tmp_path / "out"))
  (tmp_path / "jobs.jsonl").write_text('{"prompt": "x", "name": "a"}\n{"name": "a"}\n')
  with pytest.raises(ValueError, match="duplicate names"):
    jobs.sample_prompts_file(str(trained_workdir), prompts_file=str(tmp_path / "jobs.jsonl"),
                             output_dir=str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_sample_cli_refuses_nan_guidance_in_one_line(tmp_path):
  """The one CLI case run as a user does: exit status, message and no traceback."""
  script = pathlib.Path(__file__).resolve().parents[1] / "sample.py"
  result = subprocess.run([sys.executable, str(script), f"--workdir={tmp_path}",
                           "--guidance_scale=nan", f"--output={tmp_path}/video.mp4"],
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode != 0 and "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      "sample.py: error: guidance_scale=nan must be a finite number")
  assert not list(tmp_path.iterdir())
