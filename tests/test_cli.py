"""train.py and sample.py end to end, as a user runs them (subprocesses, unit-test config)."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pixeldance_jax import video_io

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run(*args, check=True):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
  if check and result.returncode != 0:
    raise AssertionError(f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
  return result


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  path = tmp_path_factory.mktemp("run")
  _run("train.py", "--config=configs/unit_test.py", f"--workdir={path}")
  return path


def test_train_writes_checkpoints_logs_and_config(workdir):
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
  assert (workdir / "config.json").exists()
  assert any(name.startswith("events") for name in os.listdir(workdir / "tensorboard"))


def test_sample_from_heldout_clip(workdir, tmp_path):
  result = _run("sample.py", f"--workdir={workdir}", "--last_frame=heldout", "--tau=2",
                f"--output={tmp_path}/clip.mp4")
  assert "held-out clip 0" in result.stderr
  for name in ("clip.mp4", "clip.gif", "clip_frames.png", "clip.json"):
    assert (tmp_path / name).stat().st_size > 0
  video = video_io.read_video(str(tmp_path / "clip.mp4"))
  assert video.shape == (4, 64, 64, 3)  # 4 frames of 16x16, upscaled 4x.


def test_sample_resizes_a_wrong_size_first_frame(workdir, tmp_path):
  Image.fromarray(np.full((40, 40, 4), 200, np.uint8), "RGBA").save(tmp_path / "first.png")
  result = _run("sample.py", f"--workdir={workdir}", f"--first_frame={tmp_path}/first.png",
                "--prompt=a red square moves quickly up", f"--output={tmp_path}/v.mp4")
  assert "40x40" in result.stderr and (tmp_path / "v.gif").exists()
  refused = _run("sample.py", f"--workdir={workdir}", f"--first_frame={tmp_path}/first.png",
                 "--prompt=x", "--noresize", f"--output={tmp_path}/w.mp4", check=False)
  assert refused.returncode != 0 and "16x16" in refused.stderr
  assert not (tmp_path / "w.mp4").exists()


def test_sample_without_checkpoint_is_a_clear_error(tmp_path):
  result = _run("sample.py", f"--workdir={tmp_path}", f"--output={tmp_path}/v.mp4", check=False)
  assert result.returncode != 0 and "No checkpoint in" in result.stderr


def test_misspelled_config_override_is_an_error(tmp_path):
  result = _run("train.py", "--config=configs/unit_test.py", f"--workdir={tmp_path}",
                "--config.conditioning.last_frame_drop_prop=0.5", check=False)
  assert result.returncode != 0 and "last_frame_drop_prop" in result.stderr
