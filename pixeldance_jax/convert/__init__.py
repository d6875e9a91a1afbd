"""Pretrained weights into this project's parameter trees: `layouts` (diffusers / transformers
tensor names and layouts to Flax), `pretrained` (a model folder to an Orbax checkpoint) and the
command, `python -m pixeldance_jax.convert`."""
