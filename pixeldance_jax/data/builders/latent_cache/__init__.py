"""TFDS builder for pre-encoded VAE latent moments and text embeddings (see data/cache.py)."""

from pixeldance_jax.data.builders.latent_cache.latent_cache_dataset_builder import LatentCache
from pixeldance_jax.data.builders.latent_cache.latent_cache_dataset_builder import LatentCacheConfig
