"""benchmarks/accelerator.py and its driver benchmarks/accelerator.sh, as someone with an
accelerator runs them: one measurement per process, one JSON line with the documented fields
(here the unit-test model on the CPU); the driver's sweep, failures and summary (with a stub in
place of the measurements)."""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

import helpers
from processes import REPO, run_python

# Multi-process, end-to-end or browser: the full suite's tier (README, Developing).
pytestmark = pytest.mark.slow

SCRIPT = "benchmarks/accelerator.py"
# The suite's one-level U-Net (its programs compile fastest) in float32 and, below, the
# unit-test config's batch of 4: test_cli's programs, which the suite's compilation cache (see
# conftest.py) may already hold.
_SMALL = ["--size=unit_test", "--dtype=float32",
          *(f"--config.unit_test.{key}={value}" for key, value in helpers.ONE_LEVEL_UNET.items())]


def _documented_fields() -> list[str]:
  """The JSON fields the script's header lists (after "Fields:"), in order."""
  listing = (REPO / SCRIPT).read_text().split('"""')[1].split("Fields:")[1]
  names = []
  for line in listing.splitlines():
    match = re.match(r"  (\w+(?:, \w+)*)(?: |$)", line)
    names += match.group(1).split(", ") if match else []
  return names


def _measure(*flags: str) -> dict:
  result = run_python(SCRIPT, *_SMALL, *flags)
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 1, result.stdout  # Logs go to stderr.
  return json.loads(lines[0])


def test_header_documents_fields():
  fields = _documented_fields()
  assert fields[:3] == ["measurement", "size", "platform"] and "seconds_per_video" in fields
  assert fields[-2:] == ["error", "error_kind"] and len(set(fields)) == len(fields)


@pytest.mark.parametrize("measurement, flags, measured", [
    ("train", ["--batch=4", "--timed_steps=2"],
     ["step_s", "clips_per_s", "tflop_per_step", "tflops_per_device", "peak_memory_gib",
      "compile_s", "lower_s", "init_s", "loss"]),
    ("sample", ["--batch=1", "--sample_steps=2", "--sample_repeats=1"],
     ["seconds_per_video", "run_s", "first_call_s", "compile_s", "init_s"]),
])
def test_one_measurement_prints_one_json_line_of_the_documented_fields(measurement, flags,
                                                                      measured):
  record = _measure(f"--measure={measurement}", *flags)
  assert list(record) == _documented_fields()
  assert record["error"] is None and record["error_kind"] is None
  assert record["measurement"] == measurement and record["platform"] == "cpu"
  for name in measured:
    assert isinstance(record[name], float) and record[name] > 0, (name, record)
  if measurement == "train":
    assert record["global_batch"] == 4 and record["memory_source"] == "xla_plan"
    assert record["mfu"] is None  # No peak FLOP/s is known for a CPU.
  else:
    assert record["steps"] == 2 and record["remat"] is None and record["step_s"] is None


def test_plan_orders_the_sweep():
  result = run_python(SCRIPT, "--size=unit_test", "--plan", "--max_batch=4",
                      "--order=train:none:kernel:1-,sample:xla:1/8,train:none:xla:2")
  rows = [line.split("\t") for line in result.stdout.strip().splitlines()]
  assert [(setting, json.loads(settings)["batch"]) for setting, _, settings in rows] == [
      ("train:none:xla", 1), ("train:none:xla", 2), ("train:none:xla", 4),
      ("sample:xla", 1), ("sample:xla", 8)]  # "kernel" is xla on a CPU; repeats dropped.
  assert rows[0][1] == "--measure=train --attention=xla --batch=1 --remat=none"


# Stands in for accelerator.py beside a copy of the driver: a plan of three settings, where
# batch 2 runs out of memory and the sampler dies without a word.
_STUB = textwrap.dedent("""\
    import json, sys
    args = dict(arg.lstrip("-").partition("=")[::2] for arg in sys.argv[1:])
    if "plan" in args:
      for setting, batch in [("train:none:xla", 1), ("train:none:xla", 2), ("train:none:xla", 4),
                             ("sample:xla", 1), ("train:full:xla", 1)]:
        kind, *rest = setting.split(":")
        settings = {"measurement": kind, "remat": rest[0] if kind == "train" else None,
                    "attention": "xla", "batch": batch, "size": "paper"}
        flags = f"--measure={kind} --batch={batch} --remat={settings['remat']}"
        print(f"{setting}\\t{flags}\\t{json.dumps(settings)}")
      sys.exit(0)
    if args["measure"] == "sample":
      sys.exit(3)
    oom = args["batch"] == "2"
    print(json.dumps({"measurement": "train", "size": "paper", "platform": "gpu",
                      "device_kind": "stub", "devices": 1, "jax_version": "0",
                      "remat": args["remat"], "attention": "xla", "batch": int(args["batch"]),
                      "step_s": 0.5,
                      "mfu": 0.25, "error": "RESOURCE_EXHAUSTED: stub" if oom else None,
                      "error_kind": "oom" if oom else None}))
    """)


def _run_driver(folder, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run(["bash", str(folder / "accelerator.sh"), *args], cwd=folder,
                        env=dict(os.environ, PYTHON=sys.executable), capture_output=True,
                        text=True, timeout=60, check=True)


def test_driver_sweeps_to_the_first_failure_records_crashes_and_keeps_the_budget(tmp_path):
  (tmp_path / "accelerator.sh").write_text((REPO / "benchmarks/accelerator.sh").read_text())
  (tmp_path / "accelerator.py").write_text(_STUB)
  result = _run_driver(tmp_path)
  records = [json.loads(line)
             for line in (tmp_path / "accelerator-results.jsonl").read_text().splitlines()]
  assert [(r["measurement"], r["remat"], r["batch"], r["error_kind"]) for r in records] == [
      ("train", "none", 1, None), ("train", "none", 2, "oom"), ("sample", None, 1, "crash"),
      ("train", "full", 1, None)]  # Batch 4 of remat none is not tried after the OOM.
  assert "exited with status 3" in records[2]["error"]
  assert result.stdout.splitlines()[:4] == [json.dumps(r) for r in records]
  assert "MFU" in result.stdout and "25.0%" in result.stdout, result.stdout
  assert "after a failure at a smaller batch: train:none:xla:4" in result.stdout
  result = _run_driver(tmp_path, "short.jsonl", "--budget=30")
  assert (tmp_path / "short.jsonl").read_text() == ""
  assert "out of budget (--budget=SECONDS for more): train:none:xla:1" in result.stdout
