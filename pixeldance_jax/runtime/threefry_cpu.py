"""Threefry-2x32 on the CPU as one straight-line hash: the same bits, compiled in half the time.

JAX lowers its random-bit hash on the CPU as a `while` loop of 5 iterations (4 rounds each), to
keep the program small; on GPUs and TPUs, as the 20 rounds written out. A loop per random draw
is costly to compile: XLA analyses and assigns buffers to each loop apart, and an initialiser
draws once per weight, so an initialiser compiles in about half the time written out
(docs/benchmarks.md). Written out, the hash is elementwise integer arithmetic that XLA fuses
into one loop over the counters, which also runs faster.

The function is the Threefry-2x32 of Salmon et al. (SC 2011) with 20 rounds, as JAX computes
it: the same key schedule and rotations, in uint32 arithmetic, so every bit is as before
(tests/test_threefry_cpu.py checks it against JAX's loop form and the published test vectors).
The commands register it (`console.run`); importing the package does not.
"""

import numpy as np
from jax.extend.random import threefry2x32_p
from jax.interpreters import mlir

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))  # Rounds 1-4, 9-12, 17-20; and 5-8, 13-16.
_PARITY = np.uint32(0x1BD11BDA)


def _rotate_left(x, distance: int):
  return (x << np.uint32(distance)) | (x >> np.uint32(32 - distance))


def threefry2x32(key1, key2, x1, x2):
  """The 20-round hash of the counter pairs `(x1, x2)` under the key `(key1, key2)`: uint32
  arrays that broadcast together. Returns the two output words."""
  keys = (key1, key2, key1 ^ key2 ^ _PARITY)
  x1, x2 = x1 + keys[0], x2 + keys[1]
  for group in range(5):  # Four rounds, then a key injection.
    for rotation in _ROTATIONS[group % 2]:
      x1 = x1 + x2
      x2 = _rotate_left(x2, rotation) ^ x1
    x1 = x1 + keys[(group + 1) % 3]
    x2 = x2 + keys[(group + 2) % 3] + np.uint32(group + 1)
  return x1, x2


def register() -> None:
  """Lower `threefry2x32_p` on the CPU with `threefry2x32` (idempotent; before compiling)."""
  mlir.register_lowering(threefry2x32_p, mlir.lower_fun(threefry2x32, multiple_results=True),
                         platform="cpu")
