"""train.py and sample.py end to end, as a user runs them (subprocesses, unit-test config), and
the console: quiet by default, one-line errors for bad config overrides."""

import importlib.util
import json
import logging
import os
import re
import shutil

import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags
from PIL import Image

from configs import unit_test
from pixeldance_jax.cli import console
from pixeldance_jax.io import video_files
from pixeldance_jax.sampling import jobs

import helpers
from processes import run_python as _run


@pytest.fixture(scope="module")
def train_run(tmp_path_factory):
  """(workdir, the finished train.py process) of a default unit-test run."""
  path = tmp_path_factory.mktemp("run")
  return path, _run("train.py", "--config=configs/unit_test.py", f"--workdir={path}",
                    *helpers.one_level_flags(), *_EVAL_FLAGS,
                    f"--config.eval.cache_dir={tmp_path_factory.mktemp('eval_cache')}")


# The periodic evaluation at the last step: two held-out clips, basic mode, the conditioning
# metrics (FVD's I3D is tested by test_evaluate.py and the evaluation command below).
_EVAL_FLAGS = ("--config.eval_every_steps=4", "--config.eval.metrics=conditioning",
               "--config.eval.variants=basic", "--config.eval.num_videos=2",
               "--config.eval.batch_size=2")


@pytest.fixture(scope="module")
def workdir(train_run):
  return train_run[0]


@pytest.mark.slow
def test_train_writes_checkpoints_logs_and_config(workdir):
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
  assert (workdir / "config.json").exists()
  assert any(name.startswith("events") for name in os.listdir(workdir / "tensorboard"))


@pytest.mark.slow
def test_train_evaluates_periodically_into_eval_and_tensorboard(train_run):
  workdir, result = train_run
  results = json.loads((workdir / "eval" / "4.json").read_text())
  assert results["step"] == 4 and list(results["variants"]) == ["basic"]
  assert results["variants"]["basic"]["videos"] == 2
  assert "last_frame_centroid_px" in results["variants"]["basic"]
  assert (workdir / "eval" / "4.md").exists()
  assert "step 4: evaluation in" in result.stderr + result.stdout
  events = b"".join(path.read_bytes() for path in (workdir / "tensorboard").iterdir())
  assert b"eval/basic/failed_fraction" in events


@pytest.mark.slow
def test_evaluate_command_writes_beside_earlier_results(workdir, tmp_path):
  """`python -m pixeldance_jax.evaluate --workdir` on sampled held-out clips (FVD's I3D runs in
  test_evaluate.py); the training run's eval/4.json stays, this run's goes to eval/4-2.json."""
  before = (workdir / "eval" / "4.json").read_text()
  result = _run("-m", "pixeldance_jax.evaluate", f"--workdir={workdir}",
                "--metrics=fid,conditioning", "--variants=magic,text_only", "--num_videos=2",
                "--batch_size=2", "--steps=2", f"--cache_dir={tmp_path}")
  assert "FID skipped: no Inception weights" in result.stdout, result.stdout
  assert "| text only: no first or last frame | 2 |" in result.stdout, result.stdout
  assert (workdir / "eval" / "4.json").read_text() == before
  results = json.loads((workdir / "eval" / "4-2.json").read_text())
  assert list(results["variants"]) == ["magic", "text_only"]
  assert "failed_fraction" in results["variants"]["magic"]


# absl's format, which the libraries' lines (Orbax, TFDS, grain) come in: "I1129 15:17:27.288 ...
# checkpoint_manager.py:1527] ...".
_ABSL_LINE = re.compile(r"^[IWE]\d{4} [\d:.]+ +\d+ \S+\.py:\d+\]", re.MULTILINE)


@pytest.mark.slow
def test_train_console_shows_progress_without_library_chatter(train_run):
  workdir, result = train_run
  log = result.stderr + result.stdout
  assert not _ABSL_LINE.search(log), log
  assert "[process=0]" not in log and "Downloading and preparing" not in log, log
  for expected in ("data: moving_shapes ready", "train_step compiled in", "step 4/4  loss",
                   f"step 2: checkpoint -> {workdir}/checkpoints/2",
                   f"TensorBoard logs in {workdir}/tensorboard"):
    assert expected in log, log
  assert len(log.splitlines()) < 20, log


@pytest.mark.slow
@pytest.mark.parametrize("level, shown", [
    ("progress", {"ours/info", "ours/warning", "library/warning"}),
    ("info", {"ours/info", "ours/warning", "library/info", "library/warning"}),
    ("warning", {"ours/warning", "library/warning"})])
def test_log_level_decides_whose_lines_show(level, shown):
  """In-process (the quiet default is checked on a real train.py run above): --log_level=info
  brings the libraries' INFO lines (Orbax's, say) back; the default shows only ours."""
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint  # pylint: disable=import-outside-toplevel
  sources = {"ours": console.__file__, "library": orbax.checkpoint.__file__}
  try:
    console.setup(level)
    handler = absl_logging.get_absl_handler()
    passed = {f"{source}/{name}"
              for source, path in sources.items()
              for name, number in (("info", logging.INFO), ("warning", logging.WARNING))
              if handler.filter(logging.LogRecord("absl", number, path, 1, "m", None, None))}
  finally:
    console.setup("progress")
  assert passed == shown


