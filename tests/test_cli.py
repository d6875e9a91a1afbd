"""train.py and sample.py end to end, as a user runs them (subprocesses, unit-test config)."""

import json
import os
import pathlib
import re
import shutil
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
                "--sampler=dpmpp_2m", "--guidance_rescale=0.7", "--raw_weights",
                f"--output={tmp_path}/clip.mp4")
  assert "held-out clip 0" in result.stderr
  for name in ("clip.mp4", "clip.gif", "clip_frames.png", "clip.json"):
    assert (tmp_path / name).stat().st_size > 0
  video = video_io.read_video(str(tmp_path / "clip.mp4"))
  assert video.shape == (4, 64, 64, 3)  # 4 frames of 16x16, upscaled 4x.
  record = json.loads((tmp_path / "clip.json").read_text())
  assert record["checkpoint_step"] == 4 and record["weights"] == "raw"
  assert record["sampler"] == "dpmpp_2m" and record["mode"] == "magic" and record["tau"] == 2


def test_sample_prompts_file_writes_a_folder_per_line(workdir, tmp_path):
  Image.fromarray(np.full((16, 16), 90, np.uint8), "L").save(tmp_path / "grey.png")
  lines = [{"prompt": "a red square moves up", "first_frame": "grey.png", "name": "basic"},
           {"heldout_index": 1, "last_frame": "heldout", "last_frame_edges": True, "seed": 9,
            "tau": 1}]
  (tmp_path / "jobs.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
  result = _run("sample.py", f"--workdir={workdir}", f"--prompts_file={tmp_path}/jobs.jsonl",
                f"--output_dir={tmp_path}/out", "--batch_size=2", "--upscale=1")
  assert "batch 1/1 (videos: 2" in result.stderr and "mode L" in result.stderr
  assert sorted(os.listdir(tmp_path / "out")) == ["0001", "basic"]
  for name in ("basic", "0001"):
    folder = tmp_path / "out" / name
    assert {"video.mp4", "video.gif", "contact_sheet.png", "record.json", "frames"} <= set(
        os.listdir(folder))
    assert len(os.listdir(folder / "frames")) == 4
  record = json.loads((tmp_path / "out" / "0001" / "record.json").read_text())
  assert record["mode"] == "sketch" and record["seed"] == 9 and record["checkpoint_step"] == 4
  assert record["heldout_index"] == 1 and record["weights"] == "ema"


def test_sample_help_documents_every_flag_with_its_default():
  result = _run("sample.py", "--helpshort", check=False)  # absl exits 1 after help.
  flags = re.findall(r"^  --(?:\[no\])?(\w+)", result.stdout, re.MULTILINE)
  assert {"workdir", "prompt", "first_frame", "last_frame", "last_frame_edges", "tau",
          "guidance_scale", "guidance_rescale", "sampler", "steps", "timestep_spacing", "eta",
          "seed", "num_clips", "prompts_file", "output_dir", "batch_size", "checkpoint_step",
          "raw_weights", "output"} <= set(flags)
  for block in re.split(r"\n  --", result.stdout)[1:]:
    assert "default" in block.lower() or "required" in block.lower(), block


def test_sample_missing_checkpoint_step_is_a_clear_error(workdir, tmp_path):
  result = _run("sample.py", f"--workdir={workdir}", "--checkpoint_step=3",
                f"--output={tmp_path}/v.mp4", check=False)
  assert result.returncode != 0 and "No checkpoint for step 3" in result.stderr
  assert "Traceback" not in result.stderr


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


def test_sample_incompatible_checkpoint_is_a_clear_error(workdir, tmp_path):
  """A checkpoint whose arrays do not fit its config (here: a wider first level)."""
  broken = tmp_path / "broken"
  shutil.copytree(workdir / "checkpoints", broken / "checkpoints")
  config_path = broken / "checkpoints" / "4" / "config" / "metadata"
  config = json.loads(config_path.read_text())
  config["unet"]["block_out_channels"] = [24, 32]
  config_path.write_text(json.dumps(config))
  result = _run("sample.py", f"--workdir={broken}", f"--output={tmp_path}/v.mp4", check=False)
  assert result.returncode != 0 and "Traceback" not in result.stderr
  assert "does not fit the model its own config describes" in result.stderr


def test_misspelled_config_override_is_an_error(tmp_path):
  result = _run("train.py", "--config=configs/unit_test.py", f"--workdir={tmp_path}",
                "--config.conditioning.last_frame_drop_prop=0.5", check=False)
  assert result.returncode != 0 and "last_frame_drop_prop" in result.stderr
