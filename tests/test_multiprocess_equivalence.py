"""Two processes train like one: same losses, same parameters.

tests/multi_process_check.py trains the unit-test model (with a one-level U-Net) 3 steps on a data 1 x fsdp 2 x tensor 1 mesh, from the same initial state and global
batch, as 2 processes of 1 CPU device each (jax.distributed on 127.0.0.1) and as 1 process of 2
devices. The three processes run at once, with the suite's fast-compiling XLA flags
(tests/processes.py), the same in both runs.
"""

import pathlib
import subprocess
import sys

import numpy as np
import pytest

from processes import REPO, free_port as _free_port
from processes import cpu_env, process_group_env

SCRIPT = str(pathlib.Path(__file__).resolve().parent / "multi_process_check.py")

def _run(commands: list[tuple[list[str], int]]) -> None:
  """Runs SCRIPT with each (arguments, CPU devices) at once; fails with the failures' logs."""
  processes = [subprocess.Popen([sys.executable, SCRIPT, *arguments], cwd=REPO,
                                env=(process_group_env if len(arguments) > 1 else cpu_env)(
                                    devices), stderr=subprocess.PIPE, text=True)
               for arguments, devices in commands]
  try:
    logs = [process.communicate(timeout=600)[1] for process in processes]
  finally:  # One process failing leaves the other waiting for it.
    for process in processes:
      if process.poll() is None:
        process.kill()
  for (arguments, _), process, log in zip(commands, processes, logs):
    assert process.returncode == 0, f"{' '.join(arguments)}:\n{log[-4000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict[str, np.ndarray]]:
  folder = tmp_path_factory.mktemp("multi_process")
  two, one = str(folder / "two.npz"), str(folder / "one.npz")
  address = f"127.0.0.1:{_free_port()}"
  _run([([two, address, "2", "0"], 1), ([two, address, "2", "1"], 1), ([one], 2)])
  return {name: dict(np.load(path)) for name, path in (("two", two), ("one", one))}


def test_the_runs_have_the_topologies_claimed(runs):
  assert (int(runs["two"]["processes"]), int(runs["two"]["devices"])) == (2, 2)
  assert (int(runs["one"]["processes"]), int(runs["one"]["devices"])) == (1, 2)


def test_two_processes_give_the_losses_of_one(runs):
  """Per step. Only the transport of the cross-process collectives differs, so float32 sums
  may round differently: 1e-6 is ~16 float32 ulps of these ~0.6 losses."""
  losses = runs["two"]["losses"]
  assert losses.shape == (3,) and np.isfinite(losses).all()
  np.testing.assert_allclose(losses, runs["one"]["losses"], rtol=0, atol=1e-6)


def test_two_processes_give_the_parameters_of_one(runs):
  """Max |difference| of every parameter after the steps.

  Adam turns a gradient that is zero in exact arithmetic (the text encoder's key bias, which
  softmax ignores) into float32 noise whose update m / (sqrt(v) + eps) is not small, so the
  bound is that of tests/test_parallel.py: 1e-4, 3% of what three steps at the unit-test
  learning rate (1e-3) can move a weight. A wrong reduction or batch moves weights by O(lr).
  """
  two, one = runs["two"], runs["one"]
  names = sorted(name for name in two if name.startswith("params"))
  assert names and names == sorted(name for name in one if name.startswith("params"))
  difference, where = max((float(np.abs(two[name] - one[name]).max()), name) for name in names)
  assert difference <= 1e-4, f"params differ by {difference:.2e} at {where}"
