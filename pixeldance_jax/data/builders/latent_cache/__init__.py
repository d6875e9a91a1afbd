"""TFDS builder for pre-encoded VAE latent moments and text embeddings.

Written by `train/latent_cache.py` (which owns the encoders), read by `data/cache.py`.
"""

from pixeldance_jax.data.builders.latent_cache.latent_cache_dataset_builder import LatentCache
from pixeldance_jax.data.builders.latent_cache.latent_cache_dataset_builder import LatentCacheConfig
