"""TFDS builder for a local folder of captioned images (joint image training)."""

from pixeldance_jax.data.builders.local_images.local_images_dataset_builder import LocalImages
from pixeldance_jax.data.builders.local_images.local_images_dataset_builder import LocalImagesConfig
