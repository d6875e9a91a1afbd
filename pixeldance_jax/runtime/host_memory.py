"""Host memory for XLA:CPU: keep freed memory for the next step instead of returning it.

XLA:CPU allocates one buffer per execution for all of a program's intermediates and frees it at
the end; glibc serves so large a block with a fresh `mmap`, so every step faults its pages in
again. From one heap that keeps up to 2 GiB free at its top (`M_ARENA_MAX` 1, no `mmap`,
`M_TRIM_THRESHOLD`), malloc hands the same pages back each step (docs/benchmarks.md); the heap
keeps its peak until the process exits, and XLA's compiler threads then share one arena, which
slows compiles. So the commands that run a step many times ask for it (`console.run(main,
reuse_freed_memory=True)`), and only where it helps: a CPU-only install (libtpu counts as an
accelerator only on a host with TPU chips) or `JAX_PLATFORMS=cpu`, on glibc, unless the
environment tunes malloc itself (`MALLOC_*`, `GLIBC_TUNABLES`) or sets
`PIXELDANCE_HOST_MALLOC=default`. It must run before JAX starts its threads.
"""

import ctypes
import ctypes.util
import glob
import importlib.metadata
import os
import platform

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_KEEP_FREE_BYTES = 2**31 - 1  # mallopt takes an int.
_GPU_PLUGINS = ("jax-cuda", "jax_cuda", "jax-rocm", "jax_rocm")
_applied = False


def tpu_attached() -> bool:
  """Whether this host has TPU chips (their device files; a CPU host may still have libtpu, to
  compile for TPUs ahead of time)."""
  return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def _accelerator_plugin_installed() -> bool:
  names = [(dist.metadata["Name"] or "").lower() for dist in importlib.metadata.distributions()]
  if any(name.startswith("libtpu") for name in names) and tpu_attached():
    return True
  return any(name.startswith(_GPU_PLUGINS) for name in names)


def quiet_libtpu() -> None:
  """On a host without TPU chips, tells an installed libtpu not to look for the cloud's TPU
  metadata (it would print a page of warnings at every JAX start), and lets several processes
  load it at once (a test suite's workers, ahead-of-time compiles). Before JAX starts."""
  if tpu_attached():
    return
  for name, value in (("TPU_SKIP_MDS_QUERY", "1"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"),
                      ("TPU_ACCELERATOR_TYPE", "v5p-8"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                      ("TPU_WORKER_ID", "0")):
    os.environ.setdefault(name, value)


def wanted() -> bool:
  """Whether this process should tune malloc (see the module docstring)."""
  env = os.environ
  if env.get("PIXELDANCE_HOST_MALLOC", "").lower() == "default":
    return False
  if any(key.startswith("MALLOC_") for key in env) or "malloc" in env.get("GLIBC_TUNABLES", ""):
    return False
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  platforms = env.get("JAX_PLATFORMS", "").lower()
  return platforms == "cpu" or (not platforms and not _accelerator_plugin_installed())


def reuse_freed_memory() -> bool:
  """Sets glibc's malloc to keep freed memory for reuse when `wanted()`; True if it did."""
  global _applied
  if _applied:
    return True
  if not wanted():
    return False
  libc = ctypes.CDLL(ctypes.util.find_library("c"))
  _applied = all(libc.mallopt(option, value) == 1 for option, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _KEEP_FREE_BYTES)))
  return _applied


def release_free_memory() -> None:
  """Returns the memory malloc holds free to the system (glibc's `malloc_trim`; nothing
  elsewhere): between ahead-of-time compiles, so that the next one does not start on top of
  the last one's peak."""
  if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
    ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
