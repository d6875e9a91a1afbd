"""PixelDance in JAX/Flax."""

from pixeldance_jax import threefry_cpu

threefry_cpu.register()  # The same random bits on the CPU, compiled faster (see the module).
