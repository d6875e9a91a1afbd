"""Shared pytest setup: make the repository's `configs` package importable."""

import pathlib
import sys

_REPO_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if _REPO_ROOT not in sys.path:
  sys.path.insert(0, _REPO_ROOT)
