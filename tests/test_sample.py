"""The jitted sampler on a randomly initialised model: tau, seeds, retracing, long videos, jobs.

Every test shares one pipeline and samples at batch 2 or 1, so the suite compiles the sampling
program twice.
"""

import json
import logging
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from configs import unit_test
from pixeldance_jax import inference, video_io
from pixeldance_jax.data import moving_shapes


@pytest.fixture(scope="module")
def pipeline():
  # Random weights everywhere, the zero-initialised temporal outputs included, so that every
  # frame (the last-frame slot too) influences every other.
  return inference.random_pipeline(unit_test.get_config(), seed=1)


def _frames(config, count, split="test"):
  spec = moving_shapes.MovingShapesSpec.from_config(config.data)
  clips = [moving_shapes.generate_clip(spec, split, i) for i in range(count)]
  return ([c["caption"] for c in clips], np.stack([c["video"][0] for c in clips]),
          np.stack([c["video"][-1] for c in clips]))


def _differ(a, b):
  return np.abs(a.astype(int) - b.astype(int)).max() > 0


def test_tau_zero_ignores_the_last_frame_bitwise(pipeline):
  prompts, first, last = _frames(pipeline.config, 2)
  a = inference.generate(pipeline, prompts, first, last, tau=0, seed=3)
  b = inference.generate(pipeline, prompts, first, 255 - last, tau=0, seed=3)
  c = inference.generate(pipeline, prompts, first, None, seed=3)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(a, c)


def test_tau_all_steps_is_always_conditioned(pipeline):
  """tau = steps uses the last frame at every step: a larger tau changes nothing."""
  prompts, first, last = _frames(pipeline.config, 2)
  steps = pipeline.config.sample.num_steps
  a = inference.generate(pipeline, prompts, first, last, tau=steps, seed=3)
  b = inference.generate(pipeline, prompts, first, 255 - last, tau=steps, seed=3)
  np.testing.assert_array_equal(a, inference.generate(pipeline, prompts, first, last,
                                                      tau=10 * steps, seed=3))
  assert a.shape == (2, pipeline.config.data.frames) + first.shape[1:] and a.dtype == np.uint8
  assert _differ(a, b)
  # tau = 1 sees the last frame in the first step only: neither tau = 0 nor tau = steps.
  c = inference.generate(pipeline, prompts, first, last, tau=1, seed=3)
  assert _differ(c, a) and _differ(c, inference.generate(pipeline, prompts, first, last, tau=0,
                                                         seed=3))


def test_same_seed_same_video_and_other_seed_differs(pipeline):
  prompts, first, last = _frames(pipeline.config, 1)
  twice = lambda seeds: inference.generate(pipeline, prompts * 2, np.repeat(first, 2, 0),
                                           np.repeat(last, 2, 0), seed=seeds)
  same, other = twice([5, 5]), twice([5, 6])
  np.testing.assert_array_equal(same[0], same[1])
  np.testing.assert_array_equal(same[0], other[0])
  assert _differ(other[0], other[1])


def test_a_seed_gives_the_same_video_in_any_batch(pipeline):
  prompts, first, last = _frames(pipeline.config, 2)
  batch = inference.generate(pipeline, prompts, first, last, tau=[2, 1], guidance_scale=[3, 1.5],
                             seed=[11, 7])
  alone = inference.generate(pipeline, prompts[1:], first[1:], last[1:], tau=1,
                             guidance_scale=1.5, seed=7)
  np.testing.assert_array_equal(batch[1], alone[0])


def test_changing_traced_settings_does_not_retrace(pipeline):
  prompts, first, last = _frames(pipeline.config, 2)
  inference.generate(pipeline, prompts, first, last, seed=0)
  traces = inference.trace_counts["ddim"]
  for tau, guidance, rescale, eta, steps, spacing in [(0, 1.0, 0.0, 0.0, 3, "leading"),
                                                      (3, 7.5, 0.7, 1.0, 8, "linspace"),
                                                      (1, [2, 4], [0, 1], 0.5, 4, "trailing")]:
    inference.generate(pipeline, prompts, first, last, tau=tau, guidance_scale=guidance,
                       guidance_rescale=rescale, eta=eta, steps=steps, timestep_spacing=spacing,
                       seed=tau)
  assert inference.trace_counts["ddim"] == traces


