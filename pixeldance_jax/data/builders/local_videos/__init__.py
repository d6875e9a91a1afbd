"""TFDS builder for a local collection of captioned videos (a folder, or a WebVid-style CSV)."""

from pixeldance_jax.data.builders.local_videos.local_videos_dataset_builder import LocalVideos
from pixeldance_jax.data.builders.local_videos.local_videos_dataset_builder import LocalVideosConfig
