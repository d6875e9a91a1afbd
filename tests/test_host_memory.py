"""host_memory: when malloc is tuned, and that XLA:CPU's per-run buffers then stop faulting."""

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from pixeldance_jax.runtime import host_memory

# A program whose intermediate (a [3072, 3072] float32 array, 36 MiB) lives in XLA's per-run
# buffer, above glibc's largest mmap threshold (32 MiB); it returns a scalar.
_RUNS = textwrap.dedent("""
    import json, resource, sys
    from pixeldance_jax.runtime import host_memory
    tuned = host_memory.reuse_freed_memory()
    import jax, jax.numpy as jnp
    x = jnp.ones((3072, 3072), jnp.float32)
    f = jax.jit(lambda x: jnp.sum(jnp.sin(x) @ x[:, :8]))
    for _ in range(10):  # The heap grows to its working shape over the first runs.
      f(x).block_until_ready()
    faults = []
    for _ in range(9):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      f(x).block_until_ready()
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({"tuned": tuned, "faults": sorted(faults)}))
""")
_PAGES = 3072 * 3072 * 4 // 4096  # The intermediate, in 4 KiB pages.
_GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
_MALLOC_SETTINGS = ("GLIBC_TUNABLES", "PIXELDANCE_HOST_MALLOC")  # And every MALLOC_* variable.


def _faults_per_run(env_update: dict[str, str]) -> dict:
  env = {k: v for k, v in os.environ.items()
         if not k.startswith("MALLOC_") and k not in _MALLOC_SETTINGS}
  env.update(env_update, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _RUNS], env=env, capture_output=True, text=True,
                       check=True, timeout=300)
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not _GLIBC, reason="glibc's malloc only")
def test_tuned_malloc_reuses_the_per_run_buffer_and_default_malloc_does_not():
  tuned = _faults_per_run({})
  default = _faults_per_run({"PIXELDANCE_HOST_MALLOC": "default"})
  assert tuned["tuned"] and not default["tuned"]
  # Default: every run maps its buffer afresh and faults in each page of it.
  assert default["faults"][4] >= _PAGES, default
  # Tuned: once the heap has grown to its working shape, a run gets the pages of the last one
  # back (the median run faults in < 10% of them; now and then the heap grows once more).
  assert tuned["faults"][4] < _PAGES // 10, tuned


@pytest.mark.parametrize("env,expected", [
    ({"JAX_PLATFORMS": "cpu"}, True),
    ({"JAX_PLATFORMS": "cpu", "PIXELDANCE_HOST_MALLOC": "default"}, False),
    ({"JAX_PLATFORMS": "cpu", "MALLOC_ARENA_MAX": "4"}, False),
    ({"JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": "glibc.malloc.mmap_max=0"}, False),
    ({"JAX_PLATFORMS": "cuda"}, False),
    ({"JAX_PLATFORMS": "tpu,cpu"}, False),
])
def test_tuning_is_wanted_only_for_the_cpu_backend_and_an_untuned_malloc(monkeypatch, env,
                                                                          expected):
  for key in list(os.environ):
    if key.startswith("MALLOC_") or key in _MALLOC_SETTINGS:
      monkeypatch.delenv(key)
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  assert host_memory.wanted() is (expected and _GLIBC)
