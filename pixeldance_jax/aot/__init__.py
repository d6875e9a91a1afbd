"""Compiling the trainer's and sampler's programs for TPU slices ahead of time, on any host
(`python -m pixeldance_jax.aot`; docs/tpu.md)."""
