"""TFDS dataset builders (array_record output, no TensorFlow needed)."""
