"""Evaluation figures against training minutes (`evaluate.curve`) and the TensorBoard reader it
stands on, on hand-written event files with known answers."""

import pytest

from pixeldance_jax.evaluate import curve, figures
from pixeldance_jax.io import tensorboard_files

import processes


def _log(folder, scalars: dict[int, dict[str, float]], start_time: float, name: str) -> None:
  """One writer's `{step: {tag: value}}`, a second of wall time apart, in a file of its own
  whose name ends in `name` (names alone must not decide the order: wall times do)."""
  writer = tensorboard_files.SummaryWriter(str(folder), filename_suffix=f".{name}")
  for i, (step, values) in enumerate(scalars.items()):
    for tag, value in values.items():
      writer.add_scalar(tag, value, step, walltime=start_time + i)
  writer.close()


def _rates(**by_step: float) -> dict[int, dict[str, float]]:
  return {int(step[1:]): {"train/steps_per_sec": rate} for step, rate in by_step.items()}


@pytest.fixture
def resumed_run(tmp_path):
  """A run logged rates at steps 50, 100 and 150 (2, 1 and 1 steps/s) and evaluated at 100 and
  150, stopped, and was resumed from its step-50 checkpoint: rates at 100 and 200 (0.5 and 1
  steps/s), evaluations at 25 (before any rate), 100, 120 (between logged steps) and 900
  (past them)."""
  folder = tmp_path / "tensorboard"
  abandoned = _rates(s50=2.0, s100=1.0, s150=1.0)
  abandoned[100]["eval/magic/fvd"] = abandoned[150]["eval/magic/fvd"] = 1.0
  _log(folder, abandoned, start_time=1000.0, name="b")
  went_on = {25: {"eval/magic/fvd": 600.0}, **_rates(s100=0.5),
             120: {"eval/magic/fvd": 450.0}, **_rates(s200=1.0),
             900: {"eval/magic/fvd": 300.0, "eval/magic/colour_error": 30.0}}
  went_on[100].update({"eval/magic/fvd": 500.0, "eval/magic/colour_error": 60.0})
  _log(folder, went_on, start_time=2000.0, name="a")
  return tmp_path


def test_a_resumed_run_drops_what_the_abandoned_run_logged_past_its_checkpoint(resumed_run):
  folder = str(resumed_run / "tensorboard")
  assert tensorboard_files.scalars(folder, "train/steps_per_sec") == {50: 2.0, 100: 0.5,
                                                                        200: 1.0}
  assert tensorboard_files.scalars(folder, "eval/magic/fvd") == {
      25: 600.0, 100: 500.0, 120: 450.0, 900: 300.0}


def test_training_minutes_add_up_the_logged_rates():
  # Steps 1-50 at 2/s: 25 s; 51-100 at 0.5/s: 100 s; 101-200 at 1/s: 100 s.
  assert curve.training_minutes({50: 2.0, 100: 0.5, 200: 1.0}) == pytest.approx(
      {50: 25 / 60, 100: 125 / 60, 200: 225 / 60})


def test_a_paused_interval_counts_at_the_median_rate():
  """A process stopped for a while logs one interval at a tiny rate: training did not run."""
  rates = {50: 1.0, 100: 1.0, 150: 0.01, 200: 0.5}  # Median 0.75.
  assert curve.training_minutes(rates)[200] == pytest.approx((100 + 50 / 0.75 + 100) / 60)


def test_the_curve_has_a_row_per_evaluated_step_with_its_training_minutes(resumed_run):
  run = curve.curve(str(resumed_run))
  assert [row["step"] for row in run.rows] == [25, 100, 120, 900]
  assert [row["fvd"] for row in run.rows] == [600.0, 500.0, 450.0, 300.0]
  minutes = [row["minutes"] for row in run.rows]
  assert minutes[:3] == pytest.approx([12.5 / 60, 125 / 60, (125 + 20) / 60])
  assert minutes[3] is None  # Past the last logged step.
  assert run.stalled_steps == []
  table = curve.markdown({"run": run.rows}, ["fvd", "colour_error"])
  assert "| run | 120 | 2.4 | 450 |  |" in table  # No colour error logged at 120.
  assert "| run | 900 |  | 300 | 30 |" in table


def test_a_record_cut_short_is_left_out(tmp_path):
  _log(tmp_path, _rates(s50=2.0, s100=1.0), start_time=0.0, name="a")
  path = next(tmp_path.glob("events*"))
  path.write_bytes(path.read_bytes()[:-6])  # A writer killed in its last record.
  assert tensorboard_files.scalars(str(tmp_path), "train/steps_per_sec") == {50: 2.0}


def test_the_picture_draws_each_run_and_the_target_line(resumed_run):
  rows = curve.curve(str(resumed_run)).rows
  image = curve.picture({"a": rows, "b": rows[:2]}, ["fvd", "colour_error"], {"fvd": 191.0})
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
  with pytest.raises(FileNotFoundError, match="no train/steps_per_sec"):
    curve.curve(str(tmp_path))
  _log(tmp_path / "tensorboard", _rates(s50=1.0), start_time=0.0, name="a")
  with pytest.raises(FileNotFoundError, match="no evaluation of the 'magic' variant.*"
                     "eval_every_steps"):
    curve.curve(str(tmp_path))


def test_the_command_prints_the_table_and_writes_the_picture(resumed_run, tmp_path):
  out = tmp_path / "curve.png"
  result = processes.run_python("-m", "pixeldance_jax.evaluate.curve",
                                f"--workdir={resumed_run}", "--metrics=fvd,colour_error",
                                "--targets=colour_error=20", f"--out={out}")
  assert "| 100 | 2.1 | 500 | 60 |" in result.stdout
  assert out.stat().st_size > 0
