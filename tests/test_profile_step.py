"""benchmarks/profile_step.py: XLA's profile mapped back to the operations of the program."""

import pytest
import pathlib
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import profile_step  # pylint: disable=wrong-import-position


@pytest.mark.slow
def test_profiled_operations_map_to_their_instructions_and_kinds():
  def program(x, kernel, weights):
    with jax.named_scope("UNet3D"):
      y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
      with jax.named_scope("ff"):
        return jnp.tanh(y.reshape(-1, y.shape[-1]) @ weights)

  args = (jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 8)), jnp.ones((8, 16)))
  compiled = jax.jit(program).lower(*args).compile()
  known = profile_step.instructions(compiled.as_text())
  kinds = {profile_step.kind(info) for info in known.values()}
  assert "U-Net forward: convolutions" in kinds, known
  assert "U-Net forward: matmuls" in kinds, known

  timed = profile_step.profile(lambda: jax.block_until_ready(compiled(*args)), steps=2)
  ran = [name for name in timed if name in known]
  assert any(known[name]["conv"] for name in ran), (sorted(timed), sorted(known))
