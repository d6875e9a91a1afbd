"""Evaluation figures against training minutes (`evaluate.curve`) and the TensorBoard reader it
stands on, on hand-written event files and evaluations with known answers."""

import json

import pytest

from pixeldance_jax.evaluate import curve, figures
from pixeldance_jax.io import tensorboard_files

import processes


def _log_rates(folder, rates: dict[int, float], start_time: float) -> None:
  """One writer's `train/steps_per_sec` at each step, a second of wall time apart (in a file of
  its own, as a later run's is: the file's name holds its creation time in seconds)."""
  writer = tensorboard_files.SummaryWriter(str(folder), filename_suffix=f".{start_time:.0f}")
  for i, (step, rate) in enumerate(rates.items()):
    writer.add_scalar("train/steps_per_sec", rate, step, walltime=start_time + i)
  writer.close()


def _write_evaluation(workdir, name: str, step: int, **figures_of_magic) -> None:
  (workdir / "eval").mkdir(exist_ok=True)
  results = {"step": step, "variants": {"magic": figures_of_magic}}
  (workdir / "eval" / name).write_text(json.dumps(results))


@pytest.fixture
def resumed_run(tmp_path):
  """A run logged steps 50 and 100 (at 2 and 1 steps/s), stopped, and resumed from its step-50
  checkpoint: steps 100 and 150 again (0.5 and 1 steps/s). Evaluated at 100 and, after the
  resume, at 150; 120 lies between logged steps."""
  _log_rates(tmp_path / "tensorboard", {50: 2.0, 100: 1.0}, start_time=1000.0)
  _log_rates(tmp_path / "tensorboard", {100: 0.5, 150: 1.0}, start_time=2000.0)
  _write_evaluation(tmp_path, "100.json", 100, fvd=500.0, colour_error=60.0)
  _write_evaluation(tmp_path, "100-2.json", 100, fvd=1.0, colour_error=1.0)  # A re-evaluation.
  _write_evaluation(tmp_path, "120.json", 120, fvd=450.0, colour_error=float("nan"))
  _write_evaluation(tmp_path, "150.json", 150, fvd=400.0, colour_error=40.0)
  _write_evaluation(tmp_path, "900.json", 900, fvd=300.0, colour_error=30.0)
  return tmp_path


def test_training_minutes_count_the_run_that_went_on_after_a_resume(resumed_run):
  minutes = curve.training_minutes(str(resumed_run / "tensorboard"))
  # Steps 1-50 at 2/s: 25 s; 51-100 at 0.5/s (the resumed run's): 100 s; 101-150 at 1/s: 50 s.
  assert minutes == pytest.approx({50: 25 / 60, 100: 125 / 60, 150: 175 / 60})


def test_a_paused_interval_counts_at_the_median_rate(tmp_path):
  """A process stopped for a while logs one interval at a tiny rate: training did not run."""
  _log_rates(tmp_path, {50: 1.0, 100: 1.0, 150: 0.01, 200: 0.5}, start_time=0.0)
  assert curve.stalled_steps(str(tmp_path)) == [150]
  # The median of 1, 1, 0.01 and 0.5 is 0.75.
  assert curve.training_minutes(str(tmp_path))[200] == pytest.approx((100 + 50 / 0.75 + 100) / 60)


def test_the_curve_has_a_row_per_first_evaluation_with_its_training_minutes(resumed_run):
  rows = curve.curve(str(resumed_run))
  assert [row["step"] for row in rows] == [100, 120, 150, 900]
  assert rows[0]["fvd"] == 500.0  # The run's own evaluation, not the re-evaluation beside it.
  assert rows[1]["minutes"] == pytest.approx((125 + 20) / 60)  # Between logged steps.
  assert rows[3]["minutes"] is None  # Past the last logged step.
  table = curve.markdown({"run": rows}, ["fvd", "colour_error"])
  assert "| run | 120 | 2.4 | 450 |  |" in table  # NaN (JSON's null) is an empty cell.
  assert "| run | 900 |  | 300 | 30 |" in table


def test_a_record_cut_short_is_left_out(tmp_path):
  _log_rates(tmp_path, {50: 2.0, 100: 1.0}, start_time=0.0)
  path = next(tmp_path.glob("events*"))
  path.write_bytes(path.read_bytes()[:-6])  # A writer killed in its last record.
  assert tensorboard_files.scalars(str(tmp_path), "train/steps_per_sec") == {50: 2.0}


def test_the_picture_draws_each_run_and_the_target_line(resumed_run):
  rows = curve.curve(str(resumed_run))
  image = curve.picture({"a": rows, "b": rows[:1]}, ["fvd", "colour_error"], {"fvd": 191.0})
  colours = {tuple(pixel) for pixel in image.reshape(-1, 3)}
  assert {figures._LINES[0], figures._LINES[1], figures._TARGET} <= colours
  assert image.shape[0] > 100 and image.shape[1] > 2 * 200


def test_targets_are_parsed_and_a_bad_one_is_named():
  assert curve.parse_targets(["fvd=191", "shape_iou=0.8"], curve.METRICS) == {
      "fvd": 191.0, "shape_iou": 0.8}
  with pytest.raises(ValueError, match="'fid', which is not among --metrics"):
    curve.parse_targets(["fid=3"], curve.METRICS)
  with pytest.raises(ValueError, match="'fvd:191' is not <metric>=<number>"):
    curve.parse_targets(["fvd:191"], curve.METRICS)


def test_a_run_without_evaluations_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="workdir .*/none does not exist"):
    curve.curve(str(tmp_path / "none"))
  with pytest.raises(FileNotFoundError, match="eval_every_steps"):
    curve.curve(str(tmp_path))
  _write_evaluation(tmp_path, "5.json", 5, fvd=1.0)
  with pytest.raises(FileNotFoundError, match="no train/steps_per_sec"):
    curve.curve(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="no evaluation of the 'basic' variant"):
    curve.curve(str(tmp_path), "basic")


def test_the_command_prints_the_table_and_writes_the_picture(resumed_run, tmp_path):
  out = tmp_path / "curve.png"
  result = processes.run_python("-m", "pixeldance_jax.evaluate.curve",
                                f"--workdir={resumed_run}", "--metrics=fvd,colour_error",
                                "--targets=colour_error=20", f"--out={out}")
  assert "| 150 | 2.9 | 400 | 40 |" in result.stdout
  assert out.stat().st_size > 0
