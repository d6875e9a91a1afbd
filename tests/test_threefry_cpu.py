"""The CPU's written-out Threefry hash (pixeldance_jax/runtime/threefry_cpu.py) gives JAX's bits."""

import jax
import jax.numpy as jnp
import numpy as np
from jax._src.random import threefry2x32 as jax_threefry  # JAX's own loop form, the reference.
from jax.extend.random import threefry2x32_p, threefry_2x32

import pixeldance_jax  # noqa: F401  # Registers the lowering.
from pixeldance_jax.runtime import threefry_cpu

# Random123's known answers for Threefry-2x32 with 20 rounds: (key, counter) -> output.
KNOWN_ANSWERS = [
    ((0x00000000, 0x00000000), (0x00000000, 0x00000000), (0x6b200159, 0x99ba4efe)),
    ((0xffffffff, 0xffffffff), (0xffffffff, 0xffffffff), (0x1cb996fc, 0xbb002be7)),
    ((0x13198a2e, 0x03707344), (0x243f6a88, 0x85a308d3), (0xc4923a9c, 0x483df7a0)),
]


def test_compiled_hash_gives_the_published_answers():
  hash_pair = jax.jit(threefry_2x32)
  for key, counter, expected in KNOWN_ANSWERS:
    found = hash_pair(np.uint32(key), np.uint32(counter))
    assert [int(word) for word in found] == list(expected), (key, counter)


def test_compiled_hash_equals_jax_loop_form_bit_for_bit():
  rng = np.random.default_rng(0)
  key1, key2 = (np.uint32(word) for word in rng.integers(0, 2**32, 2))
  x1, x2 = rng.integers(0, 2**32, (2, 1001), dtype=np.uint32)
  expected = jax_threefry._threefry2x32_lowering(key1, key2, jnp.asarray(x1), jnp.asarray(x2),
                                                 use_rolled_loops=True)
  found = jax.jit(lambda *words: threefry2x32_p.bind(*words))(
      jnp.full_like(x1, key1), jnp.full_like(x1, key2), x1, x2)
  for word, (want, got) in enumerate(zip(expected, found)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=f"word {word}")


def test_random_draws_lower_without_a_loop():
  """The registration took (at the package's import), and registering again changes nothing."""
  draw = lambda key: jax.random.normal(key, (8, 8))
  for _ in range(2):
    assert "stablehlo.while" not in jax.jit(draw).lower(jax.random.key(0)).as_text()
    threefry_cpu.register()
