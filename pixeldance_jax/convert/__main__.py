"""Converts a diffusers / Hugging Face model folder into a PixelDance Orbax checkpoint.

  python -m pixeldance_jax.convert --config=configs/pixeldance.py --model_dir=/models/sd \
      --output=/ckpt/pixeldance_init

What the folder may hold and what happens to what it lacks: `convert.pretrained`.
"""

from absl import app, flags
from ml_collections import config_flags

from pixeldance_jax.cli import console
from pixeldance_jax.convert import pretrained
from pixeldance_jax.io import checkpoints

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config the weights must fit.",
                                          lock_config=True)
_MODEL_DIR = flags.DEFINE_string("model_dir", None, "diffusers / Hugging Face model folder.")
_OUTPUT = flags.DEFINE_string("output", None, "Directory for the converted checkpoint.")
_SEED = flags.DEFINE_integer("seed", 0, "Initialisation seed for what the folder lacks.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  converted = pretrained.convert(_CONFIG.value, _MODEL_DIR.value, _OUTPUT.value, _SEED.value)
  print(f"converted {', '.join(converted) or 'nothing'} -> "
        f"{checkpoints.checkpoint_dir(_OUTPUT.value)}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "model_dir", "output"])
  console.run(main)