@pytest.mark.slow
def test_sample_from_heldout_clip(workdir, tmp_path):
  result = _run("sample.py", f"--workdir={workdir}", "--last_frame=heldout", "--tau=2",
                "--sampler=dpmpp_2m", "--guidance_rescale=0.7", "--raw_weights",
                f"--output={tmp_path}/clip.mp4")
  assert "held-out clip 0" in result.stderr
  for name in ("clip.mp4", "clip.gif", "clip_frames.png", "clip.json"):
    assert (tmp_path / name).stat().st_size > 0
  video = video_files.read_video(str(tmp_path / "clip.mp4"))
  assert video.shape == (4, 64, 64, 3)  # 4 frames of 16x16, upscaled 4x.
  record = json.loads((tmp_path / "clip.json").read_text())
  assert record["checkpoint_step"] == 4 and record["weights"] == "raw"
  assert record["sampler"] == "dpmpp_2m" and record["mode"] == "magic" and record["tau"] == 2


@pytest.mark.slow
def test_sample_prompts_file_writes_a_folder_per_line(workdir, tmp_path, caplog):
  """In-process from here on: sample.py passes its flags to `jobs` (the run above is the
  command's own), and a subprocess per case would pay jax's import each time."""
  Image.fromarray(np.full((16, 16), 90, np.uint8), "L").save(tmp_path / "grey.png")
  lines = [{"prompt": "a red square moves up", "first_frame": "grey.png", "name": "basic"},
           {"heldout_index": 1, "last_frame": "heldout", "last_frame_edges": True, "seed": 9,
            "tau": 1}]
  (tmp_path / "jobs.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
  with caplog.at_level(logging.INFO):
    jobs.sample_prompts_file(str(workdir), prompts_file=f"{tmp_path}/jobs.jsonl",
                             output_dir=f"{tmp_path}/out", batch_size=2, upscale=1)
  assert "batch 1/1 (videos: 2" in caplog.text and "mode L" in caplog.text
  assert sorted(os.listdir(tmp_path / "out")) == ["0001", "basic"]
  for name in ("basic", "0001"):
    folder = tmp_path / "out" / name
    assert {"video.mp4", "video.gif", "contact_sheet.png", "record.json", "frames"} <= set(
        os.listdir(folder))
    assert len(os.listdir(folder / "frames")) == 4
  record = json.loads((tmp_path / "out" / "0001" / "record.json").read_text())
  assert record["mode"] == "sketch" and record["seed"] == 9 and record["checkpoint_step"] == 4
  assert record["heldout_index"] == 1 and record["weights"] == "ema"


# Commands that slow tests run as subprocesses anyway (the AOT command's needs libtpu); the data
# build runs in-process there.
_HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


@pytest.mark.parametrize("command", [
    pytest.param("pixeldance_jax.aot",
                 marks=[pytest.mark.quick_only("test_aot.py")] if _HAS_LIBTPU else []),
    pytest.param("pixeldance_jax.convert", marks=pytest.mark.quick_only("test_convert.py")),
    pytest.param("pixeldance_jax.demo", marks=pytest.mark.quick_only("test_demo.py")),
    pytest.param("pixeldance_jax.evaluate", marks=pytest.mark.quick_only("test_cli.py")),
    "pixeldance_jax.data.build"])
def test_every_command_answers_help(command):
  """Each command's module imports and defines its flags (in the quick tier, the one run of
  the commands' entry modules)."""
  result = _run("-m", command, "--helpshort", check=False)
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  assert re.search(r"^  --\w+", result.stdout, re.MULTILINE), result.stdout[-2000:]


@pytest.mark.slow
def test_sample_help_documents_every_flag_with_its_default():
  result = _run("sample.py", "--helpshort", check=False)  # absl exits 1 after help.
  flags = re.findall(r"^  --(?:\[no\])?(\w+)", result.stdout, re.MULTILINE)
  assert {"workdir", "prompt", "first_frame", "last_frame", "last_frame_edges", "tau",
          "guidance_scale", "guidance_rescale", "sampler", "steps", "timestep_spacing", "eta",
          "seed", "num_clips", "prompts_file", "output_dir", "batch_size", "checkpoint_step",
          "raw_weights", "output"} <= set(flags)
  for block in re.split(r"\n  --", result.stdout)[1:]:
    assert "default" in block.lower() or "required" in block.lower(), block


@pytest.mark.slow
def test_sample_missing_checkpoint_step_is_a_clear_error(workdir, tmp_path):
  """As the command prints it: one line, no traceback (the library's errors below are the
  same ValueError/FileNotFoundError that sample.py prints this way)."""
  result = _run("sample.py", f"--workdir={workdir}", "--checkpoint_step=3",
                f"--output={tmp_path}/v.mp4", check=False)
  assert result.returncode != 0 and "No checkpoint for step 3" in result.stderr
  assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_sample_resizes_a_wrong_size_first_frame(workdir, tmp_path, caplog):
  Image.fromarray(np.full((40, 40, 4), 200, np.uint8), "RGBA").save(tmp_path / "first.png")
  with caplog.at_level(logging.INFO):
    jobs.sample(str(workdir), output=f"{tmp_path}/v.mp4", first_frame=f"{tmp_path}/first.png",
                prompt="a red square moves quickly up")
  assert "40x40" in caplog.text and (tmp_path / "v.gif").exists()
  with pytest.raises(ValueError, match="16x16"):
    jobs.sample(str(workdir), output=f"{tmp_path}/w.mp4", first_frame=f"{tmp_path}/first.png",
                prompt="x", resize=False)
  assert not (tmp_path / "w.mp4").exists()


@pytest.mark.slow
def test_sample_without_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="No checkpoint in"):
    jobs.sample(str(tmp_path), output=f"{tmp_path}/v.mp4")


