"""Shared pytest setup: `configs` importable; fast-compiling XLA; one persistent compilation
cache per run.

The suite's time is XLA compiling the unit-test programs on the CPU (running them takes
milliseconds). LLVM's optimisation level 0 and XLA's fast-compile preset (tests/processes.py)
compile them 20-40% faster; no fast-math either way (the preset fuses a little differently:
one unit-test step's weights move by ~1e-10 relative). The cache (inherited by the subprocesses
through the environment) lets identical programs compile once per run.
"""

import atexit
import gc
import os
import pathlib
import shutil
import sys
import tempfile

import pytest

_REPO_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if _REPO_ROOT not in sys.path:
  sys.path.insert(0, _REPO_ROOT)
_TESTS = str(pathlib.Path(__file__).resolve().parent)
if _TESTS not in sys.path:
  sys.path.insert(0, _TESTS)

import processes  # pylint: disable=wrong-import-position
import torch_compat  # noqa: F401  # pylint: disable=wrong-import-position,unused-import
from pixeldance_jax.runtime import host_memory, threefry_cpu  # pylint: disable=wrong-import-position

threefry_cpu.register()  # As the commands do (console.run).
host_memory.quiet_libtpu()

# The README installs with `pip --no-compile` (compiling the byte code of every installed file,
# torch's included, is half the install): the suite and its subprocesses write that of what they
# import instead, once, even where the environment asks Python not to.
sys.dont_write_bytecode = False
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)

os.environ["XLA_FLAGS"] = processes.with_fast_compile(os.environ.get("XLA_FLAGS", ""))
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # Set once, by the first pytest process.
  _CACHE = tempfile.mkdtemp(prefix="pixeldance_xla_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
# Only programs that take a second or more to compile: reading a small one back from the cache
# costs more than compiling it again, and the suite compiles some two thousand of them.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
# One thread for the torch references (OpenMP): the suite already runs a process per core, and
# OpenMP threads that spin waiting for a busy core slow both.
os.environ.setdefault("OMP_NUM_THREADS", "1")


# `--dist loadfile` hands each worker whole files in collection order (pytest_configure turns
# off xdist's reordering by test count): the longest first, by their time in a full run, so that
# the last files to run are short and both workers finish together.
LONGEST_FILES = ("test_train_at_scale.py", "test_parallel.py", "test_sample.py", "test_aot.py",
                 "test_model.py", "test_convert.py", "test_train.py", "test_cli.py",
                 "test_accelerator_benchmark.py", "test_unet_parity.py", "test_evaluate.py",
                 "test_cache.py", "test_diffusion.py", "test_local_data.py", "test_ablation.py")


def pytest_configure(config):
  if hasattr(config.option, "loadscopereorder"):  # pytest-xdist's `--dist loadscope/loadfile`.
    config.option.loadscopereorder = False
  config.addinivalue_line("markers", "slow: multi-process, many-device, end-to-end command or "
                          "browser tests; `-m 'not slow'` is the quick tier.")
  config.addinivalue_line("markers", "quick_only(*files): a cheap stand-in for slow tests in "
                          "`files` that check the same end to end; left out where those run.")


@pytest.hookimpl(trylast=True)  # After `-m` has chosen the tier.
def pytest_collection_modifyitems(config, items):
  """The longest files first; a `quick_only(*files)` test deselected where slow tests of its
  `files` run (it repeats a part of one, a command's start-up, at the cost of a process)."""
  rank = {name: index for index, name in enumerate(LONGEST_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # Stable: in-file order kept.
  slow_files = {item.path.name for item in items if item.get_closest_marker("slow")}

  def redundant(item) -> bool:
    marker = item.get_closest_marker("quick_only")
    return marker is not None and bool(slow_files.intersection(marker.args))

  deselected = [item for item in items if redundant(item)]
  if deselected:
    config.hook.pytest_deselected(items=deselected)
    items[:] = [item for item in items if not redundant(item)]


def pytest_collection_finish(session):  # pylint: disable=unused-argument
  """What the test modules imported (jax, flax, torch, ...) lives as long as the process:
  frozen, it is no longer walked by every full collection, which tracing a model's large
  pytrees otherwise triggers over and over."""
  gc.collect()
  gc.freeze()
  gc.set_threshold(50_000, 20, 100)


@pytest.fixture(scope="session", autouse=True)
def _warm_compilation_cache():
  """The first xdist worker compiles the suite's most used programs before its first test: the
  one-level unit-test train step and initialiser (`helpers.ONE_LEVEL_UNET`), which ~8 tests and
  subprocesses run. Written to the persistent cache early, they are loaded by those instead of
  compiled again by each that would otherwise need them before anyone had written them. (In a
  fixture, not at session start: the other worker runs its first file meanwhile.)"""
  if os.environ.get("PYTEST_XDIST_WORKER") != "gw0":  # Nor a serial run.
    return
  import jax  # pylint: disable=import-outside-toplevel
  import helpers  # pylint: disable=import-outside-toplevel
  from configs import unit_test  # pylint: disable=import-outside-toplevel
  from pixeldance_jax.parallel import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  from pixeldance_jax.train import state as state_lib  # pylint: disable=import-outside-toplevel
  from pixeldance_jax.train import step as step_lib  # pylint: disable=import-outside-toplevel
  config = unit_test.get_config()
  config.update_from_flattened_dict(helpers.ONE_LEVEL_UNET)
  mesh = mesh_lib.make_mesh(config.mesh)
  _, shardings = state_lib.abstract_state(config, mesh)
  state = state_lib.create_train_state(config, mesh, jax.random.key(config.seed))
  batch = mesh_lib.global_batch(helpers.synthetic_batch(config), mesh)
  # One step, as the trainer calls it (its arguments' shardings are part of the program).
  step_lib.jit_train_step(config, mesh, shardings)(state, batch, jax.random.key(0))
