"""TFDS builder for generated moving-shape clips."""

from pixeldance_jax.data.builders.moving_shapes.moving_shapes_dataset_builder import MovingShapes
from pixeldance_jax.data.builders.moving_shapes.moving_shapes_dataset_builder import MovingShapesConfig
