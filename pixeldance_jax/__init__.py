"""PixelDance in JAX/Flax."""
