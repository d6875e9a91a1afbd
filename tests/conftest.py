"""Shared pytest setup: `configs` importable; fast-compiling XLA; one persistent compilation
cache per run.

The suite's time is XLA compiling the unit-test programs on the CPU (running them takes
milliseconds). LLVM's optimisation level 0 compiles them about 30% faster and leaves float
results alone (no fast-math either way). The cache (inherited by the subprocesses through the
environment) lets identical programs compile once per run.
"""

import atexit
import os
import pathlib
import shutil
import sys
import tempfile

_REPO_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if _REPO_ROOT not in sys.path:
  sys.path.insert(0, _REPO_ROOT)
_TESTS = str(pathlib.Path(__file__).resolve().parent)
if _TESTS not in sys.path:
  sys.path.insert(0, _TESTS)

import processes  # pylint: disable=wrong-import-position

os.environ["XLA_FLAGS"] = processes.with_fast_compile(os.environ.get("XLA_FLAGS", ""))
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # Set once, by the first pytest process.
  _CACHE = tempfile.mkdtemp(prefix="pixeldance_xla_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