def test_negative_tau_is_refused(pipeline):
  prompts, first, last = _frames(pipeline.config, 1)
  with pytest.raises(ValueError, match="tau"):
    inference.generate(pipeline, prompts, first, last, tau=-1)


def test_long_video_continues_from_each_clips_last_frame(pipeline):
  prompts, first, last = _frames(pipeline.config, 1)
  clip_prompts = [["a red square moves up", "a red square moves down", prompts[0]]]
  result = inference.generate_long(pipeline, clip_prompts, first, last, tau=2, seed=4)
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
  other = inference.generate_long(pipeline, clip_prompts, first, 255 - last, tau=2, seed=4)
  np.testing.assert_array_equal(other.clips[:, :2], result.clips[:, :2])
  assert _differ(other.clips[:, 2], result.clips[:, 2])


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
  requests = inference.read_prompts_file(pipeline, str(tmp_path / "jobs.jsonl"), seed=100)
  assert [r.record["mode"] for r in requests] == [
      "sketch", "long video (2 clips, basic ending)"]
  assert [r.settings["seed"] for r in requests] == [21, 101]  # Line 1 has no seed: 100 + 1.
  results = dict((r.name, video) for r, video in inference.run_requests(pipeline, requests, 2))
  frames = pipeline.config.data.frames
  assert results["0001"].video.shape[1] == 2 * frames - 1
  # The job samples exactly what `generate` does with the line's settings.
  direct = inference.generate(pipeline, prompts, first, video_io.edge_map(last[0])[None], tau=3,
                              seed=21, guidance_scale=2.0)
  np.testing.assert_array_equal(results["sketch"].video, direct)

  folder = tmp_path / "out" / "sketch"
  written = inference.write_folder(results["sketch"].video[0], str(folder), fps=4, upscale=2,
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
                                          ("not json", "not JSON")])
def test_prompts_file_errors_name_the_line(pipeline, tmp_path, line, message):
  (tmp_path / "jobs.jsonl").write_text("# a comment\n\n" + line + "\n")
  with pytest.raises(ValueError, match=f"jobs.jsonl:3: .*{message}"):
    inference.read_prompts_file(pipeline, str(tmp_path / "jobs.jsonl"))


def test_long_prompts_are_truncated_with_a_warning(pipeline, caplog):
  long_prompt = "a red square moves quickly to the lower right " * 10
  with caplog.at_level(logging.WARNING):
    ids = inference._tokenize(pipeline.config, [long_prompt, "short"])
  assert ids.shape == (2, pipeline.config.text_encoder.max_length)
  assert any("truncated" in message and "red square" in message for message in caplog.messages)


def test_batch_sharded_over_eight_devices_samples_the_same_videos():
  """data x fsdp = 4 x 2 fake devices, batch 3 padded to 8: the videos of one device."""
  script = pathlib.Path(__file__).with_name("multi_device_sample_check.py")
  result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  if result.returncode != 0:
    raise AssertionError(f"multi_device_sample_check.py failed:\n{result.stderr[-5000:]}")
  findings = json.loads(result.stdout.strip().splitlines()[-1])
  assert findings["devices"] == 8 and findings["shape"] == [3, 4, 16, 16, 3]
  assert findings["max_abs_difference"] == 0


def test_configs_older_than_the_sampler_fields_get_the_old_behaviour():
  config = unit_test.get_config()
  del config.sample["sampler"], config.sample["guidance_rescale"]
  filled = inference._with_sample_defaults(config)
  assert filled.sample.sampler == "ddim" and filled.sample.guidance_rescale == 0.0
