"""Shared pytest setup: `configs` importable; one persistent XLA compilation cache per run.

The cache (inherited by the CLI tests' subprocesses through the environment) lets the many
identical programs of the unit-test config compile once.
"""

import os
import pathlib
import sys
import tempfile

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="pixeldance_xla_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

_REPO_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if _REPO_ROOT not in sys.path:
  sys.path.insert(0, _REPO_ROOT)