@pytest.mark.slow
def test_sample_incompatible_checkpoint_is_a_clear_error(workdir, tmp_path):
  """A checkpoint whose arrays do not fit its config (here: a wider first level)."""
  broken = tmp_path / "broken"
  shutil.copytree(workdir / "checkpoints", broken / "checkpoints")
  config_path = broken / "checkpoints" / "4" / "config" / "metadata"
  config = json.loads(config_path.read_text())
  config["unet"]["block_out_channels"] = [24]
  config_path.write_text(json.dumps(config))
  with pytest.raises(ValueError, match="does not fit the model its own config describes"):
    jobs.sample(str(broken), output=f"{tmp_path}/v.mp4")


@pytest.mark.slow
def test_misspelled_config_override_is_an_error(tmp_path):
  result = _run("train.py", "--config=configs/unit_test.py", f"--workdir={tmp_path}",
                "--config.conditioning.last_frame_drop_prop=0.5", check=False)
  assert result.returncode != 0 and "last_frame_drop_prop" in result.stderr
  assert result.stderr.strip().splitlines() == [
      "error: --config.conditioning.last_frame_drop_prop: config.conditioning has no key "
      "'last_frame_drop_prop'; did you mean --config.conditioning.last_frame_drop_prob?"]
  assert not os.listdir(tmp_path)  # Nothing was built.


def _config_flag_values(argv: list[str]) -> flags.FlagValues:
  """Flags like train.py's, on their own FlagValues (the global ones belong to the CLIs);
  ml_collections finds the overrides in `argv` (else in sys.argv)."""
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "Config file.", flag_values=flag_values,
                                  sys_argv=argv)
  flags.DEFINE_string("workdir", None, "Workdir.", flag_values=flag_values)
  return flag_values


@pytest.mark.parametrize("override, message", [
    ("--config.unet.block_out_chanels=3", "error: --config.unet.block_out_chanels: config.unet "
     "has no key 'block_out_chanels'; did you mean --config.unet.block_out_channels?"),
    ("--config.unte.dropout=0.1", "error: --config.unte.dropout: config has no key 'unte'; "
     "did you mean --config.unet.dropout?"),
    ("--noconfig.unet.pooled_text_embeding", "did you mean "
     "--config.unet.pooled_text_embedding?"),
    ("--config.batch_size=abc", "error: flag --config.batch_size=abc: invalid literal for int()"
     " with base 10: 'abc' (config.batch_size is an int, now 4). See --helpshort."),
])
def test_bad_config_override_is_one_line_naming_the_key(override, message, capsys):
  argv = ["train.py", "--config=configs/unit_test.py", "--workdir=/tmp/unused", override]
  with pytest.raises(SystemExit) as exit_info:
    console.parse_flags(argv, _config_flag_values(argv))
  assert exit_info.value.code == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and message in lines[0], lines


def test_a_config_flag_with_a_default_file_takes_overrides_and_names_bad_keys(capsys):
  flag_values = flags.FlagValues()
  argv = ["model_size.py", "--config.batch_size=2"]
  config_flags.DEFINE_config_file("config", "configs/unit_test.py", "Config file.",
                                  flag_values=flag_values, sys_argv=argv)
  assert console.parse_flags(argv, flag_values) == ["model_size.py"]
  assert flag_values.config.batch_size == 2
  with pytest.raises(SystemExit):
    console.parse_flags(["model_size.py", "--config.batch_sise=2"], flag_values)
  assert "did you mean --config.batch_size?" in capsys.readouterr().err


def test_config_override_errors_pass_valid_keys():
  config = unit_test.get_config()
  argv = ["--config.unet.dropout=0.1", "--config.sample.tau", "3",
          "--noconfig.unet.pooled_text_embedding", "--config=configs/unit_test.py", "--workdir=x"]
  assert console.config_override_errors(config, argv) == []
  argv = ["train.py", "--config=configs/unit_test.py", "--config.unet.dropout=0.25"]
  flag_values = _config_flag_values(argv)
  assert console.parse_flags(argv, flag_values) == ["train.py"]
  assert flag_values.config.unet.dropout == 0.25
